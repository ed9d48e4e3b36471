/**
 * The ceiling of the FUSE path: a trivial fuse-native filesystem with one file, `image.img`, whose bytes are
 * held in memory and copied into each read request, with the same mount options as `backy mount` (read-only,
 * max_read 128 KiB, auto_cache). Run as a child process: `node fuse-reference.js IMAGE DIR`; it prints
 * "ready" once mounted and unmounts on SIGINT/SIGTERM.
 */
import * as fs from 'node:fs';
import { createFuse, Errno, FuseOps } from '../../src/fuse/native';
import { MAX_READ } from '../../src/fuse/mount';

function main(): void {
  const [image, dir] = process.argv.slice(2);
  const size = fs.statSync(image).size;
  // Whole image in one buffer (2 GiB fits: Node allows 4 GiB).
  const data = Buffer.allocUnsafe(size);
  const fd = fs.openSync(image, 'r');
  for (let at = 0; at < size;) at += fs.readSync(fd, data, at, Math.min(64 << 20, size - at), at);
  fs.closeSync(fd);
  const now = Date.now();
  const file = { mode: 0o100444, uid: process.getuid!(), gid: process.getgid!(), size, nlink: 1, mtime: now, atime: now, ctime: now, blksize: 1024 * 1024, blocks: Math.ceil(size / 512) };
  const root = { ...file, mode: 0o040555, size: 0, blocks: 0 };
  const ops: FuseOps = {
    getattr: (p, cb) => (p === '/' ? cb(0, root) : p === '/image.img' ? cb(0, file) : cb(Errno.ENOENT)),
    readdir: (p, cb) => (p === '/' ? cb(0, ['.', '..', 'image.img']) : cb(Errno.ENOTDIR)),
    open: (p, _flags, cb) => (p === '/image.img' ? cb(0, 1) : cb(Errno.ENOENT)),
    read: (_p, _fd, buf, len, pos, cb) => {
      const n = Math.max(0, Math.min(len, size - pos));
      data.copy(buf, 0, pos, pos + n);
      cb(n);
    },
    release: (_p, _fd, cb) => cb(0),
  };
  const fuse = createFuse(dir, ops, ['ro', 'fsname=fuse-reference', 'auto_cache', `max_read=${MAX_READ}`]);
  fuse.mount((err) => {
    if (err) {
      console.error(`mount failed: ${err.message}`);
      process.exit(1);
    }
    console.log('ready');
  });
  const stop = () => fuse.unmount(() => process.exit(0));
  process.on('SIGINT', stop);
  process.on('SIGTERM', stop);
}

main();
