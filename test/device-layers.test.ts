/**
 * Device layers forward what they do not change (the pass-through base): writes, zeroes, trims, flushes and
 * capabilities of a writable device below reach it through ReadaheadDevice, ObservedDevice and ReadOnlyDevice
 * behaves as documented.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { PassThroughDevice } from '../src/device/pass-through';
import { ReadaheadDevice } from '../src/device/readahead';
import { ReadOnlyDevice } from '../src/device/read-only';
import { BlockDevice, capabilitiesOf, DeviceError } from '../src/device/types';
import { ObservedDevice } from '../src/engine/nbd-service';
import { MemoryDevice, WritableMemoryDevice } from './helpers/nbd-memdev';

const KiB = 1024;

function writable(opts: ConstructorParameters<typeof WritableMemoryDevice>[2] = {}): WritableMemoryDevice {
  return new WritableMemoryDevice(Buffer.alloc(256 * KiB, 0x11), [[64 * KiB, 64 * KiB]], { nativeFua: true, fastZero: true, ...opts });
}

/** Writes, zeroes, trims and flushes through `layer` and checks each reached `below` with its options. */
async function checkForwards(layer: BlockDevice, below: WritableMemoryDevice): Promise<void> {
  assert.deepEqual(capabilitiesOf(layer), capabilitiesOf(below), 'capabilities pass through');
  await layer.write!(1000, Buffer.alloc(3000, 0xab), { fua: true });
  await layer.zero!(8 * KiB, 4 * KiB, { noHole: true });
  await layer.trim!(16 * KiB, 4 * KiB);
  await layer.flush!();
  assert.deepEqual(below.ops, [
    { op: 'write', offset: 1000, length: 3000, fua: true },
    { op: 'zero', offset: 8 * KiB, length: 4 * KiB, fua: false, noHole: true, fast: false },
    { op: 'trim', offset: 16 * KiB, length: 4 * KiB, fua: false },
    { op: 'flush' },
  ]);
  assert.ok((await layer.read(1000, 3000)).equals(Buffer.alloc(3000, 0xab)), 'reads see the write');
  assert.ok(below.durable.subarray(1000, 4000).equals(Buffer.alloc(3000, 0xab)), 'FUA reached the device');
  assert.ok((await layer.read(8 * KiB, 4 * KiB)).every((b) => b === 0));
  const ext = await layer.extents(0, 128 * KiB);
  assert.deepEqual(ext.filter((e) => e.zero).map((e) => [e.offset, e.length]), [[16 * KiB, 4 * KiB], [64 * KiB, 64 * KiB]]);
}

describe('pass-through device layers', () => {
  test('PassThroughDevice forwards every operation and the capabilities of a writable device', async () => {
    const below = writable();
    await checkForwards(new PassThroughDevice(below), below);
  });

  test('ReadaheadDevice forwards writes, zeroes, trims, flushes (it used to drop them)', async () => {
    const below = writable();
    await checkForwards(new ReadaheadDevice(below, 4 * KiB, 8), below);
  });

  test('ObservedDevice forwards writes, zeroes, trims, flushes (it used to drop them)', async () => {
    const below = writable();
    await checkForwards(new ObservedDevice(below, 1, 'x'), below);
  });

  test('a stack of layers keeps a writable device writable and closes it once', async () => {
    const below = writable();
    const stack = new ObservedDevice(new ReadaheadDevice(new PassThroughDevice(below), 4 * KiB, 8), 2, 'y');
    await checkForwards(stack, below);
    await stack.close();
    assert.equal(below.closes, 1);
  });

  test('over a read-only device: capabilities say read-only, writes fail EPERM, flush and prefetch are no-ops', async () => {
    const ro = new MemoryDevice(Buffer.alloc(64 * KiB, 1));
    const layer = new PassThroughDevice(ro);
    const caps = capabilitiesOf(layer);
    assert.equal(caps.write, false);
    assert.equal(caps.flush, false);
    assert.equal(caps.prefetch, true);
    for (const op of [() => layer.write(0, Buffer.alloc(1)), () => layer.zero(0, 1), () => layer.trim(0, 1)]) {
      await assert.rejects(op(), (e: unknown) => e instanceof DeviceError && e.errno === 'EPERM');
    }
    await layer.flush();
    await layer.prefetch(0, 4096);
    assert.deepEqual(ro.prefetches, [[0, 4096]]);
  });

  test('capabilitiesOf a leaf device follows its methods; zero/trim missing below fail ENOTSUP', async () => {
    const leaf: BlockDevice = {
      size: 4096,
      read: async (_o, l) => Buffer.alloc(l),
      extents: async (o, l) => [{ offset: o, length: l, zero: true }],
      write: async () => undefined,
    };
    const caps = capabilitiesOf(leaf);
    assert.deepEqual(caps, { write: true, zero: false, trim: false, flush: false, fua: false, fastZero: false, multiConn: true, prefetch: false });
    const layer = new PassThroughDevice(leaf);
    await layer.write(0, Buffer.alloc(10));
    await assert.rejects(layer.zero(0, 10), (e: unknown) => e instanceof DeviceError && e.errno === 'ENOTSUP');
    await assert.rejects(layer.trim(0, 10), (e: unknown) => e instanceof DeviceError && e.errno === 'ENOTSUP');
  });

  test('ReadOnlyDevice hides the writes of a writable device', async () => {
    const below = writable();
    const ro = new ReadOnlyDevice(below);
    assert.equal(capabilitiesOf(ro).write, false);
    await assert.rejects(ro.write(0, Buffer.alloc(1)), (e: unknown) => e instanceof DeviceError && e.errno === 'EPERM');
    await assert.rejects(ro.zero(0, 1), (e: unknown) => e instanceof DeviceError && e.errno === 'EPERM');
    await ro.flush();
    assert.deepEqual(below.ops, []);
    assert.ok((await ro.read(0, 10)).equals(Buffer.alloc(10, 0x11)));
  });
});
