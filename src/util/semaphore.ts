/** Counts permits; `acquire` waits in FIFO order when none is free. */
export class Semaphore {
  private waiters: (() => void)[] = [];
  /** How many acquire() calls had to wait for a permit. */
  waits = 0;
  constructor(private permits: number) {}

  async acquire(): Promise<void> {
    if (this.permits > 0) {
      this.permits--;
      return;
    }
    this.waits++;
    await new Promise<void>((resolve) => this.waiters.push(resolve));
  }

  release(): void {
    const next = this.waiters.shift();
    if (next) next();
    else this.permits++;
  }

  async use<T>(fn: () => Promise<T>): Promise<T> {
    await this.acquire();
    try {
      return await fn();
    } finally {
      this.release();
    }
  }
}
