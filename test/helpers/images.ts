import * as fs from 'node:fs';
import { createCipheriv, createHash } from 'node:crypto';

/** Deterministic pseudo-random bytes: AES-256-CTR keystream of a seed (fast, reproducible). */
export class SeededRandom {
  private cipher;
  private zero = Buffer.alloc(1 << 20);
  constructor(seed: string) {
    const key = createHash('sha256').update(seed).digest();
    this.cipher = createCipheriv('aes-256-ctr', key, Buffer.alloc(16));
  }
  bytes(n: number): Buffer {
    const parts: Buffer[] = [];
    let left = n;
    while (left > 0) {
      const k = Math.min(left, this.zero.length);
      parts.push(this.cipher.update(this.zero.subarray(0, k)));
      left -= k;
    }
    return parts.length === 1 ? parts[0] : Buffer.concat(parts);
  }
  /** Uniform integer in [0, n). */
  int(n: number): number {
    return this.bytes(4).readUInt32LE(0) % n;
  }
}

/**
 * The benchmark's mixed image: runs of 1–8 blocks, each run 40 % fresh random blocks, 30 % zero blocks,
 * 30 % copies of earlier random blocks. Written block by block (memory stays at one block).
 */
export function makeMixedImage(file: string, size: number, seed = 'backy-bench', blockSize = 4 * 1024 * 1024): { uniqueBlocks: number; zeroBlocks: number; dupBlocks: number } {
  const rnd = new SeededRandom(seed);
  const fd = fs.openSync(file, 'w+');
  const earlier: number[] = []; // offsets of random blocks already written
  let uniqueBlocks = 0, zeroBlocks = 0, dupBlocks = 0;
  try {
    let off = 0;
    while (off < size) {
      const kind = rnd.int(10);
      const run = 1 + rnd.int(8);
      for (let k = 0; k < run && off < size; k++) {
        const len = Math.min(blockSize, size - off);
        let buf: Buffer;
        if (kind < 3) {
          buf = Buffer.alloc(len);
          zeroBlocks++;
        } else if (kind < 6 && earlier.length) {
          const src = earlier[rnd.int(earlier.length)];
          buf = Buffer.alloc(len);
          fs.readSync(fd, buf, 0, len, src);
          dupBlocks++;
        } else {
          buf = rnd.bytes(len);
          if (len === blockSize) earlier.push(off);
          uniqueBlocks++;
        }
        fs.writeSync(fd, buf, 0, len, off);
        off += len;
      }
    }
  } finally {
    fs.closeSync(fd);
  }
  return { uniqueBlocks, zeroBlocks, dupBlocks };
}

export function sha256File(file: string): string {
  const h = createHash('sha256');
  const fd = fs.openSync(file, 'r');
  const buf = Buffer.allocUnsafe(8 << 20);
  try {
    for (;;) {
      const n = fs.readSync(fd, buf, 0, buf.length, null);
      if (!n) break;
      h.update(buf.subarray(0, n));
    }
  } finally {
    fs.closeSync(fd);
  }
  return h.digest('hex');
}

/** `length` bytes of `file` at `offset` (zeroes past its end). */
export function readRange(file: string, offset: number, length: number): Buffer {
  const fd = fs.openSync(file, 'r');
  try {
    const b = Buffer.alloc(length);
    fs.readSync(fd, b, 0, length, offset);
    return b;
  } finally {
    fs.closeSync(fd);
  }
}
