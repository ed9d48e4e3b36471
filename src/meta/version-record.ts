import { HOLE, PENDING } from './block-map';
import { IMPORT_HOLE, IMPORT_PENDING, ImportBlob, ImportVersion, newBlobRef } from './types';

/**
 * Everything the database knows about one version, self-contained: its row and tags, and its block map as a
 * table of the blobs it uses (uid, checksum, size, format, wrapped key; first use first) plus, per block, an
 * index into that table. What `export` writes, what a dump import reads, and the database's side when
 * scrub compares it with the metadata in storage. Blob ids are database-local and never part of it.
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

/** importVersion's block map entries for a record whose blobs are all passed as new blobs (in table order). */
export function entriesOf(map: Int32Array): Float64Array {
  const out = new Float64Array(map.length);
  for (let i = 0; i < map.length; i++) {
    const m = map[i];
    out[i] = m >= 0 ? newBlobRef(m) : m === IMPORT_HOLE ? HOLE : m === IMPORT_PENDING ? PENDING : NaN;
  }
  return out;
}
