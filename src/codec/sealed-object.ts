import { createCipheriv, createDecipheriv, createHash, randomBytes } from 'node:crypto';
import { compress, decompress } from 'zstd-napi';
// eslint-disable-next-line @typescript-eslint/no-require-imports
import zstdBinding = require('zstd-napi/binding');

/**
 * Metadata objects in storage (a version's record, the repository's settings), sealed like blobs:
 *
 *   0  "BKYM"        magic
 *   4  version (u8)  1
 *   5  flags (u8)    bit 0: AES-256-GCM with the repository key
 *   6  reserved (2)  zero
 *   8  nonce (12)    only when encrypted
 *   .. zstd frame of the payload (ciphertext when encrypted)
 *   .. tag (16) when encrypted, else sha256 (32) of everything before it and the name
 *
 * The additional data is the header and the object's name (its storage key), so an object renamed or swapped
 * for another version's fails authentication. Without a key the hash only detects damage, not tampering.
 */
const MAGIC = Buffer.from('BKYM');
const FLAG_AES = 1;
const HEADER = 8;
const NONCE = 12;
const TAG = 16;
const HASH = 32;
/** A payload larger than this is refused when opening (bounds memory on a crafted object). */
const MAX_PAYLOAD = 1 << 30;

export class SealedObjectError extends Error {}

export function sealObject(name: string, payload: Buffer, key?: Buffer): Buffer {
  const body = compress(payload, { compressionLevel: 3 });
  const head = Buffer.alloc(HEADER);
  MAGIC.copy(head);
  head[4] = 1;
  if (!key) {
    const sum = createHash('sha256').update(head).update(body).update(name).digest();
    return Buffer.concat([head, body, sum]);
  }
  head[5] = FLAG_AES;
  const nonce = randomBytes(NONCE);
  const c = createCipheriv('aes-256-gcm', key, nonce);
  c.setAAD(Buffer.concat([head, nonce, Buffer.from(name)]));
  const ct = Buffer.concat([c.update(body), c.final()]);
  return Buffer.concat([head, nonce, ct, c.getAuthTag()]);
}

/** The payload of a sealed object; throws SealedObjectError (wrong key, damage, not an object of ours). */
export function openObject(name: string, data: Buffer, key?: Buffer): Buffer {
  if (data.length < HEADER || !data.subarray(0, 4).equals(MAGIC)) throw new SealedObjectError('not a backy metadata object');
  if (data[4] !== 1) throw new SealedObjectError(`unknown metadata object version ${data[4]}`);
  const head = data.subarray(0, HEADER);
  let body: Buffer;
  if (data[5] & FLAG_AES) {
    if (!key) throw new SealedObjectError('the object is encrypted but no encryption_key is configured');
    if (data.length < HEADER + NONCE + TAG) throw new SealedObjectError('truncated');
    const nonce = data.subarray(HEADER, HEADER + NONCE);
    const d = createDecipheriv('aes-256-gcm', key, nonce);
    d.setAAD(Buffer.concat([head, nonce, Buffer.from(name)]));
    d.setAuthTag(data.subarray(data.length - TAG));
    const plain = d.update(data.subarray(HEADER + NONCE, data.length - TAG));
    try {
      d.final();
    } catch {
      throw new SealedObjectError('authentication failed (another key, damaged, or not this object)');
    }
    body = plain;
  } else {
    if (key) throw new SealedObjectError('the object is not encrypted although this repository is');
    if (data.length < HEADER + HASH) throw new SealedObjectError('truncated');
    body = data.subarray(HEADER, data.length - HASH);
    const sum = createHash('sha256').update(head).update(body).update(name).digest();
    if (!sum.equals(data.subarray(data.length - HASH))) throw new SealedObjectError('checksum mismatch (damaged, or not this object)');
  }
  try {
    const declared = zstdBinding.getFrameContentSize(body);
    if (declared === null || declared > MAX_PAYLOAD) throw new Error(`payload of ${declared ?? 'unknown'} bytes`);
    return decompress(body, { windowLogMax: 27 });
  } catch (e) {
    throw new SealedObjectError(`decompression failed: ${(e as Error).message}`);
  }
}
