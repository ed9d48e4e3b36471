import { Semaphore } from '../util/semaphore';
import { Throttle } from '../util/throttle';
import type { BlobStore, StoredObject } from './types';

/** Caps concurrent reads and writes (simultaneous_reads / simultaneous_writes) and their bandwidth. */
export class LimitedStore implements BlobStore {
  private readers: Semaphore;
  private writers: Semaphore;
  private readThrottle: Throttle;
  private writeThrottle: Throttle;

  constructor(readonly inner: BlobStore, opts: { reads: number; writes: number; bandwidthRead: number; bandwidthWrite: number }) {
    this.readers = new Semaphore(opts.reads);
    this.writers = new Semaphore(opts.writes);
    this.readThrottle = new Throttle(opts.bandwidthRead);
    this.writeThrottle = new Throttle(opts.bandwidthWrite);
  }

  get description(): string {
    return this.inner.description;
  }

  put(key: string, data: Buffer): Promise<void> {
    return this.writers.use(async () => {
      await this.writeThrottle.take(data.length);
      await this.inner.put(key, data);
    });
  }

  get(key: string): Promise<Buffer> {
    return this.readers.use(async () => {
      const data = await this.inner.get(key);
      await this.readThrottle.take(data.length);
      return data;
    });
  }

  getInto(key: string, into: Buffer): Promise<Buffer> {
    return this.readers.use(async () => {
      const data = this.inner.getInto ? await this.inner.getInto(key, into) : await this.inner.get(key);
      await this.readThrottle.take(data.length);
      return data;
    });
  }

  delete(keys: string[]): Promise<void> {
    return this.writers.use(() => this.inner.delete(keys));
  }

  list(): AsyncIterable<(StoredObject & { partial?: boolean })[]> {
    return this.inner.list();
  }

  listUnder(prefix: string): AsyncIterable<StoredObject[]> {
    return this.inner.listUnder(prefix);
  }

  check(): Promise<void> {
    return this.inner.check();
  }

  get readMarker(): (() => Promise<string | undefined>) | undefined {
    return this.inner.readMarker?.bind(this.inner);
  }

  get writeMarker(): ((text: string) => Promise<void>) | undefined {
    return this.inner.writeMarker?.bind(this.inner);
  }

  close(): Promise<void> {
    return this.inner.close();
  }
}
