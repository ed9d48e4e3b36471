import { randomBytes } from 'node:crypto';
import { chunkCount, chunkLength, decodeChunk, encodeChunk, HOLE, MAP_CHUNK, PENDING } from './block-map';
import { DatabaseError } from '../util/errors';
import { BlobFormat, BlobRef, BlobState, ImportBlob, StatsRow } from './types';

/** Engine-independent decisions shared by the SQLite and PostgreSQL stores. */

export function newBlobUid(): string {
  return randomBytes(16).toString('hex');
}

/**
 * The chunks of a new version's map: copies of the base's chunks where nothing changes, PENDING for the
 * listed blocks and for blocks past the base's end. `baseChunk` returns the stored bytes of a base chunk.
 */
export function* newVersionChunks(
  blocks: number,
  base: { blocks: number; chunk: (c: number) => Buffer | undefined } | undefined,
  pending: Iterable<number>,
): Generator<[number, Buffer]> {
  const pendingByChunk = new Map<number, number[]>();
  for (const i of pending) {
    if (i < 0 || i >= blocks) continue;
    const c = Math.floor(i / MAP_CHUNK);
    let list = pendingByChunk.get(c);
    if (!list) pendingByChunk.set(c, (list = []));
    list.push(i % MAP_CHUNK);
  }
  for (let c = 0; c < chunkCount(blocks); c++) {
    const len = chunkLength(blocks, c);
    const raw = base?.chunk(c);
    const baseLen = base ? chunkLength(base.blocks, c) : 0;
    const marks = pendingByChunk.get(c);
    if (raw && baseLen === len && !marks) {
      yield [c, raw];
      continue;
    }
    const entries = new Float64Array(len).fill(PENDING);
    if (raw) entries.set(decodeChunk(raw).subarray(0, Math.min(len, baseLen)));
    if (marks) for (const k of marks) entries[k] = PENDING;
    yield [c, encodeChunk(entries)];
  }
}

export type BlobDecision =
  | { kind: 'reuse'; upload: false }
  | { kind: 'foreign'; upload: false } // a live blob in a foreign format (an imported backy2 blob) holds it
  | { kind: 'take-over'; upload: true } // bad, or another session's upload in flight: we store it too
  | { kind: 'insert'; upload: true };

/** Whether the backy-format blob of a checksum can be used as it is by this session. */
export function ownBlobUsable(existing: { state: number; owner: string | null } | undefined, session: string): boolean {
  return !!existing && (existing.state === BlobState.Live || (existing.state === BlobState.Uploading && existing.owner === session));
}

/**
 * What a backup does with a block whose checksum it found: `existing` is the backy-format blob of that
 * checksum (there is at most one), `foreignLive` whether a live blob in a foreign format holds it too. Foreign
 * blobs are reused but never taken over: a new upload always goes into a blob of backy's own format.
 */
export function decideBlob(existing: { state: number; owner: string | null } | undefined, session: string, foreignLive = false): BlobDecision {
  if (ownBlobUsable(existing, session)) return { kind: 'reuse', upload: false };
  if (foreignLive) return { kind: 'foreign', upload: false };
  if (!existing) return { kind: 'insert', upload: true };
  return { kind: 'take-over', upload: true };
}

/**
 * The map chunks of an imported version: `entries` as importVersion takes them, new blobs (newBlobRef) replaced
 * by their ids `newIds`.
 */
export function* importedChunks(entries: Float64Array, newIds: ArrayLike<number>): Generator<[number, Buffer]> {
  for (let c = 0; c < chunkCount(entries.length); c++) {
    const chunk = entries.slice(c * MAP_CHUNK, c * MAP_CHUNK + chunkLength(entries.length, c));
    for (let k = 0; k < chunk.length; k++) {
      const e = chunk[k];
      if (e > 0 || e === HOLE || e === PENDING) continue;
      const id = newIds[-2 - e];
      if (!(id > 0)) throw new Error(`internal error: block ${c * MAP_CHUNK + k} refers to new blob ${-2 - e}, which has no id`);
      chunk[k] = id;
    }
    yield [c, encodeChunk(chunk)];
  }
}

/** A set of blob ids as a bitmap: one bit per id, so marking a whole repository costs max(id)/8 bytes. */
export class IdBitmap {
  private bits: Uint8Array;
  constructor(maxId: number) {
    this.bits = new Uint8Array(Math.floor(maxId / 8) + 1);
  }
  add(id: number): void {
    const byte = id >>> 3;
    if (byte < this.bits.length) this.bits[byte] |= 1 << (id & 7);
  }
  has(id: number): boolean {
    const byte = id >>> 3;
    return byte < this.bits.length && (this.bits[byte] & (1 << (id & 7))) !== 0;
  }
  addChunk(raw: Uint8Array): void {
    const entries = decodeChunk(raw);
    for (let i = 0; i < entries.length; i++) if (entries[i] > 0) this.add(entries[i]);
  }
}

/** Distinct positive ids of a set of encoded chunks. */
export function idsOfChunks(chunks: Iterable<Uint8Array>): number[] {
  const ids = new Set<number>();
  for (const raw of chunks) {
    const entries = decodeChunk(raw);
    for (let i = 0; i < entries.length; i++) if (entries[i] > 0) ids.add(entries[i]);
  }
  return [...ids];
}

/**
 * The blobs whose grace period a version's removal starts (unref_since = now): those of its map (`chunks`:
 * its distinct chunks, each with how many chunks of the map have it), except the ones its successor still
 * uses. The successor is a complete version that stays (the caller keeps it from being removed until the
 * removal commits) whose map summary is a delta against this map (`successorDelta`: blob id -> uses more or
 * fewer). Skipping those is safe: they stay referenced by a map that never changes, and the removal that
 * takes away their last use stamps them then; a stamp on a blob still in use only ever gets cleared or
 * replaced. So cleanup deletes no blob sooner than before, and a daily removal writes a few rows, not
 * thousands.
 */
export function blobsToStamp(chunks: { data: Uint8Array; count: number }[], successorDelta?: Map<number, number>): number[] {
  if (!successorDelta) return idsOfChunks(chunks.map((c) => c.data));
  const uses = new Map<number, number>();
  for (const c of chunks) {
    const entries = decodeChunk(c.data);
    for (let i = 0; i < entries.length; i++) if (entries[i] > 0) uses.set(entries[i], (uses.get(entries[i]) ?? 0) + c.count);
  }
  const out: number[] = [];
  for (const [id, n] of uses) if (n + (successorDelta.get(id) ?? 0) <= 0) out.push(id);
  return out;
}

/** What cleanup does to one blob, given whether any map references it. */
export function cleanupDecision(referenced: boolean, unrefSince: number | null, graceMs: number, now: number): 'keep' | 'clear' | 'stamp' | 'delete' | 'wait' {
  if (referenced) return unrefSince !== null ? 'clear' : 'keep';
  if (graceMs <= 0) return 'delete';
  if (unrefSince === null) return 'stamp';
  return now - unrefSince >= graceMs ? 'delete' : 'wait';
}

export function* batches<T>(items: T[], size: number): Generator<T[]> {
  for (let i = 0; i < items.length; i += size) yield items.slice(i, i + size);
}

/** Sorts every blob of a cleanup scan into what to do with it, and counts. */
export class CleanupTally {
  readonly clear: number[] = [];
  readonly stamp: number[] = [];
  readonly delete: number[] = [];
  readonly mark = { marked: 0, waiting: 0, referenced: 0 };

  constructor(private readonly refs: IdBitmap, private readonly graceMs: number, private readonly now: number) {}

  add(id: number, unrefSince: number | null): void {
    const referenced = this.refs.has(id);
    if (referenced) this.mark.referenced++;
    const d = cleanupDecision(referenced, unrefSince, this.graceMs, this.now);
    if (d === 'clear') this.clear.push(id);
    else if (d === 'stamp') { this.stamp.push(id); this.mark.waiting++; }
    else if (d === 'wait') this.mark.waiting++;
    else if (d === 'delete') { this.delete.push(id); this.mark.marked++; }
  }
}

/** A `stats` table row (either engine) as a StatsRow. */
export function statsFromRow(r: Record<string, unknown>): StatsRow {
  return {
    date: Number(r.date), versionUid: String(r.version_uid), versionName: String(r.version_name),
    versionSizeBytes: Number(r.version_size_bytes), versionSizeBlocks: Number(r.version_size_blocks),
    bytesRead: Number(r.bytes_read), blocksRead: Number(r.blocks_read), bytesWritten: Number(r.bytes_written),
    blocksWritten: Number(r.blocks_written), bytesDedup: Number(r.bytes_dedup), blocksDedup: Number(r.blocks_dedup),
    bytesSparse: Number(r.bytes_sparse), blocksSparse: Number(r.blocks_sparse), durationSeconds: Number(r.duration_seconds),
  };
}

/** A `blobs` row (either engine) as a BlobRef. */
export function blobRefFromRow(r: Record<string, unknown>): BlobRef {
  return {
    id: Number(r.id), uid: r.uid as string, checksum: r.checksum as Buffer, size: Number(r.size), state: Number(r.state),
    format: Number(r.format ?? BlobFormat.Backy), keyInfo: (r.key_info as Buffer | null | undefined) ?? null,
    metaPack: (r.meta_pack as string | null | undefined) ?? null, metaIndex: r.meta_index === null || r.meta_index === undefined ? null : Number(r.meta_index),
  };
}

/**
 * The id of a blob an import names by a uid the repository knows already (shared with a version imported
 * before), after checking that it is the same blob.
 */
export function knownBlobId(b: ImportBlob, known: { id: number; checksum: Buffer; size: number; state: number; format: number }): number {
  if (!known.checksum.equals(b.checksum) || known.size !== b.size || known.format !== b.format) {
    throw new DatabaseError(`blob ${b.uid} is already in the repository with another checksum, size or format`);
  }
  if (known.state === BlobState.Deleting) {
    throw new DatabaseError(`blob ${b.uid} is being deleted by an interrupted cleanup: run "backy cleanup" first, then import again`);
  }
  return known.id;
}
