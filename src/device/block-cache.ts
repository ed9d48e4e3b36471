import { LRUCache } from 'lru-cache';
import { ShmSlab, SlabTarget } from './shm-slab';

export interface BlockCacheOptions {
  /** Loads the store serves at once (simultaneous_reads): prefetching uses at most half, and only idle ones. */
  concurrency?: number;
  /** How long a failed load is remembered: reads of that block fail at once meanwhile (no fetch). */
  failureTtlMs?: number;
  /**
   * Keep blocks in a shared-memory file (ShmSlab) instead of Buffers (default: when the cache holds at least
   * one block and /dev/shm is writable). Its slots are `blockSize` bytes (larger blocks stay Buffers).
   */
  shm?: boolean;
  blockSize?: number;
  /** Gets a loaded Buffer back once its bytes are in the shared-memory file (to reuse its memory). */
  recycle?: (b: Buffer) => void;
}

/**
 * A block as the cache hands it out. Its bytes are copied out with `copyTo`; `buffer` is set when the cache
 * keeps them as a Buffer (read it without copying; never modify it).
 */
export interface CachedBlock {
  readonly length: number;
  readonly buffer?: Buffer;
  /**
   * Copies bytes [from, to) of the block into `out` at `pos`. False when the block has been evicted and its
   * slot given to another block since it was handed out: ask the cache again.
   */
  copyTo(out: Buffer, pos: number, from: number, to: number): boolean;
}

/** A block kept in a slot of the shared-memory file. */
interface SlabEntry {
  slot: number;
  gen: number;
  length: number;
}

type Entry = Buffer | SlabEntry;

/**
 * What a load gives the cache: the block, or (when it was given a slot to write into) how many bytes of it it
 * wrote there.
 */
export type LoadResult = Buffer | { stored: number };
export type Loader = (slot?: SlabTarget) => Promise<LoadResult>;

/** A block held as a Buffer, handed out as a CachedBlock. */
export function inMemory(b: Buffer): CachedBlock {
  return {
    length: b.length,
    buffer: b,
    copyTo(out, pos, from, to) {
      b.copy(out, pos, from, to);
      return true;
    },
  };
}

/** Why a prefetch was not taken, when it was not. */
export type PrefetchOutcome = 'cached' | 'queued' | 'full';

interface Queued {
  key: string;
  size: number;
  load: Loader;
  source: object;
  done: Promise<void>;
  resolve: () => void;
}

/**
 * The process-wide cache of plaintext blocks, bounded in bytes. Keyed by block checksum, so equal blocks of
 * different versions (or of one version) share one entry; concurrent misses of one block share one fetch.
 *
 * Reads come first, prefetches (readahead, NBD_CMD_CACHE) take what is left:
 * - a prefetch waits in a bounded queue and is loaded only while fewer than `concurrency` loads run (at most
 *   half of them prefetches), so reads never queue behind a client's thousands of CACHE requests;
 * - blocks prefetched and not read yet, plus those queued, may fill at most a quarter of the cache, so a
 *   client cannot flush what everyone else reads; beyond that prefetches are dropped (they are hints);
 * - sources (devices) are served in turn, each with at most half the queue;
 * - a read of a queued block loads it at once.
 *
 * A failed load is remembered for `failureTtlMs`: reads of the block fail at once with the same error instead
 * of asking storage again, so a missing object does not turn into a storm of GETs.
 */
export class BlockCache {
  private lru: LRUCache<string, Entry> | undefined;
  private inflight = new Map<string, Promise<CachedBlock>>();
  /** Opened with the first block stored (its slot size from the block size); null: not used. */
  private slab: ShmSlab | undefined | null;
  private readonly slotSize: number;
  private readonly recycle?: (b: Buffer) => void;
  /** A write into the shared-memory file failed (tmpfs full): new blocks are kept as Buffers. */
  private slabFull = false;
  private failed = new LRUCache<string, { error: unknown; at: number }>({ max: 4096 });
  private readonly concurrency: number;
  private readonly failureTtlMs: number;
  hits = 0;
  misses = 0;

  // Prefetching
  private readonly queues = new Map<object, Queued[]>();
  private readonly queued = new Map<string, Queued>();
  private queuedBytes = 0;
  /** Prefetched blocks not read since, by key: their bytes. */
  private readonly unread = new Map<string, number>();
  private unreadBytes = 0;
  /** Blocks a read asked for while their load was running (a prefetch so joined counts as read). */
  private readonly joined = new Set<string>();
  private demandLoads = 0;
  private prefetchLoads = 0;
  /** Bytes of prefetches being loaded. */
  private loadingBytes = 0;
  readonly prefetchStats = { queued: 0, dropped: 0, loaded: 0, used: 0 };

  constructor(readonly maxBytes: number, opts: BlockCacheOptions = {}) {
    this.concurrency = Math.max(2, opts.concurrency ?? 8);
    this.failureTtlMs = opts.failureTtlMs ?? 5000;
    this.slotSize = opts.blockSize ?? 4 * 1024 * 1024;
    this.recycle = opts.recycle;
    this.slab = opts.shm === false || maxBytes < this.slotSize ? null : undefined;
    if (maxBytes > 0) {
      this.lru = new LRUCache<string, Entry>({
        maxSize: maxBytes,
        sizeCalculation: (e) => (Buffer.isBuffer(e) ? Math.max(1, e.length) : this.slotSize),
        dispose: (e, key) => {
          if (!Buffer.isBuffer(e)) this.slab?.release(e.slot);
          this.forgetUnread(key);
        },
      });
    }
  }

  /** Whether blocks are kept in shared memory (then loads may give their Buffers back through `recycle`). */
  get usesSharedMemory(): boolean {
    return this.slab !== null;
  }

  private handOut(e: Entry): CachedBlock {
    if (Buffer.isBuffer(e)) return inMemory(e);
    const slab = this.slab!;
    return {
      length: e.length,
      // Synchronous: copies on the thread pool made warm NBD reads slower (nbdcopy 0.76x of nbdkit, 0.86x
      // without), and nothing can take the slot between the generation check and the copy.
      copyTo: (out, pos, from, to) => slab.readInto(e.slot, e.gen, from, out, pos, to - from),
    };
  }

  /**
   * Keeps a loaded block: in a slot of the shared-memory file when there is one (evicting the least recently
   * used blocks for a slot), else as the Buffer itself.
   */
  private keep(key: string, b: Buffer, reserved?: { slot: number; gen: number }): CachedBlock {
    if (!this.lru) return inMemory(b);
    const slab = this.usableSlab();
    const fits = slab !== undefined && b.length <= slab.slotSize;
    if (!fits && reserved) this.slab?.release(reserved.slot);
    const taken = fits ? reserved ?? this.reserveSlot() : undefined;
    if (taken) {
      try {
        slab!.write(taken.slot, b);
        this.recycle?.(b);
        return this.keepInSlot(key, taken, b.length);
      } catch {
        // tmpfs full (or gone): this block stays a Buffer, and so do later ones (no write attempt per load)
        slab!.release(taken.slot);
        this.slabFull = true;
      }
    }
    this.lru.set(key, b);
    return inMemory(b);
  }

  /** Records a block whose bytes are in `taken`. */
  private keepInSlot(key: string, taken: { slot: number; gen: number }, length: number): CachedBlock {
    const e: SlabEntry = { slot: taken.slot, gen: taken.gen, length };
    this.lru!.set(key, e);
    return this.handOut(e);
  }

  /** The shared-memory file (opened on first use), unless it is not used, could not be opened, or is full. */
  private usableSlab(): ShmSlab | undefined {
    if (this.slab === undefined) this.slab = ShmSlab.open(this.slotSize, Math.floor(this.maxBytes / this.slotSize)) ?? null;
    return this.slab && !this.slabFull ? this.slab : undefined;
  }

  /** A free slot of the shared-memory file, evicting the least recently used blocks for one if need be. */
  private reserveSlot(): { slot: number; gen: number } | undefined {
    if (!this.lru) return undefined;
    if (!this.usableSlab()) return undefined;
    const slab = this.slab!;
    let taken = slab.take();
    while (!taken && this.lru.size > 0) {
      this.lru.pop();
      taken = slab.take();
    }
    return taken;
  }

  has(key: string): boolean {
    return !!this.lru?.has(key) || this.inflight.has(key);
  }

  /** The cached block, or the result of `load` (shared with every concurrent caller of the same key). */
  get(key: string, load: Loader): Promise<CachedBlock> {
    const hit = this.lru?.get(key);
    if (hit) {
      this.hits++;
      this.forgetUnread(key, true);
      return Promise.resolve(this.handOut(hit));
    }
    const pending = this.inflight.get(key);
    if (pending) {
      this.joined.add(key);
      return pending;
    }
    const failure = this.failed.get(key);
    if (failure && Date.now() - failure.at < this.failureTtlMs) return Promise.reject(failure.error);
    this.misses++;
    const q = this.queued.get(key);
    if (q) this.unqueue(q);
    const p = this.start(key, load, false);
    // A prefetch of this block that was still queued is answered by this load.
    if (q) p.then(q.resolve, q.resolve);
    return p;
  }

  /**
   * Asks for `key` to be loaded when storage is idle. 'cached': there or on its way; 'queued': `done` resolves
   * once loaded (or failed); 'full': dropped, the prefetch budget is used up (stop asking for more).
   */
  prefetch(key: string, size: number, load: Loader, source: object): { outcome: PrefetchOutcome; done: Promise<void> } {
    if (!this.lru || this.has(key)) return { outcome: 'cached', done: Promise.resolve() };
    const q = this.queued.get(key);
    if (q) return { outcome: 'cached', done: q.done };
    const failure = this.failed.get(key);
    if (failure && Date.now() - failure.at < this.failureTtlMs) return { outcome: 'cached', done: Promise.resolve() };
    const budget = this.maxBytes / 4;
    const mine = this.queues.get(source) ?? [];
    const mineBytes = mine.reduce((s, e) => s + e.size, 0);
    if (this.unreadBytes + this.queuedBytes + this.loadingBytes + size > budget || mineBytes + size > budget / 2) {
      this.prefetchStats.dropped++;
      return { outcome: 'full', done: Promise.resolve() };
    }
    let resolve: () => void = () => undefined;
    const done = new Promise<void>((r) => (resolve = r));
    const e: Queued = { key, size, load, source, done, resolve };
    mine.push(e);
    this.queues.set(source, mine);
    this.queued.set(key, e);
    this.queuedBytes += size;
    this.prefetchStats.queued++;
    this.pump();
    return { outcome: 'queued', done };
  }

  /** Prefetches queued, prefetched blocks not read yet (bytes), loads running: for tests and status. */
  get prefetchState(): { queued: number; unreadBytes: number; demandLoads: number; prefetchLoads: number } {
    return { queued: this.queued.size, unreadBytes: this.unreadBytes, demandLoads: this.demandLoads, prefetchLoads: this.prefetchLoads };
  }

  private start(key: string, load: Loader, prefetch: boolean): Promise<CachedBlock> {
    if (prefetch) this.prefetchLoads++;
    else this.demandLoads++;
    // The slot is taken before the load, so the load can write the block into it where it decodes it.
    const reserved = this.reserveSlot();
    const p = load(reserved && this.slab ? this.slab.target(reserved.slot) : undefined).then(
      (loaded) => {
        this.inflight.delete(key);
        this.failed.delete(key);
        if (!Buffer.isBuffer(loaded) && !(reserved && this.slab && this.lru)) throw new Error('block cache: a load stored a block without a slot');
        const b = Buffer.isBuffer(loaded) ? this.keep(key, loaded, reserved) : this.keepInSlot(key, reserved!, loaded.stored);
        const read = this.joined.delete(key);
        if (prefetch) {
          this.prefetchStats.loaded++;
          if (read) this.prefetchStats.used++;
          else if (this.lru?.has(key)) {
            // Nobody has read it yet: it counts against the prefetch budget until read or evicted.
            this.unread.set(key, b.length);
            this.unreadBytes += b.length;
          }
        }
        return b;
      },
      (e) => {
        if (reserved) this.slab?.release(reserved.slot);
        this.inflight.delete(key);
        this.joined.delete(key);
        if (this.failureTtlMs > 0) this.failed.set(key, { error: e, at: Date.now() });
        throw e;
      },
    );
    this.inflight.set(key, p);
    const settled = (): void => {
      if (prefetch) this.prefetchLoads--;
      else this.demandLoads--;
      this.pump();
    };
    p.then(settled, settled);
    return p;
  }

  /** Starts queued prefetches while storage has idle capacity, taking sources in turn. */
  private pump(): void {
    while (this.queued.size && this.prefetchLoads < this.concurrency / 2 && this.demandLoads + this.prefetchLoads < this.concurrency) {
      const [source, list] = this.queues.entries().next().value as [object, Queued[]];
      const e = list.shift()!;
      // Round robin: the source goes to the back of the line.
      this.queues.delete(source);
      if (list.length) this.queues.set(source, list);
      this.queued.delete(e.key);
      this.queuedBytes -= e.size;
      if (this.has(e.key)) {
        e.resolve();
        continue;
      }
      this.loadingBytes += e.size;
      const loaded = (): void => {
        this.loadingBytes -= e.size;
        e.resolve();
      };
      this.start(e.key, e.load, true).then(loaded, loaded);
    }
  }

  private unqueue(e: Queued): void {
    this.queued.delete(e.key);
    this.queuedBytes -= e.size;
    const list = this.queues.get(e.source);
    if (!list) return;
    const i = list.indexOf(e);
    if (i >= 0) list.splice(i, 1);
    if (!list.length) this.queues.delete(e.source);
  }

  private forgetUnread(key: string, used = false): void {
    const n = this.unread.get(key);
    if (n === undefined) return;
    this.unread.delete(key);
    this.unreadBytes -= n;
    if (used) this.prefetchStats.used++;
  }

  get size(): number {
    return this.lru?.calculatedSize ?? 0;
  }

  clear(): void {
    this.lru?.clear();
    this.failed.clear();
  }

  /**
   * Frees the shared-memory file (the cache keeps working, with Buffers). Only once no load can still write
   * into it: a codec worker given a slot writes to the file's descriptor, which the system may hand to another
   * file once closed (Repository closes its codec pool first).
   */
  close(): void {
    this.lru?.clear();
    this.slab?.close();
    this.slab = null;
  }

  /** Forgets remembered failures (a repaired object is fetched again at once). */
  forgetFailures(): void {
    this.failed.clear();
  }
}
