import * as fs from 'node:fs';
import * as path from 'node:path';
import { randomBytes } from 'node:crypto';

/**
 * Fixed-size slots in a shared-memory file (tmpfs), for the block cache.
 *
 * Why not plain Buffers: memory a process maps for the first time is dear on virtual machines that back guest
 * memory lazily (measured on the 2-core VMs this runs on: filling 800 MB of fresh Buffers took 4.8 s, writing
 * the same bytes into a tmpfs file from one reused buffer 0.17 s, reading them back 0.08 s). A cache that fills
 * with a gigabyte of decoded blocks paid that on every cold read; in a tmpfs file the pages are the kernel's
 * and never mapped into this process, and reads copy them into buffers that are reused.
 *
 * The file is unlinked as soon as it is open (nothing to clean up after a crash, no other process can open
 * it), created mode 0600. Each slot carries a generation that changes when the slot is given to another block,
 * so a reader holding an old reference finds out instead of reading another block's bytes.
 */
/** A slot to write one block into: `capacity` bytes at `position` of file descriptor `fd`. */
export interface SlabTarget {
  fd: number;
  position: number;
  capacity: number;
}

/** Writes all of `data` at `position` of `fd` (a short write continues; errors such as ENOSPC throw). */
export function writeAllAt(fd: number, data: Buffer, position: number): void {
  for (let done = 0; done < data.length;) done += fs.writeSync(fd, data, done, data.length - done, position + done);
}

export class ShmSlab {
  private readonly free: number[] = [];
  private readonly generation: Uint32Array;
  private closed = false;

  private constructor(private readonly fd: number, readonly slotSize: number, readonly slots: number) {
    this.generation = new Uint32Array(slots);
    for (let i = slots - 1; i >= 0; i--) this.free.push(i);
  }

  /** A slab of `slots` slots of `slotSize` bytes, or undefined when no tmpfs directory is writable. */
  static open(slotSize: number, slots: number, dir = process.env.BACKY_SHM_DIR ?? '/dev/shm'): ShmSlab | undefined {
    if (slots < 1 || slotSize < 1) return undefined;
    const file = path.join(dir, `backy-cache-${process.pid}-${randomBytes(6).toString('hex')}`);
    let fd: number;
    try {
      fd = fs.openSync(file, fs.constants.O_RDWR | fs.constants.O_CREAT | fs.constants.O_EXCL, 0o600);
    } catch {
      return undefined;
    }
    try {
      fs.unlinkSync(file);
    } catch {
      fs.closeSync(fd);
      return undefined;
    }
    return new ShmSlab(fd, slotSize, slots);
  }

  /** Where a slot's bytes go, for a writer in another thread (a codec worker stores a decoded block itself). */
  target(slot: number): SlabTarget {
    return { fd: this.fd, position: slot * this.slotSize, capacity: this.slotSize };
  }

  get freeSlots(): number {
    return this.free.length;
  }

  /** A free slot and its generation, or undefined when all are taken. */
  take(): { slot: number; gen: number } | undefined {
    const slot = this.free.pop();
    if (slot === undefined) return undefined;
    return { slot, gen: this.generation[slot] };
  }

  /** Gives a slot back; references to its old content stop reading. */
  release(slot: number): void {
    this.generation[slot] = (this.generation[slot] + 1) >>> 0;
    this.free.push(slot);
  }

  /** Stores `data` in `slot` (throws, e.g. ENOSPC when tmpfs is full; the slot stays taken). */
  write(slot: number, data: Buffer): void {
    if (data.length > this.slotSize) throw new RangeError(`block of ${data.length} bytes in a slot of ${this.slotSize}`);
    writeAllAt(this.fd, data, slot * this.slotSize);
  }

  /**
   * Copies `length` bytes from offset `from` of the slot into `out` at `pos`; false when the slot has been
   * given to another block since `gen` (the caller loads its block again). Synchronous, so nothing can take
   * the slot between the check and the copy.
   */
  readInto(slot: number, gen: number, from: number, out: Buffer, pos: number, length: number): boolean {
    if (this.closed || this.generation[slot] !== gen) return false;
    let done = 0;
    while (done < length) {
      const n = fs.readSync(this.fd, out, pos + done, length - done, slot * this.slotSize + from + done);
      if (n === 0) throw new Error('block cache: short read from its shared-memory file');
      done += n;
    }
    return true;
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    fs.closeSync(this.fd);
  }
}
