import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { changedGranulesOnDisk, CowDevice, createCowFiles, CowLayout } from '../device/cow';
import type { BlockDevice } from '../device/types';
import type { VersionRow } from '../meta/types';
import { BackyError, ConfigError, errorLine, LockedError, NotFoundError, UsageError } from '../util/errors';
import { fsyncDir, fsyncFd, openFd, closeFd, pwriteFull } from '../util/fd-io';
import { log } from '../util/log';
import { lockInfo } from '../util/process-info';
import type { VersionHold } from './holds';
import type { Repository } from './repository';

/**
 * Named copy-on-write overlays of versions, kept in `[DEFAULTS] overlay_dir` until removed: one directory
 * per overlay with `overlay.json` (what it is based on), and the CowDevice's `data` and `map`. A writable NBD
 * export, a writable mount and `fixate` use one; while a process uses it, it holds the overlay's lock in the
 * repository's lock table (so `overlay rm`, a second writer, or a fixate meanwhile are refused, and a
 * process that died holds nothing).
 */

const INFO_FILE = 'overlay.json';
const FORMAT = 1;
/** Overlay granule: 4 KiB, a guest's page and filesystem block, so random 4 KiB writes need no fill from below. */
export const DEFAULT_GRANULE = 4096;
const NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$/;

export interface OverlayInfo {
  format: number;
  name: string;
  /** uid of the version below */
  base: string;
  baseName: string;
  size: number;
  granule: number;
  /** ms since the epoch */
  created: number;
}

export function checkOverlayName(name: string): void {
  if (!NAME.test(name)) throw new UsageError(`invalid overlay name "${name}": use 1 to 100 letters, digits, '.', '_' or '-', starting with a letter or digit`);
}

/** The name an overlay gets when none is given: the version's uid with "-rw" (an export name of its own). */
export function defaultOverlayName(uid: string): string {
  return `${uid}-rw`;
}

export function overlayPath(repo: Repository, name: string): string {
  return path.join(repo.cfg.overlayDir, name);
}

function lockName(dir: string): string {
  return `overlay:${os.hostname()}:${dir}`;
}

export async function readOverlayInfo(dir: string): Promise<OverlayInfo | undefined> {
  let text: string;
  try {
    text = await fs.promises.readFile(path.join(dir, INFO_FILE), 'utf8');
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT' || (e as NodeJS.ErrnoException).code === 'ENOTDIR') return undefined;
    throw new ConfigError(`cannot read overlay ${dir}: ${errorLine(e)}`);
  }
  let info: OverlayInfo;
  try {
    info = JSON.parse(text) as OverlayInfo;
  } catch (e) {
    throw new ConfigError(`overlay ${dir}: ${INFO_FILE} is corrupt: ${errorLine(e)}`);
  }
  if (info.format !== FORMAT || typeof info.base !== 'string' || !(info.size >= 0) || !(info.granule > 0)) {
    throw new ConfigError(`overlay ${dir}: ${INFO_FILE} is not an overlay description this backy understands`);
  }
  return info;
}

/** Every overlay in overlay_dir, by name. */
export async function listOverlays(repo: Repository): Promise<OverlayInfo[]> {
  let names: string[];
  try {
    names = await fs.promises.readdir(repo.cfg.overlayDir);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return [];
    throw new ConfigError(`cannot list overlay_dir ${repo.cfg.overlayDir}: ${errorLine(e)}`);
  }
  const out: OverlayInfo[] = [];
  for (const n of names.sort()) {
    if (!NAME.test(n)) continue; // temporary and removed directories start with '.'
    const info = await readOverlayInfo(path.join(repo.cfg.overlayDir, n)).catch((e) => {
      log.warn(errorLine(e));
      return undefined;
    });
    if (info) out.push(info);
  }
  return out;
}

/** Overlays based on version `uid` (their version must stay while they exist). */
export async function overlaysOf(repo: Repository, uid: string): Promise<string[]> {
  return (await listOverlays(repo)).filter((o) => o.base === uid).map((o) => o.name);
}

/** Who uses the overlay now (undefined: nobody). Takes and drops its lock to find out. */
export async function overlayUser(repo: Repository, name: string): Promise<string | undefined> {
  const lock = lockName(overlayPath(repo, name));
  const info = lockInfo(`listing of overlay ${name}`);
  const holder = await repo.meta.tryLock(lock, info);
  if (holder) return `${holder.what} (pid ${holder.pid} on ${holder.host})`;
  await repo.meta.unlock(lock, info.session);
  return undefined;
}

/** Bytes of the version the overlay has changed (written, zeroed or trimmed), as of its last flush. */
export async function overlayChangedBytes(repo: Repository, info: OverlayInfo): Promise<number> {
  const n = await changedGranulesOnDisk(overlayPath(repo, info.name), { size: info.size, granule: info.granule, base: info.base });
  return Math.min(info.size, n * info.granule);
}

/** Bytes the overlay's files take on disk. */
export async function overlayDiskUsage(repo: Repository, name: string): Promise<number> {
  let total = 0;
  const dir = overlayPath(repo, name);
  for (const f of await fs.promises.readdir(dir)) {
    const st = await fs.promises.stat(path.join(dir, f));
    total += st.blocks * 512;
  }
  return total;
}

/** An overlay this process uses: locked until the repository closes (or `release`). */
export class Overlay {
  private constructor(
    private readonly repo: Repository,
    readonly info: OverlayInfo,
    readonly dir: string,
    readonly base: VersionRow,
    private readonly lock: string,
    private readonly hold: VersionHold,
  ) {}

  get name(): string {
    return this.info.name;
  }

  get layout(): CowLayout {
    return { size: this.info.size, granule: this.info.granule, base: this.info.base };
  }

  /** The overlay as a device over `lower` (a device of its base version). Closing it flushes. */
  open(lower: BlockDevice): Promise<CowDevice> {
    return CowDevice.open(lower, this.dir, this.layout).catch((e) => {
      throw new BackyError(`cannot open overlay ${this.name}: ${errorLine(e)}`);
    });
  }

  async release(): Promise<void> {
    await this.hold.release();
    await this.repo.meta.unlock(this.lock, lockInfo('').session);
  }

  /**
   * Uses overlay `name` (created over version `uid` when it does not exist and `uid` is given) for `what`.
   * Refused while another process uses it.
   */
  static async use(repo: Repository, name: string, what: string, uid?: string): Promise<Overlay> {
    checkOverlayName(name);
    const dir = overlayPath(repo, name);
    let info = await readOverlayInfo(dir);
    if (!info && !uid) throw new NotFoundError(`overlay ${name} does not exist in ${repo.cfg.overlayDir}`);
    if (info && uid && info.base !== uid) throw new BackyError(`overlay ${name} is based on version ${info.base}, not ${uid}`);
    const lock = lockName(dir);
    const holder = await repo.meta.tryLock(lock, lockInfo(what));
    if (holder) throw new LockedError(`overlay ${name} is in use by ${holder.what} (pid ${holder.pid} on ${holder.host})`);
    let hold: VersionHold | undefined;
    try {
      // Read again under the lock: a removal may have finished in between.
      info = await readOverlayInfo(dir);
      if (!info && !uid) throw new NotFoundError(`overlay ${name} does not exist in ${repo.cfg.overlayDir}`);
      // The base is held before anything else: `rm` of it is refused from now on while the overlay is used
      // (and, while no process uses it, by removeVersion's look into overlay_dir).
      hold = await repo.holdVersion(info?.base ?? uid!, `overlay ${name} (${what})`).catch((e) => {
        throw info && e instanceof NotFoundError ? new NotFoundError(`overlay ${name}: its base version ${info.base} does not exist any more`) : e;
      });
      const base = hold.version;
      if (!base.complete) throw new BackyError(`version ${base.uid} is incomplete: an overlay needs a complete version`);
      if (!info) {
        if (await repo.meta.getVersion(name)) throw new UsageError(`overlay name ${name} is a version uid: choose another name`);
        info = await createOverlay(repo, name, base);
        log.info(`created overlay ${name} over version ${base.uid} (${base.name}) in ${repo.cfg.overlayDir}`);
      } else if (base.size !== info.size) {
        throw new BackyError(`overlay ${name} was made for ${info.size} bytes, version ${base.uid} has ${base.size}`);
      }
      if (!base.valid) log.warn(`version ${base.uid} is marked invalid: some blocks may fail to read`);
      return new Overlay(repo, info, dir, base, lock, hold);
    } catch (e) {
      await hold?.release().catch(() => undefined);
      await repo.meta.unlock(lock, lockInfo('').session);
      throw e;
    }
  }

  /** Removes overlay `name` unless a process uses it. */
  static async remove(repo: Repository, name: string): Promise<void> {
    checkOverlayName(name);
    const dir = overlayPath(repo, name);
    if (!(await readOverlayInfo(dir))) throw new NotFoundError(`overlay ${name} does not exist in ${repo.cfg.overlayDir}`);
    const lock = lockName(dir);
    const info = lockInfo(`removal of overlay ${name}`);
    const holder = await repo.meta.tryLock(lock, info);
    if (holder) throw new LockedError(`overlay ${name} is in use by ${holder.what} (pid ${holder.pid} on ${holder.host}): stop it first`);
    try {
      // Renamed first: a removal cut short leaves a hidden directory, never half an overlay under its name.
      const gone = path.join(repo.cfg.overlayDir, `.${name}.removing-${process.pid}`);
      await fs.promises.rename(dir, gone);
      await fsyncDir(repo.cfg.overlayDir);
      await fs.promises.rm(gone, { recursive: true, force: true });
    } finally {
      await repo.meta.unlock(lock, info.session);
    }
  }
}

/** Creates the overlay's directory atomically: built under a hidden name, then renamed into place. */
async function createOverlay(repo: Repository, name: string, base: VersionRow): Promise<OverlayInfo> {
  const root = repo.cfg.overlayDir;
  try {
    await fs.promises.mkdir(root, { recursive: true, mode: 0o700 });
  } catch (e) {
    throw new ConfigError(`cannot create overlay_dir ${root}: ${errorLine(e)}`);
  }
  const tmp = path.join(root, `.${name}.new-${process.pid}`);
  await fs.promises.rm(tmp, { recursive: true, force: true });
  const info: OverlayInfo = { format: FORMAT, name, base: base.uid, baseName: base.name, size: base.size, granule: DEFAULT_GRANULE, created: Date.now() };
  try {
    await fs.promises.mkdir(tmp, { mode: 0o700 });
    await createCowFiles(tmp, { size: info.size, granule: info.granule, base: info.base });
    const fd = await openFd(path.join(tmp, INFO_FILE), 'wx', 0o600);
    try {
      await pwriteFull(fd, Buffer.from(`${JSON.stringify(info, null, 2)}\n`), 0);
      await fsyncFd(fd);
    } finally {
      await closeFd(fd);
    }
    await fsyncDir(tmp);
    await fs.promises.rename(tmp, overlayPath(repo, name));
    await fsyncDir(root);
  } catch (e) {
    await fs.promises.rm(tmp, { recursive: true, force: true }).catch(() => undefined);
    throw new ConfigError(`cannot create overlay ${name} in ${root}: ${errorLine(e)}`);
  }
  return info;
}

/**
 * What `-w` names: `UID[:NAME]` (NAME created over UID when missing; default NAME is UID-rw), or the NAME of an
 * existing overlay.
 */
export async function resolveOverlaySpec(repo: Repository, spec: string): Promise<{ name: string; uid?: string }> {
  const colon = spec.indexOf(':');
  if (colon >= 0) {
    const uid = spec.slice(0, colon);
    const name = spec.slice(colon + 1);
    if (!uid || !name) throw new UsageError(`-w ${spec}: expected UID[:OVERLAY_NAME]`);
    checkOverlayName(name);
    return { name, uid };
  }
  if (NAME.test(spec) && (await readOverlayInfo(overlayPath(repo, spec)))) return { name: spec };
  return { name: defaultOverlayName(spec), uid: spec };
}
