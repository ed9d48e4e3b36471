import { createCipheriv, createDecipheriv, type CipherGCM, type DecipherGCM } from 'node:crypto';
import { native, type NativeModule } from './native';

/**
 * AES-256-GCM that writes into the caller's buffers. The native module (src/native/aes-gcm.c, built by
 * `npm install`) runs OpenSSL straight into them, at about the cipher's own speed (4.5 GB/s on the benchmark
 * machine). Node's Cipher API allocates every output twice and copies it, which for 4 MiB blocks cost more than
 * the encryption itself (1.2-2.8 GB/s, and garbage); it is the fallback when the module is not built.
 */
export interface Gcm {
  /** Encrypts or decrypts `src` into the first src.length bytes of `dst` (which may be `src` itself). */
  update(src: Buffer, dst: Buffer): void;
  /** Encrypting: writes the 16-byte tag into `tag`. Decrypting: whether `tag` authenticates all the input. */
  finish(tag: Buffer): boolean;
}

export const GCM_TAG_BYTES = 16;

/** Which implementation this process uses ('native' unless the module was not built or BACKY_NATIVE=0). */
export const gcmImplementation: 'native' | 'node' = native ? 'native' : 'node';

class NativeGcm implements Gcm {
  private readonly context: unknown;
  constructor(private readonly mod: NativeModule, key: Buffer, nonce: Buffer, aad: Buffer, decrypt: boolean) {
    this.context = mod.gcmStart(key, nonce, aad, decrypt);
  }

  update(src: Buffer, dst: Buffer): void {
    this.mod.gcmUpdate(this.context, src, dst);
  }

  finish(tag: Buffer): boolean {
    return this.mod.gcmFinish(this.context, tag);
  }
}

/**
 * Node's API fed in pieces: each piece's output is a new buffer, copied into `dst` while still in the CPU
 * cache, so a block leaves small garbage behind rather than a second block-sized buffer.
 */
const PIECE = 256 * 1024;

class NodeGcm implements Gcm {
  private readonly c: CipherGCM | DecipherGCM;
  constructor(key: Buffer, nonce: Buffer, aad: Buffer, private readonly decrypt: boolean) {
    this.c = decrypt ? createDecipheriv('aes-256-gcm', key, nonce) : createCipheriv('aes-256-gcm', key, nonce);
    this.c.setAAD(aad);
  }

  update(src: Buffer, dst: Buffer): void {
    let pos = 0;
    for (let i = 0; i < src.length; i += PIECE) {
      const part = this.c.update(src.subarray(i, Math.min(src.length, i + PIECE)));
      part.copy(dst, pos);
      pos += part.length;
    }
  }

  finish(tag: Buffer): boolean {
    if (!this.decrypt) {
      this.c.final();
      (this.c as CipherGCM).getAuthTag().copy(tag);
      return true;
    }
    (this.c as DecipherGCM).setAuthTag(tag);
    try {
      this.c.final();
      return true;
    } catch {
      return false;
    }
  }
}

export function gcm(key: Buffer, nonce: Buffer, aad: Buffer, decrypt: boolean, use: 'native' | 'node' = gcmImplementation): Gcm {
  if (use === 'native') {
    if (!native) throw new Error('the native module (src/native/build/Release/backy_native.node) is not built: run npm install');
    return new NativeGcm(native, key, nonce, aad, decrypt);
  }
  return new NodeGcm(key, nonce, aad, decrypt);
}
