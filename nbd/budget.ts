/**
 * A budget of bytes shared by requests, first come first served: a reply takes its size before its data is
 * read and gives it back once the data has left the process (handed to the kernel). So the memory a client
 * can make the server hold is bounded, including replies queued to a client that does not read them.
 */
export class ByteBudget {
  private used = 0;
  private readonly waiters: Array<{ n: number; resolve: () => void }> = [];

  constructor(readonly limit: number) {}

  get inUse(): number {
    return this.used;
  }

  /**
   * Resolves once `n` more bytes fit. A request larger than the whole budget proceeds when nothing else is
   * held, so every request can be served. Returns undefined when granted at once (no promise on the hot path).
   */
  acquire(n: number): Promise<void> | undefined {
    if (this.waiters.length === 0 && this.fits(n)) {
      this.used += n;
      return undefined;
    }
    return new Promise<void>((resolve) => this.waiters.push({ n, resolve }));
  }

  release(n: number): void {
    this.used -= n;
    while (this.waiters.length && this.fits(this.waiters[0].n)) {
      const w = this.waiters.shift()!;
      this.used += w.n;
      w.resolve();
    }
  }

  private fits(n: number): boolean {
    return this.used === 0 || this.used + n <= this.limit;
  }
}

/** Calls `fn` once, however often the returned function is called. */
export function once(fn: () => void): () => void {
  let done = false;
  return () => {
    if (done) return;
    done = true;
    fn();
  };
}
