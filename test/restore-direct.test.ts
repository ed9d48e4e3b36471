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
import { makeTestRepo, TestRepo } from './helpers/cli';
import { sha256File } from './helpers/images';

const BS = 1024 * 1024;

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
    assert.ok(cached(out) <= 8192);
    assert.equal(sha256File(out), sha256File(img));
    assert.ok(fs.statSync(out).blocks * 512 <= 10 * BS + 4096, 'the zero blocks are holes');
  });

  test('--no-sync writes through the page cache', async () => {
    const out = path.join(repo.dir, 'nosync.img');
    await repo.ok(['restore', '--no-sync', uid, `file://${out}`]);
    assert.ok(cached(out) >= 9 * BS, 'the data is in the page cache');
    assert.equal(sha256File(out), sha256File(img));
  });

  test('a filesystem without O_DIRECT (tmpfs) gets the same bytes', async () => {
    const out = path.join(shm, 'out.img');
    await repo.ok(['restore', uid, `file://${out}`]);
    assert.equal(sha256File(out), sha256File(img));
  });
});
