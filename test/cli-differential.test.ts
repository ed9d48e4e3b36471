import { after, before, describe, test } from 'node:test';
import * as assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { randomBytes } from 'node:crypto';
import { makeTestRepo, TestRepo, writeImage } from './helpers/cli';
import { sha256File } from './helpers/images';

const MiB = 1024 * 1024;
const BS = 4 * MiB;

function overwrite(file: string, offset: number, data: Buffer): void {
  const fd = fs.openSync(file, 'r+');
  fs.writeSync(fd, data, 0, data.length, offset);
  fs.closeSync(fd);
}

describe('differential backups', () => {
  let repo: TestRepo;
  let img: string;
  let base: string;
  before(async () => {
    repo = makeTestRepo();
    await repo.ok(['initdb']);
    img = path.join(repo.dir, 'disk.img');
    writeImage(img, 24 * BS + 777, 'random');
    base = (await repo.ok(['backup', `file://${img}`, 'disk'])).stdout.trim();
  });
  after(() => repo.cleanup());

  test('-f without hints reads everything, stores only the changed blocks', async () => {
    overwrite(img, 5 * BS + 10, randomBytes(100));
    const r = JSON.parse((await repo.ok(['--json', 'backup', '-f', base, `file://${img}`, 'disk'])).stdout);
    assert.equal(r.blocksRead, 25);
    assert.equal(r.blocksWritten, 1);
    const out = path.join(repo.dir, 'out1');
    await repo.ok(['restore', r.uid, `file://${out}`]);
    assert.equal(sha256File(out), sha256File(img));
    base = r.uid;
  });

  test('-f with rbd hints reads only hinted blocks and copies the rest from the base', async () => {
    overwrite(img, 2 * BS + 4096, randomBytes(8192)); // block 2
    overwrite(img, 9 * BS - 10, randomBytes(20)); // blocks 8 and 9
    overwrite(img, 20 * BS, Buffer.alloc(BS)); // block 20 zeroed (discard)
    const hints = [
      { offset: 2 * BS + 4096, length: 8192, exists: 'true' },
      { offset: 9 * BS - 10, length: 20, exists: 'true' },
      { offset: 20 * BS, length: BS, exists: 'false' },
    ];
    const hf = path.join(repo.dir, 'hints.json');
    fs.writeFileSync(hf, JSON.stringify(hints));
    const r = JSON.parse((await repo.ok(['--json', 'backup', '-f', base, '-r', hf, `file://${img}`, 'disk'])).stdout);
    assert.equal(r.blocksRead, 4, 'blocks 2, 8, 9 and 20 only');
    assert.equal(r.blocksSparse, 1);
    const out = path.join(repo.dir, 'out2');
    await repo.ok(['restore', r.uid, `file://${out}`]);
    assert.equal(sha256File(out), sha256File(img));
    await repo.ok(['scrub', r.uid]);
    base = r.uid;
  });

  test('hints that miss a change: sanity check fails with exit 5 and no new valid version', async () => {
    // Change every block, then claim only block 0 changed: any sampled unhinted block differs.
    for (let i = 1; i < 25; i++) overwrite(img, i * BS, randomBytes(16));
    const hf = path.join(repo.dir, 'wrong.json');
    fs.writeFileSync(hf, JSON.stringify([{ offset: 0, length: 10, exists: true }]));
    const before = JSON.parse((await repo.ok(['--json', 'ls', 'disk'])).stdout).length;
    const r = await repo.run(['backup', '-f', base, '-r', hf, `file://${img}`, 'disk']);
    assert.equal(r.code, 5, r.stderr);
    assert.match(r.stderr, /differs from base/);
    const versions = JSON.parse((await repo.ok(['--json', 'ls', 'disk'])).stdout);
    assert.equal(versions.length, before, 'no version was created');
  });

  test('a grown image: blocks past the base end are read even without hints for them', async () => {
    const grown = path.join(repo.dir, 'grown.img');
    fs.copyFileSync(img, grown);
    const b0 = (await repo.ok(['backup', `file://${grown}`, 'grown'])).stdout.trim();
    fs.appendFileSync(grown, randomBytes(2 * BS + 5));
    const hf = path.join(repo.dir, 'none.json');
    fs.writeFileSync(hf, '[]');
    const r = JSON.parse((await repo.ok(['--json', 'backup', '-f', b0, '-r', hf, `file://${grown}`, 'grown'])).stdout);
    assert.equal(r.blocksRead, 3, 'the old last (partial) block and two new ones');
    const out = path.join(repo.dir, 'grown.out');
    await repo.ok(['restore', r.uid, `file://${out}`]);
    assert.equal(sha256File(out), sha256File(grown));
  });

  test('-r without -f, unknown base, bad hints file: clear errors', async () => {
    const hf = path.join(repo.dir, 'none.json');
    assert.equal((await repo.run(['backup', '-r', hf, `file://${img}`, 'disk'])).code, 100);
    assert.equal((await repo.run(['backup', '-f', 'nope', `file://${img}`, 'disk'])).code, 100);
    const bad = path.join(repo.dir, 'bad.json');
    fs.writeFileSync(bad, '{not json');
    const r = await repo.run(['backup', '-f', base, '-r', bad, `file://${img}`, 'disk']);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /cannot parse hints/);
    assert.equal(r.stderr.trim().split('\n').length, 1, 'one line');
  });
});
