/**
 * The device stack over a real repository: spare blob buffers are one pool for the whole process (not one per
 * device), and a version still being written becomes readable block by block as the backup records it, also
 * for a device (and an NBD export) opened before.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { execFileSync } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { loadConfig } from '../src/config/config';
import { allocBlock } from '../src/codec/codec';
import { allocAligned, allocShared, directView, isShared } from '../src/codec/transfer';
import { encodedCapacity } from '../src/codec/blob-format';
import { spareBuffers } from '../src/device/spare-buffers';
import { BlockCache } from '../src/device/block-cache';
import { DeviceError } from '../src/device/types';
import { PENDING_RECHECK_MS, VersionDevice } from '../src/device/version-device';
import { Repository } from '../src/engine/repository';
import { blobKey } from '../src/storage/types';
import { NbdClient } from '../nbd/client';
import { makeTestRepo, TestRepo, writeImage } from './helpers/cli';
import { startBackyNbd } from './helpers/backy-nbd';
import { SeededRandom } from './helpers/images';

const KiB = 1024;
const BS = 64 * KiB;

let tr: TestRepo;
let repo: Repository;
let uid: string;

before(async () => {
  tr = makeTestRepo('', { blockSize: BS });
  await tr.ok(['initdb']);
  const img = path.join(tr.dir, 'img');
  writeImage(img, 8 * BS, 'random');
  uid = (await tr.ok(['backup', `file://${img}`, 'img'])).stdout.trim();
  repo = await Repository.open(loadConfig(tr.cfg));
});

after(async () => {
  await repo?.close();
  tr?.cleanup();
});

/** Spare read buffers kept anywhere in the process: the shared pool, and any a fetcher keeps for itself. */
async function sparesKept(fetchers: object[]): Promise<number> {
  let n = 0;
  try {
    n += (await import('../src/device/spare-buffers')).spareBuffers.count;
  } catch {
    // no shared pool
  }
  for (const f of fetchers) n += (f as { spare?: Buffer[] }).spare?.length ?? 0;
  return n;
}

describe('device stack', () => {
  test('40 devices reading at once keep at most 16 spare buffers in the whole process', async () => {
    const v = await repo.version(uid);
    const fetchers: object[] = [];
    const devices = Array.from({ length: 40 }, () => {
      // No cache: every read loads its blob, as 40 FUSE opens or NBD exports with distinct data would.
      const f = repo.fetcher(new BlockCache(0));
      fetchers.push(f);
      return new VersionDevice(repo.meta, v, f);
    });
    await Promise.all(devices.map((d) => Promise.all(Array.from({ length: 8 }, (_, i) => d.read(i * BS, BS)))));
    const kept = await sparesKept(fetchers);
    assert.ok(kept <= 16, `${kept} spare buffers kept by 40 devices`);
  });

  test('a block decoded into an aligned buffer comes back in that place, so O_DIRECT writes it without a copy', async () => {
    const rnd = new SeededRandom('aligned decode');
    const plain = allocBlock(BS);
    rnd.bytes(BS).copy(plain);
    const expected = Buffer.from(plain);
    const scan = await repo.codec.scan(plain, BS);
    const { blob } = await repo.codec.encode(scan.buf, BS, scan.sum!);
    const out = allocAligned(BS);
    const at = out.byteOffset;
    assert.ok(at > 0 && directView(out), 'an aligned buffer starts past the beginning of its memory');
    const r = await repo.codec.decodeReusing(Buffer.from(blob), scan.sum!, BS, out);
    assert.equal(r.error, undefined);
    assert.ok(r.data!.equals(expected));
    assert.equal(r.data!.byteOffset, at, 'decoded where the buffer was (the buffer itself went to the worker)');
    assert.ok(directView(r.data!), 'still aligned');
    // A blob that fails verification hands the buffer back, also in its place.
    const wrong = Buffer.from(scan.sum!);
    wrong[0] ^= 1;
    const bad = await repo.codec.decodeReusing(Buffer.from(blob), wrong, BS, allocAligned(BS));
    assert.ok(bad.error);
    assert.ok(bad.spareOut && bad.spareOut.length >= BS && directView(bad.spareOut.subarray(0, BS)));
  });

  test('blob buffers in shared memory: V8 does not count them, a decode works in them in place, and cache loads leave only them as spares', async () => {
    // Why they are shared (see allocShared): V8 counts ArrayBuffers as external memory, and a pool of them made
    // the NBD server collect its whole heap every 60-100 ms. The control shows the measure sees ArrayBuffers.
    // Measured in a fresh process: here, a collection that frees earlier tests' buffers between two readings
    // would hide what the allocations added.
    const MiB = 1024 * 1024;
    const measure = `const t = require(${JSON.stringify(path.join(__dirname, '..', 'src', 'codec', 'transfer.js'))});
      const base = process.memoryUsage().external;
      const shared = Array.from({ length: 16 }, () => t.allocShared(4 * 1024 * 1024));
      const afterShared = process.memoryUsage().external;
      const plain = Array.from({ length: 16 }, () => t.allocBlock(4 * 1024 * 1024));
      const afterPlain = process.memoryUsage().external;
      console.log(JSON.stringify({ base, afterShared, afterPlain, held: shared.length + plain.length }));`;
    const { base, afterShared, afterPlain, held } = JSON.parse(execFileSync(process.execPath, ['-e', measure]).toString()) as Record<string, number>;
    assert.ok(afterPlain - afterShared >= 60 * MiB, `16 ArrayBuffers of 4 MiB counted ${afterPlain - afterShared} bytes`);
    assert.ok(afterShared - base < 4 * MiB, `16 shared buffers of 4 MiB counted ${afterShared - base} bytes`);
    assert.equal(held, 32);

    // A decode reads the blob from shared memory and writes the plaintext into the caller's shared buffer,
    // which the caller still holds (nothing was transferred away or copied back).
    const rnd = new SeededRandom('shared decode');
    const plain = allocBlock(BS);
    rnd.bytes(BS).copy(plain);
    const expected = Buffer.from(plain);
    const scan = await repo.codec.scan(plain, BS);
    const { blob } = await repo.codec.encode(scan.buf, BS, scan.sum!);
    const raw = allocShared(encodedCapacity(BS)).subarray(0, blob.length);
    blob.copy(raw);
    const out = allocShared(encodedCapacity(BS));
    const r = await repo.codec.decodeReusing(raw, scan.sum!, BS, out);
    assert.equal(r.error, undefined);
    assert.ok(r.data!.equals(expected));
    assert.ok(out.subarray(0, BS).equals(expected), "the plaintext is in the caller's own buffer");
    assert.equal(raw.length, blob.length, 'the blob buffer was not detached');
    assert.ok(isShared(r.spareBlob) && isShared(r.data!));

    // Loads through a cache in shared memory (how NBD and FUSE read) leave shared spares behind.
    while (spareBuffers.take(1)) { /* empty the pool */ }
    const v = await repo.version(uid);
    const cache = new BlockCache(16 * BS, { blockSize: BS, shm: true, recycle: (b) => spareBuffers.give(Buffer.from(b.buffer, 0, b.buffer.byteLength)) });
    try {
      const dev = new VersionDevice(repo.meta, v, repo.fetcher(cache));
      const read = await Promise.all(Array.from({ length: 8 }, (_, i) => dev.read(i * BS, BS)));
      assert.ok(Buffer.concat(read).equals(fs.readFileSync(path.join(tr.dir, 'img'))), 'the blocks read are the image');
      assert.ok(cache.usesSharedMemory);
      assert.equal(cache.misses, 8);
      const spares: Buffer[] = [];
      for (let b = spareBuffers.take(1); b; b = spareBuffers.take(1)) spares.push(b);
      assert.ok(spares.length > 0, 'loads left spare buffers');
      // A load given a slot of the file needs a buffer for its blob only: the worker decodes into its own.
      assert.ok(spares.length <= 8, `8 loads left ${spares.length} spares`);
      assert.ok(spares.every(isShared), `${spares.filter((b) => !isShared(b)).length} of ${spares.length} spares are not shared`);
      for (const b of spares) spareBuffers.give(b);
    } finally {
      cache.close();
    }
  });

  test('a block recorded after the device was opened becomes readable (it used to fail with EIO for the device\'s life)', async () => {
    const rnd = new SeededRandom('incomplete');
    const blocks = [rnd.bytes(BS), rnd.bytes(BS), rnd.bytes(BS)];
    const session = `test-${process.pid}`;
    const v = await repo.meta.createVersion({ uid: randomUUID(), name: 'running', snapshotName: '', date: Date.now(), size: 3 * BS, blockSize: BS, expire: null, baseUid: null, tags: [] });
    const record = async (index: number): Promise<void> => {
      const buf = allocBlock(BS);
      blocks[index].copy(buf);
      const scan = await repo.codec.scan(buf, BS);
      const [r] = await repo.meta.recordBlocks(v.id, session, [{ index, checksum: scan.sum!, size: BS }]);
      if (r.upload) {
        const enc = await repo.codec.encode(scan.buf, BS, scan.sum!);
        await repo.store.put(blobKey(r.uid), enc.blob);
        await repo.meta.markUploaded([{ id: r.blobId, storedSize: enc.blob.length }]);
      }
    };
    await record(0);
    const lines: string[] = [];
    const dev = new VersionDevice(repo.meta, v, repo.fetcher(new BlockCache(16 * BS)), { log: (l) => lines.push(l) });
    assert.ok((await dev.read(0, BS)).equals(blocks[0]));
    await assert.rejects(dev.read(BS, 4096), (e: unknown) => e instanceof DeviceError && e.errno === 'EIO' && /never backed up/.test(e.message));

    // The backup goes on: block 1 is recorded. Over NBD too, on a connection opened before.
    const server = await startBackyNbd(tr.cfg);
    try {
      const c = await NbdClient.connect({ host: '127.0.0.1', port: server.port }, { exportName: v.uid });
      await assert.rejects(c.read(BS, 4096), (e: Error & { errno?: string }) => e.errno === 'EIO');
      await record(1);
      await new Promise((r) => setTimeout(r, PENDING_RECHECK_MS + 100));
      assert.ok((await dev.read(BS, BS)).equals(blocks[1]), 'the device reads the block recorded after it was opened');
      assert.ok((await c.read(BS, BS)).equals(blocks[1]), 'so does the NBD connection opened before');
      await assert.rejects(dev.read(2 * BS, 10), /never backed up/, 'block 2 is still pending');
      await c.close();
    } finally {
      assert.equal(await server.stop(), 0, server.stderr());
    }
    // Reading a pending block again and again logs it once per interval.
    for (let i = 0; i < 50; i++) await dev.read(2 * BS, 10).catch(() => undefined);
    assert.ok(lines.filter((l) => /offset 131072 was never backed up/.test(l)).length <= 2, lines.join('\n'));
  });
});
