import { fmtDate } from '../cli/output';
import { ReadaheadDevice } from '../device/readahead';
import type { BlockDevice, ExportCatalogue, ExportInfo } from '../device/types';
import type { VersionRow } from '../meta/types';
import { Repository } from './repository';

/** "name snapshot date" line describing a version to NBD and FUSE clients. */
export function describeVersion(v: VersionRow): string {
  const state = !v.complete ? '(incomplete)' : v.valid ? '' : '(invalid)';
  return [v.name, v.snapshotName ? `snapshot ${v.snapshotName}` : '', fmtDate(v.date), state].filter(Boolean).join(' ');
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

  async open(name: string): Promise<{ device: BlockDevice; description: string; version: VersionRow } | undefined> {
    const v = await this.repo.meta.getVersion(name);
    if (!v) return undefined;
    return { device: this.device(v), description: describeVersion(v), version: v };
  }

  async exists(name: string): Promise<boolean> {
    return !!(await this.repo.meta.getVersion(name));
  }

  device(v: VersionRow): BlockDevice & { prefetch(offset: number, length: number): Promise<void> } {
    const cache = this.repo.cache();
    const dev = this.repo.device(v, cache);
    // Read-ahead pays only while what it fetches stays in the cache until it is read: the window is kept to
    // an eighth of the cache (several streams share it), and a cache of fewer than 16 blocks gets none.
    const window = Math.min(this.opts.readaheadBlocks ?? 8, Math.floor(cache.maxBytes / v.blockSize / 8));
    return window >= 2 ? new ReadaheadDevice(dev, v.blockSize, window) : dev;
  }
}
