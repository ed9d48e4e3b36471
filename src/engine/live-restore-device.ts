import { DeviceCapabilities, DeviceError, Extent, WriteOptions, ZeroOptions, BlockDevice } from '../device/types';
import type { Target } from '../io/types';
import { errorLine } from '../util/errors';
import type { LiveProgress } from './live-progress';
import type { BlockCopier } from './restore-copier';

/**
 * The target of a live restore as a device, served to clients while the version is copied into it:
 * - a read waits for the blocks it touches: one not restored yet is copied at once, ahead of the background
 *   copy (BlockCopier.now), then the target is read;
 * - a write (zero, trim) makes its blocks the client's first: a block it covers whole is handed over without
 *   being restored (BlockCopier.claim: the background copy never writes it afterwards); one it covers in part
 *   is restored first, then written. Either way the block stops being the source of a later repeated blob.
 *   The write is acknowledged once the block's bit is on disk (see LiveProgress);
 * - FLUSH is a checkpoint: the target is fsynced and the progress map written and fsynced.
 */
export class LiveRestoreDevice implements BlockDevice {
  readonly size: number;
  /** Blocks handed to a client write whose bit is not written yet: the copier's done-hook must not queue them. */
  private readonly claiming = new Set<number>();
  /** The background copy has finished: every block is done or failed for good. */
  copyFinished = false;

  constructor(
    private readonly copier: BlockCopier,
    private readonly target: Target,
    private readonly progress: LiveProgress,
    private readonly blockSize: number,
    size: number,
  ) {
    this.size = size;
  }

  /** For the copier's onDone hook: true when the block was handed to a client (its bit comes with the write). */
  isClaimed(index: number): boolean {
    return this.claiming.has(index);
  }

  private range(offset: number, length: number, errno: 'EINVAL' | 'ENOSPC' = 'EINVAL'): [number, number] {
    if (!(offset >= 0 && length >= 0 && offset + length <= this.size)) {
      throw new DeviceError(`request of ${length} bytes at ${offset} is outside the device (size ${this.size})`, errno, offset);
    }
    return [Math.floor(offset / this.blockSize), Math.ceil((offset + length) / this.blockSize)];
  }

  private async restoreNow(i: number): Promise<void> {
    let ok: boolean;
    try {
      ok = await this.copier.now(i);
    } catch (e) {
      throw new DeviceError(`cannot restore block at offset ${i * this.blockSize}: ${errorLine(e)}`, 'EIO', i * this.blockSize);
    }
    if (!ok) throw new DeviceError(`block at offset ${i * this.blockSize} cannot be restored: ${this.copier.errors.find((e) => e.offset === i * this.blockSize)?.message ?? 'read failed'}`, 'EIO', i * this.blockSize);
  }

  async read(offset: number, length: number): Promise<Buffer> {
    const [b0, b1] = this.range(offset, length);
    const waits: Promise<void>[] = [];
    for (let i = b0; i < b1; i++) if (!this.copier.isDone(i)) waits.push(this.restoreNow(i));
    if (waits.length) await Promise.all(waits);
    const buf = Buffer.allocUnsafe(length);
    await this.target.read(buf, offset).catch((e) => {
      throw new DeviceError(errorLine(e), 'EIO', offset);
    });
    return buf;
  }

  async extents(offset: number, length: number): Promise<Extent[]> {
    // The target holds data everywhere as far as a client can tell (its holes are not known here).
    const end = Math.min(this.size, offset + length);
    return end > offset ? [{ offset, length: end - offset, zero: false }] : [];
  }

  /**
   * Makes the blocks of [offset, offset+length) the client's to write: partly covered ones are restored
   * first (unless `keepPartial`: a trim leaves them to the copy); with `claimWhole`, wholly covered ones are
   * handed over unrestored. Returns the blocks the client now owns.
   */
  private async takeOver(offset: number, length: number, claimWhole: boolean, keepPartial = false): Promise<number[]> {
    const [b0, b1] = this.range(offset, length, 'ENOSPC');
    const end = offset + length;
    const owned: number[] = [];
    await Promise.all(Array.from({ length: b1 - b0 }, async (_, k) => {
      const i = b0 + k;
      const whole = offset <= i * this.blockSize && end >= Math.min(this.size, (i + 1) * this.blockSize);
      if (this.copyFinished && this.copier.isDone(i)) {
        owned.push(i);
        return;
      }
      if (!this.copier.isDone(i)) {
        if (whole && claimWhole) this.claiming.add(i);
        else if (keepPartial) return;
        else await this.restoreNow(i);
      }
      // Waits for copies reading the block as the source of a repeated blob, and forgets it as one.
      await this.copier.claim(i);
      owned.push(i);
    }));
    return owned.sort((a, b) => a - b);
  }

  /** Acknowledges only once every owned block's bit is on disk (after an fsync of the target). */
  private async settle(owned: number[]): Promise<void> {
    const missing = owned.filter((i) => !this.progress.isPersisted(i));
    try {
      if (missing.length) await this.progress.persistNow(missing);
    } catch (e) {
      throw new DeviceError(`cannot record the write in the progress map: ${errorLine(e)}`, 'EIO');
    } finally {
      for (const i of owned) this.claiming.delete(i);
    }
  }

  async write(offset: number, data: Buffer, _opts?: WriteOptions): Promise<void> {
    const owned = await this.takeOver(offset, data.length, true);
    try {
      await this.target.write(data, offset);
    } catch (e) {
      for (const i of owned) this.claiming.delete(i);
      throw new DeviceError(errorLine(e), /ENOSPC|EDQUOT/.test(String(e)) ? 'ENOSPC' : 'EIO', offset);
    }
    await this.settle(owned);
  }

  async zero(offset: number, length: number, _opts?: ZeroOptions): Promise<void> {
    const owned = await this.takeOver(offset, length, true);
    try {
      await this.target.zero(offset, length);
    } catch (e) {
      for (const i of owned) this.claiming.delete(i);
      throw new DeviceError(errorLine(e), 'EIO', offset);
    }
    await this.settle(owned);
  }

  /**
   * Blocks a trim covers whole and that are not restored yet are zeroed instead (cheaper than fetching what
   * the client no longer wants); everything else keeps its content, which a trim allows.
   */
  async trim(offset: number, length: number, _opts?: WriteOptions): Promise<void> {
    if (this.copyFinished) return;
    const [b0, b1] = this.range(offset, length);
    const end = offset + length;
    const todo: number[] = [];
    for (let i = b0; i < b1; i++) {
      const whole = offset <= i * this.blockSize && end >= Math.min(this.size, (i + 1) * this.blockSize);
      if (whole && !this.copier.isDone(i)) todo.push(i);
    }
    for (const i of todo) {
      const from = i * this.blockSize;
      const len = Math.min(this.blockSize, this.size - from);
      const owned = await this.takeOver(from, len, true, true);
      try {
        await this.target.zero(from, len);
      } catch (e) {
        for (const j of owned) this.claiming.delete(j);
        throw new DeviceError(errorLine(e), 'EIO', from);
      }
      await this.settle(owned);
    }
  }

  async flush(): Promise<void> {
    try {
      await this.progress.checkpoint();
    } catch (e) {
      throw new DeviceError(`flush failed: ${errorLine(e)}`, 'EIO');
    }
  }

  capabilities(): DeviceCapabilities {
    return { write: true, zero: true, trim: true, flush: true, fua: false, fastZero: false, multiConn: true, prefetch: false };
  }
}
