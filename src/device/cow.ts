import * as fs from 'node:fs';
import * as path from 'node:path';
import { closeFd, fdatasyncFd, fsyncDir, fsyncFd, openFd, preadFull, pwriteFull, pwriteFullSync, SharedSync } from '../util/fd-io';
import { MapIdentity, PersistentMap } from './persistent-map';
import { BlockDevice, DeviceCapabilities, DeviceError, Extent, WriteOptions, ZeroOptions } from './types';
import { zeroes } from './version-device';

/**
 * A copy-on-write overlay over a read-only device (nbdkit's cow filter, made persistent): writes, zeroes and
 * trims go to the overlay, reads combine overlay and device below; the device below is never written.
 *
 * On disk, in the overlay's directory:
 * - `data`: a sparse file as large as the device; a granule's overlay data sits at its own offset, so a read
 *   or write of overlay data is one pread/pwrite at the client's offset, and untouched granules cost no
 *   space;
 * - `map`: a PersistentMap with 2 bits per granule: BASE (read the device below), DATA (read `data`), ZERO
 *   (reads as zeroes; a trim or write-zeroes costs no data I/O).
 *
 * Crash safety (after kill -9 or a power loss, every write acknowledged before a completed FLUSH, or with
 * FUA, is intact; the server turns FUA into a flush): the map may say DATA only for a granule whose data is
 * durable in `data`. A flush therefore
 *   1. copies the changed map pages (only writes that completed before this instant are in them),
 *   2. fdatasyncs `data` (those writes are now durable),
 *   3. writes the page copies in place and fsyncs `map`.
 * A crash before 3 completes leaves the map as of the previous flush, possibly with some of the new pages:
 * each entry is then its old value or its new one, and both are backed by durable data. Writes after the
 * last flush may be lost, as on any disk with a volatile cache. Between flushes the map is only in memory,
 * so a write never costs a map write.
 * A granule written partly while still BASE or ZERO is filled from below first (read-modify-write); writes to
 * overlapping granules are serialised so such a fill never overwrites a concurrent write.
 */
export const BASE = 0;
export const DATA = 1;
export const ZERO = 2;

const DATA_FILE = 'data';
const MAP_FILE = 'map';
/** Writes up to this size are written synchronously (see pwriteData). */
const SYNC_WRITE_MAX = 64 * 1024;
/** Pieces in which zeroes are written as data (WRITE_ZEROES with NO_HOLE). */
const ZERO_PIECE = 1024 * 1024;

export interface CowLayout {
  size: number;
  /** bytes per map entry: a power of two from 512 to 1 MiB */
  granule: number;
  /** identifies the device below (a version uid): a map made for another device is refused */
  base: string;
}

function identity(l: CowLayout): MapIdentity {
  return { bits: 2, entries: Math.ceil(l.size / l.granule), owner: `cow base=${l.base} size=${l.size} granule=${l.granule}` };
}

/** Creates the overlay files in `dir` (which must exist): an empty sparse data file and an all-BASE map. */
export async function createCowFiles(dir: string, layout: CowLayout): Promise<void> {
  if (!Number.isInteger(Math.log2(layout.granule)) || layout.granule < 512 || layout.granule > 1 << 20) {
    throw new Error(`overlay granule ${layout.granule} is not a power of two from 512 to 1 MiB`);
  }
  const fd = await openFd(path.join(dir, DATA_FILE), 'wx', 0o600);
  try {
    await new Promise<void>((resolve, reject) => fs.ftruncate(fd, layout.size, (e) => (e ? reject(e) : resolve())));
    await fsyncFd(fd);
  } finally {
    await closeFd(fd);
  }
  const map = await PersistentMap.create(path.join(dir, MAP_FILE), identity(layout));
  await map.close();
  await fsyncDir(dir);
}

/** Granules the overlay in `dir` holds, as of its last flush (read without opening the overlay). */
export async function changedGranulesOnDisk(dir: string, layout: CowLayout): Promise<number> {
  const map = await PersistentMap.open(path.join(dir, MAP_FILE), identity(layout), true);
  try {
    return map.countNonZero();
  } finally {
    await map.close();
  }
}

/** Granule ranges [from, to) being written; a write waits for every overlapping one. */
class RangeLocks {
  private active: { from: number; to: number; done: Promise<void> }[] = [];

  async lock(from: number, to: number): Promise<() => void> {
    for (;;) {
      const clash = this.active.find((a) => a.from < to && from < a.to);
      if (!clash) break;
      await clash.done;
    }
    let release!: () => void;
    const entry = { from, to, done: new Promise<void>((r) => (release = r)) };
    this.active.push(entry);
    return () => {
      this.active.splice(this.active.indexOf(entry), 1);
      release();
    };
  }
}

function ioError(e: unknown, what: string, offset: number): DeviceError {
  const code = (e as NodeJS.ErrnoException).code;
  const errno = code === 'ENOSPC' || code === 'EDQUOT' ? 'ENOSPC' : 'EIO';
  return new DeviceError(`overlay ${what} at offset ${offset} failed: ${code ?? (e as Error).message}`, errno, offset);
}

export class CowDevice implements BlockDevice {
  readonly size: number;
  readonly granule: number;
  private readonly locks = new RangeLocks();
  private readonly syncer: SharedSync;
  /** `data` was written since the last flush began. */
  private dataDirty = false;
  /** A failed flush leaves the state unknown (the kernel may have dropped the dirty pages): every later flush fails too. */
  private flushFailure: DeviceError | undefined;
  private closing: Promise<void> | undefined;
  /** Statistics since open. */
  readonly stats = { writes: 0, bytesWritten: 0, zeroes: 0, trims: 0, flushes: 0, fills: 0 };

  private constructor(private readonly lower: BlockDevice, private readonly dataFd: number, private readonly map: PersistentMap, readonly layout: CowLayout) {
    this.size = layout.size;
    this.granule = layout.granule;
    this.syncer = new SharedSync(() => this.flushOnce());
  }

  /**
   * Opens the overlay in `dir` over `lower` (which must be the device it was made for: same size and base);
   * the overlay owns `lower` from now on (close() closes it).
   */
  static async open(lower: BlockDevice, dir: string, layout: CowLayout): Promise<CowDevice> {
    if (lower.size !== layout.size) throw new Error(`the overlay is for a device of ${layout.size} bytes, this one has ${lower.size}`);
    const map = await PersistentMap.open(path.join(dir, MAP_FILE), identity(layout));
    let fd: number;
    try {
      fd = await openFd(path.join(dir, DATA_FILE), 'r+');
    } catch (e) {
      await map.close();
      throw e;
    }
    return new CowDevice(lower, fd, map, layout);
  }

  /** The state of granule `g` (BASE, DATA or ZERO). */
  state(g: number): number {
    return this.map.get(g);
  }

  private granuleEnd(g: number): number {
    return Math.min(this.size, (g + 1) * this.granule);
  }

  private checkRange(offset: number, length: number, errno: 'EINVAL' | 'ENOSPC' = 'EINVAL'): void {
    if (!(offset >= 0 && length >= 0 && offset + length <= this.size)) {
      throw new DeviceError(`request of ${length} bytes at ${offset} is outside the device (size ${this.size})`, errno, offset);
    }
  }

  /** Runs of equal state covering [offset, offset+length), as byte ranges. */
  private runs(offset: number, length: number): { offset: number; length: number; state: number }[] {
    const out: { offset: number; length: number; state: number }[] = [];
    const end = offset + length;
    let g = Math.floor(offset / this.granule);
    const gEnd = Math.ceil(end / this.granule);
    while (g < gEnd) {
      const next = this.map.runEnd(g, gEnd);
      const from = Math.max(offset, g * this.granule);
      const to = Math.min(end, next * this.granule);
      out.push({ offset: from, length: to - from, state: this.map.get(g) });
      g = next;
    }
    return out;
  }

  async read(offset: number, length: number): Promise<Buffer> {
    this.checkRange(offset, length);
    if (length === 0) return Buffer.alloc(0);
    const runs = this.runs(offset, length);
    if (runs.length === 1) return this.readRun(runs[0]);
    const out = Buffer.allocUnsafe(length);
    await Promise.all(runs.map(async (r) => {
      if (r.state === ZERO) out.fill(0, r.offset - offset, r.offset - offset + r.length);
      else if (r.state === DATA) await this.preadData(out.subarray(r.offset - offset, r.offset - offset + r.length), r.offset);
      else (await this.lower.read(r.offset, r.length)).copy(out, r.offset - offset, 0, r.length);
    }));
    return out;
  }

  /**
   * Reads [offset, offset + buf.length) into `buf` (a reader with a buffer of its own, like a backup: overlay
   * data goes straight into it, no intermediate buffer whose fresh pages would cost more than the copy).
   */
  async readInto(buf: Buffer, offset: number): Promise<void> {
    this.checkRange(offset, buf.length);
    await Promise.all(this.runs(offset, buf.length).map(async (r) => {
      const part = buf.subarray(r.offset - offset, r.offset - offset + r.length);
      if (r.state === ZERO) part.fill(0);
      else if (r.state === DATA) await this.preadData(part, r.offset);
      else (await this.lower.read(r.offset, r.length)).copy(part, 0, 0, r.length);
    }));
  }

  private async readRun(r: { offset: number; length: number; state: number }): Promise<Buffer> {
    if (r.state === ZERO) return zeroes(r.length);
    if (r.state === BASE) return this.lower.read(r.offset, r.length);
    const b = Buffer.allocUnsafe(r.length);
    await this.preadData(b, r.offset);
    return b;
  }

  private async preadData(buf: Buffer, offset: number): Promise<void> {
    try {
      await preadFull(this.dataFd, buf, offset);
    } catch (e) {
      throw ioError(e, 'read', offset);
    }
  }

  private async pwriteData(buf: Buffer, offset: number): Promise<void> {
    try {
      // A small write goes into the page cache in microseconds; handing it to libuv's thread pool and back
      // costs several times that (far more on a busy machine), which is what a client writing 4 KiB at a
      // time waits for. Larger writes go to the pool, so the event loop never stalls for long.
      if (buf.length <= SYNC_WRITE_MAX) pwriteFullSync(this.dataFd, buf, offset);
      else await pwriteFull(this.dataFd, buf, offset);
    } catch (e) {
      throw ioError(e, 'write', offset);
    }
  }

  async extents(offset: number, length: number): Promise<Extent[]> {
    const end = Math.min(this.size, offset + length);
    if (offset >= end) return [];
    const out: Extent[] = [];
    const push = (e: Extent) => {
      const last = out[out.length - 1];
      if (last && last.zero === e.zero && last.offset + last.length === e.offset) last.length += e.length;
      else if (e.length > 0) out.push({ ...e });
    };
    for (const r of this.runs(offset, end - offset)) {
      if (r.state === BASE) for (const e of await this.lower.extents(r.offset, r.length)) push(e);
      else push({ offset: r.offset, length: r.length, zero: r.state === ZERO });
    }
    return out;
  }

  prefetch(offset: number, length: number): Promise<void> {
    return this.lower.prefetch ? this.lower.prefetch(offset, length) : Promise.resolve();
  }

  /** The granule's current content, as a buffer of its own (for a read-modify-write). */
  private async fill(g: number): Promise<Buffer> {
    const from = g * this.granule;
    const len = this.granuleEnd(g) - from;
    this.stats.fills++;
    if (this.map.get(g) === ZERO) return Buffer.alloc(len);
    const below = await this.lower.read(from, len);
    // Buffers from below may be shared with a cache: copy before changing.
    return Buffer.from(below.subarray(0, len));
  }

  /**
   * Writes `data` at `offset` (granules [g0, g1) locked by the caller). Partly covered granules that are not
   * DATA yet are filled from below first; everything else is written straight from `data`.
   */
  private async writeLocked(offset: number, data: Buffer): Promise<void> {
    const end = offset + data.length;
    const g0 = Math.floor(offset / this.granule);
    const gLast = Math.floor((end - 1) / this.granule);
    let straightFrom = offset;
    let straightTo = end;
    const jobs: Promise<void>[] = [];
    const merge = (g: number) => {
      const gStart = g * this.granule;
      return this.fill(g).then((buf) => {
        const from = Math.max(offset, gStart);
        const to = Math.min(end, this.granuleEnd(g));
        data.copy(buf, from - gStart, from - offset, to - offset);
        return this.pwriteData(buf, gStart);
      });
    };
    const partial = (g: number) => (offset > g * this.granule || end < this.granuleEnd(g)) && this.map.get(g) !== DATA;
    if (partial(g0)) {
      jobs.push(merge(g0));
      straightFrom = Math.min(end, this.granuleEnd(g0));
    }
    if (gLast !== g0 && partial(gLast)) {
      jobs.push(merge(gLast));
      straightTo = gLast * this.granule;
    }
    if (straightTo > straightFrom) jobs.push(this.pwriteData(data.subarray(straightFrom - offset, straightTo - offset), straightFrom));
    // Every piece settles before the map changes or the lock goes: no write of ours lands after a later one.
    const results = await Promise.allSettled(jobs);
    const failed = results.find((r): r is PromiseRejectedResult => r.status === 'rejected');
    if (failed) throw failed.reason;
    this.map.set(g0, gLast + 1, DATA);
    this.dataDirty = true;
  }

  async write(offset: number, data: Buffer, _opts?: WriteOptions): Promise<void> {
    this.checkRange(offset, data.length, 'ENOSPC');
    if (data.length === 0) return;
    const unlock = await this.locks.lock(Math.floor(offset / this.granule), Math.ceil((offset + data.length) / this.granule));
    try {
      await this.writeLocked(offset, data);
      this.stats.writes++;
      this.stats.bytesWritten += data.length;
    } finally {
      unlock();
    }
  }

  /**
   * Whole granules become ZERO (no data I/O); the partly covered ones at the ends get zeroes written (trim
   * leaves them as they are: their content is unspecified after a trim anyway). With `noHole` the zeroes are
   * written as data, since the client asked for the range to stay allocated.
   */
  private async zeroOrTrim(offset: number, length: number, trim: boolean, noHole: boolean): Promise<void> {
    if (length === 0) return;
    const end = offset + length;
    const unlock = await this.locks.lock(Math.floor(offset / this.granule), Math.ceil(end / this.granule));
    try {
      if (noHole) {
        for (let at = offset; at < end; at += ZERO_PIECE) await this.writeLocked(at, zeroes(Math.min(ZERO_PIECE, end - at)));
        return;
      }
      const whole0 = Math.ceil(offset / this.granule);
      let whole1 = Math.floor(end / this.granule);
      if (end === this.size) whole1 = Math.ceil(end / this.granule); // the short last granule counts as whole
      if (whole1 > whole0) this.map.set(whole0, whole1, ZERO);
      if (trim) return;
      const edges: [number, number][] = [];
      if (whole1 <= whole0) edges.push([offset, end]);
      else {
        if (offset < whole0 * this.granule) edges.push([offset, whole0 * this.granule]);
        if (end > whole1 * this.granule) edges.push([whole1 * this.granule, end]);
      }
      for (const [from, to] of edges) {
        const g = Math.floor(from / this.granule);
        if (this.map.get(g) === ZERO) continue; // reads as zeroes already
        await this.writeLocked(from, zeroes(to - from));
      }
    } finally {
      unlock();
    }
  }

  async zero(offset: number, length: number, opts?: ZeroOptions): Promise<void> {
    this.checkRange(offset, length, 'ENOSPC');
    await this.zeroOrTrim(offset, length, false, !!opts?.noHole);
    this.stats.zeroes++;
  }

  async trim(offset: number, length: number, _opts?: WriteOptions): Promise<void> {
    this.checkRange(offset, length);
    await this.zeroOrTrim(offset, length, true, false);
    this.stats.trims++;
  }

  /** Every write that completed before the call is durable when this resolves (see the class comment). */
  flush(): Promise<void> {
    if (this.flushFailure) return Promise.reject(this.flushFailure);
    this.stats.flushes++;
    return this.syncer.sync();
  }

  private async flushOnce(): Promise<void> {
    if (this.flushFailure) throw this.flushFailure;
    const pages = this.map.takeDirty();
    const dataDirty = this.dataDirty;
    this.dataDirty = false;
    try {
      if (dataDirty) await fdatasyncFd(this.dataFd);
      if (pages.length) {
        await this.map.writePages(pages);
        await this.map.sync();
      }
    } catch (e) {
      this.flushFailure = ioError(e, 'flush', 0);
      throw this.flushFailure;
    }
  }

  capabilities(): DeviceCapabilities {
    return { write: true, zero: true, trim: true, flush: true, fua: false, fastZero: true, multiConn: true, prefetch: typeof this.lower.prefetch === 'function' };
  }

  /** Byte ranges the overlay holds (DATA or ZERO granules), in order, adjacent ones merged. */
  changedRanges(): { offset: number; length: number; zero: boolean }[] {
    const out: { offset: number; length: number; zero: boolean }[] = [];
    const n = this.map.entries;
    for (let g = 0; g < n;) {
      const next = this.map.runEnd(g, n);
      const s = this.map.get(g);
      if (s !== BASE) out.push({ offset: g * this.granule, length: Math.min(this.size, next * this.granule) - g * this.granule, zero: s === ZERO });
      g = next;
    }
    return out;
  }

  /** Granules the overlay holds (DATA or ZERO). */
  changedGranules(): number {
    return this.map.countNonZero();
  }

  /** Flushes, then closes the overlay's files and the device below (each CowDevice is given its own). */
  close(): Promise<void> {
    this.closing ??= (async () => {
      try {
        await this.flush();
      } finally {
        await closeFd(this.dataFd).catch(() => undefined);
        await this.map.close();
        await this.lower.close?.();
      }
    })();
    return this.closing;
  }
}
