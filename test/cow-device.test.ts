/**
 * CowDevice against a model: random writes, zeroes and trims (aligned and not, concurrent, several in one
 * granule) over an in-memory device below; reads, extents, reopening after a flush, and a "crash" (a second
 * instance opened on the files of one never closed). The device below is never written.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { randomBytes } from 'node:crypto';
import { BASE, CowDevice, createCowFiles, CowLayout, DATA, ZERO } from '../src/device/cow';
import { PersistentMap } from '../src/device/persistent-map';
import { buildImage, MemoryDevice, sha256 } from './helpers/nbd-memdev';

const KiB = 1024;
let tmp: string;
before(() => {
  tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'cow-device-'));
});
after(() => fs.rmSync(tmp, { recursive: true, force: true }));

/** A lower device of `size` bytes (random data with zero runs) whose reads take a little while. */
function lowerDevice(size: number, delayMs = 2): { dev: MemoryDevice; original: Buffer } {
  const head = Math.floor(size / 3);
  const img = buildImage([{ length: head, fill: 'random' }, { length: 64 * KiB, fill: 'zero' }, { length: size - head - 64 * KiB, fill: 'random' }]);
  return { dev: new MemoryDevice(img.data, img.zeroRuns, { readDelayMs: delayMs }), original: Buffer.from(img.data) };
}

let n = 0;
async function freshOverlay(lower: MemoryDevice, granule = 4096): Promise<{ dir: string; layout: CowLayout; cow: CowDevice }> {
  const dir = path.join(tmp, `o${n++}`);
  fs.mkdirSync(dir);
  const layout = { size: lower.size, granule, base: 'test-base' };
  await createCowFiles(dir, layout);
  return { dir, layout, cow: await CowDevice.open(lower, dir, layout) };
}

/** What a trim does in the model: whole granules read as zeroes, partly covered ones stay as they were. */
function modelTrim(model: Buffer, offset: number, length: number, granule: number): void {
  const end = offset + length;
  const from = Math.ceil(offset / granule) * granule;
  const to = end === model.length ? end : Math.floor(end / granule) * granule;
  if (to > from) model.fill(0, from, to);
}

describe('CowDevice', () => {
  test('random writes, zeroes and trims match the model; the device below is untouched; a reopen after flush keeps everything', async () => {
    const size = 3 * 1024 * KiB + 1234; // not a multiple of the granule: the last granule is short
    const { dev: lower, original } = lowerDevice(size);
    const { dir, layout, cow } = await freshOverlay(lower);
    const model = Buffer.from(original);
    let seed = 7;
    const rnd = (k: number) => {
      seed = (seed * 1103515245 + 12345) >>> 0;
      return seed % k;
    };
    for (let round = 0; round < 40; round++) {
      // A batch of requests in flight at once, on disjoint byte ranges (so the outcome does not depend on
      // their order) but often inside the same granules.
      const used: [number, number][] = [];
      const ops: Promise<void>[] = [];
      for (let k = 0; k < 8; k++) {
        const len = [1, 512, 4096, 4095, 10_000, 70_000][rnd(6)];
        const offset = rnd(size - len);
        if (used.some(([a, b]) => offset < b + 4096 && a < offset + len + 4096)) {
          // Near another request: keep disjoint bytes but share granules on purpose.
          if (used.some(([a, b]) => offset < b && a < offset + len)) continue;
        }
        used.push([offset, offset + len]);
        const kind = rnd(10);
        if (kind < 6) {
          const data = randomBytes(len);
          data.copy(model, offset);
          ops.push(cow.write(offset, data));
        } else if (kind < 8) {
          model.fill(0, offset, offset + len);
          ops.push(cow.zero(offset, len));
        } else {
          modelTrim(model, offset, len, layout.granule);
          ops.push(cow.trim(offset, len));
        }
      }
      await Promise.all(ops);
      if (round % 10 === 9) await cow.flush();
    }
    const all = await cow.read(0, size);
    assert.equal(sha256(all), sha256(model), 'overlay reads what was written');
    assert.equal(sha256(lower.data), sha256(original), 'the device below is unchanged');
    // Piecewise reads across run boundaries agree with the whole.
    for (let k = 0; k < 50; k++) {
      const len = 1 + rnd(100_000);
      const off = rnd(size - len);
      assert.ok((await cow.read(off, len)).equals(model.subarray(off, off + len)), `read ${off}+${len}`);
    }
    // Zero extents read as zeroes.
    for (const e of await cow.extents(0, size)) {
      if (e.zero) assert.ok(model.subarray(e.offset, e.offset + e.length).every((b) => b === 0), `zero extent ${e.offset}+${e.length}`);
    }
    await cow.close();
    const again = await CowDevice.open(lower, dir, layout);
    assert.equal(sha256(await again.read(0, size)), sha256(model), 'reopened overlay reads the same');
    await again.close();
  });

  test('concurrent partial writes into one untouched granule both survive (the fill from below never overwrites a neighbour)', async () => {
    const { dev: lower } = lowerDevice(256 * KiB, 20);
    const { cow } = await freshOverlay(lower);
    const a = Buffer.alloc(100, 0xaa);
    const b = Buffer.alloc(100, 0xbb);
    const c = Buffer.alloc(4096, 0xcc);
    // a and b land in granule 2, c covers granule 3 entirely while granule 2's fill is in flight.
    await Promise.all([cow.write(8192 + 10, a), cow.write(8192 + 2000, b), cow.write(12288, c), cow.write(8192 + 4000, Buffer.alloc(200, 0xdd))]);
    const got = await cow.read(8192, 8192);
    const want = Buffer.from(lower.data.subarray(8192, 16384));
    a.copy(want, 10);
    b.copy(want, 2000);
    Buffer.alloc(96, 0xdd).copy(want, 4000);
    want.fill(0xdd, 4096, 4096 + 104);
    want.fill(0xcc, 4096 + 104, 8192);
    // The 0xdd write overlaps c's granule (bytes 4096..4199); c and it ran concurrently on overlapping bytes,
    // so either order is allowed there: accept both.
    const other = Buffer.from(want);
    other.fill(0xcc, 4096, 8192);
    assert.ok(got.equals(want) || got.equals(other), 'every write is there, in some order');
    assert.equal(cow.state(2), DATA);
    assert.equal(cow.state(3), DATA);
    await cow.close();
  });

  test('a crash keeps what was flushed: a second instance on the files of one never closed reads flushed writes, and base data elsewhere', async () => {
    const { dev: lower, original } = lowerDevice(1024 * KiB, 0);
    const { dir, layout, cow } = await freshOverlay(lower);
    const flushed = randomBytes(3 * 4096 + 100);
    await cow.write(5000, flushed);
    await cow.zero(200 * KiB, 64 * KiB);
    await cow.flush();
    const late = randomBytes(8192);
    await cow.write(600 * KiB, late); // never flushed
    // `cow` is abandoned, as a process killed with -9 would leave it.
    const after = await CowDevice.open(lower, dir, layout);
    assert.ok((await after.read(5000, flushed.length)).equals(flushed), 'flushed write intact');
    assert.ok((await after.read(200 * KiB, 64 * KiB)).every((x) => x === 0), 'flushed zeroes intact');
    const lateNow = await after.read(600 * KiB, 8192);
    assert.ok(lateNow.equals(late) || lateNow.equals(original.subarray(600 * KiB, 600 * KiB + 8192)), 'an unflushed write is either there or not');
    assert.equal(after.state(Math.floor((600 * KiB) / 4096)), BASE, 'the unflushed write is not in the map');
    assert.equal(after.state(Math.floor((200 * KiB) / 4096)), ZERO);
    await after.close();
  });

  test('the map file refuses a device it was not made for', async () => {
    const { dev: lower } = lowerDevice(512 * KiB, 0);
    const { dir, layout, cow } = await freshOverlay(lower);
    await cow.close();
    await assert.rejects(CowDevice.open(lower, dir, { ...layout, base: 'another' }), /belongs to/);
    const other = lowerDevice(256 * KiB, 0).dev;
    await assert.rejects(CowDevice.open(other, dir, layout), /bytes/);
  });

  test('PersistentMap: a page written from an older copy never lands after a newer one', async () => {
    const file = path.join(tmp, 'pm');
    const m = await PersistentMap.create(file, { bits: 1, entries: 100_000, owner: 'test' });
    const batches: Promise<void>[] = [];
    for (let i = 0; i < 200; i++) {
      m.set(i * 37, i * 37 + 1, 1);
      batches.push(m.writePages(m.takeDirty()));
    }
    await Promise.all(batches);
    await m.sync();
    await m.close();
    const again = await PersistentMap.open(file, { bits: 1, entries: 100_000, owner: 'test' });
    for (let i = 0; i < 200; i++) assert.equal(again.get(i * 37), 1, `entry ${i * 37}`);
    assert.equal(again.countNonZero(), 200);
    await again.close();
  });
});
