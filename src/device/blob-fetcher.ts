import { encodedCapacity } from '../codec/blob-format';
import { allocShared } from '../codec/codec';
import type { Codec } from '../codec/codec';
import type { BlobRef } from '../meta/types';
import { blobKey, BlobStore } from '../storage/types';
import { BlobCorruptError } from '../util/errors';
import type { BlockCache, CachedBlock, LoadResult, PrefetchOutcome } from './block-cache';
import type { SlabTarget } from './shm-slab';
import { spareBuffers } from './spare-buffers';

/** Fetches a blob, decrypts and verifies it (on the worker pool), through the shared cache. */
export class BlobFetcher {
  /** `keyOf`: the storage key of a blob (its format decides it); backy's own layout by default. */
  constructor(readonly store: BlobStore, readonly codec: Codec, readonly cache: BlockCache, readonly keyOf: (ref: BlobRef) => string = (ref) => blobKey(ref.uid)) {}

  static cacheKey(ref: BlobRef): string {
    return ref.checksum.toString('base64');
  }

  fetch(ref: BlobRef): Promise<CachedBlock> {
    return this.cache.get(BlobFetcher.cacheKey(ref), (slot) => this.loadForCache(ref, slot));
  }

  isCached(ref: BlobRef): boolean {
    return this.cache.has(BlobFetcher.cacheKey(ref));
  }

  /** Loads the block into the cache when storage is idle (see BlockCache.prefetch); `source` is the asker. */
  prefetch(ref: BlobRef, source: object): { outcome: PrefetchOutcome; done: Promise<void> } {
    return this.cache.prefetch(BlobFetcher.cacheKey(ref), ref.size, (slot) => this.loadForCache(ref, slot), source);
  }

  /**
   * A load whose result the cache keeps. When the cache keeps blocks in shared memory and gives a slot, the
   * worker decodes into memory of its own and writes the block there itself (this thread only learns that it
   * is stored); without a slot the plaintext is decoded into a reused buffer. Fresh memory is what made cold
   * reads slow: a spare for the plaintext of every load in flight cost a cold NBD copy of 2 GiB 6,000 more
   * page faults (30,000-31,700 against 25,000).
   */
  private async loadForCache(ref: BlobRef, slot?: SlabTarget): Promise<LoadResult> {
    if (!this.cache.usesSharedMemory) return this.load(ref);
    const cap = encodedCapacity(ref.size);
    const r = await this.decode(ref, slot ? undefined : spareBuffers.take(cap) ?? allocShared(cap), undefined, slot);
    if (r.spareOut) this.recycle(r.spareOut);
    if (r.stored !== undefined) return { stored: r.stored };
    return r.data!;
  }

  /**
   * Without the cache: scrub must read storage, not a cached copy. `recompute` forces (true) or skips the
   * checksum of the plaintext; by default read_verification decides.
   */
  async load(ref: BlobRef, recompute?: boolean): Promise<Buffer> {
    const r = await this.loadInto(ref, undefined, recompute);
    return r.data;
  }

  /** Loads and decodes; with `out`, the plaintext goes into it when possible (spareOut returns it if not). */
  async loadInto(ref: BlobRef, out?: Buffer, recompute?: boolean): Promise<{ data: Buffer; spareOut?: Buffer }> {
    const r = await this.decode(ref, out, recompute);
    return { data: r.data!, spareOut: r.spareOut };
  }

  /** Reads and decodes; with `slot`, the worker writes the plaintext there (`stored`) when it fits. */
  private async decode(ref: BlobRef, out?: Buffer, recompute?: boolean, slot?: SlabTarget): Promise<{ data?: Buffer; stored?: number; spareOut?: Buffer }> {
    const key = this.keyOf(ref);
    let raw: Buffer;
    if (this.store.getInto) {
      // Blob read buffers come back from the worker after decoding and are reused (one pool per process).
      const into = spareBuffers.take(encodedCapacity(ref.size)) ?? allocShared(encodedCapacity(ref.size));
      try {
        raw = await this.store.getInto(key, into);
      } catch (e) {
        this.recycle(into);
        throw e;
      }
    } else {
      raw = await this.store.get(key);
    }
    const r = await this.codec.decodeReusing(raw, ref.checksum, ref.size, out, recompute, ref, slot);
    this.recycle(r.spareBlob);
    if (r.error !== undefined) {
      if (r.spareOut) this.recycle(r.spareOut);
      throw new BlobCorruptError(key, r.error);
    }
    return { data: r.data, stored: r.stored, spareOut: r.spareOut };
  }

  private recycle(b: Buffer): void {
    spareBuffers.give(b);
  }
}
