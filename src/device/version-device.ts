import { LRUCache } from 'lru-cache';
import { blockCount, HOLE, MAP_CHUNK, PENDING } from '../meta/block-map';
import { ChunkWithBlobs, readChunkWithBlobs } from '../meta/map-reader';
import type { BlobRef, MetaStore, VersionRow } from '../meta/types';
import { errorLine } from '../util/errors';
import type { BlobFetcher } from './blob-fetcher';
import { BlockDevice, DeviceError, Extent } from './types';

/** What one block of a version is. */
export type BlockSlot = { kind: 'hole' } | { kind: 'pending' } | { kind: 'data'; ref: BlobRef };

/**
 * Errors already logged. Concurrent readers of one block share one fetch (and so one error object): the
 * failure is logged once, not once per waiting request.
 */
const logged = new WeakSet<object>();

let zeroBlock = Buffer.alloc(0);
/** A shared all-zero buffer of at least `len` bytes. Callers must never write into it. */
export function zeroes(len: number): Buffer {
  if (zeroBlock.length < len) zeroBlock = Buffer.alloc(len);
  return zeroBlock.subarray(0, len);
}

/**
 * A backup version as a read-only block device: block map chunks are loaded on demand (opening a 1 TiB
 * version reads nothing), data blocks come through the BlobFetcher (shared cache, decryption, verification).
 * Buffers returned by `read` may be shared with the cache: never modify them.
 */
export class VersionDevice implements BlockDevice {
  readonly size: number;
  readonly blockSize: number;
  readonly blocks: number;
  private chunks: LRUCache<number, Promise<ChunkWithBlobs>>;

  constructor(
    private readonly meta: MetaStore,
    readonly version: VersionRow,
    private readonly fetcher: BlobFetcher,
    opts: { chunkCacheEntries?: number; log?: (line: string) => void } = {},
  ) {
    this.size = version.size;
    this.blockSize = version.blockSize;
    this.blocks = blockCount(version.size, version.blockSize);
    this.chunks = new LRUCache({ max: opts.chunkCacheEntries ?? 64 });
    this.log = opts.log ?? (() => undefined);
  }

  private readonly log: (line: string) => void;

  private chunk(c: number): Promise<ChunkWithBlobs> {
    let p = this.chunks.get(c);
    if (!p) {
      p = (async () => {
        // Any failure here (a version removed while open makes its map rows disappear; a lost database
        // connection) fails only the requests that need this chunk, as an I/O error: never the process.
        try {
          return await readChunkWithBlobs(this.meta, this.version, c);
        } catch (e) {
          throw new DeviceError(`version ${this.version.uid}: cannot read its block map: ${errorLine(e)}`, 'EIO', c * MAP_CHUNK * this.blockSize);
        }
      })();
      p.catch(() => this.chunks.delete(c));
      this.chunks.set(c, p);
    }
    return p;
  }

  async slot(index: number): Promise<BlockSlot> {
    const c = await this.chunk(Math.floor(index / MAP_CHUNK));
    const e = c.entries[index % MAP_CHUNK];
    if (e === HOLE) return { kind: 'hole' };
    if (e === PENDING) return { kind: 'pending' };
    const ref = c.refs.get(e);
    if (!ref) throw new DeviceError(`block ${index} of version ${this.version.uid} refers to blob ${e}, which is not in the database`, 'EIO', index * this.blockSize);
    return { kind: 'data', ref };
  }

  private logOnce(e: unknown, line: string): void {
    if (typeof e === 'object' && e !== null) {
      if (logged.has(e)) return;
      logged.add(e);
    }
    this.log(line);
  }

  blockLength(index: number): number {
    return Math.min(this.blockSize, this.size - index * this.blockSize);
  }

  /** The plaintext of block `index`, or undefined for a hole. */
  async readBlock(index: number): Promise<Buffer | undefined> {
    const at = index * this.blockSize;
    let s: BlockSlot;
    try {
      s = await this.slot(index);
    } catch (e) {
      const line = `cannot read block at offset ${at}: ${errorLine(e)}`;
      this.logOnce(e, line);
      throw new DeviceError(line, 'EIO', at);
    }
    if (s.kind === 'hole') return undefined;
    if (s.kind === 'pending') {
      const line = `version ${this.version.uid}: block at offset ${at} was never backed up (incomplete version)`;
      this.log(line);
      throw new DeviceError(line, 'EIO', at);
    }
    try {
      return await this.fetcher.fetch(s.ref);
    } catch (e) {
      const line = `version ${this.version.uid}: cannot read block at offset ${at}: ${errorLine(e)}`;
      this.logOnce(e, line);
      throw new DeviceError(line, 'EIO', at);
    }
  }

  async read(offset: number, length: number): Promise<Buffer> {
    if (offset < 0 || length < 0 || offset + length > this.size) throw new DeviceError(`read of ${length} bytes at ${offset} is outside the device (size ${this.size})`, 'EINVAL', offset);
    if (length === 0) return Buffer.alloc(0);
    const first = Math.floor(offset / this.blockSize);
    const last = Math.floor((offset + length - 1) / this.blockSize);
    if (first === last) {
      const b = await this.readBlock(first);
      const from = offset - first * this.blockSize;
      return b ? b.subarray(from, from + length) : zeroes(length);
    }
    const parts = await Promise.all(Array.from({ length: last - first + 1 }, (_, k) => this.readBlock(first + k)));
    const out = Buffer.allocUnsafe(length);
    let pos = 0;
    for (let k = 0; k < parts.length; k++) {
      const blockStart = (first + k) * this.blockSize;
      const from = Math.max(offset, blockStart) - blockStart;
      const to = Math.min(offset + length, blockStart + this.blockLength(first + k)) - blockStart;
      const p = parts[k];
      if (p) p.copy(out, pos, from, to);
      else out.fill(0, pos, pos + (to - from));
      pos += to - from;
    }
    return out;
  }

  async extents(offset: number, length: number): Promise<Extent[]> {
    const end = Math.min(this.size, offset + length);
    const out: Extent[] = [];
    if (offset >= end) return out;
    let c: ChunkWithBlobs | undefined;
    for (let i = Math.floor(offset / this.blockSize); i * this.blockSize < end; i++) {
      // One lookup per chunk, not per block: block status of a whole 1 TiB version walks 262,144 blocks.
      if (!c || i % MAP_CHUNK === 0) c = await this.chunk(Math.floor(i / MAP_CHUNK));
      const zero = c.entries[i % MAP_CHUNK] === HOLE;
      const from = Math.max(offset, i * this.blockSize);
      const to = Math.min(end, (i + 1) * this.blockSize);
      const last = out[out.length - 1];
      if (last && last.zero === zero) last.length += to - from;
      else out.push({ offset: from, length: to - from, zero });
    }
    return out;
  }

  /**
   * Starts fetching the blocks of the range into the cache; resolves when they are there (errors ignored).
   * At most half the cache is prefetched per call: more would evict what this call just fetched (a client's
   * NBD_CMD_CACHE may name gigabytes).
   */
  async prefetch(offset: number, length: number): Promise<void> {
    if (this.fetcher.cache.maxBytes <= 0) return; // nowhere to keep what would be fetched
    const end = Math.min(this.size, offset + length, offset + Math.max(this.blockSize, this.fetcher.cache.maxBytes / 2));
    const jobs: Promise<unknown>[] = [];
    for (let i = Math.floor(offset / this.blockSize); i * this.blockSize < end; i++) {
      jobs.push(this.slot(i).then((s) => (s.kind === 'data' && !this.fetcher.isCached(s.ref) ? this.fetcher.fetch(s.ref) : undefined)).catch(() => undefined));
    }
    await Promise.all(jobs);
  }
}
