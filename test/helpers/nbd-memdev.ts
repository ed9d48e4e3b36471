/**
 * In-memory block devices and catalogue for NBD tests.
 *
 * `MemoryDevice` serves a Buffer; its extents() reports exactly the zero runs it was built with (they are
 * zero-filled), everything else as data. It can be told to fail reads touching a range, and counts calls.
 * `buildImage` lays out regions (pattern bytes, random data, zero runs) so tests know what every byte is.
 */
import { createHash, randomFillSync } from 'node:crypto';
import { BlockDevice, DeviceCapabilities, DeviceError, ExportCatalogue, ExportInfo, Extent, WriteOptions, ZeroOptions } from '../../src/device/types';

export interface Region {
  length: number;
  /** A byte value, 'random', or 'zero' (a zero run reported by extents()). */
  fill: number | 'random' | 'zero';
}

export interface Image {
  data: Buffer;
  zeroRuns: Array<[number, number]>;
  /** Each region with its absolute offset. */
  regions: Array<Region & { offset: number }>;
}

export function buildImage(regions: Region[]): Image {
  const size = regions.reduce((s, r) => s + r.length, 0);
  const data = Buffer.alloc(size);
  const zeroRuns: Array<[number, number]> = [];
  const placed: Array<Region & { offset: number }> = [];
  let off = 0;
  for (const r of regions) {
    if (r.fill === 'zero') zeroRuns.push([off, r.length]);
    else if (r.fill === 'random') randomFillSync(data, off, r.length);
    else data.fill(r.fill, off, off + r.length);
    placed.push({ ...r, offset: off });
    off += r.length;
  }
  return { data, zeroRuns, regions: placed };
}

export class MemoryDevice implements BlockDevice {
  readonly size: number;
  reads = 0;
  extentCalls = 0;
  prefetches: Array<[number, number]> = [];
  closes = 0;
  protected failures: Array<{ offset: number; length: number; message: string }> = [];
  protected zeroRuns: Array<[number, number]>;

  constructor(
    readonly data: Buffer,
    zeroRuns: Array<[number, number]> = [],
    private readonly options: { readDelayMs?: number } = {},
  ) {
    this.size = data.length;
    this.zeroRuns = [...zeroRuns].sort((a, b) => a[0] - b[0]);
    for (const [o, l] of this.zeroRuns) data.fill(0, o, o + l);
  }

  static fromImage(img: Image, options?: { readDelayMs?: number }): MemoryDevice {
    return new MemoryDevice(img.data, img.zeroRuns, options);
  }

  /** Reads overlapping [offset, offset+length) will throw DeviceError('...', 'EIO', first failing byte). */
  failReads(offset: number, length: number, message = 'simulated unreadable block'): void {
    this.failures.push({ offset, length, message });
  }

  async read(offset: number, length: number): Promise<Buffer> {
    this.reads++;
    if (offset < 0 || length < 0 || offset + length > this.size) throw new DeviceError('read outside device', 'EINVAL', offset);
    if (this.options.readDelayMs) await new Promise((r) => setTimeout(r, this.options.readDelayMs));
    for (const f of this.failures) {
      if (offset < f.offset + f.length && f.offset < offset + length) {
        throw new DeviceError(f.message, 'EIO', Math.max(offset, f.offset));
      }
    }
    return this.data.subarray(offset, offset + length);
  }

  async extents(offset: number, length: number): Promise<Extent[]> {
    this.extentCalls++;
    return extentsFromZeroRuns(this.zeroRuns, offset, length);
  }

  async prefetch(offset: number, length: number): Promise<void> {
    this.prefetches.push([offset, length]);
  }

  async close(): Promise<void> {
    this.closes++;
  }
}

/** One call a WritableMemoryDevice received. */
export interface DeviceOp {
  op: 'write' | 'zero' | 'trim' | 'flush';
  offset?: number;
  length?: number;
  fua?: boolean;
  noHole?: boolean;
  fast?: boolean;
}

export interface WritableOptions {
  /** FUA honoured by the device itself (else the server must flush after a FUA request). Default false. */
  nativeFua?: boolean;
  /** zero() exists (else the server writes zero buffers). Default true. */
  zero?: boolean;
  /** trim() exists. Default true. */
  trim?: boolean;
  /** zero() honours `fast` (and fails fast zeroes of ranges that are not already zero). Default false. */
  fastZero?: boolean;
  readDelayMs?: number;
  writeDelayMs?: number;
}

/**
 * A writable in-memory device. `durable` is what a power cut would leave: updated by flush() and by
 * writes with `fua` (when FUA is native), so tests can check the server's FUA and FLUSH handling. Every
 * write-type call is recorded in `ops`. Write failures can be injected like read failures.
 */
export class WritableMemoryDevice extends MemoryDevice {
  readonly ops: DeviceOp[] = [];
  durable: Buffer;
  private writeFailures: Array<{ offset: number; length: number }> = [];

  constructor(data: Buffer, zeroRuns: Array<[number, number]> = [], private readonly wopts: WritableOptions = {}) {
    super(data, zeroRuns, { readDelayMs: wopts.readDelayMs });
    this.durable = Buffer.from(this.data);
  }

  failWrites(offset: number, length: number): void {
    this.writeFailures.push({ offset, length });
  }

  capabilities(): DeviceCapabilities {
    return {
      write: true,
      zero: this.wopts.zero !== false,
      trim: this.wopts.trim !== false,
      flush: true,
      fua: !!this.wopts.nativeFua,
      fastZero: !!this.wopts.fastZero,
      multiConn: true,
      prefetch: true,
    };
  }

  private async check(offset: number, length: number): Promise<void> {
    if (offset < 0 || length < 0 || offset + length > this.size) throw new DeviceError('write outside device', 'ENOSPC', offset);
    if (this.wopts.writeDelayMs) await new Promise((r) => setTimeout(r, this.wopts.writeDelayMs));
    for (const f of this.writeFailures) {
      if (offset < f.offset + f.length && f.offset < offset + length) throw new DeviceError('simulated write failure', 'EIO', Math.max(offset, f.offset));
    }
  }

  private persistIfFua(offset: number, length: number, opts?: WriteOptions): void {
    if (opts?.fua && this.wopts.nativeFua) this.data.copy(this.durable, offset, offset, offset + length);
  }

  async write(offset: number, data: Buffer, opts?: WriteOptions): Promise<void> {
    this.ops.push({ op: 'write', offset, length: data.length, fua: !!opts?.fua });
    await this.check(offset, data.length);
    data.copy(this.data, offset);
    this.zeroRuns = subtractRun(this.zeroRuns, offset, data.length);
    this.persistIfFua(offset, data.length, opts);
  }

  async zero(offset: number, length: number, opts?: ZeroOptions): Promise<void> {
    this.ops.push({ op: 'zero', offset, length, fua: !!opts?.fua, noHole: !!opts?.noHole, fast: !!opts?.fast });
    if (opts?.fast && !this.data.subarray(offset, offset + length).every((b) => b === 0)) {
      throw new DeviceError('fast zero not possible here', 'ENOTSUP', offset);
    }
    await this.check(offset, length);
    this.data.fill(0, offset, offset + length);
    this.zeroRuns = opts?.noHole ? subtractRun(this.zeroRuns, offset, length) : addRun(this.zeroRuns, offset, length);
    this.persistIfFua(offset, length, opts);
  }

  async trim(offset: number, length: number, opts?: WriteOptions): Promise<void> {
    this.ops.push({ op: 'trim', offset, length, fua: !!opts?.fua });
    await this.check(offset, length);
    // Trimmed ranges read as zeroes here (the spec leaves their content unspecified).
    this.data.fill(0, offset, offset + length);
    this.zeroRuns = addRun(this.zeroRuns, offset, length);
    this.persistIfFua(offset, length, opts);
  }

  async flush(): Promise<void> {
    this.ops.push({ op: 'flush' });
    this.data.copy(this.durable);
  }
}

function subtractRun(runs: Array<[number, number]>, offset: number, length: number): Array<[number, number]> {
  const end = offset + length;
  const out: Array<[number, number]> = [];
  for (const [o, l] of runs) {
    if (o + l <= offset || o >= end) {
      out.push([o, l]);
      continue;
    }
    if (o < offset) out.push([o, offset - o]);
    if (o + l > end) out.push([end, o + l - end]);
  }
  return out;
}

function addRun(runs: Array<[number, number]>, offset: number, length: number): Array<[number, number]> {
  const all = [...subtractRun(runs, offset, length), [offset, length] as [number, number]].sort((a, b) => a[0] - b[0]);
  const out: Array<[number, number]> = [];
  for (const r of all) {
    const last = out[out.length - 1];
    if (last && last[0] + last[1] >= r[0]) last[1] = Math.max(last[1], r[0] + r[1] - last[0]);
    else out.push([r[0], r[1]]);
  }
  return out;
}

/** A device of any size that reads as zeroes everywhere (no memory behind it). */
export class ZeroDevice implements BlockDevice {
  closes = 0;
  constructor(readonly size: number) {}
  async read(_offset: number, length: number): Promise<Buffer> {
    return Buffer.alloc(length);
  }
  async extents(offset: number, length: number): Promise<Extent[]> {
    return [{ offset, length, zero: true }];
  }
  async close(): Promise<void> {
    this.closes++;
  }
}

export function extentsFromZeroRuns(runs: ReadonlyArray<[number, number]>, offset: number, length: number): Extent[] {
  const end = offset + length;
  const out: Extent[] = [];
  let pos = offset;
  for (const [o, l] of runs) {
    const a = Math.max(o, pos);
    const b = Math.min(o + l, end);
    if (b <= a) continue;
    if (a > pos) out.push({ offset: pos, length: a - pos, zero: false });
    out.push({ offset: a, length: b - a, zero: true });
    pos = b;
  }
  if (pos < end) out.push({ offset: pos, length: end - pos, zero: false });
  return out;
}

/**
 * Opens a new device on every open, the way a catalogue of stateful devices (overlays) would: only the
 * server's sharing of one device per export lets connections see each other's writes.
 */
export class FreshDeviceCatalogue implements ExportCatalogue {
  readonly opened: WritableMemoryDevice[] = [];
  closes = 0;
  constructor(private readonly make: () => WritableMemoryDevice, readonly name = 'disk') {}

  async list(): Promise<ExportInfo[]> {
    return [{ name: this.name, description: 'a fresh writable device per open' }];
  }

  async open(name: string): Promise<{ device: BlockDevice; description: string } | undefined> {
    if (name !== this.name) return undefined;
    const d = this.make();
    const close = d.close.bind(d);
    d.close = async () => {
      this.closes++;
      await close();
    };
    this.opened.push(d);
    return { device: d, description: 'fresh' };
  }
}

export interface CatalogueEntry {
  device: BlockDevice & { closes?: number };
  description: string;
}

/** Hands out the same device object to every opener; counts opens so tests can check every open is closed. */
export class MemoryCatalogue implements ExportCatalogue {
  opens = 0;
  constructor(readonly entries: Map<string, CatalogueEntry>) {}

  async list(): Promise<ExportInfo[]> {
    return [...this.entries].map(([name, e]) => ({ name, description: e.description }));
  }

  async open(name: string): Promise<{ device: BlockDevice; description: string } | undefined> {
    const e = this.entries.get(name);
    if (!e) return undefined;
    this.opens++;
    return { device: e.device, description: e.description };
  }

  /** Sum of close() calls over all devices. */
  get closes(): number {
    let n = 0;
    for (const e of this.entries.values()) n += e.device.closes ?? 0;
    return n;
  }
}

export function sha256(b: Buffer): string {
  return createHash('sha256').update(b).digest('hex');
}
