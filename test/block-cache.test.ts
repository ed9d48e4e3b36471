/**
 * The block cache keeps blocks in a shared-memory file (ShmSlab) and reads copy out of it: a block handed out
 * and evicted before it was copied is noticed (its slot's generation changed) and read again, never served
 * with another block's bytes. Reply buffers are reused only when they are the pool's own.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { loadConfig } from '../src/config/config';
import { BlockCache } from '../src/device/block-cache';
import { ReplyBuffers } from '../src/device/reply-buffers';
import { ShmSlab } from '../src/device/shm-slab';
import { VersionDevice } from '../src/device/version-device';
import { Repository } from '../src/engine/repository';
import { makeTestRepo, TestRepo, writeImage } from './helpers/cli';

const KiB = 1024;
const BS = 64 * KiB;
const BLOCKS = 8;

let tr: TestRepo;
let repo: Repository;
let uid: string;
let image: Buffer;

before(async () => {
  tr = makeTestRepo('', { blockSize: BS });
  await tr.ok(['initdb']);
  const img = path.join(tr.dir, 'img');
  writeImage(img, BLOCKS * BS, 'random');
  image = fs.readFileSync(img);
  uid = (await tr.ok(['backup', `file://${img}`, 'img'])).stdout.trim();
  repo = await Repository.open(loadConfig(tr.cfg));
});

after(async () => {
  await repo?.close();
  tr?.cleanup();
});

const filled = (byte: number, n = BS) => Buffer.alloc(n, byte);

describe('ShmSlab', () => {
  test('slots keep their bytes; a released slot stops answering for its old content', () => {
    const slab = ShmSlab.open(BS, 2)!;
    assert.ok(slab, 'a slab in /dev/shm');
    try {
      const a = slab.take()!;
      const b = slab.take()!;
      assert.equal(slab.take(), undefined, 'two slots, both taken');
      slab.write(a.slot, filled(1));
      slab.write(b.slot, filled(2, 1000));
      const out = Buffer.alloc(300);
      assert.ok(slab.readInto(b.slot, b.gen, 100, out, 0, 300));
      assert.ok(out.equals(filled(2, 300)));
      slab.release(a.slot);
      const again = slab.take()!;
      assert.equal(again.slot, a.slot);
      slab.write(again.slot, filled(3));
      assert.equal(slab.readInto(a.slot, a.gen, 0, out, 0, 300), false, 'the old reference is refused');
      assert.ok(slab.readInto(again.slot, again.gen, 0, out, 0, 300) && out.equals(filled(3, 300)));
      assert.throws(() => slab.write(b.slot, filled(4, BS + 1)), RangeError);
    } finally {
      slab.close();
    }
  });

  test('no writable tmpfs directory: no slab (the cache keeps Buffers)', () => {
    assert.equal(ShmSlab.open(BS, 2, path.join(tr.dir, 'missing')), undefined);
  });
});

describe('BlockCache in shared memory', () => {
  test('evicted blocks are noticed by holders, loaded again, and loaded buffers are given back', async () => {
    const recycled: Buffer[] = [];
    const cache = new BlockCache(2 * BS, { blockSize: BS, recycle: (b) => recycled.push(b) });
    try {
      let loads = 0;
      const load = (byte: number) => async () => {
        loads++;
        return filled(byte);
      };
      const b1 = await cache.get('k1', load(1));
      assert.equal(b1.buffer, undefined, 'kept in shared memory, not as a Buffer');
      assert.ok(cache.usesSharedMemory);
      await cache.get('k2', load(2));
      const out = Buffer.alloc(BS);
      assert.ok(b1.copyTo(out, 0, 0, BS) && out.equals(filled(1)));
      await cache.get('k2', load(2));
      await cache.get('k3', load(3)); // k1 is the least recently used: its slot goes to k3
      assert.equal(b1.copyTo(out, 0, 0, BS), false, 'a holder of the evicted k1 is told, not given k3');
      const again = await cache.get('k1', load(1));
      assert.ok(again.copyTo(out, 0, 0, BS) && out.equals(filled(1)));
      assert.equal(loads, 4);
      assert.equal(cache.hits, 1);
      assert.equal(recycled.length, 4, 'every loaded buffer came back once its bytes were stored');
      assert.ok(cache.size <= 2 * BS);
    } finally {
      cache.close();
    }
  });

  test('a full tmpfs: the blocks that do not fit stay Buffers, every read right', async () => {
    const dir = path.join(tr.dir, 'small-shm');
    fs.mkdirSync(dir);
    execFileSync('mount', ['-t', 'tmpfs', '-o', `size=${2 * BS}`, 'tmpfs', dir]);
    const saved = process.env.BACKY_SHM_DIR;
    process.env.BACKY_SHM_DIR = dir;
    const v = await repo.version(uid);
    const cache = new BlockCache(BLOCKS * BS, { blockSize: BS });
    try {
      const dev = new VersionDevice(repo.meta, v, repo.fetcher(cache));
      for (let i = 0; i < BLOCKS; i++) assert.ok((await dev.read(i * BS, BS)).equals(image.subarray(i * BS, (i + 1) * BS)), `block ${i}`);
      assert.ok(cache.usesSharedMemory);
      const held = await Promise.all(Array.from({ length: BLOCKS }, (_, i) => cache.get(`probe-${i}`, async () => Buffer.alloc(BS, i))));
      assert.ok(held.every((b) => b.buffer), 'once tmpfs was full, blocks are kept as Buffers');
      for (let i = 0; i < BLOCKS; i++) assert.ok((await dev.read(i * BS, BS)).equals(image.subarray(i * BS, (i + 1) * BS)), `block ${i} again`);
    } finally {
      cache.close();
      if (saved === undefined) delete process.env.BACKY_SHM_DIR;
      else process.env.BACKY_SHM_DIR = saved;
      execFileSync('umount', [dir]);
    }
  });

  test('without shared memory (shm: false) blocks are Buffers, as before', async () => {
    const cache = new BlockCache(2 * BS, { blockSize: BS, shm: false });
    const b = await cache.get('k', async () => filled(7));
    assert.ok(b.buffer?.equals(filled(7)));
    assert.equal(cache.usesSharedMemory, false);
  });

  test('reads through a cache of two blocks, eight blocks at once, many rounds: every byte right, evictions before the copy retried', async () => {
    const v = await repo.version(uid);
    const cache = new BlockCache(2 * BS, { blockSize: BS });
    const dev = new VersionDevice(repo.meta, v, repo.fetcher(cache));
    try {
      for (let round = 0; round < 20; round++) {
        const order = Array.from({ length: BLOCKS }, (_, i) => (i * 3 + round) % BLOCKS);
        // Whole blocks and ranges across two blocks (the copy path of reads over block boundaries).
        const reads = order.map(async (i) => {
          const whole = await dev.read(i * BS, BS);
          assert.ok(whole.equals(image.subarray(i * BS, (i + 1) * BS)), `block ${i}, round ${round}`);
          if (i + 1 < BLOCKS) {
            const across = await dev.read(i * BS + BS / 2, BS);
            assert.ok(across.equals(image.subarray(i * BS + BS / 2, i * BS + BS / 2 + BS)), `across ${i}/${i + 1}, round ${round}`);
          }
        });
        await Promise.all(reads);
      }
      assert.ok(cache.usesSharedMemory);
      assert.ok(dev.staleCopies > 0, 'some block was evicted between its load and its copy (the race this guards)');
      const sum = (b: Buffer) => createHash('sha256').update(b).digest('hex');
      assert.equal(sum(await dev.read(0, BLOCKS * BS)), sum(image));
    } finally {
      cache.close();
    }
  });
});

describe('cache_memory', () => {
  test('shared (the default) keeps blocks in shared memory, heap in the process; anything else is refused', async () => {
    const text = fs.readFileSync(tr.cfg, 'utf8');
    assert.equal(loadConfig(tr.cfg).cacheMemory, 'shared');
    for (const [value, shared] of [['heap', false], ['shared', true]] as const) {
      const cfgFile = path.join(tr.dir, `cache-${value}.cfg`);
      fs.writeFileSync(cfgFile, `${text}\n[DEFAULTS]\ncache_memory = ${value}\n`);
      const r = await Repository.open(loadConfig(cfgFile));
      try {
        const dev = r.device(await r.version(uid), r.cache(4 * BS));
        assert.ok((await dev.read(BS, BS)).equals(image.subarray(BS, 2 * BS)));
        assert.equal(r.cache().usesSharedMemory, shared, value);
      } finally {
        await r.close();
      }
    }
    const bad = path.join(tr.dir, 'cache-bad.cfg');
    fs.writeFileSync(bad, `${text}\n[DEFAULTS]\ncache_memory = disk\n`);
    assert.throws(() => loadConfig(bad), /cache_memory/);
  });
});

describe('ReplyBuffers', () => {
  test('buffers come back for reuse; foreign ones and second returns are ignored', () => {
    const pool = new ReplyBuffers(1024 * KiB);
    const a = pool.take(200 * KiB);
    assert.equal(a.length, 200 * KiB);
    pool.give(a.subarray(0, 10)); // a view of it counts as it
    pool.give(a);
    assert.equal(pool.keptBytes, 256 * KiB, 'kept once, in its power-of-two size');
    const b = pool.take(129 * KiB);
    assert.equal(b.buffer, a.buffer, 'the same memory again');
    assert.equal(pool.keptBytes, 0);
    pool.give(Buffer.alloc(256 * KiB));
    assert.equal(pool.keptBytes, 0, 'a buffer the pool did not make is not taken');
    const small = pool.take(4 * KiB);
    pool.give(small);
    assert.equal(pool.keptBytes, 0, 'small buffers are left to Node');
    const many = Array.from({ length: 8 }, () => pool.take(256 * KiB));
    for (const m of many) pool.give(m);
    assert.equal(pool.keptBytes, 1024 * KiB, 'no more than its limit is kept');
  });
});
