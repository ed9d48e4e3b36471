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
  if (b.byteOffset === 0 && isShared(b)) return b.buffer as unknown as ArrayBuffer;
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

/**
 * A block buffer of at least `size` bytes in shared memory (a SharedArrayBuffer): it goes to a worker and back
 * by reference, with no transfer, and V8 does not count it as the isolate's external memory. Why that matters:
 * the NBD and FUSE servers keep a pool of spare 4 MiB block buffers (64 MiB). As ArrayBuffers they made V8
 * believe the heap was always over its limit, and it ran a full collection every 60-100 ms (a cold copy of
 * 2 GiB: 20-28 of them, with 1 of them after this change).
 * Only for memory whose users wait for the worker's reply before they touch it again (nothing stops the two
 * threads from sharing it otherwise). A blob is read into it with O_DIRECT through directWindow; a buffer to
 * write with O_DIRECT comes from allocAligned.
 */
export function allocShared(size: number): Buffer {
  // All of its memory, one aligned block more than asked: a blob of `size` bytes still fits when it is read
  // with O_DIRECT from the first aligned address inside it (see directWindow).
  return Buffer.from(new SharedArrayBuffer(roundUp(Math.max(1, size)) + DIRECT_ALIGNMENT));
}

/**
 * The aligned part of a shared buffer, for an O_DIRECT read: from the first aligned address in `b` to the last
 * aligned end inside it (never past `b`: the memory after it may be someone else's). Undefined without the
 * native module (it alone can see addresses) or when less than `atLeast` bytes would fit.
 */
export function directWindow(b: Buffer, atLeast: number): Buffer | undefined {
  if (!native?.viewAlignedOffset || !isShared(b)) return undefined;
  const pad = native.viewAlignedOffset(b, DIRECT_ALIGNMENT);
  const length = Math.floor((b.length - pad) / DIRECT_ALIGNMENT) * DIRECT_ALIGNMENT;
  return length >= atLeast ? Buffer.from(b.buffer, b.byteOffset + pad, length) : undefined;
}

/** Whether `b` lives in a SharedArrayBuffer (it travels by reference: never put it in a transfer list). */
export function isShared(b: Buffer): boolean {
  return typeof SharedArrayBuffer !== 'undefined' && b.buffer instanceof SharedArrayBuffer;
}

/** The ArrayBuffers of a list meant for postMessage's transfer list (shared memory cannot be transferred). */
export function transferable(list: readonly ArrayBufferLike[]): ArrayBuffer[] {
  return list.filter((x): x is ArrayBuffer => x instanceof ArrayBuffer);
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
