import { createHash } from 'node:crypto';
import { BlobFormat } from '../meta/types';
import { BACKY_NAMING, blobKey, registerBlobNaming, uidFromKey } from './types';

/**
 * The namings of blobs in every format backy reads. backy's own blobs live at `ab/cd/<32 hex>` (BACKY_NAMING).
 * Blobs of an imported backy2 repository stay where backy2 put them: `ab/cd/<uid>.blob` in a directory,
 * `<uid>` at the top of an S3 bucket. A backy2 uid is md5(s)[:10] + s, s a 22-character shortuuid (base57).
 * Importing this module registers backy2's namings, so their uids are checked before any storage call and
 * their keys are recognised when storage is listed.
 */
export type KeyLayout = 'file' | 's3';

const BASE57 = '23456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz';
const BACKY2_UID = new RegExp(`^[0-9a-f]{10}[${BASE57}]{22}$`);

registerBlobNaming({
  name: 'backy2-file',
  uid: BACKY2_UID,
  key: (uid) => `${uid.slice(0, 2)}/${uid.slice(2, 4)}/${uid}.blob`,
  uidOfKey(key) {
    const m = /^([0-9a-f]{2})\/([0-9a-f]{2})\/([0-9A-Za-z]{32})\.blob$/.exec(key);
    return m && BACKY2_UID.test(m[3]) && m[3].startsWith(m[1] + m[2]) ? m[3] : undefined;
  },
});
registerBlobNaming({
  name: 'backy2-s3',
  uid: BACKY2_UID,
  key: (uid) => uid,
  uidOfKey: (key) => (BACKY2_UID.test(key) ? key : undefined),
});

/** Whether `uid` is a blob uid backy2 wrote (shape and its md5 prefix). */
export function isBacky2Uid(uid: string): boolean {
  return BACKY2_UID.test(uid) && createHash('md5').update(uid.slice(10), 'ascii').digest('hex').slice(0, 10) === uid.slice(0, 10);
}

/** The naming of blobs of `format` on a backend of `layout`. */
export function namingOf(format: BlobFormat, layout: KeyLayout): string {
  return format === BlobFormat.Backy ? BACKY_NAMING.name : layout === 's3' ? 'backy2-s3' : 'backy2-file';
}

/** The storage key of a blob; InvalidBlobUidError when the uid is not one of its naming (never a path). */
export function storageKey(uid: string, format: BlobFormat, layout: KeyLayout): string {
  return blobKey(uid, namingOf(format, layout));
}

/** The uid of a stored object that is a blob of any naming, or undefined (metadata objects, strangers). */
export function uidOfKey(key: string): string | undefined {
  return uidFromKey(key);
}
