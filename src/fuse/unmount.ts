import { readdir, realpath } from 'node:fs/promises';
import * as path from 'node:path';
import { IoError } from '../util/errors';
import { detachLoop, loopBackingFile, unmountFilesystem } from './partitions';
import { FUSE_TYPE, isWithin, readMounts, run } from './system';

/** Loop devices whose backing file lies inside `dir` (a partition mount's image), with that file. */
async function loopsBackedFrom(dir: string): Promise<{ loop: string; file: string }[]> {
  const out: { loop: string; file: string }[] = [];
  for (const dev of (await readdir('/sys/block').catch(() => [] as string[])).filter((d) => d.startsWith('loop'))) {
    const file = await loopBackingFile(dev);
    if (file && isWithin(file, dir)) out.push({ loop: `/dev/${dev}`, file });
  }
  return out;
}

/** Unmounts a FUSE mount: normally, and lazily when something still uses it. */
async function unmountFuse(dir: string): Promise<string | undefined> {
  let r = await run('fusermount', ['-u', dir]);
  if (r.code === 127) r = await run('umount', [dir]);
  if (r.code === 0) return undefined;
  const why = r.stderr.trim().split('\n')[0];
  const lazy = await run('fusermount', ['-uz', dir]);
  if (lazy.code === 0 || (await run('umount', ['-l', dir])).code === 0) return `${dir} was busy (${why}); detached lazily`;
  return `cannot unmount ${dir}: ${why}`;
}

/**
 * `backy umount DIR`: undoes a mount whose process is gone (or asks a live one to end, since it exits when
 * its mount disappears). Partition mounts inside DIR first, then their loop devices, then the FUSE mount.
 * Returns lines about what was done lazily; throws when DIR is not a backy mount or stays mounted.
 */
export async function unmountDir(dir: string): Promise<string[]> {
  const abs = path.resolve(dir);
  // realpath fails on the mount point of a FUSE process that died (ENOTCONN): the plain path is used then.
  const real = await realpath(abs).catch(() => abs);
  const mounts = await readMounts();
  const top = mounts.filter((m) => m.mountPoint === real).pop();
  if (!top) throw new IoError(`${dir} is not mounted`);
  if (top.fsType !== FUSE_TYPE) throw new IoError(`${dir} is not a backy mount (it is ${top.fsType}); use umount`);
  const notes: string[] = [];
  const nested = mounts.filter((m) => m.mountPoint !== real && isWithin(m.mountPoint, real))
    .sort((a, b) => b.mountPoint.split('/').length - a.mountPoint.split('/').length || b.id - a.id);
  for (const m of nested) {
    const p = await unmountFilesystem(m.mountPoint);
    if (p) notes.push(p);
  }
  for (const { loop, file } of await loopsBackedFrom(real)) {
    const p = await detachLoop(loop, file);
    if (p) notes.push(p);
  }
  const p = await unmountFuse(real);
  if (p?.startsWith('cannot')) throw new IoError(p);
  if (p) notes.push(p);
  return notes;
}
