import { digestLength } from '../codec/hashes';
import { blockCount } from '../meta/block-map';
import { BlobFormat, IMPORT_HOLE, IMPORT_PENDING, ImportVersion } from '../meta/types';
import { isBacky2Uid } from '../storage/blob-keys';
import { DatabaseError } from '../util/errors';
import type { Backy2BlobDetails, Backy2Database, Backy2Version } from './database';

/**
 * One backy2 version read and checked: its row as backy's ImportVersion, its blocks as a map over a table of
 * blob uids (first use first), each block's date, and what was wrong with any row. A block whose row is
 * missing or unusable stays PENDING (it reads as an error and scrub reports it), a blob backy2 had found bad
 * (a block row with valid 0) is marked bad, and either makes the version invalid.
 */
export interface Backy2Layout {
  version: ImportVersion;
  /** per block: index into `uids`, IMPORT_HOLE or IMPORT_PENDING */
  map: Int32Array;
  uids: string[];
  /** per table entry: some row of it has valid = 0 */
  bad: boolean[];
  /** per block: ms (whole seconds), NaN without a row */
  dates: Float64Array;
  rows: number;
  problems: string[];
}

/** What is wrong with one version of a backy2 database: that version is not imported, the others are. */
export class Backy2DataError extends DatabaseError {}

/** backy2's naive UTC date text ("2026-11-26 06:36:16.345831", or a date alone) as ms since the epoch. */
export function parseBacky2Date(text: string): number {
  const m = /^(\d{4})-(\d{2})-(\d{2})(?:[ T](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,6}))?)?(?:[+-]00(?::?00)?|Z)?$/.exec(text.trim());
  if (!m) throw new Backy2DataError(`unexpected date "${text}" in the backy2 database`);
  const [y, mo, d, h = '0', mi = '0', s = '0', frac = ''] = m.slice(1);
  return Date.UTC(+y, +mo - 1, +d, +h, +mi, +s, Math.floor(Number(frac.padEnd(6, '0')) / 1000));
}

/** The version row as backy keeps it (states are decided by readLayout). */
export function importedVersionRow(v: Backy2Version, blockSize: number, tags: string[]): ImportVersion {
  return {
    uid: v.uid, name: v.name, snapshotName: v.snapshotName, date: parseBacky2Date(v.date), size: v.sizeBytes, blockSize,
    expire: v.expire === null || v.expire === '' ? null : parseBacky2Date(v.expire), baseUid: null, tags,
    valid: v.valid, complete: true, protected: v.protected,
  };
}

export async function readLayout(db: Backy2Database, v: Backy2Version, blockSize: number, tags: string[]): Promise<Backy2Layout> {
  const version = importedVersionRow(v, blockSize, tags);
  const blocks = blockCount(v.sizeBytes, blockSize);
  if (blocks !== v.size) {
    throw new Backy2DataError(`version ${v.uid} has ${v.size} blocks for ${v.sizeBytes} bytes, which does not fit block_size ${blockSize}`);
  }
  const map = new Int32Array(blocks).fill(IMPORT_PENDING);
  const dates = new Float64Array(blocks).fill(NaN);
  const uids: string[] = [];
  const bad: boolean[] = [];
  const index = new Map<string, number>();
  const problems: string[] = [];
  let rows = 0;
  let lastPrefix = '';
  let lastMs = NaN;
  for await (const page of db.blockRows(v.uid)) {
    for (const [id, uid, date, valid, size] of page) {
      if (!Number.isInteger(id) || id < 0 || id >= blocks) {
        problems.push(`a block row with id ${id} outside the version`);
        continue;
      }
      rows++;
      // Rows of one second share their first 19 characters: parse only when that changes.
      const prefix = date.slice(0, 19);
      if (prefix !== lastPrefix) {
        lastPrefix = prefix;
        lastMs = parseBacky2Date(prefix);
      }
      dates[id] = lastMs;
      if (uid === null) {
        map[id] = IMPORT_HOLE;
        continue;
      }
      const want = Math.min(blockSize, v.sizeBytes - id * blockSize);
      if (size !== want) {
        problems.push(`block ${id} has size ${size}, expected ${want}`);
        continue;
      }
      if (!isBacky2Uid(uid)) {
        problems.push(`block ${id} names blob ${JSON.stringify(uid.slice(0, 40))}, which is not a backy2 blob uid`);
        continue;
      }
      let k = index.get(uid);
      if (k === undefined) {
        k = uids.length;
        index.set(uid, k);
        uids.push(uid);
        bad.push(false);
      }
      if (valid !== 1) bad[k] = true;
      map[id] = k;
    }
  }
  if (rows < blocks) problems.push(`${blocks - rows} of ${blocks} blocks have no row (an unfinished backup)`);
  version.complete = rows === blocks;
  return { version, map, uids, bad, dates, rows, problems };
}

/** A blob as backy2's database describes it, checked; a string says why it cannot be used. */
export interface Backy2Blob {
  uid: string;
  checksum: Buffer;
  size: number;
  format: BlobFormat;
  /** Backy2Aes: the data key wrapped with backy2's key (40 bytes) */
  envkey?: Buffer;
  /** Backy2Aes: the nonce, when the database has it (2.13) */
  nonce?: Buffer;
}

const hexLengths = new Map<string, number>();

export function checkBlob(uid: string, d: Backy2BlobDetails | undefined, hashFunction: string): Backy2Blob | string {
  if (!d) return `blob ${uid} has no row`;
  let hexLen = hexLengths.get(hashFunction);
  if (hexLen === undefined) hexLengths.set(hashFunction, (hexLen = (digestLength(hashFunction) ?? 0) * 2));
  if (!d.checksum || d.checksum.length !== hexLen || !/^[0-9a-f]+$/i.test(d.checksum)) return `blob ${uid} has no ${hashFunction} checksum`;
  // Objects written out, not spread from a common base: this runs for every new blob of an import.
  const checksum = Buffer.from(d.checksum, 'hex');
  if (d.encVersion === 0) return { uid, checksum, size: d.size, format: BlobFormat.Backy2Plain };
  if (d.encVersion !== 1) return `blob ${uid} has encryption version ${d.encVersion}, which backy2 never wrote`;
  if (!d.envkey || !/^[0-9a-f]{80}$/i.test(d.envkey)) return `blob ${uid} has no wrapped data key`;
  if (d.nonce !== null && d.nonce !== '' && !/^[0-9a-f]{32}$/i.test(d.nonce)) return `blob ${uid} has a malformed nonce`;
  return { uid, checksum, size: d.size, format: BlobFormat.Backy2Aes, envkey: Buffer.from(d.envkey, 'hex'), nonce: d.nonce ? Buffer.from(d.nonce, 'hex') : undefined };
}
