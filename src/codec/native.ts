import * as path from 'node:path';

/** backy's native module (src/native/*.c, built by `npm install` with node-gyp into src/native/build), when it is built. */
export interface NativeModule {
  gcmStart(key: Buffer, nonce: Buffer, aad: Buffer, decrypt: boolean): unknown;
  gcmUpdate(context: unknown, src: Buffer, dst: Buffer): void;
  gcmFinish(context: unknown, tag: Buffer): boolean;
  alignedOffset(memory: ArrayBuffer, alignment: number): number;
  /** The same for a view (of an ArrayBuffer or a SharedArrayBuffer), counted from the view's start. */
  viewAlignedOffset?(view: Uint8Array, alignment: number): number;
  /** 0, or the errno of fallocate(2) */
  fallocate(fd: number, mode: number, offset: number, length: number): number;
}

function load(): NativeModule | undefined {
  // BACKY_NATIVE=0: plain JavaScript, as on a machine where the module could not be built (for tests).
  if (process.env.BACKY_NATIVE === '0') return undefined;
  try {
    // dist/src/codec → the package root → src/native, where node-gyp builds.
    // eslint-disable-next-line @typescript-eslint/no-require-imports
    return require(path.join(__dirname, '..', '..', '..', 'src', 'native', 'build', 'Release', 'backy_native.node')) as NativeModule;
  } catch {
    return undefined;
  }
}

export const native = load();
