import { DeviceError } from '../device/types';
import { errorLine, LockedError, NotFoundError } from '../util/errors';
import { Errno, FuseOps, FuseStat } from './native';
import { OpenImages, readInto } from './open-images';
import type { Node, Tree } from './tree';

const S_IFDIR = 0o040000;
const S_IFREG = 0o100000;
const O_ACCMODE = 3;
const O_TRUNC = 0o1000;

/** st_blksize of images: `cat`, `cp` and friends size their reads by it. */
export const IMAGE_IO_SIZE = 1024 * 1024;

export interface OperationsOptions {
  tree: Tree;
  images: OpenImages;
  uid: number;
  gid: number;
  /** One line about a request that failed; `key` groups failures of one cause (see FailureLog). */
  logFailure(key: string, line: string): void;
  /**
   * A request not answered within this time is answered ETIMEDOUT (the reader gets an error instead of
   * hanging on storage forever). Reads have their own, longer limit.
   */
  timeoutMs?: number;
  readTimeoutMs?: number;
  /**
   * Images take writes (`backy mount -w`: their devices are copy-on-write overlays): open for writing,
   * write, fsync (the device's flush), and truncate to the image's own size are served; info files and the
   * tree stay read-only.
   */
  writable?: boolean;
}

/** Default limits: a request, and a read (which may fetch from slow storage). */
export const REQUEST_TIMEOUT_MS = 30_000;
export const READ_TIMEOUT_MS = 120_000;

function errnoOf(e: unknown): number {
  if (e instanceof DeviceError) return e.errno === 'EINVAL' ? Errno.EINVAL : e.errno === 'ENOSPC' ? Errno.ENOSPC : Errno.EIO;
  return Errno.EIO;
}

/**
 * The fuse-native callbacks for a read-only tree. Every callback answers exactly once, also when something
 * throws: a failing request gets an errno, never takes the process down.
 */
export function createOperations(o: OperationsOptions): FuseOps {
  const { tree, images } = o;

  const stat = (node: Node): FuseStat => {
    const base = { uid: o.uid, gid: o.gid };
    if (node.kind === 'dir') {
      // nlink 1 means "subdirectories not counted", so `find` does not skip any by the link-count shortcut.
      return { ...base, mode: S_IFDIR | 0o555, nlink: 1, size: 0, mtime: node.mtime, atime: node.mtime, ctime: node.mtime };
    }
    if (node.kind === 'image') {
      const v = node.version;
      return {
        ...base, mode: S_IFREG | (o.writable ? 0o644 : 0o444), nlink: 1, size: v.size, mtime: v.date, atime: v.date, ctime: v.date,
        blksize: IMAGE_IO_SIZE, blocks: Math.ceil(v.size / 512),
      };
    }
    return {
      ...base, mode: S_IFREG | 0o444, nlink: 1, size: node.content.length, mtime: node.mtime, atime: node.mtime, ctime: node.mtime,
      blocks: Math.ceil(node.content.length / 512),
    };
  };

  /**
   * Runs a request: `work` answers through `reply`; whatever it throws (a database error while resolving a
   * path, a failed fetch) becomes one errno answer instead of an unhandled rejection, which would end the
   * process. A request not answered in time is answered ETIMEDOUT. Every request is answered exactly once:
   * a second answer is dropped. Once answered, libfuse may free the request's buffer (at once, in another
   * thread), so `owned()` tells the work whether it may still write into it.
   */
  const handle = <A extends [number, ...unknown[]]>(
    what: string,
    cb: (...a: A) => void,
    work: (reply: (...a: A) => void, owned: () => boolean) => Promise<void>,
    timeoutMs = o.timeoutMs ?? REQUEST_TIMEOUT_MS,
  ): void => {
    let answered = false;
    const reply = (...a: A) => {
      if (answered) return;
      answered = true;
      clearTimeout(timer);
      cb(...a);
    };
    const timer = setTimeout(() => {
      if (answered) return;
      o.logFailure(`timeout ${what.split(' ')[0]}`, `${what}: no answer within ${timeoutMs / 1000} s; answered ETIMEDOUT`);
      reply(...([Errno.ETIMEDOUT] as unknown as A));
    }, timeoutMs);
    work(reply, () => !answered).catch((e: unknown) => {
      // The device layer has logged a block it could not fetch; anything else is news.
      if (!answered && !(e instanceof DeviceError && e.errno === 'EIO')) o.logFailure(errorLine(e), `${what}: ${errorLine(e)}`);
      // Every fuse-native callback takes a negative errno alone as its failure answer.
      reply(...([errnoOf(e)] as unknown as A));
    });
  };

  const resolve = async (path: string): Promise<Node | number> => (await tree.resolve(path)) ?? Errno.ENOENT;

  const readOnly = (...args: unknown[]): void => {
    const cb = args[args.length - 1] as (err: number) => void;
    cb(Errno.EROFS);
  };

  return {
    getattr(path, cb) {
      handle(`stat ${path}`, cb, async (reply) => {
        const n = await resolve(path);
        if (typeof n === 'number') reply(n);
        else reply(0, stat(n));
      });
    },

    readdir(path, cb) {
      handle(`list ${path}`, cb, async (reply) => {
        const n = await resolve(path);
        if (typeof n === 'number') reply(n);
        else if (n.kind !== 'dir') reply(Errno.ENOTDIR);
        else reply(0, ['.', '..', ...(await n.list())]);
      });
    },

    open(path, flags, cb) {
      const writing = (flags & O_ACCMODE) !== 0 || (flags & O_TRUNC) !== 0;
      if (writing && !o.writable) return cb(Errno.EROFS);
      handle(`open ${path}`, cb, async (reply, owned) => {
        const n = await resolve(path);
        if (typeof n === 'number') reply(n);
        else if (n.kind === 'dir') reply(Errno.EISDIR);
        // An image cannot be emptied: O_TRUNC would have to zero it all.
        else if (writing && (n.kind !== 'image' || (flags & O_TRUNC) !== 0)) reply(Errno.EROFS);
        // Info files are read by path; only images keep state per open file.
        else if (n.kind === 'info') reply(0, 0);
        else {
          let fh: number;
          try {
            fh = await images.open(n.version);
          } catch (e) {
            // The version could not be held: it is being removed, or is gone. It no longer exists for us.
            if (e instanceof LockedError || e instanceof NotFoundError) return reply(Errno.ENOENT);
            throw e;
          }
          // Answered meanwhile (timeout): nobody will ever release this handle, so release it now.
          if (!owned()) return void (await images.release(fh));
          reply(0, fh);
        }
      });
    },

    read(path, fh, buf, len, pos, cb) {
      const img = fh ? images.get(fh) : undefined;
      handle(`read of ${len} bytes at ${pos} of ${path}`, cb, async (reply, owned) => {
        if (img) return reply(await readInto(img.device, img.version.blockSize, buf, len, pos, owned));
        const n = await resolve(path);
        if (typeof n === 'number') return reply(n);
        if (n.kind !== 'info') return reply(n.kind === 'dir' ? Errno.EISDIR : Errno.EBADF);
        const part = n.content.subarray(Math.min(pos, n.content.length), Math.min(pos + len, n.content.length));
        if (!owned()) return;
        part.copy(buf);
        reply(part.length);
      }, o.readTimeoutMs ?? READ_TIMEOUT_MS);
    },

    release(path, fh, cb) {
      // Closing cannot fail from the kernel's point of view: answer at once, tidy up behind.
      cb(0);
      if (fh) images.release(fh).catch((e: unknown) => o.logFailure(errorLine(e), `closing ${path}: ${errorLine(e)}`));
    },

    // Read-only: the kernel refuses most of these itself on an `ro` mount; answering them too costs nothing.
    write: readOnly, create: readOnly, mkdir: readOnly, unlink: readOnly, rmdir: readOnly, rename: readOnly,
    truncate: readOnly, ftruncate: readOnly, chmod: readOnly, chown: readOnly, utimens: readOnly,
    symlink: readOnly, link: readOnly, mknod: readOnly, setxattr: readOnly, removexattr: readOnly,
    ...(o.writable ? writableImageOps(o, handle, resolve) : {}),
  };
}

type Handle = <A extends [number, ...unknown[]]>(what: string, cb: (...a: A) => void, work: (reply: (...a: A) => void) => Promise<void>) => void;

/** The operations a writable image adds (`backy mount -w`). */
function writableImageOps(o: OperationsOptions, handle: Handle, resolve: (path: string) => Promise<Node | number>): Partial<FuseOps> {
  const { images } = o;
  /** Only the image's own size: the kernel asks for it on open(O_TRUNC) paths and `truncate -s` of equal size. */
  const sameSize = (path: string, size: number, cb: (err: number) => void) => {
    handle(`truncate ${path}`, cb, async (reply) => {
      const n = await resolve(path);
      if (typeof n === 'number') return reply(n);
      if (n.kind !== 'image') return reply(Errno.EROFS);
      reply(size === n.version.size ? 0 : Errno.EPERM);
    });
  };
  return {
    write(path: string, fh: number, buf: Buffer, len: number, pos: number, cb: (bytesOrErr: number) => void) {
      const img = fh ? images.get(fh) : undefined;
      handle(`write of ${len} bytes at ${pos} of ${path}`, cb, async (reply) => {
        if (!img) return reply(Errno.EBADF);
        if (pos >= img.device.size && len > 0) return reply(Errno.ENOSPC);
        const n = Math.min(len, img.device.size - pos);
        // A copy, taken before anything is awaited: once the request is answered (a timeout too) libfuse frees
        // `buf`, and the device may still be reading it or keep it.
        await img.device.write!(pos, Buffer.from(buf.subarray(0, n)));
        reply(n);
      });
    },
    fsync(path: string, _datasync: number, fh: number, cb: (err: number) => void) {
      const img = fh ? images.get(fh) : undefined;
      handle(`fsync of ${path}`, cb, async (reply) => {
        if (img?.device.flush) await img.device.flush();
        reply(0);
      });
    },
    flush(_path: string, _fh: number, cb: (err: number) => void) {
      // close() promises no durability; fsync does.
      cb(0);
    },
    truncate(path: string, size: number, cb: (err: number) => void) {
      sameSize(path, size, cb);
    },
    ftruncate(path: string, _fh: number, size: number, cb: (err: number) => void) {
      sameSize(path, size, cb);
    },
  };
}
