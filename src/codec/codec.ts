import type { CodecOptions } from './blob-format';
import { BlobFormat } from '../meta/types';

/** How a blob is stored, when not in backy's own format (BlobRef has these fields). */
export interface StoredFormat {
  format: BlobFormat;
  keyInfo: Buffer | null;
}
import { WorkerPool } from './pool';
import type { SlabTarget } from '../device/shm-slab';
import { isShared, owned, ownArrayBuffer } from './transfer';

export { allocBlock, allocShared } from './transfer';

/**
 * `main`'s ArrayBuffer and, when given, `out`'s, as a transfer list (the same memory only once). With
 * `mainAnywhere`, shared memory goes as it is with `mainOffset` saying where `main` starts in it (a blob read
 * with O_DIRECT starts at an aligned address inside its buffer); otherwise `main` starts at 0.
 */
function transferWith(main: Buffer, out?: Buffer, mainAnywhere = false): { ab: ArrayBuffer; mainOffset?: number; outAb?: ArrayBuffer; outOffset?: number; outLength?: number; transfer: ArrayBuffer[] } {
  const inPlace = mainAnywhere && isShared(main) && main.byteOffset > 0;
  const ab = inPlace ? main.buffer as ArrayBuffer : ownArrayBuffer(main);
  // `out` goes with its place in its memory (an allocAligned buffer starts past the beginning); memory it may
  // share with others is copied instead, and then starts at 0.
  const outAb = out ? (owned(out) || isShared(out) ? out.buffer as ArrayBuffer : ownArrayBuffer(out)) : undefined;
  const placed = !!out && outAb === out.buffer;
  return {
    ab, mainOffset: inPlace ? main.byteOffset : undefined, outAb, transfer: outAb && outAb !== ab ? [ab, outAb] : [ab],
    outOffset: placed && out.byteOffset ? out.byteOffset : undefined,
    outLength: placed ? out.length : undefined,
  };
}

/**
 * Block encoding and decoding on the worker pool. Buffers given to scan/encode/decodeReusing are
 * transferred: the caller must use the ones returned instead.
 */
export class Codec {
  /**
   * @param recomputeOnRead read_verification = checksum (default): every read recomputes the plaintext
   *   checksum besides checking the GCM tag; false: the tag alone (it authenticates the checksum too).
   */
  constructor(readonly pool: WorkerPool, readonly opts: CodecOptions, readonly recomputeOnRead = true) {}

  /** Zero test, then checksum of non-zero data. */
  async scan(buf: Buffer, len: number): Promise<{ zero: boolean; sum?: Buffer; buf: Buffer }> {
    const ab = ownArrayBuffer(buf);
    const r = await this.pool.run({ op: 'scan', buf: ab, len }, [ab]);
    if (r.op !== 'scan') throw new Error('codec: unexpected reply');
    return { zero: r.zero, sum: r.sum ? Buffer.from(r.sum.buffer, r.sum.byteOffset, r.sum.byteLength) : undefined, buf: Buffer.from(r.buf) };
  }

  /**
   * Compresses and encrypts. With `out` (allocAligned or allocBlock of encodedCapacity(len) bytes, memory the
   * caller owns whole) the blob is written into it, so a backup can reuse the same few output buffers:
   * `blob.buffer` is then that memory, and the blob starts where `out` starts in it.
   */
  async encode(buf: Buffer, len: number, sum: Buffer, out?: Buffer): Promise<{ blob: Buffer; buf: Buffer }> {
    const { ab, outAb, outOffset, outLength, transfer } = transferWith(buf, out);
    const r = await this.pool.run({ op: 'encode', buf: ab, len, sum: new Uint8Array(sum), out: outAb, outOffset, outLength }, transfer);
    if (r.op !== 'encode') throw new Error('codec: unexpected reply');
    return { blob: Buffer.from(r.blob, r.offset ?? 0, r.len), buf: Buffer.from(r.buf) };
  }

  /**
   * Decode that gives the memory back: `blob` returns as `spareBlob` (read the next blob into it) and, when
   * `out` is given, the plaintext is written into it if possible (else `spareOut` returns it unused).
   * `stored`: the blob's format (a BlobRef), for blobs in another format than backy's own.
   */
  async decodeReusing(blob: Buffer, sum: Buffer, size: number, out?: Buffer, recompute = this.recomputeOnRead, stored?: StoredFormat, store?: SlabTarget): Promise<{ data?: Buffer; stored?: number; error?: string; spareBlob: Buffer; spareOut?: Buffer }> {
    const { ab, mainOffset, outAb, outOffset, transfer } = transferWith(blob, out, true);
    const foreign = stored && stored.format !== BlobFormat.Backy ? { format: stored.format, keyInfo: stored.keyInfo ? new Uint8Array(stored.keyInfo) : undefined } : {};
    const r = await this.pool.run({ op: 'decode', blob: ab, blobOffset: mainOffset, len: blob.length, sum: new Uint8Array(sum), size, out: outAb, outOffset, recompute, ...foreign, ...(store ? { store } : {}) }, transfer);
    if (r.op !== 'decode') throw new Error('codec: unexpected reply');
    return {
      data: r.data ? Buffer.from(r.data, r.offset ?? 0, r.len) : undefined,
      stored: r.stored ? r.len : undefined,
      error: r.error,
      spareBlob: Buffer.from(r.blob),
      spareOut: r.out ? Buffer.from(r.out, outOffset ?? 0) : undefined,
    };
  }

  close(): Promise<void> {
    return this.pool.close();
  }
}
