import { access, readdir, readFile } from 'node:fs/promises';
import * as path from 'node:path';
import { errorLine } from '../util/errors';
import { run, runOk } from './system';

/** Filesystem types blkid reports that are not mountable filesystems. */
const NOT_FILESYSTEMS = new Set(['swap', 'LVM2_member', 'crypto_LUKS', 'linux_raid_member', 'zfs_member', 'ceph_bluestore', 'bcache', 'drbd', 'isw_raid_member', 'ddf_raid_member']);

/**
 * Read-only mount options per type. A filesystem that was in use when its snapshot was taken has a dirty
 * journal; replaying it needs writes, which a read-only device refuses, so the journal is skipped.
 */
function mountOptions(fsType: string): string {
  const base = 'ro,nosuid,nodev';
  if (fsType === 'ext3' || fsType === 'ext4') return `${base},noload`;
  if (fsType === 'xfs') return `${base},norecovery`;
  return base;
}

export interface MountDirs {
  add(name: string): void;
  remove(name: string): void;
}

export interface PartitionMount {
  /** partN, or fs for an unpartitioned image */
  name: string;
  device: string;
  fsType: string;
  target: string;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

async function exists(p: string): Promise<boolean> {
  return access(p).then(() => true, () => false);
}

/** Partition numbers of a loop device (from sysfs), waiting for their /dev nodes. */
async function partitionsOf(loop: string): Promise<number[]> {
  let numbers = await kernelPartitions(loop);
  if (!numbers.length) {
    // Kernels built without partition table parsers (minimal VM kernels) find nothing; partx reads the table
    // in user space and adds the partitions through BLKPG. An image without a table just makes it fail.
    await run('partx', ['-a', loop]);
    numbers = await kernelPartitions(loop);
  }
  // devtmpfs creates the nodes shortly after the partitions appear.
  for (let i = 0; i < 40 && !(await Promise.all(numbers.map((n) => exists(`${loop}p${n}`)))).every(Boolean); i++) await sleep(50);
  return numbers;
}

async function kernelPartitions(loop: string): Promise<number[]> {
  const base = path.basename(loop);
  const entries = await readdir(`/sys/block/${base}`).catch(() => [] as string[]);
  const numbers: number[] = [];
  for (const e of entries.filter((x) => x.startsWith(`${base}p`))) {
    const n = Number((await readFile(`/sys/block/${base}/${e}/partition`, 'utf8').catch(() => '')).trim());
    if (n > 0) numbers.push(n);
  }
  return numbers.sort((a, b) => a - b);
}

async function filesystemType(device: string): Promise<string | undefined> {
  // -p probes the device itself instead of trusting blkid's cache.
  const r = await run('blkid', ['-p', '-o', 'value', '-s', 'TYPE', device]);
  const t = r.stdout.trim();
  return r.code === 0 && t ? t : undefined;
}

/**
 * The image attached read-only to a loop device with partition scanning, and each recognisable filesystem
 * on it mounted read-only under the mount (`partN`, or `fs` when the image has no partition table).
 * `detach` undoes it in reverse order.
 */
export class LoopAttachment {
  private constructor(readonly loop: string, private readonly image: string, readonly mounts: PartitionMount[], private readonly dirs: MountDirs) {}

  static async attach(image: string, mountRoot: string, dirs: MountDirs, say: (line: string) => void): Promise<LoopAttachment> {
    const loop = (await runOk('losetup', ['-r', '-P', '-f', '--show', image])).trim();
    const att = new LoopAttachment(loop, (await loopBackingFile(loop)) ?? image, [], dirs);
    try {
      const numbers = await partitionsOf(loop);
      const candidates = numbers.length ? numbers.map((n) => ({ name: `part${n}`, device: `${loop}p${n}` })) : [{ name: 'fs', device: loop }];
      for (const c of candidates) {
        const fsType = await filesystemType(c.device);
        if (!fsType || NOT_FILESYSTEMS.has(fsType)) {
          say(`${c.name} (${c.device}): ${fsType ?? 'no filesystem recognised'}, not mounted`);
          continue;
        }
        const target = path.join(mountRoot, c.name);
        dirs.add(c.name);
        try {
          await runOk('mount', ['-t', fsType, '-o', mountOptions(fsType), c.device, target]);
        } catch (e) {
          dirs.remove(c.name);
          say(`${c.name} (${c.device}, ${fsType}): cannot mount: ${errorLine(e)}`);
          continue;
        }
        att.mounts.push({ ...c, fsType, target });
        say(`${target}: ${fsType} from ${c.device}, read-only`);
      }
    } catch (e) {
      await att.detach();
      throw e;
    }
    return att;
  }

  /** Unmounts the filesystems and detaches the loop device; returns what could not be undone, one line each. */
  async detach(): Promise<string[]> {
    const problems: string[] = [];
    for (const m of this.mounts.splice(0).reverse()) {
      const p = await unmountFilesystem(m.target);
      if (p) problems.push(p);
      this.dirs.remove(m.name);
    }
    const p = await detachLoop(this.loop, this.image);
    if (p) problems.push(p);
    return problems;
  }
}

/** Unmounts a kernel filesystem, retrying briefly while it is busy, then lazily. Returns a problem or undefined. */
export async function unmountFilesystem(target: string): Promise<string | undefined> {
  let last = '';
  for (let i = 0; i < 5; i++) {
    const r = await run('umount', [target]);
    if (r.code === 0) return undefined;
    last = r.stderr.trim().split('\n')[0];
    if (/not mounted|no mount point/i.test(last)) return undefined;
    await sleep(200);
  }
  const lazy = await run('umount', ['-l', target]);
  return lazy.code === 0 ? `${target} was busy (${last}); detached lazily` : `cannot unmount ${target}: ${last}`;
}

/** The file a loop device is attached to, or undefined when it is free. */
export async function loopBackingFile(loop: string): Promise<string | undefined> {
  const text = await readFile(`/sys/block/${path.basename(loop)}/loop/backing_file`, 'utf8').catch(() => '');
  return text.trim().replace(/ \(deleted\)$/, '') || undefined;
}

/**
 * Detaches a loop device, if it is still attached to `image` (after an outside `backy umount` the number
 * may already belong to someone else), and waits until it has let go of the file.
 */
export async function detachLoop(loop: string, image: string): Promise<string | undefined> {
  if ((await loopBackingFile(loop)) !== image) return undefined;
  const r = await run('losetup', ['-d', loop]);
  const backing = `/sys/block/${path.basename(loop)}/loop/backing_file`;
  // A device still in use is only marked for detach (autoclear); wait a little for its last user.
  for (let i = 0; i < 50 && (await exists(backing)); i++) await sleep(100);
  if (await exists(backing)) return `loop device ${loop} is still in use${r.code ? ` (${r.stderr.trim().split('\n')[0]})` : ''}`;
  return undefined;
}
