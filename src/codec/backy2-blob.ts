import { createCipheriv, createDecipheriv, createHash } from 'node:crypto';
// eslint-disable-next-line @typescript-eslint/no-require-imports
import zstdBinding = require('zstd-napi/binding');
import { BlobFormat } from '../meta/types';
import { BlobFormatError } from './blob-format';

/**
 * backy2's blob formats, read where backy2 stored them (an import without copying).
 *
 * Version 0: the block itself. Nothing but its checksum says it is the right block, so the checksum is always
 * recomputed.
 *
 * Version 1: tag (16) ‖ nonce (16) ‖ AES-256-GCM ciphertext of one zstd frame holding the block, under a random
 * data key per blob, no additional data. backy2 kept the data key wrapped with its master key (RFC 3394) in
 * its database; an import re-wraps it with backy's own key (as backy2's `rekey` would), so backy never needs
 * backy2's key after the import. keyInfo = wrapped key (40) ‖ nonce (16; absent when backy2's database had no
 * nonce column, before 2.13). The data key is unique to the
 * blob, so the GCM tag already ties the blob to this database row: like backy's own format, reading may rely
 * on the tag alone (read_verification = tag) or recompute the checksum as well.
 */
const IV_3394 = Buffer.from('A6A6A6A6A6A6A6A6', 'hex');
const TAG = 16;
const NONCE = 16;
export const WRAPPED_KEY = 40;
export const KEY_INFO = WRAPPED_KEY + NONCE;

/** Unwraps a backy2 data key; throws when the master key is not the one it was wrapped with. */
export function unwrapDataKey(master: Buffer, wrapped: Buffer): Buffer {
  if (wrapped.length !== WRAPPED_KEY) throw new BlobFormatError(`wrapped data key of ${wrapped.length} bytes, expected ${WRAPPED_KEY}`);
  try {
    const d = createDecipheriv('id-aes256-wrap', master, IV_3394);
    return Buffer.concat([d.update(wrapped), d.final()]);
  } catch {
    throw new BlobFormatError('the data key does not unwrap with this key (another key?)');
  }
}

export function wrapDataKey(master: Buffer, dataKey: Buffer): Buffer {
  const c = createCipheriv('id-aes256-wrap', master, IV_3394);
  return Buffer.concat([c.update(dataKey), c.final()]);
}

let dctx: InstanceType<typeof zstdBinding.DCtx> | undefined;

/** Decompresses one zstd frame that must hold exactly `size` bytes, never allocating more than that. */
function inflateExactly(frame: Buffer, size: number, out?: Buffer): Buffer {
  let declared: number | null;
  try {
    declared = zstdBinding.getFrameContentSize(frame);
  } catch {
    throw new BlobFormatError('decompression failed (not a zstd frame)');
  }
  if (declared !== null && declared !== size) throw new BlobFormatError(`wrong size ${declared}, expected ${size}`);
  const dst = out && out.length >= size ? out.subarray(0, size) : Buffer.allocUnsafe(size);
  dctx ??= new zstdBinding.DCtx();
  let n: number;
  try {
    n = dctx.decompress(dst, frame);
  } catch {
    dctx = undefined; // a failed context is not reused
    throw new BlobFormatError(`decompression failed (corrupt, or larger than ${size} bytes)`);
  }
  if (n !== size) throw new BlobFormatError(`wrong size ${n}, expected ${size}`);
  return dst;
}

export interface Backy2DecodeOptions {
  format: BlobFormat;
  keyInfo: Buffer | null;
  /** backy's key: Backy2Aes data keys are wrapped with it */
  key?: Buffer;
  hashFunction: string;
}

/** Decodes and verifies a backy2 blob (see the top of this file); throws BlobFormatError, never returns garbage. */
export function decodeBacky2Blob(blob: Buffer, sum: Buffer, size: number, o: Backy2DecodeOptions, out?: Buffer, recompute = true): Buffer {
  let data: Buffer;
  if (o.format === BlobFormat.Backy2Plain) {
    if (blob.length !== size) throw new BlobFormatError(`wrong size ${blob.length}, expected ${size}`);
    data = blob;
    recompute = true; // nothing else vouches for a plain blob
  } else if (o.format === BlobFormat.Backy2Aes) {
    if (!o.key) throw new BlobFormatError('blob is encrypted but this repository has no key');
    if (!o.keyInfo || (o.keyInfo.length !== KEY_INFO && o.keyInfo.length !== WRAPPED_KEY)) throw new BlobFormatError('the database has no data key for this blob');
    if (blob.length < TAG + NONCE) throw new BlobFormatError('truncated');
    const nonce = blob.subarray(TAG, TAG + NONCE);
    if (o.keyInfo.length === KEY_INFO && !nonce.equals(o.keyInfo.subarray(WRAPPED_KEY))) throw new BlobFormatError('nonce differs from the database (another blob?)');
    const dataKey = unwrapDataKey(o.key, o.keyInfo.subarray(0, WRAPPED_KEY));
    const d = createDecipheriv('aes-256-gcm', dataKey, nonce);
    d.setAuthTag(blob.subarray(0, TAG));
    const frame = d.update(blob.subarray(TAG + NONCE));
    try {
      d.final();
    } catch {
      throw new BlobFormatError('authentication failed (corrupt, tampered with, or another key)');
    }
    data = inflateExactly(frame, size, out);
  } else {
    throw new BlobFormatError(`unknown blob format ${o.format}`);
  }
  if (recompute && !createHash(o.hashFunction).update(data).digest().equals(sum)) throw new BlobFormatError('checksum mismatch');
  return data;
}
