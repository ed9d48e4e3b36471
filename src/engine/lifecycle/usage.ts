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

/** One distinct chunk content: its holes, pending entries, last entry and blob ids (repeats included). */
interface Content {
  holes: number;
  pending: number;
  last: number;
  ids: Uint32Array | Float64Array;
  /** versions using it (-1 once two do), and how many chunks of all versions have it */
  owner: number;
  uses: number;
  real: number;
  share: number;
  storedShare: number;
}

/**
 * Reads an encoded chunk without building the generic decoder's arrays: the msgpack array of small integers
 * written by block-map.ts (0 hole, 1 pending, else 2 + zigzag delta of the blob id). Anything unexpected
 * goes through decodeChunk.
 */
type ScannedChunk = Pick<Content, 'holes' | 'pending' | 'last' | 'ids'>;

export function scanChunk(raw: Uint8Array): ScannedChunk {
  const fast = scanFast(raw);
  if (fast) return fast;
  const entries = decodeChunk(raw);
  let holes = 0;
  let pending = 0;
  const ids: number[] = [];
  for (const e of entries) {
    if (e === HOLE) holes++;
    else if (e === PENDING) pending++;
    else ids.push(e);
  }
  return { holes, pending, last: entries.length ? entries[entries.length - 1] : HOLE, ids: idArray(ids) };
}

function idArray(ids: number[]): Uint32Array | Float64Array {
  return ids.every((x) => x <= 0xffffffff) ? Uint32Array.from(ids) : Float64Array.from(ids);
}

function scanFast(b: Uint8Array): ScannedChunk | undefined {
  const dv = new DataView(b.buffer, b.byteOffset, b.byteLength);
  let p = 0;
  let n: number;
  const h = b[p++];
  if ((h & 0xf0) === 0x90) n = h & 0x0f;
  else if (h === 0xdc) { n = dv.getUint16(p); p += 2; }
  else if (h === 0xdd) { n = dv.getUint32(p); p += 4; }
  else return undefined;
  let ids: Uint32Array | Float64Array = new Uint32Array(n);
  let count = 0;
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
    else if (t === 0xcd) { c = dv.getUint16(p); p += 2; }
    else if (t === 0xce) { c = dv.getUint32(p); p += 4; }
    else if (t === 0xcb) { c = dv.getFloat64(p); p += 8; }
    else if (t === 0xcf) { c = Number(dv.getBigUint64(p)); p += 8; }
    else return undefined;
    if (c === 0) { holes++; last = HOLE; continue; }
    if (c === 1) { pending++; last = PENDING; continue; }
    const z = c - 2;
    prev += z % 2 === 0 ? z / 2 : -(z + 1) / 2;
    if (prev > 0xffffffff && ids instanceof Uint32Array) ids = Float64Array.from(ids);
    ids[count++] = prev;
    last = prev;
  }
  if (p !== b.length) return undefined;
  return { holes, pending, last, ids: ids.subarray(0, count) };
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

  // Which versions use each distinct content, how often.
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
        content = { ...scanChunk(raw), owner: vi, uses: 0, real: 0, share: 0, storedShare: 0 };
        contents.set(c.digest, content);
      } else if (content.owner !== vi) content.owner = -1;
      content.uses += c.count;
    }
  }

  // Uses of each blob over all versions, and the one version using it (0: none yet, -1: several).
  const total = new Float64Array(maxId + 1);
  const owner = new Int32Array(maxId + 1);
  for (const c of contents.values()) {
    let real = 0;
    for (let k = 0; k < c.ids.length; k++) {
      const id = c.ids[k];
      if (id > maxId) continue; // a blob row that vanished: counts as nothing
      total[id] += c.uses;
      const o = owner[id];
      if (c.owner < 0) owner[id] = -1;
      else if (o === 0) owner[id] = c.owner + 1;
      else if (o !== c.owner + 1) owner[id] = -1;
      real += size[id];
    }
    c.real = real;
  }
  for (const c of contents.values()) {
    let share = 0;
    let storedShare = 0;
    for (let k = 0; k < c.ids.length; k++) {
      const id = c.ids[k];
      if (id > maxId || !total[id]) continue;
      share += size[id] / total[id];
      storedShare += stored[id] / total[id];
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
