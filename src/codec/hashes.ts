import { createHash, getHashes } from 'node:crypto';

/**
 * The checksum functions a repository may use. Node's (OpenSSL's) digests, plus BLAKE3 through
 * the prebuilt native module of @napi-rs/blake-hash for x86-64 Linux with glibc (depended on directly and
 * optionally: the npm registry this project installs from lacks the wrapper's other platform packages, which
 * breaks `npm ci`). Where that module does not load, blake3 is not offered.
 */
export interface Hasher {
  update(data: Uint8Array): Hasher;
  digest(): Buffer;
}

/** Accepted as hash_function (those this Node build and platform can compute). */
const NODE_HASHES = ['sha512', 'sha256', 'sha384', 'sha512-256', 'sha3-256', 'sha3-512', 'blake2b512', 'blake2s256'];

interface Blake3Module {
  Blake3Hasher: new () => { update(d: Uint8Array): unknown; digestBuffer(): Buffer };
}

let blake3Module: Blake3Module | null | undefined;

function blake3(): Blake3Module | null {
  if (blake3Module === undefined) {
    try {
      // eslint-disable-next-line @typescript-eslint/no-require-imports
      blake3Module = require('@napi-rs/blake-hash-linux-x64-gnu') as Blake3Module;
    } catch {
      blake3Module = null;
    }
  }
  return blake3Module;
}

class Blake3 implements Hasher {
  private readonly h;
  constructor(mod: Blake3Module) {
    this.h = new mod.Blake3Hasher();
  }

  update(data: Uint8Array): Hasher {
    this.h.update(data);
    return this;
  }

  digest(): Buffer {
    return this.h.digestBuffer();
  }
}

/** The hash functions this machine can compute. */
export function availableHashes(): string[] {
  const node = new Set(getHashes());
  return [...NODE_HASHES.filter((h) => node.has(h)), ...(blake3() ? ['blake3'] : [])];
}

export function hashAvailable(name: string): boolean {
  return availableHashes().includes(name);
}

export function createHasher(name: string): Hasher {
  if (name === 'blake3') {
    const mod = blake3();
    if (!mod) throw new Error('hash_function blake3 needs the module @napi-rs/blake-hash-linux-x64-gnu, which does not load on this platform');
    return new Blake3(mod);
  }
  return createHash(name);
}

/** Digest length of a hash function in bytes, or undefined when it is not available here. */
export function digestLength(name: string): number | undefined {
  return hashAvailable(name) ? createHasher(name).digest().length : undefined;
}

/** What a new repository may be given without being asked: 256 bits or more, collision resistant. */
const CANDIDATES = ['blake3', 'sha256', 'sha512'];

/**
 * The fastest candidate on this machine, by hashing a few MiB with each (a few milliseconds): SHA-256 wins
 * over SHA-512 only where the CPU has SHA instructions, BLAKE3 wins wherever its module loads. The best of
 * several passes is kept, so a busy machine does not decide by accident.
 */
export function fastestHash(): string {
  const data = Buffer.alloc(1024 * 1024, 0x5a);
  let best = 'sha512';
  let bestRate = 0;
  for (const name of CANDIDATES.filter(hashAvailable)) {
    let rate = 0;
    for (let pass = 0; pass < 3; pass++) {
      const t0 = process.hrtime.bigint();
      createHasher(name).update(data).update(data).digest();
      rate = Math.max(rate, 1 / Number(process.hrtime.bigint() - t0 || 1n));
    }
    if (rate > bestRate) {
      best = name;
      bestRate = rate;
    }
  }
  return best;
}
