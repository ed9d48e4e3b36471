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
  const whole = b.byteLength === b.buffer.byteLength || b.buffer.byteLength > Buffer.poolSize;
  if (b.byteOffset === 0 && whole && b.buffer instanceof ArrayBuffer) return b.buffer;
  const copy = new ArrayBuffer(b.length);
  new Uint8Array(copy).set(b);
  return copy;
}

/** A block buffer that owns its memory, so it can travel to a worker and back. */
export function allocBlock(size: number): Buffer {
  return Buffer.from(new ArrayBuffer(Math.max(1, size)), 0, size);
}
