import { BlobFormatError } from '../codec/blob-format';
import type { Codec } from '../codec/codec';
import type { BlobRef } from '../meta/types';
import { blobKey, BlobStore } from '../storage/types';
import { BlobCorruptError } from '../util/errors';
import type { BlockCache } from './block-cache';

/** Fetches a blob, decrypts and verifies it (on the worker pool), through the shared cache. */
export class BlobFetcher {
  constructor(readonly store: BlobStore, readonly codec: Codec, readonly cache: BlockCache) {}

  static cacheKey(ref: BlobRef): string {
    return ref.checksum.toString('base64');
  }

  fetch(ref: BlobRef): Promise<Buffer> {
    return this.cache.get(BlobFetcher.cacheKey(ref), () => this.load(ref));
  }

  isCached(ref: BlobRef): boolean {
    return this.cache.has(BlobFetcher.cacheKey(ref));
  }

  /** Without the cache: scrub must read storage, not a cached copy. */
  async load(ref: BlobRef): Promise<Buffer> {
    const key = blobKey(ref.uid);
    const raw = await this.store.get(key);
    try {
      return await this.codec.decode(raw, ref.checksum, ref.size);
    } catch (e) {
      if (e instanceof BlobFormatError) throw new BlobCorruptError(key, e.message);
      throw e;
    }
  }
}
