/**
 * In-memory block devices and catalogue for NBD tests.
 *
 * `MemoryDevice` serves a Buffer; its extents() reports exactly the zero runs it was built with (they are
 * zero-filled), everything else as data. It can be told to fail reads touching a range, and counts calls.
 * `buildImage` lays out regions (pattern bytes, random data, zero runs) so tests know what every byte is.
 */
import { createHash, randomFillSync } from 'node:crypto';
import { BlockDevice, DeviceError, ExportCatalogue, ExportInfo, Extent } from '../../src/device/types';

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
  private failures: Array<{ offset: number; length: number; message: string }> = [];
  private readonly zeroRuns: Array<[number, number]>;

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
