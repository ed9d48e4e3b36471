import { BlobFormatError, CodecOptions, decodeBlob } from './blob-format';
import { WorkerPool } from './pool';

/** A Buffer whose ArrayBuffer can be transferred to a worker: the same memory if it owns it all, else a copy. */
export function transferable(b: Buffer): { ab: ArrayBuffer; len: number } {
  if (b.byteOffset === 0 && b.byteLength === b.buffer.byteLength && b.buffer instanceof ArrayBuffer) {
    return { ab: b.buffer, len: b.length };
  }
  const ab = new ArrayBuffer(b.length);
  new Uint8Array(ab).set(b);
  return { ab, len: b.length };
}

/** A block buffer that owns its memory, so it can travel to a worker and back. */
export function allocBlock(size: number): Buffer {
  return Buffer.from(new ArrayBuffer(Math.max(1, size)), 0, size);
}

/**
 * Block encoding and decoding on the worker pool. Buffers given to scan/encode are transferred: the caller
 * must use the one returned instead.
 */
export class Codec {
  /**
   * @param recomputeOnRead read_verification = checksum (default): every read recomputes the plaintext
   *   checksum besides checking the GCM tag; false: the tag alone (it authenticates the checksum too).
   */
  constructor(readonly pool: WorkerPool, readonly opts: CodecOptions, readonly recomputeOnRead = true) {}

  /** Zero test, then checksum of non-zero data. */
  async scan(buf: Buffer, len: number): Promise<{ zero: boolean; sum?: Buffer; buf: Buffer }> {
    const { ab } = transferable(buf);
    const r = await this.pool.run({ op: 'scan', buf: ab, len }, [ab]);
    if (r.op !== 'scan') throw new Error('codec: unexpected reply');
    return { zero: r.zero, sum: r.sum ? Buffer.from(r.sum.buffer, r.sum.byteOffset, r.sum.byteLength) : undefined, buf: Buffer.from(r.buf) };
  }

  /**
   * Compresses and encrypts. With `out` (an allocBlock of encodedCapacity(len) bytes) the blob is written
   * into it, so a backup can reuse the same few output buffers: `blob.buffer` is then that memory.
   */
  async encode(buf: Buffer, len: number, sum: Buffer, out?: Buffer): Promise<{ blob: Buffer; buf: Buffer }> {
    const { ab } = transferable(buf);
    const transfer = [ab];
    let outAb: ArrayBuffer | undefined;
    if (out) {
      outAb = transferable(out).ab;
      if (outAb !== ab) transfer.push(outAb);
    }
    const r = await this.pool.run({ op: 'encode', buf: ab, len, sum: new Uint8Array(sum), out: outAb }, transfer);
    if (r.op !== 'encode') throw new Error('codec: unexpected reply');
    return { blob: Buffer.from(r.blob, 0, r.len), buf: Buffer.from(r.buf) };
  }

  /** Decrypts, decompresses and verifies; throws BlobFormatError with the reason. */
  async decode(blob: Buffer, sum: Buffer, size: number, recompute = this.recomputeOnRead): Promise<Buffer> {
    const r = await this.decodeReusing(blob, sum, size, undefined, recompute);
    if (r.error !== undefined) throw new BlobFormatError(r.error);
    return r.data!;
  }

  /**
   * Decode that gives the memory back: `blob` returns as `spareBlob` (read the next blob into it) and, when
   * `out` is given, the plaintext is written into it if possible (else `spareOut` returns it unused).
   */
  async decodeReusing(blob: Buffer, sum: Buffer, size: number, out?: Buffer, recompute = this.recomputeOnRead): Promise<{ data?: Buffer; error?: string; spareBlob: Buffer; spareOut?: Buffer }> {
    const { ab, len } = transferable(blob);
    const transfer = [ab];
    let outAb: ArrayBuffer | undefined;
    if (out) {
      outAb = transferable(out).ab;
      if (outAb !== ab) transfer.push(outAb);
    }
    const r = await this.pool.run({ op: 'decode', blob: ab, len, sum: new Uint8Array(sum), size, out: outAb, recompute }, transfer);
    if (r.op !== 'decode') throw new Error('codec: unexpected reply');
    return {
      data: r.data ? Buffer.from(r.data, 0, r.len) : undefined,
      error: r.error,
      spareBlob: Buffer.from(r.blob),
      spareOut: r.out ? Buffer.from(r.out) : undefined,
    };
  }

  /** Same as decode, on the calling thread (small jobs, tests). */
  decodeSync(blob: Buffer, sum: Buffer, size: number): Buffer {
    return decodeBlob(blob, sum, size, this.opts);
  }

  close(): Promise<void> {
    return this.pool.close();
  }
}
