import { allocBlock } from '../codec/codec';
import type { Target } from '../io/types';
import { blockCount, HOLE, MAP_CHUNK, PENDING } from '../meta/block-map';
import type { BlobRef, VersionRow } from '../meta/types';
import type { Repository } from './repository';
import type { CopyHooks } from './restore-copier';

export interface DeltaStats {
  /** blocks read from the target and hashed */
  blocksCompared: number;
  /** blocks not read at all: the base version has the same entry, and the target is said to hold the base */
  blocksSkippedByBase: number;
}

/**
 * Hooks that turn a restore into a delta restore: before anything is fetched for a block, the target's
 * block is read and hashed (on the worker pool, with the repository's hash function) and compared with the
 * version's checksum (a hole: the block must read as zeroes); only blocks that differ are written. With a
 * base version the target is known to hold, blocks whose map entry the base shares are not even read.
 */
export async function deltaHooks(repo: Repository, v: VersionRow, target: Target, base?: VersionRow): Promise<{ hooks: CopyHooks; stats: DeltaStats }> {
  const stats: DeltaStats = { blocksCompared: 0, blocksSkippedByBase: 0 };
  const bs = v.blockSize;
  const sameAsBase = base ? await baseComparer(repo, v, base) : undefined;
  const pool: Buffer[] = [];
  const take = () => pool.pop() ?? allocBlock(bs);
  const give = (b: Buffer) => {
    if (pool.length < 64 && b.length >= bs) pool.push(b);
  };
  /**
   * blob id → a block of the target already found to hold it. Another block of the same blob is then
   * compared with that one byte for byte instead of being hashed: a memcmp costs a fraction of a sha512,
   * and repeated blocks are common (the same file twice, filler patterns).
   */
  const verified = new Map<number, number>();
  const hooks: CopyHooks = {
    async unchanged(index: number, ref: BlobRef | undefined, length: number): Promise<boolean> {
      if (sameAsBase && (await sameAsBase(index))) {
        stats.blocksSkippedByBase++;
        return true;
      }
      let buf = take();
      try {
        await target.read(buf.subarray(0, length), index * bs);
        stats.blocksCompared++;
        const known = ref && verified.get(ref.id);
        if (ref && known !== undefined) {
          const other = take();
          try {
            await target.read(other.subarray(0, length), known * bs);
            // Equal bytes: equal checksum. Different bytes: not the blob (that block holds it).
            return buf.subarray(0, length).equals(other.subarray(0, length));
          } finally {
            give(other);
          }
        }
        const scan = await repo.codec.scan(buf, length);
        buf = scan.buf;
        const same = ref ? !scan.zero && !!scan.sum && scan.sum.equals(ref.checksum) : scan.zero;
        if (same && ref && !verified.has(ref.id) && verified.size < 1 << 20) verified.set(ref.id, index);
        return same;
      } finally {
        give(buf);
      }
    },
  };
  return { hooks, stats };
}

/** Whether block `index` of `v` has the same map entry as in `base` (same blob, or both holes). */
async function baseComparer(repo: Repository, v: VersionRow, base: VersionRow): Promise<(index: number) => Promise<boolean>> {
  const baseBlocks = blockCount(base.size, base.blockSize);
  // The base's last block differs when it was shorter; blocks past the base's end are never the same.
  const lastComparable = base.size === v.size ? baseBlocks : Math.min(baseBlocks, Math.floor(base.size / base.blockSize));
  const cache = new Map<number, Promise<[Float64Array, Float64Array]>>();
  const chunk = (c: number) => {
    let p = cache.get(c);
    if (!p) {
      // Block maps are read a chunk at a time, in order: keep only the most recent few.
      if (cache.size > 8) cache.delete(cache.keys().next().value!);
      p = Promise.all([repo.meta.readMapChunk(v.id, c), repo.meta.readMapChunk(base.id, c)]);
      cache.set(c, p);
    }
    return p;
  };
  return async (index: number) => {
    if (base.blockSize !== v.blockSize || index >= lastComparable) return false;
    const [mine, theirs] = await chunk(Math.floor(index / MAP_CHUNK));
    const k = index % MAP_CHUNK;
    if (k >= theirs.length) return false;
    const a = mine[k];
    const b = theirs[k];
    return a !== PENDING && a === b && (a === HOLE || a > 0);
  };
}
