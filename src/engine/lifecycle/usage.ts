import { blockCount, decodeChunk, HOLE, PENDING } from '../../meta/block-map';
import type { MapSummary, MapUsage } from '../../meta/map-summary';
import type { VersionRow } from '../../meta/types';

/** backy2's du columns for one version, in logical (plaintext) bytes, plus what storage would free. */
export interface VersionUsage {
  version: VersionRow;
  /** bytes of data blocks */
  real: number;
  /** bytes of holes (all-zero blocks, never stored) */
  null: number;
  /** bytes of blocks repeating a blob used only by this version */
  dedupOwn: number;
  /** bytes of blocks whose blob other versions use too */
  dedupOthers: number;
  /** bytes of blobs used once, by this version only */
  individual: number;
  /** this version's share of the blobs it uses: each blob's size split over all its uses */
  estSpace: number;
  /** plaintext bytes of the blobs only this version uses: what rm + cleanup would free */
  estSpaceFreed: number;
  /** stored bytes (compressed, encrypted) of those blobs: what rm + cleanup frees in storage */
  storedFreed: number;
  /** this version's share of stored bytes */
  estStored: number;
}

export interface RepositoryUsage {
  versions: number;
  /** every blob not being deleted */
  blobs: number;
  storedBytes: number;
  plainBytes: number;
  /** blobs no version uses (cleanup frees them after the grace period) */
  unreferencedBlobs: number;
  unreferencedStoredBytes: number;
  /** Σ real over all versions: what the versions hold, holes excluded */
  logicalBytes: number;
  /** Σ null over all versions */
  sparseBytes: number;
  /** logical bytes per plaintext byte of the blobs in use */
  dedupRatio: number;
  /** plaintext bytes per stored byte of the blobs in use */
  compressionRatio: number;
}

/** One distinct chunk content: its holes, pending entries, last entry and its blob ids in the id pool. */
interface Content {
  holes: number;
  pending: number;
  last: number;
  /** ids[start, end) of the pool: the blob ids of its data entries, repeats included */
  start: number;
  end: number;
  /** how many chunks of all versions have it (through the roots' descendants) */
  uses: number;
  real: number;
  share: number;
  storedShare: number;
}

/**
 * The blob ids of every distinct chunk, back to back in one typed array: one allocation instead of one per
 * chunk, and loops over it stay monomorphic. Blob ids above 2^32 would need a Float64Array; they do not occur.
 */
export class IdPool {
  ids: Uint32Array;
  length = 0;
  constructor(capacity = 1024) {
    this.ids = new Uint32Array(capacity);
  }
  reserve(n: number): void {
    if (this.length + n <= this.ids.length) return;
    const grown = new Uint32Array(Math.max(this.ids.length * 2, this.length + n));
    grown.set(this.ids.subarray(0, this.length));
    this.ids = grown;
  }
}

type Scanned = Pick<Content, 'holes' | 'pending' | 'last' | 'start' | 'end'>;

/**
 * Reads an encoded chunk into the pool without building the generic decoder's arrays: the msgpack array of
 * small integers that block-map.ts writes (0 hole, 1 pending, else 2 + zigzag delta of the blob id). Anything
 * unexpected goes through decodeChunk.
 */
export function scanChunk(raw: Uint8Array, pool: Pick<IdPool, 'ids' | 'length' | 'reserve'> = new IdPool()): Scanned {
  const fast = scanFast(raw, pool);
  if (fast) return fast;
  const entries = decodeChunk(raw);
  pool.reserve(entries.length);
  const start = pool.length;
  let holes = 0;
  let pending = 0;
  for (const e of entries) {
    if (e === HOLE) holes++;
    else if (e === PENDING) pending++;
    else if (e > 0xffffffff) throw new Error(`blob id ${e} is beyond what du counts`);
    else pool.ids[pool.length++] = e;
  }
  return { holes, pending, last: entries.length ? entries[entries.length - 1] : HOLE, start, end: pool.length };
}

function scanFast(b: Uint8Array, pool: Pick<IdPool, 'ids' | 'length' | 'reserve'>): Scanned | undefined {
  let p = 0;
  let n: number;
  const h = b[p++];
  if ((h & 0xf0) === 0x90) n = h & 0x0f;
  else if (h === 0xdc) { n = (b[1] << 8) | b[2]; p = 3; }
  else if (h === 0xdd) { n = ((b[1] << 24) >>> 0) + ((b[2] << 16) | (b[3] << 8) | b[4]); p = 5; }
  else return undefined;
  pool.reserve(n);
  const ids = pool.ids;
  const start = pool.length;
  let count = start;
  let holes = 0;
  let pending = 0;
  let prev = 0;
  let last = HOLE;
  for (let i = 0; i < n; i++) {
    if (p >= b.length) return undefined;
    const t = b[p++];
    let c: number;
    if (t < 0x80) c = t;
    else if (t === 0xcc) c = b[p++];
    else if (t === 0xcd) { c = (b[p] << 8) | b[p + 1]; p += 2; }
    else if (t === 0xce) { c = ((b[p] << 24) >>> 0) + ((b[p + 1] << 16) | (b[p + 2] << 8) | b[p + 3]); p += 4; }
    else return undefined; // larger codes: the generic decoder
    if (c === 0) { holes++; last = HOLE; continue; }
    if (c === 1) { pending++; last = PENDING; continue; }
    const z = c - 2;
    prev += (z & 1) === 0 ? z / 2 : -(z + 1) / 2;
    if (prev > 0xffffffff || prev < 1) return undefined;
    ids[count++] = prev;
    last = prev;
  }
  if (p !== b.length) return undefined;
  pool.length = count;
  return { holes, pending, last, start, end: count };
}

// The long loops of computeUsage are small functions of their own: du runs once per process, so its loops
// start in the interpreter, and V8 optimizes a small function's loop at once but a big function's only after
// compiling all of it (per loop). Over 400,000 blobs that was most of computeUsage's time.

function maxOf(a: Float64Array): number {
  let max = 0;
  for (let k = 0; k < a.length; k++) if (a[k] > max) max = a[k];
  return max;
}

/** values[k] at ids[k], in an array indexed by id. */
function byId(ids: Float64Array, values: Float64Array, maxId: number): Uint32Array {
  const out = new Uint32Array(maxId + 1);
  for (let k = 0; k < ids.length; k++) out[ids[k]] = values[k];
  return out;
}

/** Adds `weight` (times counts[k], if given) uses to each blob of ids[start, end); returns Σ size of them. */
function addUses(ids: ArrayLike<number>, start: number, end: number, weight: number, total: Float64Array, size?: Uint32Array, counts?: Float64Array): number {
  let sum = 0;
  const maxId = total.length - 1;
  for (let k = start; k < end; k++) {
    const id = ids[k];
    if (id > maxId) continue;
    total[id] += counts ? weight * counts[k] : weight;
    if (size) sum += size[id];
  }
  return sum;
}

/** Σ of per[id] over ids[start, end). */
function sumOf(ids: Uint32Array, start: number, end: number, per: Float64Array): number {
  let sum = 0;
  const maxId = per.length - 1;
  for (let k = start; k < end; k++) if (ids[k] <= maxId) sum += per[ids[k]];
  return sum;
}

/** Counts each blob of ids[start, end) `count` times in `mine`, noting in `touched` the ones counted first. */
function countUses(ids: Uint32Array, start: number, end: number, count: number, mine: Float64Array, touched: number[]): void {
  const maxId = mine.length - 1;
  for (let k = start; k < end; k++) {
    const id = ids[k];
    if (id > maxId) continue;
    if (mine[id] === 0) touched.push(id);
    mine[id] += count;
  }
}

/** Root vi's exclusive blobs: those of `touched` whose uses are all its own; clears `mine` and `touched`. */
function exclusiveOfRoot(vi: number, touched: number[], mine: Float64Array, total: Float64Array, exclusive: (vi: number, id: number, uses: number) => void): void {
  for (let k = 0; k < touched.length; k++) {
    const id = touched[k];
    if (mine[id] === total[id]) exclusive(vi, id, mine[id]);
    mine[id] = 0;
  }
  touched.length = 0;
}

/** Child vi's figures: its parent's (already in its columns) plus its delta [start, end); `exclusive` for blobs only it uses. */
function applyDelta(vi: number, start: number, end: number,
  a: { ids: Float64Array; counts: Float64Array; size: Uint32Array; perUse: Float64Array; storedPerUse: Float64Array; total: Float64Array; real: Float64Array; estSpace: Float64Array; estStored: Float64Array },
  exclusive: (vi: number, id: number, count: number) => void): void {
  const maxId = a.total.length - 1;
  let real = a.real[vi];
  let estSpace = a.estSpace[vi];
  let estStored = a.estStored[vi];
  for (let k = start; k < end; k++) {
    const id = a.ids[k];
    const count = a.counts[k];
    if (id > maxId) continue;
    real += count * a.size[id];
    estSpace += count * a.perUse[id];
    estStored += count * a.storedPerUse[id];
    if (count > 0 && a.total[id] === count) exclusive(vi, id, count);
  }
  a.real[vi] = real;
  a.estSpace[vi] = estSpace;
  a.estStored[vi] = estStored;
}

/** The repository totals over every blob (versions, logical and sparse bytes and the ratios are the caller's). */
function totalsOf(blobIds: Float64Array, size: Uint32Array, stored: Uint32Array, total: Float64Array): RepositoryUsage & { usedPlain: number; usedStored: number } {
  let storedBytes = 0;
  let plainBytes = 0;
  let usedPlain = 0;
  let usedStored = 0;
  let unreferencedBlobs = 0;
  let unreferencedStoredBytes = 0;
  for (let k = 0; k < blobIds.length; k++) {
    const id = blobIds[k];
    storedBytes += stored[id];
    plainBytes += size[id];
    if (total[id] > 0) {
      usedPlain += size[id];
      usedStored += stored[id];
    } else {
      unreferencedBlobs++;
      unreferencedStoredBytes += stored[id];
    }
  }
  return {
    versions: 0, blobs: blobIds.length, storedBytes, plainBytes, unreferencedBlobs, unreferencedStoredBytes, logicalBytes: 0, sparseBytes: 0,
    dedupRatio: 0, compressionRatio: 0, usedPlain, usedStored,
  };
}

/** Each blob's size divided by its uses (0 for unused blobs). */
function perUseOf(size: Uint32Array, total: Float64Array): Float64Array {
  const out = new Float64Array(total.length);
  for (let id = 1; id < total.length; id++) {
    if (total[id] < 0) throw new Error(`inconsistent map summaries: blob ${id} is used ${total[id]} times`);
    if (total[id] > 0) out[id] = size[id] / total[id];
  }
  return out;
}

/**
 * du for every version from the block maps alone (storage is never touched). Each version's map is its
 * root's map plus the deltas on the way down (map-summary.ts): so a blob's uses over all versions are the
 * roots' chunks (each distinct chunk decoded once), weighted by how many versions descend from them, plus
 * each delta weighted the same way. A blob is exclusive to a version when all its uses are there: for a root,
 * its own count of the blob equals all uses; for any other version, a blob its delta adds whose count is all
 * uses (its parent cannot use it then).
 */
export function computeUsage(versions: VersionRow[], usage: MapUsage): { rows: VersionUsage[]; totals: RepositoryUsage } {
  const n = versions.length;
  const index = new Map<number, number>();
  for (let vi = 0; vi < n; vi++) index.set(versions[vi].id, vi);
  const maxId = maxOf(usage.blobs.ids);
  const size = byId(usage.blobs.ids, usage.blobs.sizes, maxId);
  const stored = byId(usage.blobs.ids, usage.blobs.stored, maxId);
  const sums = usage.summaries;
  // Each version's slot in the summary table (-1: none) and its delta's range in the table's id/count pools.
  const slot = new Int32Array(n);
  for (let vi = 0; vi < n; vi++) slot[vi] = sums.slotOf(versions[vi].id);
  const dIds = sums.deltaIds;
  const dCounts = sums.deltaCounts;

  // The delta forest, parents (lower ids) before children.
  const parent = new Int32Array(n).fill(-1);
  for (let vi = 0; vi < n; vi++) {
    const base = slot[vi] < 0 ? -1 : sums.deltaBase(slot[vi]);
    if (base < 0 || !sums.has(base)) continue;
    const p = index.get(base);
    if (p === undefined || versions[p].id >= versions[vi].id) throw new Error('the repository changed while du read it: run du again');
    parent[vi] = p;
  }
  const order = Array.from({ length: n }, (_, i) => i).sort((a, b) => versions[a].id - versions[b].id);
  // How many versions share each version's map up to its delta: itself and all descending from it.
  const weight = new Float64Array(n).fill(1);
  for (let k = n - 1; k >= 0; k--) if (parent[order[k]] >= 0) weight[parent[order[k]]] += weight[order[k]];
  const isRoot = (vi: number) => parent[vi] < 0 && slot[vi] >= 0;
  // The roots' chunk lists (only theirs are decoded).
  const rootChunks: MapSummary['chunks'][] = [];
  for (let vi = 0; vi < n; vi++) if (isRoot(vi)) rootChunks[vi] = sums.chunksOf(slot[vi]);

  // The roots' distinct chunks, each decoded once into the pool (every entry takes at least one encoded byte).
  let capacity = 0;
  for (const raw of usage.contents.values()) capacity += raw.length;
  const pool = new IdPool(capacity);
  const contents = new Map<string, Content>();
  for (let vi = 0; vi < n; vi++) {
    if (!isRoot(vi)) continue;
    for (const c of rootChunks[vi]) {
      let content = contents.get(c.digest);
      if (!content) {
        const raw = usage.contents.get(c.digest);
        if (!raw) throw new Error(`chunk content ${c.digest} of version ${versions[vi].uid} was not read`);
        const scanned = scanChunk(raw, pool);
        content = { holes: scanned.holes, pending: scanned.pending, last: scanned.last, start: scanned.start, end: scanned.end, uses: 0, real: 0, share: 0, storedShare: 0 };
        contents.set(c.digest, content);
      }
      content.uses += c.count * weight[vi];
    }
  }

  // Uses of each blob over all versions.
  const ids = pool.ids;
  const total = new Float64Array(maxId + 1);
  for (const c of contents.values()) {
    // a blob row that vanished (id beyond maxId) counts as nothing
    c.real = addUses(ids, c.start, c.end, c.uses, total, size);
  }
  for (let vi = 0; vi < n; vi++) {
    if (parent[vi] >= 0) addUses(dIds, sums.deltaStart(slot[vi]), sums.deltaEnd(slot[vi]), weight[vi], total, undefined, dCounts);
  }
  // Each blob's size and stored size divided by its uses, once per blob; then summed per chunk.
  const perUse = perUseOf(size, total);
  const storedPerUse = perUseOf(stored, total);
  for (const c of contents.values()) {
    c.share = sumOf(ids, c.start, c.end, perUse);
    c.storedShare = sumOf(ids, c.start, c.end, storedPerUse);
  }

  // The figures per version as columns (typed arrays): the loops below add up doubles, which in fields of
  // 10,000 objects cost an allocation each while the code is not optimized yet. Objects are built at the end.
  const col = () => new Float64Array(n);
  const real = col();
  const nul = col();
  const dedupOwn = col();
  const individual = col();
  const estSpace = col();
  const estSpaceFreed = col();
  const storedFreed = col();
  const estStored = col();
  const exclusiveUses = col();
  const exclusive = (vi: number, id: number, uses: number) => {
    if (uses === 1) individual[vi] += size[id];
    else dedupOwn[vi] += size[id] * (uses - 1);
    estSpaceFreed[vi] += size[id];
    storedFreed[vi] += stored[id];
    exclusiveUses[vi] += size[id] * uses;
  };
  // Roots: from their chunks; a scratch count per blob finds what only they use.
  const mine = new Float64Array(maxId + 1);
  const touched: number[] = [];
  for (let vi = 0; vi < n; vi++) {
    if (!isRoot(vi)) continue;
    const v = versions[vi];
    let holes = 0;
    for (const ch of rootChunks[vi]) {
      const c = contents.get(ch.digest)!;
      real[vi] += ch.count * c.real;
      holes += ch.count * c.holes;
      estSpace[vi] += ch.count * c.share;
      estStored[vi] += ch.count * c.storedShare;
      countUses(ids, c.start, c.end, ch.count, mine, touched);
    }
    exclusiveOfRoot(vi, touched, mine, total, exclusive);
    const blocks = blockCount(v.size, v.blockSize);
    const lastLen = v.size - (blocks - 1) * v.blockSize;
    const last = sums.lastOf(slot[vi]);
    const lastIsHole = last !== '' && contents.get(last)!.last === HOLE;
    nul[vi] = holes * v.blockSize - (lastIsHole ? v.blockSize - lastLen : 0);
  }
  // The others (complete, no pending blocks): their parent's figures plus their delta.
  const arrays = { ids: dIds, counts: dCounts, size, perUse, storedPerUse, total, real, estSpace, estStored };
  for (let k = 0; k < n; k++) {
    const vi = order[k];
    const p = parent[vi];
    if (p < 0) continue;
    real[vi] = real[p];
    estSpace[vi] = estSpace[p];
    estStored[vi] = estStored[p];
    applyDelta(vi, sums.deltaStart(slot[vi]), sums.deltaEnd(slot[vi]), arrays, exclusive);
    nul[vi] = versions[vi].size - real[vi];
  }
  // Rounded only now: children start from their parent's exact share.
  const rows: VersionUsage[] = new Array(n);
  for (let vi = 0; vi < n; vi++) {
    rows[vi] = {
      version: versions[vi], real: real[vi], null: nul[vi], dedupOwn: dedupOwn[vi], dedupOthers: real[vi] - exclusiveUses[vi],
      individual: individual[vi], estSpace: Math.round(estSpace[vi]), estSpaceFreed: estSpaceFreed[vi], storedFreed: storedFreed[vi],
      estStored: Math.round(estStored[vi]),
    };
  }

  const totals = totalsOf(usage.blobs.ids, size, stored, total);
  totals.versions = n;
  for (let vi = 0; vi < n; vi++) {
    totals.logicalBytes += real[vi];
    totals.sparseBytes += nul[vi];
  }
  totals.dedupRatio = totals.usedPlain ? totals.logicalBytes / totals.usedPlain : 0;
  totals.compressionRatio = totals.usedStored ? totals.usedPlain / totals.usedStored : 0;
  const { usedPlain: _p, usedStored: _s, ...repository } = totals;
  return { rows, totals: repository };
}
