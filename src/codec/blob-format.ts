import { createCipheriv, createDecipheriv, createHash, randomBytes } from 'node:crypto';
import { compress, decompress } from 'zstd-napi';

/**
 * How one block is stored. Layout (version 1):
 *
 *   0  "BKY1"            magic
 *   4  flags (u8)        bit 0: zstd-compressed payload, bit 1: AES-256-GCM encrypted
 *   5  reserved (3)      zero
 *   8  nonce (12)        only when encrypted
 *   .. payload           (ciphertext when encrypted)
 *   .. tag (16)          only when encrypted
 *
 * The GCM additional data is the header plus the block's checksum, so a blob is authentic only as the block
 * it was written for: a blob swapped for another (or renamed in storage) fails authentication, not just a
 * flipped bit. The checksum of the plaintext is verified again after decoding.
 */
export const MAGIC = Buffer.from('BKY1');
const FLAG_ZSTD = 1;
const FLAG_AES = 2;
const HEADER_PLAIN = 8;
const HEADER_AES = 20;
const TAG = 16;

export interface CodecOptions {
  key?: Buffer; // 32 bytes; undefined = no encryption
  compression: 'zstd' | 'none';
  compressionLevel: number;
  hashFunction: string;
}

export function checksum(hashFunction: string, data: Uint8Array): Buffer {
  return createHash(hashFunction).update(data).digest();
}

let zeros = Buffer.alloc(0);

/** true when every byte is zero (memcmp against a shared zero buffer: many GB/s, stops at the first difference). */
export function isZero(data: Uint8Array): boolean {
  if (zeros.length < data.length) zeros = Buffer.alloc(data.length);
  return Buffer.compare(data, zeros.subarray(0, data.length)) === 0;
}

/** Cheap test whether zstd is worth running on the whole block: compress three 16 KiB samples. */
function worthCompressing(data: Buffer, level: number): boolean {
  if (data.length < 8192) return true;
  const sample = 16384;
  let inSize = 0;
  let outSize = 0;
  for (const at of [0, Math.floor(data.length / 2), Math.max(0, data.length - sample)]) {
    const part = data.subarray(at, Math.min(data.length, at + sample));
    inSize += part.length;
    outSize += compress(part, { compressionLevel: level }).length;
  }
  return outSize < inSize * 0.9;
}

export function encodeBlob(data: Buffer, sum: Buffer, opts: CodecOptions): Buffer {
  let payload = data;
  let flags = 0;
  if (opts.compression === 'zstd' && data.length > 0 && worthCompressing(data, opts.compressionLevel)) {
    const c = compress(data, { compressionLevel: opts.compressionLevel });
    if (c.length < data.length * 0.95) {
      payload = c;
      flags |= FLAG_ZSTD;
    }
  }
  if (!opts.key) {
    const out = Buffer.allocUnsafe(HEADER_PLAIN + payload.length);
    MAGIC.copy(out, 0);
    out.writeUInt32LE(flags, 4);
    payload.copy(out, HEADER_PLAIN);
    return out;
  }
  flags |= FLAG_AES;
  const out = Buffer.allocUnsafe(HEADER_AES + payload.length + TAG);
  MAGIC.copy(out, 0);
  out.writeUInt32LE(flags, 4);
  randomBytes(12).copy(out, 8);
  const cipher = createCipheriv('aes-256-gcm', opts.key, out.subarray(8, 20));
  cipher.setAAD(Buffer.concat([out.subarray(0, HEADER_AES), sum]));
  const ct = cipher.update(payload);
  ct.copy(out, HEADER_AES);
  let end = HEADER_AES + ct.length;
  const fin = cipher.final();
  fin.copy(out, end);
  end += fin.length;
  cipher.getAuthTag().copy(out, end);
  return out;
}

export class BlobFormatError extends Error {}

/**
 * Decodes and verifies a stored blob. Throws BlobFormatError with a short reason (never garbage data):
 * not a backy blob, authentication failed (wrong key or tampered), decompression failed, wrong size,
 * checksum mismatch.
 */
export function decodeBlob(blob: Buffer, sum: Buffer, size: number, opts: CodecOptions): Buffer {
  if (blob.length < HEADER_PLAIN || !blob.subarray(0, 4).equals(MAGIC)) throw new BlobFormatError('not a backy blob (bad magic)');
  const flags = blob.readUInt32LE(4);
  if (flags & ~(FLAG_AES | FLAG_ZSTD)) throw new BlobFormatError(`unknown flags ${flags}`);
  let payload: Buffer;
  if (flags & FLAG_AES) {
    if (!opts.key) throw new BlobFormatError('blob is encrypted but encryption is off in the configuration');
    if (blob.length < HEADER_AES + TAG) throw new BlobFormatError('truncated');
    const decipher = createDecipheriv('aes-256-gcm', opts.key, blob.subarray(8, 20));
    decipher.setAAD(Buffer.concat([blob.subarray(0, HEADER_AES), sum]));
    decipher.setAuthTag(blob.subarray(blob.length - TAG));
    const body = decipher.update(blob.subarray(HEADER_AES, blob.length - TAG));
    try {
      decipher.final();
    } catch {
      throw new BlobFormatError('authentication failed (corrupt, tampered with, or another key)');
    }
    payload = body;
  } else {
    payload = blob.subarray(HEADER_PLAIN);
  }
  let data: Buffer;
  if (flags & FLAG_ZSTD) {
    try {
      data = decompress(payload);
    } catch {
      throw new BlobFormatError('decompression failed');
    }
  } else {
    data = payload;
  }
  if (data.length !== size) throw new BlobFormatError(`wrong size ${data.length}, expected ${size}`);
  if (!checksum(opts.hashFunction, data).equals(sum)) throw new BlobFormatError('checksum mismatch');
  return data;
}
