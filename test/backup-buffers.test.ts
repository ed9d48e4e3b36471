/**
 * A backup keeps few block buffers: a block holds one from its read until it is encoded, and reads wait for
 * one rather than allocate more, however far the stores queue. Memory touched for the first time is dear on
 * some VMs, so this bound is what keeps a backup of compressible data fast there.
 */
import { after, before, test } from 'node:test';
import * as assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { randomBytes } from 'node:crypto';
import { makeTestRepo, restoredHash, TestRepo } from './helpers/cli';
import { sha256File } from './helpers/images';

const BS = 1024 * 1024;
let repo: TestRepo;

before(async () => {
  // One worker: it compresses far slower than the file is read, so reads run ahead of it.
  repo = makeTestRepo('[DEFAULTS]\nworkers = 1', { blockSize: BS });
  await repo.ok(['initdb']);
});
after(() => repo.cleanup());

test('reads wait for one of at most 3 block buffers (1 worker, a file source), and the data round-trips', async () => {
  const img = path.join(repo.dir, 'text.img');
  // Distinct blocks of base64 text: every one is compressed and stored, none is zero or a duplicate.
  const fd = fs.openSync(img, 'w');
  for (let i = 0; i < 32; i++) fs.writeSync(fd, Buffer.from(randomBytes(BS).toString('base64').slice(0, BS)));
  fs.closeSync(fd);
  const b = await repo.ok(['-v', 'backup', `file://${img}`, 'text']);
  const m = /backup: (\d+) block buffers \(reads waited for one (\d+) times\), (\d+) blob buffers/.exec(b.stderr);
  assert.ok(m, b.stderr);
  const [buffers, waits, blobs] = m.slice(1).map(Number);
  assert.ok(waits > 0, `the reads ran ahead of the worker and had to wait (${waits} waits)`);
  assert.ok(buffers <= 3, `${buffers} block buffers`);
  assert.ok(blobs >= 1);
  const uid = b.stdout.trim();
  assert.equal(await restoredHash(repo, uid), sha256File(img));
});
