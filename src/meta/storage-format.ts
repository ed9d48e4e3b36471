import { Packr } from 'msgpackr';
import { blockCount, decodeChunk, encodeChunk, HOLE, PENDING } from './block-map';
import { BlobFormat, ImportVersion } from './types';
import type { RecordBlob } from './version-record';

/**
 * The payloads of the metadata objects in storage (sealed by codec/sealed-object.ts).
 *
 * A blob pack holds the details of a set of blobs (uid, checksum, size, format, wrapped key), as columns:
 * uids and checksums concatenated, sizes as 32-bit words. A blob's details are written once, into the pack
 * of the moment it was first needed, and every version using it refers to that pack: versions of one
 * machine share nearly all their blobs, so their objects stay small (a 100 GiB version refers to 25,600
 * blobs; with the details in each version's object, a thousand such versions would store 3.6 GB of
 * repeated checksums and keys instead of a few hundred MB).
 *
 * A version's object holds its row, its tags, backy2's block dates if imported, and per block a reference
 * (pack, index) or a hole or "never backed up", in the block-map chunk code: consecutive references take a
 * byte or two each.
 */
const packr = new Packr({ useRecords: false, variableMapSize: true });
const UID_LEN = 32;

export class StorageFormatError extends Error {}

export function encodePack(blobs: RecordBlob[]): Buffer {
  const n = blobs.length;
  const sumLen = n ? blobs[0].checksum.length : 0;
  const uids = Buffer.allocUnsafe(n * UID_LEN);
  const sums = Buffer.allocUnsafe(n * sumLen);
  const sizes = Buffer.allocUnsafe(n * 4);
  const formats = Buffer.alloc(n);
  const keys: Buffer[] = [];
  let foreign = false;
  blobs.forEach((b, k) => {
    if (b.uid.length !== UID_LEN || uids.write(b.uid, k * UID_LEN, 'latin1') !== UID_LEN) throw new StorageFormatError(`blob uid ${b.uid} is not ${UID_LEN} characters`);
    if (b.checksum.length !== sumLen) throw new StorageFormatError('checksums of different lengths');
    b.checksum.copy(sums, k * sumLen);
    sizes.writeUInt32LE(b.size, k * 4);
    formats[k] = b.format;
    if (b.format !== BlobFormat.Backy) foreign = true;
    if (b.format === BlobFormat.Backy2Aes) keys.push(b.keyInfo ?? Buffer.alloc(0));
  });
  return packr.pack({ f: 1, uids, sums, sizes, ...(foreign ? { formats, keys } : {}) });
}

export function decodePack(data: Uint8Array): RecordBlob[] {
  let o: Record<string, any>;
  try {
    o = packr.unpack(data);
  } catch (e) {
    throw new StorageFormatError(`undecodable blob pack: ${(e as Error).message}`);
  }
  if (!o || o.f !== 1) throw new StorageFormatError(`unknown blob pack format ${o?.f}`);
  const uids = Buffer.from(o.uids ?? []);
  const sums = Buffer.from(o.sums ?? []);
  const sizes = Buffer.from(o.sizes ?? []);
  const n = uids.length / UID_LEN;
  if (!Number.isInteger(n) || sizes.length !== n * 4 || (n && sums.length % n)) throw new StorageFormatError('inconsistent blob pack');
  const sumLen = n ? sums.length / n : 0;
  const formats = o.formats ? Buffer.from(o.formats) : undefined;
  const keys: Uint8Array[] = o.keys ?? [];
  let nextKey = 0;
  const out: RecordBlob[] = new Array(n);
  for (let k = 0; k < n; k++) {
    const format = formats ? formats[k] : BlobFormat.Backy;
    out[k] = {
      uid: uids.toString('latin1', k * UID_LEN, (k + 1) * UID_LEN),
      checksum: sums.subarray(k * sumLen, (k + 1) * sumLen),
      size: sizes.readUInt32LE(k * 4),
      format,
      keyInfo: format === BlobFormat.Backy2Aes ? Buffer.from(keys[nextKey++] ?? []) : null,
    };
  }
  return out;
}

/** Block references of a version object: PACK_HOLE / PACK_PENDING, or an index into `packs`. */
export const PACK_HOLE = -1;
export const PACK_PENDING = -2;

export interface VersionObject {
  version: ImportVersion;
  /** names of the packs its blocks refer to, in order of first use */
  packs: string[];
  /** per block: index into `packs`, PACK_HOLE or PACK_PENDING */
  packNo: Int32Array;
  /** per block: the blob's index in its pack (0 for holes and pending blocks) */
  index: Int32Array;
  blockDates?: Buffer;
}

export function encodeVersionObject(o: VersionObject): Buffer {
  const v = o.version;
  const n = o.packNo.length;
  const p = new Float64Array(n);
  let data = 0;
  for (let i = 0; i < n; i++) {
    const x = o.packNo[i];
    p[i] = x >= 0 ? x + 1 : x === PACK_HOLE ? HOLE : PENDING;
    if (x >= 0) data++;
  }
  const idx = new Float64Array(data);
  for (let i = 0, d = 0; i < n; i++) if (o.packNo[i] >= 0) idx[d++] = o.index[i] + 1;
  return packr.pack({
    f: 2,
    v: {
      uid: v.uid, name: v.name, snapshotName: v.snapshotName, date: v.date, size: v.size, blockSize: v.blockSize,
      expire: v.expire, baseUid: v.baseUid, tags: [...v.tags].sort(), valid: v.valid, complete: v.complete, protected: v.protected,
    },
    packs: o.packs,
    p: encodeChunk(p),
    i: encodeChunk(idx),
    ...(o.blockDates ? { dates: o.blockDates } : {}),
  });
}

export function decodeVersionObject(data: Uint8Array): VersionObject {
  let o: Record<string, any>;
  try {
    o = packr.unpack(data);
  } catch (e) {
    throw new StorageFormatError(`undecodable version object: ${(e as Error).message}`);
  }
  if (!o || o.f !== 2) throw new StorageFormatError(`unknown version object format ${o?.f}`);
  const v = o.v ?? {};
  const version: ImportVersion = {
    uid: String(v.uid), name: String(v.name), snapshotName: String(v.snapshotName), date: Number(v.date), size: Number(v.size),
    blockSize: Number(v.blockSize), expire: v.expire === null || v.expire === undefined ? null : Number(v.expire),
    baseUid: v.baseUid ?? null, tags: Array.isArray(v.tags) ? v.tags.map(String) : [], valid: !!v.valid,
    complete: !!v.complete, protected: !!v.protected,
  };
  const packs: string[] = Array.isArray(o.packs) ? o.packs.map(String) : [];
  const p = decodeChunk(o.p);
  const idx = decodeChunk(o.i);
  const n = blockCount(version.size, version.blockSize);
  if (p.length !== n) throw new StorageFormatError('block map length does not match the version size');
  const packNo = new Int32Array(n);
  const index = new Int32Array(n);
  let d = 0;
  for (let i = 0; i < n; i++) {
    const x = p[i];
    if (x === HOLE) packNo[i] = PACK_HOLE;
    else if (x === PENDING) packNo[i] = PACK_PENDING;
    else {
      if (x > packs.length || d >= idx.length || !(idx[d] > 0)) throw new StorageFormatError(`block ${i} refers to no pack entry`);
      packNo[i] = x - 1;
      index[i] = idx[d++] - 1;
    }
  }
  return { version, packs, packNo, index, blockDates: o.dates ? Buffer.from(o.dates) : undefined };
}
