import { blockCount, decodeChunk, HOLE, PENDING } from '../../meta/block-map';
import type { MapUsage } from '../../meta/map-summary';
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
  const index = new Map<number, number>(versions.map((v, i) => [v.id, i]));
  let maxId = 0;
  for (const id of usage.blobs.ids) if (id > maxId) maxId = id;
  const size = new Uint32Array(maxId + 1);
  const stored = new Uint32Array(maxId + 1);
  usage.blobs.ids.forEach((id, k) => { size[id] = usage.blobs.sizes[k]; stored[id] = usage.blobs.stored[k]; });
  const sizeOf = (id: number) => (id <= maxId ? size[id] : 0);
  const storedOf = (id: number) => (id <= maxId ? stored[id] : 0);
  const summaryOf = (vi: number) => usage.summaries.get(versions[vi].id);

  // The delta forest, parents (lower ids) before children.
  const parent = new Int32Array(n).fill(-1);
  for (let vi = 0; vi < n; vi++) {
    const base = summaryOf(vi)?.delta?.base;
    if (base === undefined || !usage.summaries.has(base)) continue;
    const p = index.get(base);
    if (p === undefined || versions[p].id >= versions[vi].id) throw new Error('the repository changed while du read it: run du again');
    parent[vi] = p;
  }
  const order = Array.from({ length: n }, (_, i) => i).sort((a, b) => versions[a].id - versions[b].id);
  // How many versions share each version's map up to its delta: itself and all descending from it.
  const weight = new Float64Array(n).fill(1);
  for (let k = n - 1; k >= 0; k--) if (parent[order[k]] >= 0) weight[parent[order[k]]] += weight[order[k]];
  const isRoot = (vi: number) => parent[vi] < 0 && summaryOf(vi) !== undefined;

  // The roots' distinct chunks, each decoded once into the pool (every entry takes at least one encoded byte).
  let capacity = 0;
  for (const raw of usage.contents.values()) capacity += raw.length;
  const pool = new IdPool(capacity);
  const contents = new Map<string, Content>();
  for (let vi = 0; vi < n; vi++) {
    if (!isRoot(vi)) continue;
    for (const c of summaryOf(vi)!.chunks) {
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
    let real = 0;
    for (let k = c.start; k < c.end; k++) {
      const id = ids[k];
      if (id > maxId) continue; // a blob row that vanished: counts as nothing
      total[id] += c.uses;
      real += size[id];
    }
    c.real = real;
  }
  for (let vi = 0; vi < n; vi++) {
    if (parent[vi] < 0) continue;
    const d = summaryOf(vi)!.delta!;
    for (let k = 0; k < d.ids.length; k++) if (d.ids[k] <= maxId) total[d.ids[k]] += weight[vi] * d.counts[k];
  }
  // Each blob's size and stored size divided by its uses, once per blob; then summed per chunk.
  const perUse = new Float64Array(maxId + 1);
  const storedPerUse = new Float64Array(maxId + 1);
  for (let id = 1; id <= maxId; id++) {
    if (total[id] < 0) throw new Error(`inconsistent map summaries: blob ${id} is used ${total[id]} times`);
    if (total[id] > 0) {
      perUse[id] = size[id] / total[id];
      storedPerUse[id] = stored[id] / total[id];
    }
  }
  for (const c of contents.values()) {
    let share = 0;
    let storedShare = 0;
    for (let k = c.start; k < c.end; k++) {
      const id = ids[k];
      if (id > maxId) continue;
      share += perUse[id];
      storedShare += storedPerUse[id];
    }
    c.share = share;
    c.storedShare = storedShare;
  }

  const rows: VersionUsage[] = versions.map((version) => ({
    version, real: 0, null: 0, dedupOwn: 0, dedupOthers: 0, individual: 0, estSpace: 0, estSpaceFreed: 0, storedFreed: 0, estStored: 0,
  }));
  const exclusiveUses = new Float64Array(n);
  const exclusive = (vi: number, id: number, uses: number) => {
    const r = rows[vi];
    if (uses === 1) r.individual += size[id];
    else r.dedupOwn += size[id] * (uses - 1);
    r.estSpaceFreed += size[id];
    r.storedFreed += stored[id];
    exclusiveUses[vi] += size[id] * uses;
  };
  // Roots: from their chunks; a scratch count per blob finds what only they use.
  const mine = new Float64Array(maxId + 1);
  const touched: number[] = [];
  for (let vi = 0; vi < n; vi++) {
    if (!isRoot(vi)) continue;
    const v = versions[vi];
    const s = summaryOf(vi)!;
    const r = rows[vi];
    let holes = 0;
    for (const ch of s.chunks) {
      const c = contents.get(ch.digest)!;
      r.real += ch.count * c.real;
      holes += ch.count * c.holes;
      r.estSpace += ch.count * c.share;
      r.estStored += ch.count * c.storedShare;
      for (let k = c.start; k < c.end; k++) {
        const id = ids[k];
        if (id > maxId) continue;
        if (mine[id] === 0) touched.push(id);
        mine[id] += ch.count;
      }
    }
    for (const id of touched) {
      if (mine[id] === total[id]) exclusive(vi, id, mine[id]);
      mine[id] = 0;
    }
    touched.length = 0;
    const blocks = blockCount(v.size, v.blockSize);
    const lastLen = v.size - (blocks - 1) * v.blockSize;
    const lastIsHole = s.last !== '' && contents.get(s.last)!.last === HOLE;
    r.null = holes * v.blockSize - (lastIsHole ? v.blockSize - lastLen : 0);
  }
  // The others (complete, no pending blocks): their parent's figures plus their delta.
  for (const vi of order) {
    const p = parent[vi];
    if (p < 0) continue;
    const d = summaryOf(vi)!.delta!;
    const r = rows[vi];
    r.real = rows[p].real;
    r.estSpace = rows[p].estSpace;
    r.estStored = rows[p].estStored;
    for (let k = 0; k < d.ids.length; k++) {
      const id = d.ids[k];
      const count = d.counts[k];
      if (id > maxId) continue;
      r.real += count * size[id];
      r.estSpace += count * perUse[id];
      r.estStored += count * storedPerUse[id];
      if (count > 0 && total[id] === count) exclusive(vi, id, count);
    }
    r.null = versions[vi].size - r.real;
  }
  rows.forEach((r, vi) => {
    r.dedupOthers = r.real - exclusiveUses[vi];
  });
  // Rounded only now: children start from their parent's exact share.
  for (const r of rows) {
    r.estSpace = Math.round(r.estSpace);
    r.estStored = Math.round(r.estStored);
  }

  const totals: RepositoryUsage = {
    versions: versions.length, blobs: usage.blobs.ids.length, storedBytes: 0, plainBytes: 0, unreferencedBlobs: 0,
    unreferencedStoredBytes: 0, logicalBytes: 0, sparseBytes: 0, dedupRatio: 0, compressionRatio: 0,
  };
  let usedPlain = 0;
  let usedStored = 0;
  for (const id of usage.blobs.ids) {
    totals.storedBytes += storedOf(id);
    totals.plainBytes += sizeOf(id);
    if (total[id] > 0) {
      usedPlain += sizeOf(id);
      usedStored += storedOf(id);
    } else {
      totals.unreferencedBlobs++;
      totals.unreferencedStoredBytes += storedOf(id);
    }
  }
  for (const r of rows) {
    totals.logicalBytes += r.real;
    totals.sparseBytes += r.null;
  }
  totals.dedupRatio = usedPlain ? totals.logicalBytes / usedPlain : 0;
  totals.compressionRatio = usedStored ? usedPlain / usedStored : 0;
  return { rows, totals };
}
