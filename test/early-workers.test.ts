/**
 * Codec workers start at the beginning of backup, restore and scrub (before the configuration is read) and
 * the command's worker pool adopts them: the same bytes come back, a pool smaller than the early set stops
 * the rest, and other commands start none.
 */
import { after, before, describe, test } from 'node:test';
import * as assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { makeTestRepo, TestRepo, writeImage } from './helpers/cli';
import { sha256File } from './helpers/images';
import { commandWord } from '../src/cli/early-start';

const BS = 1024 * 1024;
const early = (stderr: string) => /codec: (\d+) workers, (\d+) of them started early/.exec(stderr)?.slice(1).map(Number);

describe('early codec workers', () => {
  let repo: TestRepo;
  let img: string;

  before(async () => {
    repo = makeTestRepo('', { blockSize: BS });
    await repo.ok(['initdb']);
    img = path.join(repo.dir, 'img');
    writeImage(img, 6 * BS, 'random');
  });

  after(() => repo.cleanup());

  test('the command word is found after global options, -c and its value', () => {
    assert.equal(commandWord(['node', 'main.js', '-c', 'backup', '-v', 'restore', 'x']), 'restore');
    assert.equal(commandWord(['node', 'main.js', '--configfile', 'restore', 'ls']), 'ls');
    assert.equal(commandWord(['node', 'main.js', '--json']), undefined);
  });

  test('backup, restore and scrub adopt every early worker, and the data round-trips', async () => {
    const workers = Math.max(1, os.availableParallelism());
    const b = await repo.ok(['-v', 'backup', `file://${img}`, 'early']);
    assert.deepEqual(early(b.stderr), [workers, workers], b.stderr);
    const uid = b.stdout.trim().split('\n').pop()!;
    const out = path.join(repo.dir, 'out.img');
    const r = await repo.ok(['-v', 'restore', uid, `file://${out}`]);
    assert.deepEqual(early(r.stderr), [workers, workers]);
    assert.equal(sha256File(out), sha256File(img));
    const s = await repo.ok(['-v', 'scrub', uid]);
    assert.deepEqual(early(s.stderr), [workers, workers]);
    // Commands that may never need a worker start none early.
    const l = await repo.ok(['-v', 'ls']);
    assert.equal(early(l.stderr), undefined);
  });

  test('a configuration with fewer workers adopts that many; a restore still round-trips', async () => {
    const one = makeTestRepo('[DEFAULTS]\nworkers = 1', { blockSize: BS });
    try {
      await one.ok(['initdb']);
      const uid = (await one.ok(['backup', `file://${img}`, 'one'])).stdout.trim();
      const out = path.join(one.dir, 'out.img');
      const r = await one.ok(['-v', 'restore', uid, `file://${out}`]);
      assert.deepEqual(early(r.stderr), [1, 1], r.stderr);
      assert.equal(sha256File(out), sha256File(img));
      assert.equal(fs.statSync(out).size, 6 * BS);
    } finally {
      one.cleanup();
    }
  });
});
