import { LRUCache } from 'lru-cache';
import { blockCount, HOLE, MAP_CHUNK, PENDING } from '../meta/block-map';
import { ChunkWithBlobs, readChunkWithBlobs } from '../meta/map-reader';
import type { BlobRef, MetaStore, VersionRow } from '../meta/types';
import { errorLine } from '../util/errors';
import type { BlobFetcher } from './blob-fetcher';
import { CachedBlock, inMemory } from './block-cache';
import { replyBuffers } from './reply-buffers';
import { FailureLog } from './failure-log';
import { BlockDevice, DeviceError, Extent } from './types';

/** What one block of a version is. */
export type BlockSlot = { kind: 'hole' } | { kind: 'pending' } | { kind: 'data'; ref: BlobRef };

/**
 * Failed reads of one block are logged once per interval with the number of repeats: concurrent readers share
 * one fetch and a failed fetch is remembered for a while (BlockCache), but a client may ask again and again.
 */
const blockFailures = new FailureLog(() => undefined);

/** How long a block map chunk holding blocks not yet backed up is trusted before it is read again. */
export const PENDING_RECHECK_MS = 1000;

interface LoadedChunk {
  chunk: Promise<ChunkWithBlobs>;
  at: number;
}

let zeroBlock = Buffer.alloc(0);
/** A shared all-zero buffer of at least `len` bytes. Callers must never write into it. */
export function zeroes(len: number): Buffer {
  if (zeroBlock.length < len) zeroBlock = Buffer.alloc(len);
  return zeroBlock.subarray(0, len);
}

/**
 * A backup version as a read-only block device: block map chunks are loaded on demand (opening a 1 TiB
 * version reads nothing), data blocks come through the BlobFetcher (shared cache, decryption, verification).
 * Buffers returned by `read` may be shared with the cache: never modify them. Those it copied into come from
 * `replyBuffers` and are the caller's (a server gives them back there once sent).
 */
export class VersionDevice implements BlockDevice {
  readonly size: number;
  readonly blockSize: number;
  readonly blocks: number;
  private chunks: LRUCache<number, LoadedChunk>;

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
  /** Blocks read again because the cache gave their memory to another block before they were copied. */
  staleCopies = 0;

  private chunk(c: number): Promise<ChunkWithBlobs> {
    return this.chunkEntry(c).chunk;
  }

  private chunkEntry(c: number): LoadedChunk {
    let e = this.chunks.get(c);
    if (!e) {
      const p = (async () => {
        // Any failure here (a version removed while open makes its map rows disappear; a lost database
        // connection) fails only the requests that need this chunk, as an I/O error: never the process.
        try {
          return await readChunkWithBlobs(this.meta, this.version, c);
        } catch (err) {
          throw new DeviceError(`version ${this.version.uid}: cannot read its block map: ${errorLine(err)}`, 'EIO', c * MAP_CHUNK * this.blockSize);
        }
      })();
      e = { chunk: p, at: Date.now() };
      const entry = e;
      p.catch(() => {
        if (this.chunks.get(c) === entry) this.chunks.delete(c);
      });
      this.chunks.set(c, e);
    }
    return e;
  }

  async slot(index: number): Promise<BlockSlot> {
    const c = Math.floor(index / MAP_CHUNK);
    const first = this.chunkEntry(c);
    let chunk = await first.chunk;
    let e = chunk.entries[index % MAP_CHUNK];
    if (e === PENDING) {
      // A backup still running (or continued later) records this block after we read the map: a chunk with
      // pending blocks is read again once it is older than a moment, so they become readable when written.
      // Another request may have done so meanwhile: then its newer chunk answers.
      const current = this.chunks.get(c);
      if (current && current !== first) {
        chunk = await current.chunk;
      } else if (Date.now() - first.at >= PENDING_RECHECK_MS) {
        this.chunks.delete(c);
        chunk = await this.chunk(c);
      }
      e = chunk.entries[index % MAP_CHUNK];
    }
    if (e === HOLE) return { kind: 'hole' };
    if (e === PENDING) return { kind: 'pending' };
    const ref = chunk.refs.get(e);
    if (!ref) throw new DeviceError(`block ${index} of version ${this.version.uid} refers to blob ${e}, which is not in the database`, 'EIO', index * this.blockSize);
    return { kind: 'data', ref };
  }

  /** One line per block and cause per interval, however many requests fail on it. */
  private logFailure(index: number, line: string): void {
    blockFailures.report(`${this.version.uid}:${index}:${line}`, line, this.log);
  }

  blockLength(index: number): number {
    return Math.min(this.blockSize, this.size - index * this.blockSize);
  }

  /** The plaintext of block `index`, or undefined for a hole; `uncached`: straight from storage. */
  async readBlock(index: number, uncached = false): Promise<CachedBlock | undefined> {
    const at = index * this.blockSize;
    let s: BlockSlot;
    try {
      s = await this.slot(index);
    } catch (e) {
      const line = `cannot read block at offset ${at}: ${errorLine(e)}`;
      this.logFailure(index, line);
      throw new DeviceError(line, 'EIO', at);
    }
    if (s.kind === 'hole') return undefined;
    if (s.kind === 'pending') {
      const line = `version ${this.version.uid}: block at offset ${at} was never backed up (incomplete version)`;
      this.logFailure(index, line);
      throw new DeviceError(line, 'EIO', at);
    }
    try {
      if (!uncached) return await this.fetcher.fetch(s.ref);
      return inMemory(await this.fetcher.load(s.ref));
    } catch (e) {
      const line = `version ${this.version.uid}: cannot read block at offset ${at}: ${errorLine(e)}`;
      this.logFailure(index, line);
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
      if (!b) return zeroes(length);
      if (b.buffer) return b.buffer.subarray(from, from + length);
      const out = replyBuffers.take(length);
      await this.copyOut(first, b, out, 0, from, from + length);
      return out;
    }
    const parts = await Promise.all(Array.from({ length: last - first + 1 }, (_, k) => this.readBlock(first + k)));
    const out = replyBuffers.take(length);
    let pos = 0;
    for (let k = 0; k < parts.length; k++) {
      const blockStart = (first + k) * this.blockSize;
      const from = Math.max(offset, blockStart) - blockStart;
      const to = Math.min(offset + length, blockStart + this.blockLength(first + k)) - blockStart;
      const p = parts[k];
      if (p) await this.copyOut(first + k, p, out, pos, from, to);
      else out.fill(0, pos, pos + (to - from));
      pos += to - from;
    }
    return out;
  }

  /**
   * Copies bytes of a block the cache handed out. Should it have been evicted and its memory given to another
   * block before this copy (a cache much smaller than what is read at once), the block is asked for again; after
   * a few such rounds it is read from storage without the cache, so a read always ends.
   */
  private async copyOut(index: number, b: CachedBlock, out: Buffer, pos: number, from: number, to: number): Promise<void> {
    for (let round = 0; !b.copyTo(out, pos, from, to); round++) {
      this.staleCopies++;
      const again = await this.readBlock(index, round >= 2);
      if (!again) throw new DeviceError(`version ${this.version.uid}: block ${index} changed while read`, 'EIO', index * this.blockSize);
      b = again;
    }
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
   * Asks for the data blocks of the range to be loaded into the cache while storage is idle; resolves when the
   * ones taken are there (errors ignored). The cache bounds what is queued and kept unread (BlockCache), so
   * the walk stops at the first block it refuses: a client's NBD_CMD_CACHE may name gigabytes.
   */
  async prefetch(offset: number, length: number): Promise<void> {
    if (this.fetcher.cache.maxBytes <= 0) return; // nowhere to keep what would be fetched
    // More than the prefetch budget (a quarter of the cache) could not be kept anyway; holes count too, so
    // a hint over a terabyte of holes does not walk its whole block map.
    const end = Math.min(this.size, offset + length, offset + Math.max(this.blockSize, this.fetcher.cache.maxBytes / 4));
    const waits: Promise<void>[] = [];
    for (let i = Math.floor(offset / this.blockSize); i * this.blockSize < end; i++) {
      let s: BlockSlot;
      try {
        s = await this.slot(i);
      } catch {
        break; // the block map cannot be read: the reads will say so
      }
      if (s.kind !== 'data') continue;
      const r = this.fetcher.prefetch(s.ref, this);
      if (r.outcome === 'full') break;
      waits.push(r.done);
    }
    await Promise.all(waits);
  }
}
