/**
 * Collects items pushed in the same moment and hands them to `flush` as one batch, one batch at a time:
 * under load batches grow by themselves (one database transaction for many blocks), when idle each item
 * goes alone without waiting for a timer.
 */
export class Coalescer<I, R> {
  private queue: { item: I; resolve: (r: R) => void; reject: (e: unknown) => void }[] = [];
  private running = false;

  constructor(private readonly flush: (items: I[]) => Promise<R[]>, private readonly maxBatch = 512) {}

  push(item: I): Promise<R> {
    return new Promise<R>((resolve, reject) => {
      this.queue.push({ item, resolve, reject });
      if (!this.running) {
        this.running = true;
        setImmediate(() => void this.loop());
      }
    });
  }

  private async loop(): Promise<void> {
    while (this.queue.length) {
      const batch = this.queue.splice(0, this.maxBatch);
      try {
        const results = await this.flush(batch.map((b) => b.item));
        batch.forEach((b, k) => b.resolve(results[k]));
      } catch (e) {
        for (const b of batch) b.reject(e);
      }
    }
    this.running = false;
  }
}
