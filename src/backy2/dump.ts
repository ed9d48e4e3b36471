import { BlobFormat } from '../meta/types';
import type { VersionRecord } from '../meta/version-record';
import { parseKeyInfo } from '../codec/backy2-blob';
import { blockCount } from '../meta/block-map';
import { decodeBlockDates } from '../meta/block-dates';
import { IMPORT_HOLE } from '../meta/types';
import { csvRow } from './csv';

/**
 * Metadata dumps of one version. backy2's own (`export` of a version whose blobs are all backy2's, byte for
 * byte what backy2 would write for it):
 *
 *   backy2 Version 2.12 metadata dump
 *   uid,date,name,snapshot_name,size (blocks),size_bytes,valid,protected,expire (date only or '')
 *   blob uid (or '' for a sparse block),version uid,block id,date,checksum,size,valid,enc_version,enc_envkey,enc_nonce
 *
 * Older backy2 versions wrote 2.1 (no snapshot name, protection, expiry), 2.2 and 2.10 (no encryption columns).
 * backy's own, for versions with blobs backy2 could not read, keeps everything a version record holds:
 *
 *   backy Version 1 metadata dump
 *   uid,date (ms),name,snapshot_name,size_bytes,block_size,valid,complete,protected,expire (ms or ''),base_uid,tags (comma separated)
 *   blob uid (or '' for a sparse block),block id,checksum,size,format,key (hex)
 */
export const BACKY2_SIGNATURE = 'backy2 Version 2.12 metadata dump';
export const BACKY_SIGNATURE = 'backy Version 1 metadata dump';

/** backy2's strftime('%Y-%m-%d %H:%M:%S') of a naive UTC datetime. */
export function backy2DateText(ms: number): string {
  return new Date(ms).toISOString().slice(0, 19).replace('T', ' ');
}

/** Whether backy2's format can describe the version: every blob is one of backy2's. */
export function fitsBacky2(r: VersionRecord): boolean {
  return r.blobs.every((b) => b.format !== BlobFormat.Backy);
}

/** The dump's lines, a chunk of text at a time (a large version is never one string). */
export function* dumpLines(r: VersionRecord, bad: (blobIndex: number) => boolean): Generator<string> {
  const v = r.version;
  const blocks = blockCount(v.size, v.blockSize);
  const lenOf = (i: number) => Math.min(v.blockSize, v.size - i * v.blockSize);
  let out = '';
  if (fitsBacky2(r)) {
    const dates = decodeBlockDates(v.date, blocks, r.blockDates);
    out += csvRow([BACKY2_SIGNATURE]);
    out += csvRow([v.uid, backy2DateText(v.date), v.name, v.snapshotName, blocks, v.size, v.valid ? 1 : 0, v.protected ? 1 : 0,
      v.expire === null ? '' : backy2DateText(v.expire).slice(0, 10)]);
    for (let i = 0; i < blocks; i++) {
      const m = r.map[i];
      if (m < 0 && m !== IMPORT_HOLE) continue; // never backed up: backy2 had no row
      const date = backy2DateText(Number.isNaN(dates[i]) ? v.date : dates[i]);
      if (m === IMPORT_HOLE) {
        out += csvRow(['', v.uid, i, date, '', lenOf(i), 1, 0, '', '']);
      } else {
        const b = r.blobs[m];
        const aes = b.format === BlobFormat.Backy2Aes;
        const info = aes && b.keyInfo ? parseKeyInfo(b.keyInfo) : undefined;
        const key = info ? info.wrapped.toString('hex') : '';
        const nonce = info?.nonce ? info.nonce.toString('hex') : '';
        out += csvRow([b.uid, v.uid, i, date, b.checksum.toString('hex'), b.size, bad(m) ? 0 : 1, aes ? 1 : 0, key, nonce]);
      }
      if (out.length > 1 << 20) {
        yield out;
        out = '';
      }
    }
  } else {
    out += csvRow([BACKY_SIGNATURE]);
    out += csvRow([v.uid, v.date, v.name, v.snapshotName, v.size, v.blockSize, v.valid ? 1 : 0, v.complete ? 1 : 0, v.protected ? 1 : 0,
      v.expire ?? '', v.baseUid ?? '', v.tags.join(',')]);
    for (let i = 0; i < blocks; i++) {
      const m = r.map[i];
      if (m < 0 && m !== IMPORT_HOLE) continue;
      if (m === IMPORT_HOLE) out += csvRow(['', i, '', lenOf(i), '', '']);
      else {
        const b = r.blobs[m];
        out += csvRow([b.uid, i, b.checksum.toString('hex'), b.size, b.format, b.keyInfo ? b.keyInfo.toString('hex') : '']);
      }
      if (out.length > 1 << 20) {
        yield out;
        out = '';
      }
    }
  }
  if (out) yield out;
}
