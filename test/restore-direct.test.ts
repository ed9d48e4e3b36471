/**
 * A plain restore to a file writes around the page cache (O_DIRECT) when it flushes at the end: nothing is
 * copied into the page cache only to be written out by the final fsync. The result is the same byte for byte
 * (odd sizes, holes, repeated blocks), also where the filesystem refuses O_DIRECT (tmpfs), and --no-sync
 * still writes through the page cache (its writes need not reach the disk).
 */
import { after, before, describe, test } from 'node:test';
import * as assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { BACKY, makeTestRepo, runBacky, TestRepo } from './helpers/cli';
import { sha256File } from './helpers/images';
import { PAGE_CACHE_WRITE } from '../src/util/fd-io';

// Larger than PAGE_CACHE_WRITE and than the O_DIRECT staging buffers (1 MiB), so the tests can tell a write from its pieces.
const BS = 2 * 1024 * 1024;

/**
 * The writes to `file` while `args` ran: the most in flight at once (strace -f: a pwrite64 another thread's
 * syscall interrupts is printed `<unfinished ...>` and later `<... pwrite64 resumed>`) and the largest.
 */
function writesTo(cfg: string, args: string[], file: string, log: string): { inFlight: number; largest: number; threads: number; mainThread: boolean } {
  execFileSync('strace', ['-f', '-y', '-qq', '-s', '0', '-e', 'trace=execve,pwrite64', '-o', log, process.execPath, BACKY, '-c', cfg, ...args], { stdio: 'ignore' });
  const open = new Set<string>();
  const threads = new Set<string>();
  let inFlight = 0;
  let largest = 0;
  const lines = fs.readFileSync(log, 'utf8').split('\n');
  // The process's own id is its main thread's: the first line of the log is its execve.
  assert.match(lines[0], /execve\(/);
  const main = lines[0].split(' ')[0];
  for (const line of lines) {
    const pid = line.split(' ')[0];
    if (line.includes(`pwrite64(`) && line.includes(`<${file}>`)) {
      threads.add(pid);
      inFlight = Math.max(inFlight, open.size + 1);
      // pwrite64(fd<path>, ""..., LENGTH, OFFSET
      largest = Math.max(largest, Number(/"(?:\.\.\.)?, (\d+), \d+/.exec(line)![1]));
      if (line.endsWith('<unfinished ...>')) open.add(pid);
    } else if (line.includes('<... pwrite64 resumed>')) open.delete(pid);
  }
  return { inFlight, largest, threads: threads.size, mainThread: threads.size === 1 && threads.has(main) };
}

/** Bytes of `file` in the page cache (util-linux fincore). */
function cached(file: string): number {
  return Number(execFileSync('fincore', ['-b', '-n', '-o', 'RES', file]).toString().trim());
}

describe('restore to a file with O_DIRECT', () => {
  let repo: TestRepo;
  let img: string;
  let uid: string;
  let dataBytes = 0;
  const shm = fs.mkdtempSync('/dev/shm/backy-direct-');

  before(async () => {
    repo = makeTestRepo('', { blockSize: BS });
    await repo.ok(['initdb']);
    // 9 distinct data blocks, 2 zero blocks, one repeat of block 0, and a tail of 513 bytes.
    img = path.join(repo.dir, 'img');
    const blocks = [...Array.from({ length: 5 }, () => randomBytes(BS)), Buffer.alloc(BS), ...Array.from({ length: 4 }, () => randomBytes(BS)), Buffer.alloc(BS)];
    blocks.push(blocks[0], randomBytes(513));
    fs.writeFileSync(img, Buffer.concat(blocks));
    dataBytes = 10 * BS + 513;
    uid = (await repo.ok(['backup', `file://${img}`, 'direct'])).stdout.trim();
  });

  after(() => {
    repo.cleanup();
    fs.rmSync(shm, { recursive: true, force: true });
  });

  test('the default restore is byte-identical and leaves (almost) nothing in the page cache', async () => {
    const out = path.join(repo.dir, 'out.img');
    await repo.ok(['restore', uid, `file://${out}`]);
    // Written (and the repeated block read back) around the page cache: only the tail is there.
    const res = cached(out);
    assert.ok(res <= 8192, `${res} bytes of the restored file are in the page cache (of ${dataBytes} written)`);
    assert.equal(sha256File(out), sha256File(img));
    assert.equal(fs.statSync(out).blocks * 512 >= 12 * BS, true, 'all space allocated');
  });

  test('-s keeps the holes, byte-identical', async () => {
    const out = path.join(repo.dir, 'sparse.img');
    await repo.ok(['restore', '-s', uid, `file://${out}`]);
    assert.ok(cached(out) <= 8192, `${cached(out)} bytes in the page cache`);
    assert.equal(sha256File(out), sha256File(img));
    // The data and the tail's page, and room for an extent tree block or two (a zero block would be BS more).
    assert.ok(fs.statSync(out).blocks * 512 <= 10 * BS + 16384, `the zero blocks are holes (${fs.statSync(out).blocks * 512} bytes allocated)`);
  });

  test('--no-sync writes through the page cache', async () => {
    const out = path.join(repo.dir, 'nosync.img');
    await repo.ok(['restore', '--no-sync', uid, `file://${out}`]);
    assert.ok(cached(out) >= 9 * BS, 'the data is in the page cache');
    assert.equal(sha256File(out), sha256File(img));
  });

  test('--no-sync writes to the page cache one at a time, PAGE_CACHE_WRITE at most, from the main thread; O_DIRECT writes overlap, a block at once', async () => {
    // Buffered writers of one file in parallel contend for its inode lock, and the kernel spins for it: a
    // 2 GiB restore took 6.5 s with 8.6 s of system CPU that way, 1.7 s one write at a time. Writes larger
    // than PAGE_CACHE_WRITE took large folios, slow to fill on the benchmark VM (see fd-io.ts).
    const buffered = path.join(repo.dir, 'serial.img');
    const direct = path.join(repo.dir, 'parallel.img');
    // The same count run with O_DIRECT, whose writes may overlap, shows the count sees overlaps at all.
    let d = { inFlight: 0, largest: 0, threads: 0, mainThread: false };
    for (let i = 0; i < 5 && d.inFlight < 2; i++) {
      fs.rmSync(direct, { force: true });
      d = writesTo(repo.cfg, ['restore', uid, `file://${direct}`], direct, path.join(repo.dir, 'direct.strace'));
    }
    assert.ok(d.inFlight >= 2, `O_DIRECT writes overlapped (${d.inFlight} at most in flight)`);
    assert.equal(d.largest, BS, 'an O_DIRECT write is a whole block, from where it was decoded');
    assert.ok(d.threads >= 2, `O_DIRECT writes come from the thread pool (${d.threads} threads)`);
    // Page-cache writes: one at a time, in pieces, made by the main thread itself (blockingWrites) rather than
    // handed to the thread pool piece by piece.
    assert.deepEqual(writesTo(repo.cfg, ['restore', '--no-sync', uid, `file://${buffered}`], buffered, path.join(repo.dir, 'buffered.strace')),
      { inFlight: 1, largest: PAGE_CACHE_WRITE, threads: 1, mainThread: true });
    assert.equal(sha256File(buffered), sha256File(img));
    assert.equal(sha256File(direct), sha256File(img));
  });

  test('without the native module the space is allocated all the same (util-linux fallocate), byte-identical', async () => {
    const out = path.join(repo.dir, 'plain-js.img');
    const r = await runBacky(['-c', repo.cfg, 'restore', uid, `file://${out}`], { env: { ...process.env, BACKY_NATIVE: '0' } });
    assert.equal(r.code, 0, r.stderr);
    assert.equal(sha256File(out), sha256File(img));
    assert.ok(fs.statSync(out).blocks * 512 >= 12 * BS, 'all space allocated');
  });

  test('a target filesystem that fills up: one line with the offset and ENOSPC, exit 1, with and without --no-sync', async () => {
    const small = fs.mkdtempSync(path.join(repo.dir, 'small-'));
    execFileSync('mount', ['-t', 'tmpfs', '-o', `size=${2 * BS}`, 'tmpfs', small]);
    try {
      for (const args of [['--no-sync'], ['-s'], []]) {
        const out = path.join(small, 'out.img');
        fs.rmSync(out, { force: true });
        const r = await repo.run(['restore', ...args, uid, `file://${out}`]);
        assert.equal(r.code, 1, `${args.join(' ')}: ${r.stderr}`);
        const errors = r.stderr.split('\n').filter((l) => l.startsWith('ERROR'));
        assert.equal(errors.length, 1, r.stderr);
        assert.match(errors[0], /^ERROR: cannot write target \S+ at offset \d+: ENOSPC$/);
        assert.doesNotMatch(r.stderr, /\n\s+at /, 'no stack trace');
      }
    } finally {
      execFileSync('umount', [small]);
    }
  });

  test('a filesystem without O_DIRECT (tmpfs) gets the same bytes', async () => {
    const out = path.join(shm, 'out.img');
    await repo.ok(['restore', uid, `file://${out}`]);
    assert.equal(sha256File(out), sha256File(img));
  });
});
