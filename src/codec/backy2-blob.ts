import { createCipheriv, createDecipheriv } from 'node:crypto';
import { createHasher } from './hashes';
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
 * its database. backy keeps it as it was, with the id of the key that wraps it (keyInfo below): backy2's key
 * is kept in the repository wrapped with backy's own (a key-encryption key, KEK), so an import costs no
 * cryptography per blob, a repository key differing from backy2's is no problem, and exports show the
 * wrapped keys exactly as backy2 did. The data key is unique to the
 * blob, so the GCM tag already ties the blob to this database row: like backy's own format, reading may rely
 * on the tag alone (read_verification = tag) or recompute the checksum as well.
 */
const IV_3394 = Buffer.from('A6A6A6A6A6A6A6A6', 'hex');
const TAG = 16;
const NONCE = 16;
export const WRAPPED_KEY = 40;

/**
 * A Backy2Aes blob's key information: the id of the key wrapping its data key (0: the repository key, else a
 * KEK an import registered), the wrapped data key (40), and its nonce (16; absent when backy2's database had
 * no nonce column, before 2.13).
 */
export function makeKeyInfo(kek: number, wrapped: Buffer, nonce?: Buffer): Buffer {
  if (!Number.isInteger(kek) || kek < 0 || kek > 255) throw new Error(`key id ${kek} out of range`);
  // One buffer, filled in place (an import makes one per blob: Buffer.concat of three cost several times more).
  const out = Buffer.allocUnsafe(1 + wrapped.length + (nonce ? nonce.length : 0));
  out[0] = kek;
  wrapped.copy(out, 1);
  if (nonce) nonce.copy(out, 1 + wrapped.length);
  return out;
}

export function parseKeyInfo(k: Buffer): { kek: number; wrapped: Buffer; nonce?: Buffer } {
  if (k.length !== 1 + WRAPPED_KEY && k.length !== 1 + WRAPPED_KEY + NONCE) throw new BlobFormatError('the database has no data key for this blob');
  return { kek: k[0], wrapped: k.subarray(1, 1 + WRAPPED_KEY), nonce: k.length > 1 + WRAPPED_KEY ? k.subarray(1 + WRAPPED_KEY) : undefined };
}

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
  /** the key of a KEK id (0: the repository key) */
  keys: (kek: number) => Buffer | undefined;
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
    if (!o.keyInfo) throw new BlobFormatError('the database has no data key for this blob');
    const info = parseKeyInfo(o.keyInfo);
    const kek = o.keys(info.kek);
    if (!kek) throw new BlobFormatError(info.kek ? `key ${info.kek} of this blob is not known to this repository` : 'blob is encrypted but this repository has no key');
    if (blob.length < TAG + NONCE) throw new BlobFormatError('truncated');
    const nonce = blob.subarray(TAG, TAG + NONCE);
    if (info.nonce && !nonce.equals(info.nonce)) throw new BlobFormatError('nonce differs from the database (another blob?)');
    const dataKey = unwrapDataKey(kek, info.wrapped);
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
  if (recompute && !createHasher(o.hashFunction).update(data).digest().equals(sum)) throw new BlobFormatError('checksum mismatch');
  return data;
}
