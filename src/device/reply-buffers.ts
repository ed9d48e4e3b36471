/**
 * Buffers for the data of device reads, reused once their reply is sent. Memory a process maps for the
 * first time is dear on some virtual machines (see ShmSlab), and a fresh buffer per NBD read of 256 KiB cost
 * more than copying the data into it. A device read that copies into a buffer of its own takes one from here;
 * the server gives it back after the reply has gone out. Only buffers this pool made are taken back, so
 * giving back a buffer that belongs to someone else (a cache's, a subarray of one) is a no-op.
 *
 * Contract: a device that returns a buffer taken from here hands it over to its caller and keeps no
 * reference; the caller gives it back at most once, when it no longer reads it.
 *
 * The memory is SharedArrayBuffers: up to 64 MiB kept here as ArrayBuffers counted as V8's external memory,
 * and that made it collect the whole heap over and over (see allocShared).
 */
export class ReplyBuffers {
  private readonly free = new Map<number, SharedArrayBuffer[]>();
  private readonly mine = new WeakSet<SharedArrayBuffer>();
  private kept = 0;

  constructor(
    /** Bytes kept for reuse at most. */
    private readonly maxKept = 64 * 1024 * 1024,
    /** Smaller reads come from Node's allocator (small allocations are reused there anyway). */
    private readonly minSize = 64 * 1024,
  ) {}

  /** A buffer of `length` bytes (contents undefined). */
  take(length: number): Buffer {
    if (length < this.minSize) return Buffer.allocUnsafe(length);
    const size = 2 ** Math.ceil(Math.log2(length));
    const ab = this.free.get(size)?.pop();
    if (ab) {
      this.kept -= size;
      return Buffer.from(ab, 0, length);
    }
    const fresh = new SharedArrayBuffer(size);
    this.mine.add(fresh);
    return Buffer.from(fresh, 0, length);
  }

  /** Gives back a buffer from `take` (anything else is ignored). */
  give(b: Buffer): void {
    const ab = b.buffer;
    if (!(ab instanceof SharedArrayBuffer) || !this.mine.has(ab) || this.kept + ab.byteLength > this.maxKept) return;
    let list = this.free.get(ab.byteLength);
    if (!list) this.free.set(ab.byteLength, (list = []));
    if (list.includes(ab)) return; // given twice: keep it once
    list.push(ab);
    this.kept += ab.byteLength;
  }

  get keptBytes(): number {
    return this.kept;
  }
}

/** The process's pool. */
export const replyBuffers = new ReplyBuffers();
