/**
 * Spare blob read buffers, one pool for the whole process: a buffer a blob was read into comes back after
 * decoding and is reused for the next read. Kept outside cache_size, so it is small and shared: every device
 * of every NBD connection and FUSE open file draws from it, instead of each keeping its own spares.
 */
export class SpareBuffers {
  private readonly free: Buffer[] = [];
  private bytes = 0;

  constructor(
    /** Buffers kept at most (enough for the loads that run at once). */
    private readonly maxCount = 16,
    /** Buffers smaller than this are not worth keeping. */
    private readonly minSize = 64 * 1024,
  ) {}

  /** A spare of at least `size` bytes, or undefined. */
  take(size: number): Buffer | undefined {
    for (let i = this.free.length - 1; i >= 0; i--) {
      if (this.free[i].length >= size) {
        const [b] = this.free.splice(i, 1);
        this.bytes -= b.length;
        return b;
      }
    }
    return undefined;
  }

  give(b: Buffer): void {
    if (b.length < this.minSize) return;
    if (this.free.length >= this.maxCount) {
      // Keep the larger buffers: they fit every block.
      let smallest = 0;
      for (let i = 1; i < this.free.length; i++) if (this.free[i].length < this.free[smallest].length) smallest = i;
      if (this.free[smallest].length >= b.length) return;
      this.bytes -= this.free[smallest].length;
      this.free.splice(smallest, 1);
    }
    this.free.push(b);
    this.bytes += b.length;
  }

  get count(): number {
    return this.free.length;
  }

  get size(): number {
    return this.bytes;
  }
}

/** The process's pool. */
export const spareBuffers = new SpareBuffers();
