/**
 * `restore --live` and `restore --delta`, end to end with the CLI in child processes and Debian's NBD
 * clients: reads and writes while the copy runs (storage throttled so the copy takes seconds), kill -9 and
 * --continue without losing an acknowledged write, a guest-like workload (ext4 in the export through
 * nbdfuse and a loop device), and delta restores that write exactly the blocks that differ (pwrite calls
 * counted with strace).
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { ChildProcess, spawn } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { BACKY, makeTestRepo, runBacky, TestRepo, writeImage } from './helpers/cli';
import { NBDSH_ENV, run, waitFor } from './helpers/nbd-tools';

const KiB = 1024;
const MiB = 1024 * KiB;
const BS = MiB;
const SIZE = 24 * MiB;
const sha256 = (b: Buffer) => createHash('sha256').update(b).digest('hex');
const root = process.geteuid?.() === 0;

interface LiveProcess {
  child: ChildProcess;
  events: Record<string, unknown>[];
  stderr(): string;
  port: number;
  uri: string;
  exited: Promise<number>;
  /** The first event of this kind (waits for it). */
  event(kind: string, timeoutMs?: number): Promise<Record<string, unknown>>;
}

/** Starts `backy --json restore --live -p 0 ARGS` and waits for its "serving" event. */
async function startLive(cfg: string, args: string[]): Promise<LiveProcess> {
  const child = spawn(process.execPath, [BACKY, '-c', cfg, '--json', 'restore', '--live', '-p', '0', ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  const reap = () => child.kill('SIGKILL');
  process.once('exit', reap);
  const events: Record<string, unknown>[] = [];
  let out = '';
  let err = '';
  child.stdout!.on('data', (d) => {
    out += d;
    let nl: number;
    while ((nl = out.indexOf('\n')) >= 0) {
      const line = out.slice(0, nl);
      out = out.slice(nl + 1);
      if (line.trim()) events.push(JSON.parse(line) as Record<string, unknown>);
    }
  });
  child.stderr!.on('data', (d) => (err += d));
  const exited = new Promise<number>((resolve) => child.on('exit', (code, signal) => {
    process.off('exit', reap);
    resolve(code ?? (signal === 'SIGKILL' ? 137 : 143));
  }));
  let gone = false;
  void exited.then(() => (gone = true));
  const event = async (kind: string, timeoutMs = 120_000) => {
    const ok = await waitFor(() => gone || events.some((e) => e.event === kind), timeoutMs);
    const e = events.find((x) => x.event === kind);
    if (!ok || !e) throw new Error(`no "${kind}" event (exited: ${gone}): ${err}`);
    return e;
  };
  const serving = await event('serving', 60_000);
  const port = Number(/:(\d+)$/.exec(String(serving.address))![1]);
  return { child, events, stderr: () => err, port, uri: `nbd://127.0.0.1:${port}/${String(serving.export)}`, exited, event };
}

async function python(script: string, args: string[]): Promise<string> {
  const r = await run('/usr/bin/python3', ['-c', script, ...args], { env: NBDSH_ENV, timeoutMs: 120_000 });
  assert.equal(r.code, 0, `python: ${r.stdout}${r.stderr}`);
  return r.stdout;
}

/** Applies the writes a client script made, as a list of [offset, hex byte, length] (byte -1: zeroes). */
function apply(model: Buffer, writes: [number, number, number][]): void {
  for (const [off, byte, len] of writes) model.fill(byte < 0 ? 0 : byte, off, off + len);
}

describe('restore --live and --delta', () => {
  let repo: TestRepo;
  let image: string;
  let original: Buffer;
  let uid: string;
  /** The same repository with storage reads throttled to 1 MiB/s: a live restore then takes seconds. */
  let slowCfg: string;

  before(async () => {
    repo = makeTestRepo('[DEFAULTS]\noverlay_dir = overlays', { blockSize: BS });
    await repo.ok(['initdb']);
    image = path.join(repo.dir, 'disk.img');
    writeImage(image, SIZE, 'mixed', 11);
    original = fs.readFileSync(image);
    uid = (await repo.ok(['backup', `file://${image}`, 'disk'])).stdout.trim();
    slowCfg = path.join(repo.dir, 'slow.cfg');
    fs.writeFileSync(slowCfg, `${fs.readFileSync(repo.cfg, 'utf8')}\n[DataBackend]\nbandwidth_read = 1M\nsimultaneous_reads = 4\n`);
  });
  after(() => repo?.cleanup());

  test('reads during the copy return the version, writes, zeroes and trims during the copy survive it; the target ends as version + writes', async () => {
    const target = path.join(repo.dir, 'live1.img');
    const live = await startLive(slowCfg, [uid, `file://${target}`]);
    let code: number;
    const writes: [number, number, number][] = [
      [21 * MiB, 0xa1, MiB], // a whole block, not restored yet: handed over without a restore
      [22 * MiB + 300, 0xa2, 5000], // part of a block: restored first, then written
      [17 * MiB - 2000, 0xa3, 4000], // across a block boundary
      [0, 0xa4, 512], // the first block, probably restored by now
      [18 * MiB, -1, MiB], // write_zeroes of a whole block
    ];
    try {
      const out = await python(`
import nbd, sys, hashlib
h = nbd.NBD(); h.set_strict_mode(h.get_strict_mode() & ~nbd.STRICT_ALIGN); h.connect_uri(sys.argv[1])
for off, ln in ((20 << 20, 1 << 20), ((23 << 20) + 100, 70000), ((5 << 20) - 10, 20)):
    print("R", off, ln, hashlib.sha256(h.pread(ln, off)).hexdigest())
h.pwrite(b"\\xa1" * (1 << 20), 21 << 20)
h.pwrite(b"\\xa2" * 5000, (22 << 20) + 300)
h.pwrite(b"\\xa3" * 4000, (17 << 20) - 2000)
h.pwrite(b"\\xa4" * 512, 0)
h.zero(1 << 20, 18 << 20)
h.trim(1 << 20, 19 << 20)
assert h.pread(5000, (22 << 20) + 300) == b"\\xa2" * 5000
assert h.pread(1 << 20, 21 << 20) == b"\\xa1" * (1 << 20)
assert h.pread(1 << 20, 18 << 20) == bytes(1 << 20)
print("OK")
`, [live.uri]);
      // The client is done while the copy still runs: what it read came from blocks restored on demand.
      assert.ok(!live.events.some((e) => e.event === 'complete'), `the copy finished before the client: ${JSON.stringify(live.events)}`);
      const progress = live.events.filter((e) => e.event === 'progress');
      assert.ok(progress.length === 0 || Number(progress[progress.length - 1].done_bytes) < SIZE);
      for (const line of out.trim().split('\n').filter((l) => l.startsWith('R '))) {
        const [, off, len, hash] = line.split(' ');
        assert.equal(hash, sha256(original.subarray(Number(off), Number(off) + Number(len))), `read ${off}+${len} during the copy`);
      }
      assert.match(out, /OK/);
      const done = await live.event('complete', 180_000);
      assert.equal(done.errors, 0);
    } finally {
      live.child.kill('SIGTERM');
      code = await live.exited;
    }
    assert.equal(code, 0, live.stderr());
    const stopped = live.events.find((e) => e.event === 'stopped')!;
    assert.equal(stopped.complete, true);
    assert.ok(!fs.existsSync(`${target}.backy-live`), 'the progress map is removed once complete');
    const model = Buffer.from(original);
    apply(model, writes);
    const got = fs.readFileSync(target);
    // The trimmed block may read as the version's data or as zeroes; everything else is exact.
    const trimmed = got.subarray(19 * MiB, 20 * MiB);
    assert.ok(trimmed.equals(original.subarray(19 * MiB, 20 * MiB)) || trimmed.every((b) => b === 0), 'trimmed block');
    model.set(trimmed, 19 * MiB);
    assert.equal(sha256(got), sha256(model), 'target = version + writes');
  });

  test('kill -9 in the middle, then --continue: no acknowledged write is lost (flushed or not), restored blocks are not copied again', async () => {
    const target = path.join(repo.dir, 'live2.img');
    const live = await startLive(slowCfg, [uid, `file://${target}`]);
    const writes: [number, number, number][] = [[23 * MiB, 0xb1, MiB], [15 * MiB + 4096, 0xb2, 8192], [0, 0xb3, 100]];
    try {
      // Let a checkpoint record some restored blocks first.
      await waitFor(() => live.events.some((e) => e.event === 'progress' && Number(e.done_bytes) >= 4 * MiB), 60_000);
      await new Promise((r) => setTimeout(r, 2500));
      await python(`
import nbd, sys
h = nbd.NBD(); h.set_strict_mode(h.get_strict_mode() & ~nbd.STRICT_ALIGN); h.connect_uri(sys.argv[1])
h.pwrite(b"\\xb1" * (1 << 20), 23 << 20)
h.pwrite(b"\\xb2" * 8192, (15 << 20) + 4096)
h.pwrite(b"\\xb3" * 100, 0)
print("acked, no flush")
`, [live.uri]);
      assert.ok(!live.events.some((e) => e.event === 'complete'), 'killed before the copy finished');
    } finally {
      live.child.kill('SIGKILL');
      await live.exited;
    }
    assert.ok(fs.existsSync(`${target}.backy-live`), 'the progress map stays after a crash');
    // Starting over without --continue is refused: it would throw the progress (and the writes) away.
    const again = await runBacky(['-c', repo.cfg, 'restore', '--live', '-p', '0', '-f', uid, `file://${target}`]);
    assert.equal(again.code, 100, again.stderr);
    assert.match(again.stderr, /--continue/);

    const cont = await startLive(repo.cfg, ['--continue', '--exit-when-done', uid, `file://${target}`]);
    const serving = cont.events.find((e) => e.event === 'serving')!;
    assert.ok(Number(serving.done_bytes) >= 4 * MiB && Number(serving.done_bytes) < SIZE, `resumed at ${serving.done_bytes}`);
    assert.equal(await cont.exited, 0, cont.stderr());
    const stopped = cont.events.find((e) => e.event === 'stopped')!;
    assert.equal(stopped.complete, true);
    assert.ok(Number(stopped.copied_bytes) <= SIZE - Number(serving.done_bytes), `copied ${stopped.copied_bytes} after resuming at ${serving.done_bytes}`);
    assert.ok(!fs.existsSync(`${target}.backy-live`));
    const model = Buffer.from(original);
    apply(model, writes);
    assert.equal(sha256(fs.readFileSync(target)), sha256(model), 'target = version + every acknowledged write');
  });

  test('a guest-like workload: ext4 in the export through nbdfuse and a loop device, changed while the copy runs', { skip: !root && 'needs root' }, async () => {
    const fsImage = path.join(repo.dir, 'ext4.img');
    const tree = path.join(repo.dir, 'tree');
    fs.mkdirSync(tree, { recursive: true });
    fs.writeFileSync(path.join(tree, 'a.txt'), 'version\n');
    fs.writeFileSync(path.join(tree, 'big.bin'), randomBytes(8 * MiB));
    assert.equal((await run('mkfs.ext4', ['-q', '-F', '-d', tree, fsImage, '32M'])).code, 0);
    const fsUid = (await repo.ok(['backup', `file://${fsImage}`, 'fs'])).stdout.trim();
    const target = path.join(repo.dir, 'live3.img');
    const fuseDir = path.join(repo.dir, 'nbdfuse');
    const mnt = path.join(repo.dir, 'mnt');
    fs.mkdirSync(fuseDir);
    fs.mkdirSync(mnt);
    // 8 MiB of random data at 1 MiB/s: the guest starts while the copy runs.
    const live = await startLive(slowCfg, [fsUid, `file://${target}`]);
    let fuse: ChildProcess | undefined;
    let loop = '';
    const added = randomBytes(2 * MiB);
    fs.writeFileSync(path.join(repo.dir, 'added.bin'), added);
    try {
      const pidfile = path.join(repo.dir, 'nbdfuse.pid');
      fuse = spawn('nbdfuse', ['-P', pidfile, `${fuseDir}/disk`, live.uri], { stdio: 'ignore' });
      assert.ok(await waitFor(() => fs.existsSync(pidfile), 30_000), 'nbdfuse started');
      const l = await run('losetup', ['-f', '--show', `${fuseDir}/disk`]);
      assert.equal(l.code, 0, l.stderr);
      loop = l.stdout.trim();
      const mounted = await run('mount', [loop, mnt]);
      assert.equal(mounted.code, 0, mounted.stderr);
      assert.ok(!live.events.some((e) => e.event === 'complete'), 'the guest mounted its filesystem while the copy was still going');
      const work = await run('sh', ['-c', `echo guest > ${mnt}/a.txt && rm ${mnt}/big.bin && cp ${repo.dir}/added.bin ${mnt}/added.bin && sync`]);
      assert.equal(work.code, 0, `${work.stderr}\n${live.stderr()}`);
      assert.equal((await run('umount', [mnt])).code, 0);
    } catch (e) {
      live.child.kill('SIGKILL');
      throw e;
    } finally {
      await run('umount', [mnt]);
      if (loop) await run('losetup', ['-d', loop]);
      await run('fusermount3', ['-u', fuseDir]);
      if (fuse && fuse.exitCode === null) await new Promise((r) => fuse!.once('exit', r));
    }
    try {
      await live.event('complete', 120_000);
    } finally {
      live.child.kill('SIGTERM');
    }
    assert.equal(await live.exited, 0, live.stderr());
    const fsck = await run('fsck.ext4', ['-f', '-n', target]);
    assert.equal(fsck.code, 0, `fsck: ${fsck.stdout}`);
    assert.equal((await run('debugfs', ['-R', 'cat /a.txt', target])).stdout, 'guest\n');
    const got = await new Promise<Buffer>((resolve) => {
      const c = spawn('debugfs', ['-R', 'cat /added.bin', target], { stdio: ['ignore', 'pipe', 'ignore'] });
      const parts: Buffer[] = [];
      c.stdout.on('data', (d: Buffer) => parts.push(d));
      c.on('close', () => resolve(Buffer.concat(parts)));
    });
    assert.ok(got.equals(added), 'the file the guest added');
    assert.doesNotMatch((await run('debugfs', ['-R', 'ls /', target])).stdout, /big\.bin/);
  });

  test('live restore onto a block device keeps its progress map in overlay_dir', { skip: !root && 'needs root for loop devices' }, async () => {
    const backing = path.join(repo.dir, 'blockdev.img');
    fs.writeFileSync(backing, randomBytes(SIZE + MiB)); // old data everywhere, and larger than the version
    const l = await run('losetup', ['-f', '--show', backing]);
    assert.equal(l.code, 0, l.stderr);
    const dev = l.stdout.trim();
    try {
      const live = await startLive(repo.cfg, ['-f', '--exit-when-done', uid, `file://${dev}`]);
      const serving = live.events.find((e) => e.event === 'serving')!;
      assert.equal(path.dirname(String(serving.state)), path.join(repo.dir, 'overlays'));
      assert.equal(await live.exited, 0, live.stderr());
      assert.ok(!fs.existsSync(String(serving.state)), 'removed once complete');
    } finally {
      await run('losetup', ['-d', dev]);
    }
    const got = fs.readFileSync(backing);
    assert.equal(sha256(got.subarray(0, SIZE)), sha256(original), 'the version, holes written as zeroes over the old data');
  });

  test('delta restore of a target differing in 2 blocks writes exactly those 2 (pwrite calls counted) and ends byte-identical; -s punches a hole', async () => {
    const target = path.join(repo.dir, 'delta.img');
    const changed = Buffer.from(original);
    randomBytes(BS).copy(changed, 3 * BS); // a data block, different
    assert.ok(original.subarray(4 * BS, 5 * BS).every((b) => b === 0), 'block 4 is a hole in the version');
    randomBytes(BS).copy(changed, 4 * BS); // a hole block, holding data in the target
    fs.writeFileSync(target, changed);
    const trace = path.join(repo.dir, 'delta.strace');
    const r = await run('strace', ['-f', '-y', '-s', '0', '-e', 'trace=pwrite64', '-o', trace, process.execPath, BACKY, '-c', repo.cfg, '--json', 'restore', '--delta', uid, `file://${target}`], { timeoutMs: 120_000 });
    assert.equal(r.code, 0, r.stderr);
    const stats = JSON.parse(r.stdout.slice(r.stdout.indexOf('{'))) as Record<string, number>;
    assert.equal(stats.blocksCompared, SIZE / BS);
    assert.equal(stats.blocksWritten + stats.blocksRepeated + stats.blocksZeroed, 2, JSON.stringify(stats));
    assert.equal(stats.blocksUnchanged, SIZE / BS - 2);
    // Written to the target (in pieces of PAGE_CACHE_WRITE): the two blocks, nothing else.
    const writes = fs.readFileSync(trace, 'utf8').split('\n').filter((l) => l.includes(`pwrite64(`) && l.includes(`<${target}>`));
    // pwrite64(fd<path>, ""..., LENGTH, OFFSET) = ..., or ... OFFSET <unfinished ...>
    const args = writes.map((l) => /, (\d+), (\d+)(?:\)| <unfinished)/.exec(l)!.slice(1).map(Number));
    const blocksWritten = new Set(args.map(([, offset]) => Math.floor(offset / BS)));
    const bytes = args.reduce((n, [length]) => n + length, 0);
    assert.deepEqual([...blocksWritten].sort(), [3, 4], writes.join('\n'));
    assert.equal(bytes, 2 * BS);
    assert.equal(sha256(fs.readFileSync(target)), sha256(original), 'byte-identical');

    // -s: the hole is punched rather than written.
    fs.writeFileSync(target, changed);
    const before = fs.statSync(target).blocks;
    const s = JSON.parse((await repo.ok(['--json', 'restore', '--delta', '-s', uid, `file://${target}`])).stdout) as Record<string, number>;
    assert.equal(s.blocksZeroed, 1);
    assert.equal(sha256(fs.readFileSync(target)), sha256(original));
    assert.ok(fs.statSync(target).blocks <= before - (BS / 512) * 0.9, `block 4 deallocated (${before} -> ${fs.statSync(target).blocks} sectors)`);
  });

  test('delta restore --from-version reads only the blocks the two versions do not share', async () => {
    const next = Buffer.from(original);
    randomBytes(BS).copy(next, 6 * BS);
    randomBytes(1000).copy(next, 9 * BS + 5);
    const nextImage = path.join(repo.dir, 'next.img');
    fs.writeFileSync(nextImage, next);
    const uid2 = (await repo.ok(['backup', '-f', uid, `file://${nextImage}`, 'disk'])).stdout.trim();
    const target = path.join(repo.dir, 'older.img');
    await repo.ok(['restore', uid, `file://${target}`]);
    const s = JSON.parse((await repo.ok(['--json', 'restore', '--delta', '--from-version', uid, uid2, `file://${target}`])).stdout) as Record<string, number>;
    assert.equal(s.blocksCompared, 2, JSON.stringify(s));
    assert.equal(s.blocksSkippedByBase, SIZE / BS - 2);
    assert.equal(s.blocksWritten + s.blocksRepeated + s.blocksZeroed, 2);
    assert.equal(sha256(fs.readFileSync(target)), sha256(next));
  });

  test('bad use: --continue without a progress map, --live onto an NBD target, --delta onto a missing file', async () => {
    const nothing = await repo.run(['restore', '--live', '--continue', '-p', '0', uid, `file://${repo.dir}/none.img`]);
    assert.equal(nothing.code, 1, nothing.stderr);
    assert.match(nothing.stderr, /nothing to continue/);
    const nbdTarget = await repo.run(['restore', '--live', '-p', '0', uid, 'nbd://127.0.0.1:1/x']);
    assert.equal(nbdTarget.code, 2, nbdTarget.stderr);
    const missing = await repo.run(['restore', '--delta', uid, `file://${repo.dir}/missing.img`]);
    assert.equal(missing.code, 1, missing.stderr);
    assert.match(missing.stderr, /does not exist/);
    const stray = await repo.run(['restore', '--continue', uid, `file://${repo.dir}/x.img`]);
    assert.equal(stray.code, 2);
    for (const r of [nothing, nbdTarget, missing, stray]) assert.doesNotMatch(r.stderr, /\n\s+at /, 'no stack trace');
  });
});
