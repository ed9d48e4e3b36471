import { Packr } from 'msgpackr';

/**
 * A version's block map: for every block index, the id of the blob holding it, HOLE for an all-zero block,
 * or PENDING for a block a running (or interrupted) backup has not recorded yet. Stored in chunks of
 * MAP_CHUNK entries so a differential version copies chunks instead of writing one row per block, and a
 * reader loads only the chunks it touches.
 *
 * On disk a chunk is a msgpack array of small integers: 0 = HOLE, 1 = PENDING, otherwise 2 + zigzag(id -
 * previous id). Fresh backups allocate consecutive ids, so most entries take one byte.
 */
export const MAP_CHUNK = 1024;
export const HOLE = 0;
export const PENDING = -1;

const packr = new Packr({ useRecords: false });

let scratch = Buffer.allocUnsafe(0);

export function encodeChunk(entries: Float64Array): Buffer {
  // Written here byte for byte as msgpackr writes an array of unsigned 32-bit integers (useRecords: false):
  // a JS array of numbers and msgpackr's generic walk over it cost more than everything else of an import
  // of backy2's maps (tens of millions of entries). Anything else (ids beyond 32 bits) goes to msgpackr.
  const n = entries.length;
  if (scratch.length < 5 + 5 * n) scratch = Buffer.allocUnsafe(Math.max(5 + 5 * n, 2 * scratch.length));
  const out = scratch;
  let at;
  if (n < 0x10) {
    out[0] = 0x90 | n;
    at = 1;
  } else if (n < 0x10000) {
    out[0] = 0xdc;
    out[1] = n >> 8;
    out[2] = n & 0xff;
    at = 3;
  } else {
    out[0] = 0xdd;
    out.writeUInt32BE(n, 1);
    at = 5;
  }
  let prev = 0;
  for (let i = 0; i < n; i++) {
    const e = entries[i];
    let c;
    if (e === HOLE) c = 0;
    else if (e === PENDING) c = 1;
    else {
      const d = e - prev;
      c = 2 + (d >= 0 ? 2 * d : -2 * d - 1);
      prev = e;
    }
    if (c < 0x80) out[at++] = c;
    else if (c < 0x100) {
      out[at++] = 0xcc;
      out[at++] = c;
    } else if (c < 0x10000) {
      out[at++] = 0xcd;
      out[at++] = c >> 8;
      out[at++] = c & 0xff;
    } else if (c >>> 0 === c) {
      out[at++] = 0xce;
      out[at++] = c >>> 24;
      out[at++] = (c >>> 16) & 0xff;
      out[at++] = (c >>> 8) & 0xff;
      out[at++] = c & 0xff;
    } else return packr.pack(chunkCodes(entries));
  }
  return Buffer.from(out.subarray(0, at));
}

function chunkCodes(entries: Float64Array): number[] {
  const codes = new Array<number>(entries.length);
  let prev = 0;
  for (let i = 0; i < entries.length; i++) {
    const e = entries[i];
    if (e === HOLE) codes[i] = 0;
    else if (e === PENDING) codes[i] = 1;
    else {
      const d = e - prev;
      codes[i] = 2 + (d >= 0 ? 2 * d : -2 * d - 1);
      prev = e;
    }
  }
  return codes;
}

export function decodeChunk(data: Uint8Array): Float64Array {
  const codes = packr.unpack(data) as number[];
  if (!Array.isArray(codes)) throw new Error('corrupt block map chunk');
  const out = new Float64Array(codes.length);
  let prev = 0;
  for (let i = 0; i < codes.length; i++) {
    const c = codes[i];
    if (c === 0) out[i] = HOLE;
    else if (c === 1) out[i] = PENDING;
    else {
      const z = c - 2;
      const d = z % 2 === 0 ? z / 2 : -(z + 1) / 2;
      prev += d;
      out[i] = prev;
    }
  }
  return out;
}

export function blockCount(size: number, blockSize: number): number {
  return Math.ceil(size / blockSize);
}

export function chunkCount(blocks: number): number {
  return Math.ceil(blocks / MAP_CHUNK);
}

/** Number of entries of chunk `chunkNo` in a map of `blocks` blocks. */
export function chunkLength(blocks: number, chunkNo: number): number {
  return Math.max(0, Math.min(MAP_CHUNK, blocks - chunkNo * MAP_CHUNK));
}
