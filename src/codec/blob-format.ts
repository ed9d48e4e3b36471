import { randomBytes } from 'node:crypto';
import { createHasher } from './hashes';
import { gcm } from './aes-gcm';
// The low-level contexts: compress into memory we reuse (the simple API allocates a block-sized buffer for
// every call and copies the result out of it), and decompress into a buffer we size, never one sized by the
// frame's own header.
// eslint-disable-next-line @typescript-eslint/no-require-imports
const { CCtx, DCtx, compressBound } = require('zstd-napi/binding') as typeof import('zstd-napi/binding');

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
  return createHasher(hashFunction).update(data).digest();
}

let zeros = Buffer.alloc(0);

/** true when every byte is zero (memcmp against a shared zero buffer: many GB/s, stops at the first difference). */
export function isZero(data: Uint8Array): boolean {
  if (zeros.length < data.length) zeros = Buffer.alloc(data.length);
  return Buffer.compare(data, zeros.subarray(0, data.length)) === 0;
}

let cctx: InstanceType<typeof CCtx> | undefined;
const SAMPLE = 16384;
let sampleOut: Buffer | undefined;

/**
 * zstd-compresses `data` into `dst`; the compressed length, or undefined when it does not fit (then it is not
 * worth storing compressed).
 */
function compressInto(data: Buffer, dst: Buffer, level: number): number | undefined {
  cctx ??= new CCtx();
  try {
    return cctx.compress(dst, data, level);
  } catch (e) {
    if (/too small/i.test((e as Error).message)) return undefined;
    throw e;
  }
}

/** Cheap test whether zstd is worth running on the whole block: compress three 16 KiB samples. */
function worthCompressing(data: Buffer, level: number): boolean {
  if (data.length < 8192) return true;
  sampleOut ??= Buffer.allocUnsafe(compressBound(SAMPLE));
  let inSize = 0;
  let outSize = 0;
  for (const at of [0, Math.floor(data.length / 2), Math.max(0, data.length - SAMPLE)]) {
    const part = data.subarray(at, Math.min(data.length, at + SAMPLE));
    inSize += part.length;
    outSize += compressInto(part, sampleOut, level)!;
  }
  return outSize < inSize * 0.9;
}

/** Largest encoded size of a block of `size` bytes (compressed output is only kept when smaller). */
export function encodedCapacity(size: number): number {
  return HEADER_AES + size + TAG;
}

// Decrypted data is hashed a piece at a time, while the piece is still in the CPU cache.
const PIECE = 256 * 1024;

/** Holds a compressed payload between decryption and decompression; reused, as blocks are decoded one at a time. */
let scratch = Buffer.alloc(0);

function scratchOf(size: number): Buffer {
  if (scratch.length < size) scratch = Buffer.allocUnsafe(size);
  return scratch.subarray(0, size);
}

/** Encodes a block; writes into `out` (capacity encodedCapacity(data.length)) when given. */
export function encodeBlob(data: Buffer, sum: Buffer, opts: CodecOptions, out?: Buffer): Buffer {
  const header = opts.key ? HEADER_AES : HEADER_PLAIN;
  const capacity = header + data.length + (opts.key ? TAG : 0);
  const dst = out && out.length >= capacity ? out : Buffer.allocUnsafe(capacity);
  // Compressed straight to where the payload goes, and encrypted there in place. Output that does not fit in
  // 95 % of the block is not worth keeping: the block is stored as it is.
  let payload = data;
  let flags = 0;
  if (opts.compression === 'zstd' && data.length > 0 && worthCompressing(data, opts.compressionLevel)) {
    const n = compressInto(data, dst.subarray(header, header + Math.ceil(data.length * 0.95) - 1), opts.compressionLevel);
    if (n !== undefined) {
      payload = dst.subarray(header, header + n);
      flags |= FLAG_ZSTD;
    }
  }
  MAGIC.copy(dst, 0);
  const end = header + payload.length;
  if (!opts.key) {
    dst.writeUInt32LE(flags, 4);
    if (payload === data) data.copy(dst, header);
    return dst.subarray(0, end);
  }
  flags |= FLAG_AES;
  dst.writeUInt32LE(flags, 4);
  randomBytes(12).copy(dst, 8);
  const cipher = gcm(opts.key, dst.subarray(8, 20), Buffer.concat([dst.subarray(0, HEADER_AES), sum]), false);
  cipher.update(payload, dst.subarray(HEADER_AES, end));
  cipher.finish(dst.subarray(end, end + TAG));
  return dst.subarray(0, end + TAG);
}

export class BlobFormatError extends Error {}

/**
 * What a stored blob is. The one place that tells formats apart (and decides which a repository accepts):
 * foreign formats (backy2's v0 plain and v1 blobs, read in place after an import) are added here, each with
 * its decoder below.
 */
export interface BlobFormat {
  name: 'backy-v1';
  encrypted: boolean;
  compressed: boolean;
}

/** The format of a blob from its header; BlobFormatError when it is none this backy reads. */
export function identifyBlob(blob: Buffer): BlobFormat {
  if (blob.length < HEADER_PLAIN || !blob.subarray(0, 4).equals(MAGIC)) throw new BlobFormatError('not a backy blob (bad magic)');
  const flags = blob.readUInt32LE(4);
  if (flags & ~(FLAG_AES | FLAG_ZSTD)) throw new BlobFormatError(`unknown flags ${flags}`);
  return { name: 'backy-v1', encrypted: (flags & FLAG_AES) !== 0, compressed: (flags & FLAG_ZSTD) !== 0 };
}

/**
 * Whether a repository with these options reads a blob of format `f`. An encrypted repository reads only
 * encrypted blobs: a plaintext blob in it was not written by backy with this repository's settings (a
 * configuration that switched encryption off, or a planted object) and is refused, never served.
 */
function refusal(f: BlobFormat, opts: CodecOptions): string | undefined {
  if (f.encrypted && !opts.key) return 'blob is encrypted but encryption is off in the configuration';
  if (!f.encrypted && opts.key) return 'blob is not encrypted, but this repository is: refused';
  return undefined;
}

let dctx: InstanceType<typeof DCtx> | undefined;

/**
 * zstd-decompresses `payload`, which must yield exactly `size` bytes, into `out` when it is large enough.
 * The output is bounded by `size`: a frame that claims or produces more fails, so a crafted blob cannot make
 * this process allocate more than one block.
 */
function decompressBounded(payload: Buffer, size: number, out?: Buffer): Buffer {
  const dst = out && out.length >= size ? out.subarray(0, size) : Buffer.allocUnsafe(size);
  dctx ??= new DCtx();
  let n: number;
  try {
    n = dctx.decompress(dst, payload);
  } catch (e) {
    throw new BlobFormatError(/too small/i.test((e as Error).message) ? `decompresses to more than ${size} bytes` : 'decompression failed');
  }
  if (n !== size) throw new BlobFormatError(`wrong size ${n}, expected ${size}`);
  return dst;
}

/**
 * Decodes and verifies a stored blob. Throws BlobFormatError with a short reason (never garbage data):
 * not a backy blob, authentication failed (wrong key or tampered), decompression failed, wrong size,
 * checksum mismatch. With `recompute` false, an encrypted blob is verified by its GCM tag alone, which
 * authenticates the block's checksum as well (it is additional data); unencrypted blobs are always
 * checksummed.
 */
export function decodeBlob(blob: Buffer, sum: Buffer, size: number, opts: CodecOptions, out?: Buffer, recompute = true): Buffer {
  const format = identifyBlob(blob);
  const refused = refusal(format, opts);
  if (refused) throw new BlobFormatError(refused);
  const compressed = format.compressed;
  let payload: Buffer;
  // Set when the checksum was computed on the way (decrypted pieces hashed while still in the CPU cache).
  let hashed: Buffer | undefined;
  if (format.encrypted && opts.key) {
    if (blob.length < HEADER_AES + TAG) throw new BlobFormatError('truncated');
    const decipher = gcm(opts.key, blob.subarray(8, 20), Buffer.concat([blob.subarray(0, HEADER_AES), sum]), true);
    const body = blob.subarray(HEADER_AES, blob.length - TAG);
    // Uncompressed: straight into the caller's buffer; compressed: into scratch memory, then decompressed into it.
    const plain = compressed ? scratchOf(body.length) : out && out.length >= body.length ? out.subarray(0, body.length) : Buffer.allocUnsafe(body.length);
    if (recompute && !compressed) {
      const hash = createHasher(opts.hashFunction);
      for (let i = 0; i < body.length; i += PIECE) {
        const end = Math.min(body.length, i + PIECE);
        decipher.update(body.subarray(i, end), plain.subarray(i, end));
        hash.update(plain.subarray(i, end));
      }
      hashed = hash.digest();
    } else {
      decipher.update(body, plain);
    }
    if (!decipher.finish(blob.subarray(blob.length - TAG))) {
      throw new BlobFormatError('authentication failed (corrupt, tampered with, or another key)');
    }
    payload = plain;
  } else {
    payload = blob.subarray(HEADER_PLAIN);
  }
  const data = compressed ? decompressBounded(payload, size, out) : payload;
  if (data.length !== size) throw new BlobFormatError(`wrong size ${data.length}, expected ${size}`);
  if (recompute || !format.encrypted) {
    if (!(hashed ?? checksum(opts.hashFunction, data)).equals(sum)) throw new BlobFormatError('checksum mismatch');
  }
  return data;
}
