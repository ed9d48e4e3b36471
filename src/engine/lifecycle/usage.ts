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
  /** the version using it (index), -1 once two do; how many chunks of all versions have it */
  owner: number;
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
 * du for every version from the block maps alone: each distinct chunk content is read once, each blob's
 * uses over all versions are counted, and a blob is exclusive to a version when every chunk holding it
 * belongs to that version alone. Storage is never touched.
 */
export function computeUsage(versions: VersionRow[], usage: MapUsage): { rows: VersionUsage[]; totals: RepositoryUsage } {
  const index = new Map<number, number>(versions.map((v, i) => [v.id, i]));
  let maxId = 0;
  for (const id of usage.blobs.ids) if (id > maxId) maxId = id;
  const size = new Uint32Array(maxId + 1);
  const stored = new Uint32Array(maxId + 1);
  usage.blobs.ids.forEach((id, k) => { size[id] = usage.blobs.sizes[k]; stored[id] = usage.blobs.stored[k]; });
  const sizeOf = (id: number) => (id <= maxId ? size[id] : 0);
  const storedOf = (id: number) => (id <= maxId ? stored[id] : 0);

  // Which versions use each distinct content, how often. Every entry takes at least one byte encoded, so
  // the encoded sizes bound the pool.
  let capacity = 0;
  for (const raw of usage.contents.values()) capacity += raw.length;
  const pool = new IdPool(capacity);
  const contents = new Map<string, Content>();
  for (const v of versions) {
    const s = usage.summaries.get(v.id);
    if (!s) continue;
    const vi = index.get(v.id)!;
    for (const c of s.chunks) {
      let content = contents.get(c.digest);
      if (!content) {
        const raw = usage.contents.get(c.digest);
        if (!raw) throw new Error(`chunk content ${c.digest} of version ${v.uid} was not read`);
        const scanned = scanChunk(raw, pool);
        content = { holes: scanned.holes, pending: scanned.pending, last: scanned.last, start: scanned.start, end: scanned.end, owner: vi, uses: 0, real: 0, share: 0, storedShare: 0 };
        contents.set(c.digest, content);
      } else if (content.owner !== vi) content.owner = -1;
      content.uses += c.count;
    }
  }

  // Uses of each blob over all versions, and the one version using it (0: none yet, -1: several).
  const total = new Float64Array(maxId + 1);
  const owner = new Int32Array(maxId + 1);
  const ids = pool.ids;
  for (const c of contents.values()) {
    let real = 0;
    const uses = c.uses;
    const mark = c.owner < 0 ? -1 : c.owner + 1;
    for (let k = c.start; k < c.end; k++) {
      const id = ids[k];
      if (id > maxId) continue; // a blob row that vanished: counts as nothing
      total[id] += uses;
      const o = owner[id];
      if (o === 0) owner[id] = mark;
      else if (o !== mark) owner[id] = -1;
      real += size[id];
    }
    c.real = real;
  }
  // Each blob's size and stored size divided by its uses, once per blob; then summed per content.
  const perUse = new Float64Array(maxId + 1);
  const storedPerUse = new Float64Array(maxId + 1);
  for (let id = 1; id <= maxId; id++) {
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
  const exclusiveUses = new Float64Array(versions.length);
  versions.forEach((v, vi) => {
    const s = usage.summaries.get(v.id);
    if (!s) return;
    const r = rows[vi];
    let holes = 0;
    for (const ch of s.chunks) {
      const c = contents.get(ch.digest)!;
      r.real += ch.count * c.real;
      holes += ch.count * c.holes;
      r.estSpace += ch.count * c.share;
      r.estStored += ch.count * c.storedShare;
    }
    const blocks = blockCount(v.size, v.blockSize);
    const lastLen = v.size - (blocks - 1) * v.blockSize;
    const lastIsHole = s.last !== '' && contents.get(s.last)!.last === HOLE;
    r.null = holes * v.blockSize - (lastIsHole ? v.blockSize - lastLen : 0);
  });
  for (let id = 1; id <= maxId; id++) {
    const o = owner[id];
    if (o <= 0) continue;
    const r = rows[o - 1];
    const uses = total[id];
    if (uses === 1) r.individual += size[id];
    else r.dedupOwn += size[id] * (uses - 1);
    r.estSpaceFreed += size[id];
    r.storedFreed += stored[id];
    exclusiveUses[o - 1] += size[id] * uses;
  }
  rows.forEach((r, vi) => {
    r.dedupOthers = r.real - exclusiveUses[vi];
    r.estSpace = Math.round(r.estSpace);
    r.estStored = Math.round(r.estStored);
  });

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
