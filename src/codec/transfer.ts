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

/** `n` rounded up to whole aligned blocks. */
export const alignedLength = (n: number) => Math.ceil(n / DIRECT_ALIGNMENT) * DIRECT_ALIGNMENT;

/**
 * A buffer of at least `size` bytes (whole aligned blocks) that can travel between threads like allocBlock's
 * and, when the native module is built, starts at an aligned address: O_DIRECT can then write it or read into
 * it (see directView).
 */
export function allocAligned(size: number): Buffer {
  const length = alignedLength(Math.max(1, size));
  const ab = new ArrayBuffer(length + DIRECT_ALIGNMENT);
  return Buffer.from(ab, native ? native.alignedOffset(ab, DIRECT_ALIGNMENT) : 0, length);
}

/**
 * `length` bytes (b.length by default) from b's start, rounded up to whole aligned blocks, for O_DIRECT: when b
 * starts at an aligned address and its memory reaches that far (past b.length it holds whatever is there);
 * undefined otherwise.
 */
export function directView(b: Buffer, length = b.length): Buffer | undefined {
  if (!native || !(b.buffer instanceof ArrayBuffer)) return undefined;
  const whole = alignedLength(Math.max(1, length));
  if (b.byteOffset + whole > b.buffer.byteLength) return undefined;
  if ((b.byteOffset - native.alignedOffset(b.buffer, DIRECT_ALIGNMENT)) % DIRECT_ALIGNMENT !== 0) return undefined;
  return Buffer.from(b.buffer, b.byteOffset, whole);
}

/** Whether O_DIRECT can use b's memory from its start: it starts at an aligned address. */
export function directAligned(b: Buffer): boolean {
  return directView(b, 1) !== undefined;
}

/** A buffer to reuse from the memory behind `b`: from b's start to the end of that memory. */
export function reusable(b: Buffer): Buffer {
  return Buffer.from(b.buffer, b.byteOffset, b.buffer.byteLength - b.byteOffset);
}
