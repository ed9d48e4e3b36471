import { fmtDate } from '../cli/output';
import { ReadaheadDevice } from '../device/readahead';
import { PassThroughDevice } from '../device/pass-through';
import { BlockDevice, DeviceError, ExportCatalogue, ExportInfo, Extent } from '../device/types';
import type { VersionRow } from '../meta/types';
import { errorLine, LockedError, NotFoundError } from '../util/errors';
import { escapeText } from '../util/labels';
import type { VersionHold } from './holds';
import { Repository } from './repository';

/** "name snapshot date" line describing a version to NBD and FUSE clients. */
export function describeVersion(v: VersionRow): string {
  const state = !v.complete ? '(incomplete)' : v.valid ? '' : '(invalid)';
  // Escaped: nbdinfo --list and the FUSE info files show it to people and scripts, one line per version.
  return [escapeText(v.name), v.snapshotName ? `snapshot ${escapeText(v.snapshotName)}` : '', fmtDate(v.date), state].filter(Boolean).join(' ');
}

/**
 * Every version of a repository as a read-only device, for the NBD server and the FUSE mount. All devices
 * share the repository's one block cache (`cache_size`), so equal blocks of different versions are fetched
 * and decrypted once. Opening a version reads only its row: block map chunks load on first use.
 */
export class VersionCatalogue implements ExportCatalogue {
  constructor(readonly repo: Repository, private readonly opts: { readaheadBlocks?: number } = {}) {}

  async list(): Promise<ExportInfo[]> {
    const versions = await this.repo.meta.listVersions();
    return versions.map((v) => ({ name: v.uid, description: describeVersion(v) }));
  }

  /**
   * Opens a version for an NBD client. The version is held until the device is closed (see
   * Repository.holdVersion): `rm` of it is refused meanwhile. A version being removed is not offered.
   */
  async open(name: string): Promise<{ device: BlockDevice; description: string; version: VersionRow } | undefined> {
    if (!(await this.repo.meta.getVersion(name))) return undefined;
    let hold: VersionHold;
    try {
      hold = await this.repo.holdVersion(name, `NBD export of ${name}`);
    } catch (e) {
      if (e instanceof NotFoundError || e instanceof LockedError) return undefined;
      throw e;
    }
    const v = hold.version;
    return { device: new HeldDevice(this.plainDevice(v), Promise.resolve(hold)), description: describeVersion(v), version: v };
  }

  async exists(name: string): Promise<boolean> {
    return !!(await this.repo.meta.getVersion(name));
  }

  /**
   * A version as a device for an image that is opened (a FUSE image file, the base of a writable overlay).
   * The hold is taken at once, without waiting for it (FUSE opens synchronously); reads wait for it, and
   * fail with EIO if the version is being removed. Closing the device releases it.
   */
  device(v: VersionRow, what = `open image of ${v.uid}`): BlockDevice & { prefetch(offset: number, length: number): Promise<void> } {
    return new HeldDevice(this.plainDevice(v), this.repo.holdVersion(v.uid, what));
  }

  /**
   * Like `device`, but resolves only once the hold is taken, and rejects (releasing everything) when the
   * version is being removed or is gone: an open that succeeds can then never turn into EIO on read because
   * an `rm` slipped in between the open and the hold.
   */
  async heldDevice(v: VersionRow, what = `open image of ${v.uid}`): Promise<BlockDevice> {
    const d = new HeldDevice(this.plainDevice(v), this.repo.holdVersion(v.uid, what));
    try {
      await d.whenHeld();
    } catch (e) {
      await d.close().catch(() => undefined);
      throw e;
    }
    return d;
  }

  private plainDevice(v: VersionRow): BlockDevice & { prefetch(offset: number, length: number): Promise<void> } {
    const cache = this.repo.cache();
    const dev = this.repo.device(v, cache);
    // Read-ahead pays only while what it fetches stays in the cache until it is read: the window is kept to
    // an eighth of the cache (several streams share it), and a cache of fewer than 16 blocks gets none.
    const window = Math.min(this.opts.readaheadBlocks ?? 8, Math.floor(cache.maxBytes / v.blockSize / 8));
    return window >= 2 ? new ReadaheadDevice(dev, v.blockSize, window) : dev;
  }
}

/**
 * A device that holds its version: operations wait until the hold is taken (only the first ones ever
 * wait), fail with EIO when it could not be, and close() releases it.
 */
class HeldDevice extends PassThroughDevice {
  private ready = false;
  private failure: DeviceError | undefined;

  constructor(next: BlockDevice, private readonly hold: Promise<VersionHold>) {
    super(next);
    hold.then(() => { this.ready = true; }, (e) => { this.failure = new DeviceError(errorLine(e), 'EIO'); });
  }

  /** Resolves when the hold is taken; rejects with the reason it could not be. */
  async whenHeld(): Promise<void> {
    await this.hold;
  }

  private held<T>(op: () => Promise<T>): Promise<T> {
    if (this.ready) return op();
    return this.hold.then(op, () => Promise.reject(this.failure ?? new DeviceError('the version could not be held', 'EIO')));
  }

  override read(offset: number, length: number): Promise<Buffer> {
    return this.held(() => this.next.read(offset, length));
  }

  override extents(offset: number, length: number): Promise<Extent[]> {
    return this.held(() => this.next.extents(offset, length));
  }

  override prefetch(offset: number, length: number): Promise<void> {
    return this.held(() => super.prefetch(offset, length));
  }

  override async close(): Promise<void> {
    try {
      await super.close();
    } finally {
      const h = await this.hold.catch(() => undefined);
      await h?.release();
    }
  }
}
