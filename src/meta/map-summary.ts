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
  summaries: SummaryTable;
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

/** Read position of the readers below in the bytes being decoded (synchronous code only: one decoder at a time). */
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

/** Skips n integers; false when one is not a plain integer or they run past `end`. */
function skipInts(b: Uint8Array, n: number, end: number): boolean {
  if (n < 0 || n > end - at) return false;
  for (let k = 0; k < n; k++) {
    const v = readInt(b);
    if (v !== v) return false; // NaN
  }
  return at <= end;
}

/** Where the parts of an encoded summary are (filled by locate; one at a time, no allocation per summary). */
const found = { chunksAt: 0, chunkCount: 0, lastAt: 0, lastEnd: 0, base: -1, idsAt: 0, countsAt: 0, deltaLength: 0 };

/**
 * Checks that b[start, end) is a summary as encodeSummary writes it with msgpackr (an array of the chunk list,
 * the last digest and null or the delta, integers of at most 32 bits) and notes where its parts are in `found`.
 * False for anything else: the generic decoder reads it then.
 */
function locate(b: Uint8Array, start: number, end: number): boolean {
  at = start;
  if (readArray(b) !== 3) return false;
  const count = readArray(b);
  if (count < 0 || count > end - at) return false;
  found.chunksAt = at;
  found.chunkCount = count;
  for (let k = 0; k < count; k++) {
    if (b[at] !== 0x93 || b[at + 1] !== 0xc4) return false;
    at += 3 + b[at + 2];
    if (!skipInts(b, 2, end)) return false;
  }
  const t = b[at++];
  let len: number;
  if ((t & 0xe0) === 0xa0) len = t & 0x1f;
  else if (t === 0xd9) len = b[at++];
  else return false;
  found.lastAt = at;
  at += len;
  found.lastEnd = at;
  found.base = -1;
  found.deltaLength = 0;
  if (b[at] === 0xc0) {
    at++;
  } else {
    if (readArray(b) !== 3) return false;
    const base = readInt(b);
    if (!(base >= 0)) return false;
    found.base = base;
    const n = readArray(b);
    found.idsAt = at;
    if (!skipInts(b, n, end) || readArray(b) !== n) return false;
    found.countsAt = at;
    if (!skipInts(b, n, end)) return false;
    found.deltaLength = n;
  }
  return at === end;
}

/** n integers from `from` (checked by locate) into a list. */
function readIntsAt(b: Uint8Array, from: number, n: number): number[] {
  at = from;
  const out: number[] = new Array(n);
  for (let k = 0; k < n; k++) out[k] = readInt(b);
  return out;
}

/** The chunk list at `from` (checked by locate). */
function readChunks(b: Uint8Array, from: number, count: number): MapSummary['chunks'] {
  const buf = Buffer.isBuffer(b) ? b : Buffer.from(b.buffer, b.byteOffset, b.byteLength);
  const list: MapSummary['chunks'] = new Array(count);
  at = from;
  for (let k = 0; k < count; k++) {
    const len = buf[at + 2];
    const digest = buf.toString('hex', at + 3, at + 3 + len);
    at += 3 + len;
    const n = readInt(buf);
    list[k] = { digest, count: n, chunk: readInt(buf) };
  }
  return list;
}

function decodeGeneric(data: Uint8Array): MapSummary {
  const v = packr.unpack(data) as [[Uint8Array, number, number][], string, [number, number[], number[]] | null | undefined];
  if (!Array.isArray(v) || !Array.isArray(v[0])) throw new Error('corrupt map summary');
  const out: MapSummary = { chunks: v[0].map(([d, count, chunk]) => ({ digest: Buffer.from(d).toString('hex'), count, chunk })), last: v[1] };
  if (v[2]) out.delta = { base: v[2][0], ids: v[2][1], counts: v[2][2] };
  return out;
}

/**
 * A stored summary with its delta decoded and its chunk list and last digest read on first use (du reads
 * those of the roots only).
 */
class StoredSummary implements MapSummary {
  delta?: MapDelta;
  private chunkList?: MapSummary['chunks'];
  private lastDigest?: string;

  constructor(private readonly raw: Uint8Array, private readonly chunksAt: number, private readonly chunkCount: number,
    private readonly lastAt: number, private readonly lastEnd: number) {}

  get chunks(): MapSummary['chunks'] {
    this.chunkList ??= readChunks(this.raw, this.chunksAt, this.chunkCount);
    return this.chunkList;
  }

  get last(): string {
    this.lastDigest ??= Buffer.from(this.raw.buffer, this.raw.byteOffset, this.raw.byteLength).toString('utf8', this.lastAt, this.lastEnd);
    return this.lastDigest;
  }
}

export function decodeSummary(data: Uint8Array): MapSummary {
  if (!locate(data, 0, data.length)) return decodeGeneric(data);
  const s = new StoredSummary(data, found.chunksAt, found.chunkCount, found.lastAt, found.lastEnd);
  if (found.base >= 0) s.delta = { base: found.base, ids: readIntsAt(data, found.idsAt, found.deltaLength), counts: readIntsAt(data, found.countsAt, found.deltaLength) };
  return s;
}

/** A growable Float64Array. */
class Pool {
  a = new Float64Array(1024);
  length = 0;
  push(v: number): void {
    this.reserve(1);
    this.a[this.length++] = v;
  }
  reserve(n: number): void {
    if (this.length + n <= this.a.length) return;
    const grown = new Float64Array(Math.max(this.a.length * 2, this.length + n));
    grown.set(this.a.subarray(0, this.length));
    this.a = grown;
  }
  /** Appends n integers read from b at `from` (checked by locate). */
  appendInts(b: Uint8Array, from: number, n: number): void {
    this.reserve(n);
    at = from;
    const a = this.a;
    let k = this.length;
    for (const end = k + n; k < end; k++) a[k] = readInt(b);
    this.length = k;
  }
}

/**
 * Every version's summary as du reads them, with few objects per version (10,000 summaries as objects with
 * arrays were a large part of du's time, in building them and in the garbage collector copying them): the
 * deltas' blob ids and counts back to back in two typed arrays, the chunk lists left in the encoded bytes
 * until asked for (du needs those of the roots only). `get` builds a MapSummary of one version.
 */
export class SummaryTable {
  /** version id -> slot */
  private readonly slots = new Map<number, number>();
  /** per slot: delta base (-1: none), its range in the pools */
  private readonly bases: number[] = [];
  private readonly starts: number[] = [];
  private readonly ends: number[] = [];
  /** per slot: the encoded bytes (an index into `sources`) and where its chunk list and last digest are, or the decoded summary */
  private readonly source: number[] = [];
  private readonly chunksAt: number[] = [];
  private readonly chunkCounts: number[] = [];
  private readonly lastAt: number[] = [];
  private readonly lastEnd: number[] = [];
  private readonly decoded: (MapSummary | undefined)[] = [];
  private readonly sources: Uint8Array[] = [];
  private readonly ids = new Pool();
  private readonly counts = new Pool();

  get size(): number {
    return this.slots.size;
  }

  keys(): IterableIterator<number> {
    return this.slots.keys();
  }

  has(id: number): boolean {
    return this.slots.has(id);
  }

  /** The slot of a version's summary, or -1. */
  slotOf(id: number): number {
    return this.slots.get(id) ?? -1;
  }

  /** The deltas' blob ids and counts: a slot's delta is [deltaStart(slot), deltaEnd(slot)) of these. */
  get deltaIds(): Float64Array { return this.ids.a; }
  get deltaCounts(): Float64Array { return this.counts.a; }
  deltaBase(slot: number): number { return this.bases[slot]; }
  deltaStart(slot: number): number { return this.starts[slot]; }
  deltaEnd(slot: number): number { return this.ends[slot]; }

  /** Adds a version's summary as encodeSummary wrote it, bytes[start, end) (bytes is kept: several summaries may share it). */
  addEncoded(id: number, bytes: Uint8Array, start: number, end: number): void {
    if (this.sources[this.sources.length - 1] !== bytes) this.sources.push(bytes);
    if (!locate(bytes, start, end)) {
      this.add(id, decodeGeneric(bytes.subarray(start, end)));
      return;
    }
    const slot = this.newSlot(id);
    this.source[slot] = this.sources.length - 1;
    this.chunksAt[slot] = found.chunksAt;
    this.chunkCounts[slot] = found.chunkCount;
    this.lastAt[slot] = found.lastAt;
    this.lastEnd[slot] = found.lastEnd;
    this.bases[slot] = found.base;
    this.starts[slot] = this.ids.length;
    if (found.base >= 0) {
      this.ids.appendInts(bytes, found.idsAt, found.deltaLength);
      this.counts.appendInts(bytes, found.countsAt, found.deltaLength);
    }
    this.ends[slot] = this.ids.length;
  }

  add(id: number, s: MapSummary): void {
    const slot = this.newSlot(id);
    this.decoded[slot] = s;
    this.source[slot] = -1;
    this.bases[slot] = s.delta ? s.delta.base : -1;
    this.starts[slot] = this.ids.length;
    if (s.delta) {
      for (let k = 0; k < s.delta.ids.length; k++) {
        this.ids.push(s.delta.ids[k]);
        this.counts.push(s.delta.counts[k]);
      }
    }
    this.ends[slot] = this.ids.length;
  }

  private newSlot(id: number): number {
    if (this.slots.has(id)) throw new Error(`internal error: two summaries of version ${id}`);
    const slot = this.bases.length;
    this.slots.set(id, slot);
    this.bases.push(-1);
    this.starts.push(0);
    this.ends.push(0);
    this.source.push(-1);
    this.chunksAt.push(0);
    this.chunkCounts.push(0);
    this.lastAt.push(0);
    this.lastEnd.push(0);
    this.decoded.push(undefined);
    return slot;
  }

  /** A slot's distinct chunks (decoded from its bytes each time: callers ask once per root). */
  chunksOf(slot: number): MapSummary['chunks'] {
    const d = this.decoded[slot];
    return d ? d.chunks : readChunks(this.sources[this.source[slot]], this.chunksAt[slot], this.chunkCounts[slot]);
  }

  lastOf(slot: number): string {
    const d = this.decoded[slot];
    if (d) return d.last;
    const b = this.sources[this.source[slot]];
    return Buffer.from(b.buffer, b.byteOffset, b.byteLength).toString('utf8', this.lastAt[slot], this.lastEnd[slot]);
  }

  /** One version's summary as an object (for tests and single look-ups). */
  get(id: number): MapSummary | undefined {
    const slot = this.slots.get(id);
    if (slot === undefined) return undefined;
    const d = this.decoded[slot];
    if (d) return d;
    const out: MapSummary = { chunks: this.chunksOf(slot), last: this.lastOf(slot) };
    if (this.bases[slot] >= 0) {
      const range = (a: Float64Array) => Array.from(a.subarray(this.starts[slot], this.ends[slot]));
      out.delta = { base: this.bases[slot], ids: range(this.ids.a), counts: range(this.counts.a) };
    }
    return out;
  }

  /** Versions whose summary has no delta, or one against a version that is gone: du reads their chunks. */
  roots(): number[] {
    const out: number[] = [];
    for (const [id, slot] of this.slots) if (this.bases[slot] < 0 || !this.slots.has(this.bases[slot])) out.push(id);
    return out;
  }
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
  // Byte arithmetic: Buffer's readUInt*BE checks its arguments on every call (400,000 blobs: a tenth of du).
  const u32 = (b: Buffer, p: number) => ((b[p] << 24) >>> 0) + ((b[p + 1] << 16) | (b[p + 2] << 8) | b[p + 3]);
  for (const b of list) {
    for (let off = 0; off < b.length; k++, off += 14) {
      out.ids[k] = ((b[off] << 8) | b[off + 1]) * 2 ** 32 + u32(b, off + 2);
      out.sizes[k] = u32(b, off + 6);
      out.stored[k] = u32(b, off + 10);
    }
  }
  return out;
}
