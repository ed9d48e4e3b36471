/**
 * The part of fuse-native (libfuse 2 high-level API, one worker thread per request in flight) that backy
 * uses, with types: the package ships none.
 */

export interface FuseStat {
  mode: number;
  uid: number;
  gid: number;
  size: number;
  nlink: number;
  mtime: number;
  atime: number;
  ctime: number;
  blksize?: number;
  blocks?: number;
}

/** A callback takes 0 or a negative errno first, then the result. */
export interface FuseOps {
  init?(cb: (err: number) => void): void;
  getattr(path: string, cb: (err: number, stat?: FuseStat) => void): void;
  readdir(path: string, cb: (err: number, names?: string[], stats?: FuseStat[]) => void): void;
  open(path: string, flags: number, cb: (err: number, fd?: number) => void): void;
  opendir?(path: string, flags: number, cb: (err: number, fd?: number) => void): void;
  read(path: string, fd: number, buf: Buffer, len: number, pos: number, cb: (bytesOrErr: number) => void): void;
  release(path: string, fd: number, cb: (err: number) => void): void;
  statfs?(path: string, cb: (err: number, st?: Record<string, number>) => void): void;
  [write: string]: unknown;
}

export interface FuseHandle {
  mount(cb: (err: Error | null) => void): void;
  unmount(cb: (err: Error | null) => void): void;
}

export const Errno = {
  EPERM: -1,
  ENOENT: -2,
  EIO: -5,
  EBADF: -9,
  EACCES: -13,
  ENOTDIR: -20,
  EISDIR: -21,
  EINVAL: -22,
  EFBIG: -27,
  ENOSPC: -28,
  EROFS: -30,
  ETIMEDOUT: -110,
} as const;

interface FuseClass {
  new (mnt: string, ops: FuseOps, opts: Record<string, unknown>): FuseHandle & { _fuseOptions(): string };
}

/**
 * Creates (does not mount) a filesystem with exactly these mount options. fuse-native builds its option
 * string from a fixed list that lacks `ro` and the read-size options, so the one method that produces it is
 * replaced; everything else (thread dispatch, buffers) is the library's. Its timeouts are switched off: when
 * one fires it answers the request and libfuse frees the read buffer, while our read still writes into it
 * later. The operations time requests out themselves (createOperations) and never touch an answered buffer.
 */
export function createFuse(mountPoint: string, ops: FuseOps, options: string[]): FuseHandle {
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  const Base = require('fuse-native') as FuseClass;
  const optionString = options.length ? `-o${options.join(',')}` : '';
  class BackyFuse extends Base {
    override _fuseOptions(): string {
      return optionString;
    }
  }
  return new BackyFuse(mountPoint, ops, { timeout: false });
}
