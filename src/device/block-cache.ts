import { LRUCache } from 'lru-cache';

/**
 * The process-wide cache of plaintext blocks, bounded in bytes. Keyed by block checksum, so equal blocks of
 * different versions (or of one version) share one entry; concurrent misses of one block share one fetch.
 */
export class BlockCache {
  private lru: LRUCache<string, Buffer> | undefined;
  private inflight = new Map<string, Promise<Buffer>>();
  hits = 0;
  misses = 0;

  constructor(readonly maxBytes: number) {
    if (maxBytes > 0) {
      this.lru = new LRUCache<string, Buffer>({ maxSize: maxBytes, sizeCalculation: (b) => Math.max(1, b.length) });
    }
  }

  has(key: string): boolean {
    return !!this.lru?.has(key) || this.inflight.has(key);
  }

  /** The cached block, or the result of `load` (shared with every concurrent caller of the same key). */
  get(key: string, load: () => Promise<Buffer>): Promise<Buffer> {
    const hit = this.lru?.get(key);
    if (hit) {
      this.hits++;
      return Promise.resolve(hit);
    }
    const pending = this.inflight.get(key);
    if (pending) return pending;
    this.misses++;
    const p = load().then(
      (b) => {
        this.inflight.delete(key);
        this.lru?.set(key, b);
        return b;
      },
      (e) => {
        this.inflight.delete(key);
        throw e;
      },
    );
    this.inflight.set(key, p);
    return p;
  }

  get size(): number {
    return this.lru?.calculatedSize ?? 0;
  }

  clear(): void {
    this.lru?.clear();
  }
}
