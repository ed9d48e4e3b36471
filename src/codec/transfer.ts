import { native } from './native';

/**
 * Moving buffers between threads without copying: a Buffer's ArrayBuffer can be transferred only when the
 * Buffer owns all of it (small Buffers share Node's pool, and transferring that would detach the pool).
 */

/**
 * The ArrayBuffer behind `b`, to transfer, or a copy when that memory may be shared. A view starting at the
 * beginning of a buffer larger than Node's pool counts as owned: callers pass views of their own reusable
 * block buffers (a compressed blob read into a block-sized buffer), and the receiver gets the length apart.
 */
export function ownArrayBuffer(b: Buffer): ArrayBuffer {
  if (b.byteOffset === 0 && owned(b)) return b.buffer as ArrayBuffer;
  const copy = new ArrayBuffer(b.length);
  new Uint8Array(copy).set(b);
  return copy;
}

/** Whether `b`'s memory is its own to transfer (not a slice of Node's shared pool). */
export function owned(b: Buffer): boolean {
  return b.buffer instanceof ArrayBuffer && (b.byteLength === b.buffer.byteLength || b.buffer.byteLength > Buffer.poolSize);
}

/** A block buffer that owns its memory, so it can travel to a worker and back. */
export function allocBlock(size: number): Buffer {
  return Buffer.from(new ArrayBuffer(Math.max(1, size)), 0, size);
}

/** What direct I/O (O_DIRECT) needs buffers, lengths and file offsets aligned to: a page covers every device. */
export const DIRECT_ALIGNMENT = 4096;

const roundUp = (n: number) => Math.ceil(n / DIRECT_ALIGNMENT) * DIRECT_ALIGNMENT;

/**
 * A buffer of `size` bytes that can travel between threads like allocBlock's and, when the native module is
 * built, starts at an aligned address with memory up to the next aligned length behind it: directView() then
 * lets file storage write it with O_DIRECT.
 */
export function allocAligned(size: number): Buffer {
  const ab = new ArrayBuffer(roundUp(Math.max(1, size)) + DIRECT_ALIGNMENT);
  return Buffer.from(ab, native ? native.alignedOffset(ab, DIRECT_ALIGNMENT) : 0, size);
}

/**
 * `b` extended to a multiple of DIRECT_ALIGNMENT bytes, for O_DIRECT, when it starts at an aligned address and
 * its memory reaches that far (the bytes past b.length are whatever is there); undefined otherwise.
 */
export function directView(b: Buffer): Buffer | undefined {
  if (!native || !(b.buffer instanceof ArrayBuffer)) return undefined;
  const length = roundUp(Math.max(1, b.length));
  if (b.byteOffset + length > b.buffer.byteLength) return undefined;
  if ((b.byteOffset - native.alignedOffset(b.buffer, DIRECT_ALIGNMENT)) % DIRECT_ALIGNMENT !== 0) return undefined;
  return Buffer.from(b.buffer, b.byteOffset, length);
}

/** A buffer to reuse from the memory behind `b`: from b's start to the end of that memory. */
export function reusable(b: Buffer): Buffer {
  return Buffer.from(b.buffer, b.byteOffset, b.buffer.byteLength - b.byteOffset);
}
