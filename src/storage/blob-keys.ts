import { createHash } from 'node:crypto';
import { BlobFormat } from '../meta/types';
import { StorageError } from '../util/errors';
import { blobKey, uidFromKey } from './types';

/**
 * Storage keys of blobs in every format backy reads. backy's own blobs live at `ab/cd/<32 hex>`. Blobs of an
 * imported backy2 repository stay where backy2 put them: `ab/cd/<uid>.blob` in a directory, `<uid>` at the
 * top of an S3 bucket. A backy2 uid is md5(s)[:10] + s, s a 22-character shortuuid (base57).
 */
export type KeyLayout = 'file' | 's3';

const BASE57 = '23456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz';
const BACKY2_UID = new RegExp(`^[0-9a-f]{10}[${BASE57}]{22}$`);

/** Whether `uid` is a blob uid backy2 wrote (shape and its md5 prefix). */
export function isBacky2Uid(uid: string): boolean {
  return BACKY2_UID.test(uid) && createHash('md5').update(uid.slice(10), 'ascii').digest('hex').slice(0, 10) === uid.slice(0, 10);
}

/** The storage key of a blob of `format`; refuses a uid that is not of the format's shape (never a path). */
export function storageKey(uid: string, format: BlobFormat, layout: KeyLayout): string {
  if (format === BlobFormat.Backy) {
    if (!/^[0-9a-f]{32}$/.test(uid)) throw new StorageError(`refusing blob uid ${JSON.stringify(uid.slice(0, 40))}: not a backy blob uid`);
    return blobKey(uid);
  }
  if (!isBacky2Uid(uid)) throw new StorageError(`refusing blob uid ${JSON.stringify(uid.slice(0, 40))}: not a backy2 blob uid`);
  return layout === 's3' ? uid : `${uid.slice(0, 2)}/${uid.slice(2, 4)}/${uid}.blob`;
}

/** The uid of a stored object that is a blob in any format, or undefined (metadata objects, strangers). */
export function uidOfKey(key: string): string | undefined {
  const own = uidFromKey(key);
  if (own) return own;
  const m = /^(?:([0-9a-f]{2})\/([0-9a-f]{2})\/)?([0-9A-Za-z]{32})(\.blob)?$/.exec(key);
  if (!m || !isBacky2Uid(m[3])) return undefined;
  // Either backy2's directory layout (shard dirs and suffix) or its flat S3 layout (neither).
  if (m[1] === undefined && m[4] === undefined) return m[3];
  if (m[1] !== undefined && m[4] !== undefined && m[3].startsWith(m[1] + m[2])) return m[3];
  return undefined;
}
