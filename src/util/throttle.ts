/**
 * Bandwidth limit shared by every transfer in one direction: a token bucket refilled at `bytesPerSecond`
 * with one second of burst. 0 means unlimited.
 */
export class Throttle {
  private tokens: number;
  private last = Date.now();
  private chain: Promise<void> = Promise.resolve();

  constructor(private readonly bytesPerSecond: number) {
    this.tokens = bytesPerSecond;
  }

  /** Resolves once `bytes` may be transferred. Calls are served in order. */
  take(bytes: number): Promise<void> {
    if (!this.bytesPerSecond) return Promise.resolve();
    const next = this.chain.then(async () => {
      const now = Date.now();
      this.tokens = Math.min(this.bytesPerSecond, this.tokens + ((now - this.last) / 1000) * this.bytesPerSecond);
      this.last = now;
      this.tokens -= bytes;
      if (this.tokens < 0) {
        const waitMs = (-this.tokens / this.bytesPerSecond) * 1000;
        await new Promise((r) => setTimeout(r, waitMs));
      }
    });
    this.chain = next.catch(() => undefined);
    return next;
  }
}
