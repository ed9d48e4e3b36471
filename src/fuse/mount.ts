import { access, constants, readdir, realpath, stat } from 'node:fs/promises';
import * as path from 'node:path';
import { VersionCatalogue } from '../engine/catalogue';
import { Overlay, resolveOverlaySpec } from '../engine/overlays';
import { PassThroughDevice } from '../device/pass-through';
import type { BlockDevice } from '../device/types';
import type { Repository } from '../engine/repository';
import { BackyError, errorLine, ExitCode, IoError } from '../util/errors';
import { log } from '../util/log';
import { FailureLog } from '../device/failure-log';
import { imageFileName } from './info-files';
import { createFuse, FuseHandle } from './native';
import { OpenImages } from './open-images';
import { createOperations } from './operations';
import { LoopAttachment } from './partitions';
import { FUSE_TYPE, readMounts } from './system';
import { AllVersionsTree, SingleVersionTree, Tree } from './tree';
import { VersionList } from './version-list';

/**
 * The kernel sends reads of at most 128 KiB to a libfuse 2 filesystem (fuse-native cannot negotiate more
 * pages per request), so this is the largest max_read that means anything.
 */
export const MAX_READ = 128 * 1024;

export interface MountOptions {
  dir: string;
  /** one version; all versions when undefined */
  uid?: string;
  /** attach the image to a loop device and mount its filesystems (root only, needs `uid`) */
  partitions?: boolean;
  /** let other users than the one mounting read the mount (FUSE allow_other) */
  allowOther?: boolean;
  /** progress lines (stderr) */
  say?: (line: string) => void;
  /** A read storage does not answer within this time fails with ETIMEDOUT (default 120 s). */
  readTimeoutMs?: number;
  /**
   * `-w UID[:OVERLAY]` (or an existing overlay's name): the image is writable, its writes go to that
   * copy-on-write overlay (see engine/overlays.ts), shared by every open of the image.
   */
  writable?: string;
}

/** Refuses a mount point that is missing, not a directory, already mounted on, or not empty. Returns its real path. */
async function checkMountPoint(dir: string): Promise<string> {
  try {
    const st = await stat(dir);
    if (!st.isDirectory()) throw new IoError(`mount point ${dir} is not a directory`);
  } catch (e) {
    if (e instanceof BackyError) throw e;
    const code = (e as NodeJS.ErrnoException).code;
    if (code === 'ENOTCONN') throw new BackyError(`${dir} is busy: the process of an earlier backy mount there has ended; run "backy umount ${dir}"`);
    if (code === 'ENOENT') throw new IoError(`mount point ${dir} does not exist`);
    throw new IoError(`mount point ${dir}: ${errorLine(e)}`);
  }
  const real = await realpath(dir);
  const taken = (await readMounts()).find((m) => m.mountPoint === real);
  if (taken) {
    const hint = taken.fsType === FUSE_TYPE ? ` (another backy mount; "backy umount ${dir}" ends it)` : '';
    throw new BackyError(`${dir} is busy: ${taken.fsType} is mounted there${hint}`);
  }
  if ((await readdir(dir)).length) throw new BackyError(`mount point ${dir} is not empty`);
  return real;
}

/** libfuse only says "fuse failed" when it cannot open /dev/fuse: say why first. */
async function checkFuseDevice(): Promise<void> {
  try {
    await access('/dev/fuse', constants.R_OK | constants.W_OK);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    throw new BackyError(code === 'ENOENT'
      ? 'FUSE is not available: /dev/fuse does not exist (load the fuse kernel module)'
      : `FUSE is not available to this user: /dev/fuse: ${errorLine(e)} (it is normally mode 0666)`);
  }
}

function mountFuse(fuse: FuseHandle, dir: string): Promise<void> {
  return new Promise((resolve, reject) => {
    fuse.mount((err) => (err ? reject(new BackyError(`cannot mount ${dir}: ${err.message}`)) : resolve()));
  });
}

function unmountFuse(fuse: FuseHandle): Promise<void> {
  return new Promise((resolve, reject) => fuse.unmount((err) => (err ? reject(err) : resolve())));
}

/**
 * Resolves `stopped` with the reason once a stop signal arrives or, after `watch()`, once the mount
 * disappears (someone ran `backy umount` or `fusermount -u`).
 */
function stopConditions(real: string): { stopped: Promise<string>; watch(): void; dispose(): void } {
  let done: (why: string) => void = () => undefined;
  const stopped = new Promise<string>((r) => (done = r));
  const onSignal = (sig: NodeJS.Signals) => done(sig);
  const signals: NodeJS.Signals[] = ['SIGINT', 'SIGTERM', 'SIGHUP'];
  for (const s of signals) process.on(s, onSignal);
  let timer: NodeJS.Timeout | undefined;
  return {
    stopped,
    watch() {
      timer = setInterval(() => {
        readMounts().then((ms) => {
          if (!ms.some((m) => m.mountPoint === real && m.fsType === FUSE_TYPE)) done('unmounted from outside');
        }, () => undefined);
      }, 1000);
    },
    dispose() {
      clearInterval(timer);
      for (const s of signals) process.off(s, onSignal);
    },
  };
}

/**
 * The overlay of a writable mount and its device, opened once: every open of the image shares it (what one
 * writer wrote, all read); closing an open image does not close it.
 */
async function openWritableImage(repo: Repository, spec: string): Promise<{ overlay: Overlay; device: BlockDevice; close(): Promise<void> }> {
  const { name, uid } = await resolveOverlaySpec(repo, spec);
  const overlay = await Overlay.use(repo, name, 'a writable mount', uid);
  const cow = await overlay.open(new VersionCatalogue(repo).device(overlay.base)).catch(async (e) => {
    await overlay.release();
    throw e;
  });
  const device = new (class extends PassThroughDevice {
    override close(): Promise<void> {
      return Promise.resolve();
    }
  })(cow);
  return {
    overlay,
    device,
    async close() {
      try {
        await cow.close();
      } finally {
        await overlay.release();
      }
    },
  };
}

/**
 * `backy mount`: serves one version (`DIR/<name>.img` and info files) or all versions (`by_version_uid/`,
 * `by_name/`) read-only until SIGINT/SIGTERM/SIGHUP or until the mount is unmounted from outside, then
 * undoes everything (partition mounts, loop device, FUSE mount) and resolves.
 */
export async function serveMount(repo: Repository, o: MountOptions): Promise<void> {
  const say = o.say ?? ((l: string) => log.info(l));
  if (o.partitions && !o.uid) throw new BackyError('--partitions needs a version uid', ExitCode.USAGE);
  if (o.partitions && process.geteuid?.() !== 0) {
    throw new BackyError('--partitions needs root (loop devices and mount); without root, mount the version and run "losetup -r -P" and "mount -o ro" yourself');
  }
  if (o.writable && o.uid) throw new BackyError('-w names the version to mount writable: give no other uid', ExitCode.USAGE);
  const dir = path.resolve(o.dir);
  const writable = o.writable ? await openWritableImage(repo, o.writable) : undefined;
  // A mounted version is held while mounted: rm of it is refused meanwhile.
  const version = writable ? writable.overlay.base : o.uid ? (await repo.holdVersion(o.uid, `FUSE mount of ${o.uid}`)).version : undefined;
  const real = await checkMountPoint(dir).catch(async (e) => {
    await writable?.close();
    throw e;
  });
  await checkFuseDevice();

  const list = new VersionList(repo.meta, { only: version?.uid });
  const tree: Tree = version ? new SingleVersionTree(list, version) : new AllVersionsTree(list);
  const catalogue = new VersionCatalogue(repo);
  const images = new OpenImages((v) => writable?.device ?? catalogue.heldDevice(v));
  const failures = new FailureLog((line) => log.error(line));
  const ops = createOperations({
    tree, images, uid: process.getuid?.() ?? 0, gid: process.getgid?.() ?? 0,
    logFailure: (key, line) => failures.report(key, line),
    readTimeoutMs: o.readTimeoutMs,
    writable: !!writable,
  });
  const options = [
    // Writable: writes of up to 128 KiB per request (libfuse 2 sends 4 KiB pieces without big_writes).
    ...(writable ? ['big_writes', `max_write=${MAX_READ}`] : ['ro']),
    `fsname=backy${version ? `:${version.uid}` : ''}`, 'subtype=backy', 'default_permissions',
    // Images never change and keep their size and mtime, so their cached pages survive reopening; info
    // files get a new mtime when their content changes (VersionList.changed), which drops stale pages.
    'auto_cache',
    `max_read=${MAX_READ}`,
    ...(o.allowOther ? ['allow_other'] : []),
  ];
  const fuse = createFuse(dir, ops, options);

  const stop = stopConditions(real);
  let attachment: LoopAttachment | undefined;
  const problems: string[] = [];
  try {
    await mountFuse(fuse, dir);
    stop.watch();
    say(version ? `mounted version ${version.uid} (${version.name}) at ${dir}: ${path.join(dir, imageFileName(version))}` : `mounted all versions at ${dir}`);
    if (writable) say(`the image is writable: writes go to overlay ${writable.overlay.name} (kept until "backy overlay rm ${writable.overlay.name}"; "backy fixate ${writable.overlay.name}" makes a version of it)`);
    if (o.partitions && version) {
      const single = tree as SingleVersionTree;
      attachment = await LoopAttachment.attach(path.join(dir, imageFileName(version)), dir, {
        add: (n) => single.addMountDir(n),
        remove: (n) => single.removeMountDir(n),
      }, say);
      if (!attachment.mounts.length) say('no filesystem of the image could be mounted; the image file is still there');
    }
    say('serving until interrupted (Ctrl-C) or "backy umount"');
    const why = await stop.stopped;
    say(`${why}: unmounting ${dir}`);
  } finally {
    // Signals stay caught until everything is undone: a second Ctrl-C must not leave a loop device behind.
    if (attachment) problems.push(...(await attachment.detach()));
    const stillMounted = (await readMounts().catch(() => [])).some((m) => m.mountPoint === real && m.fsType === FUSE_TYPE);
    if (stillMounted) await unmountFuse(fuse).catch((e) => problems.push(`cannot unmount ${dir}: ${errorLine(e)}`));
    // After the unmount: nothing can write any more, and what was written is flushed into the overlay.
    if (writable) await writable.close().catch((e) => problems.push(`cannot flush overlay ${writable.overlay.name}: ${errorLine(e)}`));
    stop.dispose();
  }
  if (problems.length) throw new BackyError(problems.join('; '));
}
