/**
 * The restore copier's variation points, used in-process the way live restore and delta restore will use
 * them: a real repository (SQLite + files), a real version, a real file target.
 */
import { after, before, describe, test } from 'node:test';
import * as assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { randomBytes } from 'node:crypto';
import { makeTestRepo, TestRepo } from './helpers/cli';
import { loadConfig } from '../src/config/config';
import { Repository } from '../src/engine/repository';
import { BlockCopier } from '../src/engine/restore-copier';
import { planRestore } from '../src/engine/restore-plan';
import { BlockCache } from '../src/device/block-cache';
import { VersionDevice } from '../src/device/version-device';
import { openTarget } from '../src/io/registry';
import type { Target } from '../src/io/types';

const BS = 64 * 1024;
const BLOCKS = 40;

/** Blocks: 0..9 random, 10..19 holes, 20..29 repeats of 0..9, 30..39 random. */
function image(file: string): Buffer {
  const img = Buffer.alloc(BLOCKS * BS);
  for (let i = 0; i < BLOCKS; i++) {
    if (i >= 10 && i < 20) continue;
    if (i >= 20 && i < 30) img.copy(img, i * BS, (i - 20) * BS, (i - 19) * BS);
    else randomBytes(BS).copy(img, i * BS);
  }
  fs.writeFileSync(file, img);
  return img;
}

/** A target that counts what the copier does to it. */
function counted(t: Target): Target & { writes: number[]; zeroed: boolean; zeroes: Array<[number, number]> } {
  const writes: number[] = [];
  const zeroes: Array<[number, number]> = [];
  return Object.assign(Object.create(t) as Target, {
    writes,
    zeroes,
    zeroed: t.zeroed,
    write: (buf: Buffer, offset: number) => {
      writes.push(offset / BS);
      return t.write(buf, offset);
    },
    zero: (offset: number, length: number) => {
      zeroes.push([offset / BS, length / BS]);
      return t.zero(offset, length);
    },
  });
}

describe('restore copier hooks (for live and delta restore)', () => {
  let repo: TestRepo;
  let r: Repository;
  let img: Buffer;
  let uid: string;
  before(async () => {
    repo = makeTestRepo('', { blockSize: BS });
    await repo.ok(['initdb']);
    const file = path.join(repo.dir, 'img.raw');
    img = image(file);
    uid = (await repo.ok(['backup', `file://${file}`, 'img'])).stdout.trim();
    r = await Repository.open(loadConfig(repo.cfg));
  });
  after(async () => {
    await r.close();
    repo.cleanup();
  });

  const setup = async (name: string, opts: { force?: boolean } = {}) => {
    const v = await r.version(uid);
    const fetcher = r.fetcher(new BlockCache(0));
    const dev = new VersionDevice(r.meta, v, fetcher);
    const file = path.join(repo.dir, name);
    const target = counted(await openTarget(`file://${file}`, { size: v.size, force: !!opts.force, sparse: true }));
    return { dev, fetcher, target, file };
  };

  test('the plan: data blocks, one run of holes, in order', async () => {
    const v = await r.version(uid);
    const dev = new VersionDevice(r.meta, v, r.fetcher(new BlockCache(0)));
    const steps = [];
    for await (const s of planRestore(dev)) steps.push(s);
    assert.deepEqual(steps.map((s) => s.kind === 'hole' ? `h${s.index}+${s.count}` : `${s.kind[0]}${s.index}`),
      [...Array.from({ length: 10 }, (_, i) => `d${i}`), 'h10+10', ...Array.from({ length: 20 }, (_, i) => `d${20 + i}`)]);
  });

  test('live restore: now() copies a block ahead of the background pass; claim() keeps a client write; done-map hooks', async () => {
    const { dev, fetcher, target, file } = await setup('live.raw');
    const done = new Set<number>([35]); // restored before a restart:
    await target.write(img.subarray(35 * BS, 36 * BS), 35 * BS);
    target.writes.length = 0;
    const copier = new BlockCopier(dev, fetcher, target, { inFlight: 2, hooks: { isDone: (i) => done.has(i), onDone: (i) => done.add(i) } });
    // A client reads block 33 before the background pass started: copied at once.
    assert.equal(await copier.now(33), true);
    assert.deepEqual(target.writes, [33]);
    assert.ok(copier.isDone(33) && done.has(33));
    // A client writes block 0 (the first copy of the blob repeated at block 20) and block 36.
    await copier.claim(0);
    await copier.claim(36);
    const mine = Buffer.alloc(BS, 0xcd);
    await target.write(mine, 0);
    await target.write(mine, 36 * BS);
    await copier.run();
    await target.close();
    assert.ok(!target.writes.includes(35), 'a block done before the restart is not copied again');
    assert.equal(target.writes.filter((w) => w === 33).length, 1, 'block 33 was copied once');
    assert.equal(copier.stats.blocksRepeated, 9, 'block 20 repeats block 0, which the client took: fetched, not copied');
    const out = fs.readFileSync(file);
    const want = Buffer.from(img);
    mine.copy(want, 0);
    mine.copy(want, 36 * BS);
    const diff: number[] = [];
    for (let i = 0; i < BLOCKS; i++) if (!out.subarray(i * BS, (i + 1) * BS).equals(want.subarray(i * BS, (i + 1) * BS))) diff.push(i);
    assert.deepEqual(diff, [], 'the target is the version plus the client writes');
    assert.equal(done.size, BLOCKS);
  });

  test('delta restore: unchanged() skips blocks the target already holds; only differing blocks are written', async () => {
    const { dev, fetcher, target, file } = await setup('delta.raw');
    // Yesterday's disk in the target: two blocks differ (a data block and a hole).
    fs.writeFileSync(file, img);
    const fd = fs.openSync(file, 'r+');
    fs.writeSync(fd, randomBytes(100), 0, 100, 5 * BS + 7);
    fs.writeSync(fd, Buffer.alloc(10, 1), 0, 10, 12 * BS);
    fs.closeSync(fd);
    target.zeroed = false; // it holds data now
    const codec = r.codec;
    const compared: number[] = [];
    const copier = new BlockCopier(dev, fetcher, target, {
      inFlight: 4,
      hooks: {
        async unchanged(index, ref, length) {
          compared.push(index);
          const buf = Buffer.alloc(length);
          await target.read(buf, index * BS);
          const s = await codec.scan(buf, length);
          return ref ? !s.zero && s.sum!.equals(ref.checksum) : s.zero;
        },
      },
    });
    await copier.run();
    await target.close();
    assert.equal(compared.length, BLOCKS, 'every block compared');
    assert.deepEqual(target.writes, [5], 'one data block written');
    assert.deepEqual(target.zeroes, [[12, 1]], 'one hole zeroed');
    assert.equal(copier.stats.blocksUnchanged, BLOCKS - 2);
    assert.ok(fs.readFileSync(file).equals(img));
  });
});
