import { Packr } from 'msgpackr';
import { blockCount, decodeChunk, encodeChunk, HOLE, PENDING } from './block-map';
import { BlobFormat, IMPORT_HOLE, IMPORT_PENDING, ImportBlob, ImportVersion } from './types';

/**
 * Everything the database knows about one finished version, self-contained: its row and tags, and its block
 * map as a table of the blobs it uses (uid, checksum, size, format, wrapped key) plus, per block, an index into
 * that table. This is what a version's metadata object in storage holds, what `db-rebuild` turns back into
 * database rows, and what an import builds before adding a version. Blob ids are database-local and never
 * part of it.
 *
 * Encoded compactly (msgpack): the table as columns (uids and checksums concatenated, sizes as 32-bit words),
 * the map in the block-map chunk code (consecutive table indices take a byte each), so a 100 GiB version takes
 * about 100 bytes per block, nearly all of it checksum and uid.
 */
export interface VersionRecord {
  version: ImportVersion;
  blobs: RecordBlob[];
  /** per block: an index into `blobs`, IMPORT_HOLE or IMPORT_PENDING */
  map: Int32Array;
  /** backy2's block dates (block-dates.ts), for imported versions */
  blockDates?: Buffer;
}

export type RecordBlob = Pick<ImportBlob, 'uid' | 'checksum' | 'size' | 'format' | 'keyInfo'>;

const FORMAT_VERSION = 1;
const UID_LEN = 32;
const packr = new Packr({ useRecords: false, variableMapSize: true });

export class RecordFormatError extends Error {}

export function encodeVersionRecord(r: VersionRecord): Buffer {
  const n = r.blobs.length;
  const sumLen = n ? r.blobs[0].checksum.length : 0;
  const uids = Buffer.allocUnsafe(n * UID_LEN);
  const sums = Buffer.allocUnsafe(n * sumLen);
  const sizes = Buffer.allocUnsafe(n * 4);
  const formats = Buffer.alloc(n);
  const keys: Buffer[] = [];
  let foreign = false;
  r.blobs.forEach((b, k) => {
    if (uids.write(b.uid, k * UID_LEN, 'latin1') !== UID_LEN || b.uid.length !== UID_LEN) throw new RecordFormatError(`blob uid ${b.uid} is not ${UID_LEN} characters`);
    if (b.checksum.length !== sumLen) throw new RecordFormatError('checksums of different lengths');
    b.checksum.copy(sums, k * sumLen);
    sizes.writeUInt32LE(b.size, k * 4);
    formats[k] = b.format;
    if (b.format !== BlobFormat.Backy) foreign = true;
    if (b.format === BlobFormat.Backy2Aes) keys.push(b.keyInfo ?? Buffer.alloc(0));
  });
  const entries = new Float64Array(r.map.length);
  for (let i = 0; i < r.map.length; i++) {
    const m = r.map[i];
    entries[i] = m >= 0 ? m + 1 : m === IMPORT_HOLE ? HOLE : PENDING;
  }
  const v = r.version;
  return packr.pack({
    f: FORMAT_VERSION,
    v: {
      uid: v.uid, name: v.name, snapshotName: v.snapshotName, date: v.date, size: v.size, blockSize: v.blockSize,
      expire: v.expire, baseUid: v.baseUid, tags: [...v.tags].sort(), valid: v.valid, complete: v.complete, protected: v.protected,
    },
    uids, sums, sizes, ...(foreign ? { formats, keys } : {}),
    map: encodeChunk(entries),
    ...(r.blockDates ? { dates: r.blockDates } : {}),
  });
}

export function decodeVersionRecord(data: Uint8Array): VersionRecord {
  let o: Record<string, any>;
  try {
    o = packr.unpack(data);
  } catch (e) {
    throw new RecordFormatError(`undecodable version record: ${(e as Error).message}`);
  }
  if (!o || typeof o !== 'object' || o.f !== FORMAT_VERSION) throw new RecordFormatError(`unknown version record format ${o?.f}`);
  const v = o.v ?? {};
  const version: ImportVersion = {
    uid: String(v.uid), name: String(v.name), snapshotName: String(v.snapshotName), date: Number(v.date), size: Number(v.size),
    blockSize: Number(v.blockSize), expire: v.expire === null || v.expire === undefined ? null : Number(v.expire),
    baseUid: v.baseUid ?? null, tags: Array.isArray(v.tags) ? v.tags.map(String) : [], valid: !!v.valid,
    complete: !!v.complete, protected: !!v.protected,
  };
  const uids = Buffer.from(o.uids ?? []);
  const sums = Buffer.from(o.sums ?? []);
  const sizes = Buffer.from(o.sizes ?? []);
  const n = uids.length / UID_LEN;
  if (!Number.isInteger(n) || sizes.length !== n * 4 || (n && sums.length % n)) throw new RecordFormatError('inconsistent blob table');
  const sumLen = n ? sums.length / n : 0;
  const formats = o.formats ? Buffer.from(o.formats) : undefined;
  const keys: Uint8Array[] = o.keys ?? [];
  let nextKey = 0;
  const blobs: RecordBlob[] = [];
  for (let k = 0; k < n; k++) {
    const format = formats ? formats[k] : BlobFormat.Backy;
    blobs.push({
      uid: uids.toString('latin1', k * UID_LEN, (k + 1) * UID_LEN),
      checksum: sums.subarray(k * sumLen, (k + 1) * sumLen),
      size: sizes.readUInt32LE(k * 4),
      format,
      keyInfo: format === BlobFormat.Backy2Aes ? Buffer.from(keys[nextKey++] ?? []) : null,
    });
  }
  const entries = decodeChunk(o.map);
  if (entries.length !== blockCount(version.size, version.blockSize)) throw new RecordFormatError('block map length does not match the version size');
  const map = new Int32Array(entries.length);
  for (let i = 0; i < entries.length; i++) {
    const e = entries[i];
    if (e > n) throw new RecordFormatError(`block ${i} refers to blob ${e - 1} of ${n}`);
    map[i] = e > 0 ? e - 1 : e === HOLE ? IMPORT_HOLE : IMPORT_PENDING;
  }
  return { version, blobs, map, blockDates: o.dates ? Buffer.from(o.dates) : undefined };
}
