import { createHash } from 'node:crypto';
import { Packr } from 'msgpackr';
import { decodeChunk, MAP_CHUNK, PENDING } from './block-map';

/**
 * A version's block map as a multiset of distinct chunk contents, and, for a complete version, as a delta:
 * the blob ids it uses more or less often than an earlier complete version of the same size (its -f base, or
 * else the previous complete version of its name). A sparse image's empty chunks are all alike and a daily
 * version differs from the day before in a few blocks, so `du` over thousands of 1 TiB versions decodes the
 * chunks of the few versions without a usable delta ("roots") and adds up small deltas for the rest.
 *
 * A complete version's map never changes, so its summary is computed once (when the version becomes
 * complete, or on first use) and kept in map_summaries; running and interrupted versions are summarized
 * afresh each time. A delta whose base was removed is simply not used: that version counts as a root.
 */
export interface MapSummary {
  /** the distinct chunk contents: digest (hex), how many chunks have it, the first chunk number that has it */
  chunks: { digest: string; count: number; chunk: number }[];
  /** digest of the map's last chunk ('' for an empty map) */
  last: string;
  delta?: MapDelta;
}

/** This map's blob uses minus those of the map of version `base` (an older one, lower id, same size). */
export interface MapDelta {
  base: number;
  ids: number[];
  counts: number[];
}

/** Everything `du` needs, read in one consistent snapshot. */
export interface MapUsage {
  /** every version's summary, by version id */
  summaries: Map<number, MapSummary>;
  /** the encoded chunk of every digest the roots' summaries mention (versions without a usable delta) */
  contents: Map<string, Uint8Array>;
  /** every blob not being deleted (parallel arrays): id, plaintext size, stored size */
  blobs: { ids: Float64Array; sizes: Float64Array; stored: Float64Array };
}

const packr = new Packr({ useRecords: false });

/** 128 bits of sha256: an identity for chunk contents, not a security boundary. */
export function chunkDigest(raw: Uint8Array): string {
  return createHash('sha256').update(raw).digest('hex').slice(0, 32);
}

/** The summary of a map from its chunk rows (any order). `keep` receives each distinct chunk's bytes once. */
export function summarizeChunks(rows: Iterable<{ chunk: number; data: Uint8Array }>, keep?: (digest: string, data: Uint8Array) => void): MapSummary {
  const byDigest = new Map<string, { digest: string; count: number; chunk: number }>();
  let lastChunk = -1;
  let last = '';
  for (const r of rows) {
    const digest = chunkDigest(r.data);
    const e = byDigest.get(digest);
    if (e) {
      e.count++;
      if (r.chunk < e.chunk) e.chunk = r.chunk;
    } else {
      byDigest.set(digest, { digest, count: 1, chunk: r.chunk });
      keep?.(digest, r.data);
    }
    if (r.chunk > lastChunk) {
      lastChunk = r.chunk;
      last = digest;
    }
  }
  return { chunks: [...byDigest.values()].sort((a, b) => a.chunk - b.chunk), last };
}

export function encodeSummary(s: MapSummary): Buffer {
  const d = s.delta ? [s.delta.base, s.delta.ids, s.delta.counts] : null;
  return packr.pack([s.chunks.map((c) => [Buffer.from(c.digest, 'hex'), c.count, c.chunk]), s.last, d]);
}

/**
 * A stored summary, decoded as far as `du` needs it for most versions: the delta at once, the chunk list and
 * the last digest on first use (only the roots' are read; building a hex string and an object per chunk of
 * 10,000 summaries was a large part of du). Reads msgpackr's encoding of the few types a summary holds.
 */
class StoredSummary implements MapSummary {
  delta?: MapDelta;
  private chunkList?: MapSummary['chunks'];
  private lastDigest?: string;

  constructor(private readonly raw: Uint8Array, private readonly chunksAt: number, private readonly chunkCount: number,
    private readonly lastAt: number, private readonly lastEnd: number) {}

  get chunks(): MapSummary['chunks'] {
    if (!this.chunkList) {
      const b = Buffer.from(this.raw.buffer, this.raw.byteOffset, this.raw.byteLength);
      const list: MapSummary['chunks'] = new Array(this.chunkCount);
      at = this.chunksAt;
      for (let k = 0; k < this.chunkCount; k++) {
        at += 1; // the entry's array header (checked when the summary was decoded)
        const len = b[at + 1];
        const digest = b.toString('hex', at + 2, at + 2 + len);
        at += 2 + len;
        const count = readInt(b);
        list[k] = { digest, count, chunk: readInt(b) };
      }
      this.chunkList = list;
    }
    return this.chunkList;
  }

  get last(): string {
    this.lastDigest ??= Buffer.from(this.raw.buffer, this.raw.byteOffset, this.raw.byteLength).toString('utf8', this.lastAt, this.lastEnd);
    return this.lastDigest;
  }
}

/** Read position of readInt/readArray in the bytes being decoded (one decoder runs at a time: no await inside). */
let at = 0;

/** An integer as msgpackr writes one up to 32 bits; NaN for anything else (then the generic decoder decides). */
function readInt(b: Uint8Array): number {
  const t = b[at++];
  if (t < 0x80) return t;
  if (t >= 0xe0) return t - 0x100;
  let v: number;
  switch (t) {
    case 0xcc: v = b[at]; at += 1; return v;
    case 0xcd: v = (b[at] << 8) | b[at + 1]; at += 2; return v;
    case 0xce: v = ((b[at] << 24) >>> 0) + ((b[at + 1] << 16) | (b[at + 2] << 8) | b[at + 3]); at += 4; return v;
    case 0xd0: v = (b[at] << 24) >> 24; at += 1; return v;
    case 0xd1: v = ((b[at] << 24) >> 16) | b[at + 1]; at += 2; return v;
    case 0xd2: v = (b[at] << 24) | (b[at + 1] << 16) | (b[at + 2] << 8) | b[at + 3]; at += 4; return v;
    default: return NaN;
  }
}

/** An array header's length, or -1. */
function readArray(b: Uint8Array): number {
  const t = b[at++];
  if ((t & 0xf0) === 0x90) return t & 0x0f;
  if (t === 0xdc) { const n = (b[at] << 8) | b[at + 1]; at += 2; return n; }
  if (t === 0xdd) { const n = ((b[at] << 24) >>> 0) + ((b[at + 1] << 16) | (b[at + 2] << 8) | b[at + 3]); at += 4; return n; }
  return -1;
}

/** A list of n integers, or undefined when one is not a plain integer. */
function readInts(b: Uint8Array, n: number): number[] | undefined {
  if (n < 0 || n > b.length - at) return undefined;
  const out: number[] = new Array(n);
  for (let k = 0; k < n; k++) {
    const v = readInt(b);
    if (v !== v) return undefined;
    out[k] = v;
  }
  return out;
}

function decodeFast(b: Uint8Array): StoredSummary | undefined {
  at = 0;
  if (readArray(b) !== 3) return undefined;
  const count = readArray(b);
  if (count < 0 || count > b.length) return undefined;
  const chunksAt = at;
  for (let k = 0; k < count; k++) {
    if (b[at] !== 0x93 || b[at + 1] !== 0xc4) return undefined;
    at += 3 + b[at + 2];
    const n = readInt(b);
    const chunk = readInt(b);
    if (n !== n || chunk !== chunk || at > b.length) return undefined; // NaN: not a plain integer
  }
  return decodeTail(b, chunksAt, count);
}

function decodeTail(b: Uint8Array, chunksAt: number, count: number): StoredSummary | undefined {
  const t = b[at++];
  let len: number;
  if ((t & 0xe0) === 0xa0) len = t & 0x1f;
  else if (t === 0xd9) len = b[at++];
  else return undefined;
  const lastAt = at;
  at += len;
  const s = new StoredSummary(b, chunksAt, count, lastAt, at);
  if (b[at] === 0xc0) {
    at++;
  } else {
    if (readArray(b) !== 3) return undefined;
    const base = readInt(b);
    if (base !== base) return undefined;
    const ids = readInts(b, readArray(b));
    const counts = ids && readInts(b, readArray(b));
    if (!counts) return undefined;
    s.delta = { base, ids, counts };
  }
  return at === b.length ? s : undefined;
}

export function decodeSummary(data: Uint8Array): MapSummary {
  const fast = decodeFast(data);
  if (fast) return fast;
  const v = packr.unpack(data) as [[Uint8Array, number, number][], string, [number, number[], number[]] | null | undefined];
  if (!Array.isArray(v) || !Array.isArray(v[0])) throw new Error('corrupt map summary');
  const out: MapSummary = { chunks: v[0].map(([d, count, chunk]) => ({ digest: Buffer.from(d).toString('hex'), count, chunk })), last: v[1] };
  if (v[2]) out.delta = { base: v[2][0], ids: v[2][1], counts: v[2][2] };
  return out;
}

/**
 * The delta of a map against an older one of the same length, position by position (only chunks whose bytes
 * differ are decoded). undefined when the maps do not line up, a block is pending, or more than a quarter of
 * the blocks changed (then the chunks are the cheaper description).
 */
export function mapDelta(baseId: number, base: Map<number, Uint8Array>, mine: Map<number, Uint8Array>): MapDelta | undefined {
  if (base.size !== mine.size) return undefined;
  const diff = new Map<number, number>();
  let blocks = 0;
  let changed = 0;
  const add = (id: number, d: number) => diff.set(id, (diff.get(id) ?? 0) + d);
  for (const [c, raw] of mine) {
    const other = base.get(c);
    if (!other) return undefined;
    if (Buffer.from(raw.buffer, raw.byteOffset, raw.byteLength).equals(other)) {
      blocks += MAP_CHUNK;
      continue;
    }
    const x = decodeChunk(raw);
    const y = decodeChunk(other);
    if (x.length !== y.length) return undefined;
    blocks += x.length;
    for (let i = 0; i < x.length; i++) {
      if (x[i] === y[i]) continue;
      if (x[i] === PENDING || y[i] === PENDING) return undefined;
      changed++;
      if (x[i] > 0) add(x[i], 1);
      if (y[i] > 0) add(y[i], -1);
    }
  }
  if (changed * 4 > blocks) return undefined;
  const ids: number[] = [];
  const counts: number[] = [];
  for (const [id, d] of diff) if (d !== 0) { ids.push(id); counts.push(d); }
  return { base: baseId, ids, counts };
}

/**
 * Which earlier complete version a version's delta is taken against: its -f base when that is complete and
 * of the same size, else the newest complete one of its name and size created before it. (SQL for both
 * engines; `$1`: the version's id. Lower ids only, so deltas never form a cycle.)
 */
export const DELTA_BASE_SQL = `SELECT b.id FROM versions v JOIN versions b ON b.id < v.id AND b.complete = 1 AND b.size = v.size
  AND b.block_size = v.block_size AND (b.uid = v.base_uid OR b.name = v.name)
  WHERE v.id = $1 ORDER BY COALESCE(b.uid = v.base_uid, false) DESC, b.id DESC LIMIT 1`;

/**
 * For each version about to be removed, the next complete version of its name that stays (the one whose
 * summary is likely a delta against it: see blobsToStamp). SQL for both engines, taking the removed ids as
 * the engine passes a list: PostgreSQL an array ($1), SQLite JSON (twice, through json_each).
 */
export function successorsSql(engine: 'sqlite' | 'postgresql'): string {
  const isDoomed = (col: string) => (engine === 'sqlite' ? `${col} IN (SELECT value FROM json_each(?))` : `${col} = ANY($1::bigint[])`);
  return `SELECT d.id AS base, (SELECT MIN(s.id) FROM versions s WHERE s.name = d.name AND s.id > d.id AND s.complete = 1 AND NOT (${isDoomed('s.id')})) AS successor
    FROM versions d WHERE ${isDoomed('d.id')}`;
}

/** The delta of a summary against version `base` as blob id -> change of uses, or undefined. */
export function deltaAgainst(s: MapSummary | undefined, base: number): Map<number, number> | undefined {
  if (!s?.delta || s.delta.base !== base) return undefined;
  return new Map(s.delta.ids.map((id, k) => [id, s.delta!.counts[k]]));
}

/** Versions whose summary has no delta, or one against a version that is gone: du reads their chunks. */
export function rootsOf(summaries: Map<number, MapSummary>): number[] {
  return [...summaries].filter(([, s]) => !s.delta || !summaries.has(s.delta.base)).map(([id]) => id);
}

/**
 * MapUsage's blob arrays from one hex string, 28 digits per blob: id (12), size (8), stored size (8). SQLite
 * builds it in SQL (one value, not a row per blob) and Buffer parses hex natively.
 */
export function blobSizesFromHex(hex: string): MapUsage['blobs'] {
  if (hex.length % 28) throw new Error('corrupt blob size list');
  return blobSizesFromBytes(Buffer.from(hex, 'hex'));
}

/** The same from the bytes themselves, 14 per blob, in one or more parts (PostgreSQL sends them so). */
export function blobSizesFromBytes(parts: Buffer | Buffer[]): MapUsage['blobs'] {
  const list = Array.isArray(parts) ? parts : [parts];
  let n = 0;
  for (const b of list) {
    if (b.length % 14) throw new Error('corrupt blob size list');
    n += b.length / 14;
  }
  const out = { ids: new Float64Array(n), sizes: new Float64Array(n), stored: new Float64Array(n) };
  let k = 0;
  for (const b of list) {
    for (let off = 0; off < b.length; k++, off += 14) {
      out.ids[k] = b.readUInt16BE(off) * 2 ** 32 + b.readUInt32BE(off + 2);
      out.sizes[k] = b.readUInt32BE(off + 6);
      out.stored[k] = b.readUInt32BE(off + 10);
    }
  }
  return out;
}
