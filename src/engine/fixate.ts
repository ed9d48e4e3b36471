import type { CowDevice } from '../device/cow';
import type { Source } from '../io/types';
import { log } from '../util/log';
import { backup, BackupResult } from './backup';
import { Overlay } from './overlays';
import type { Repository } from './repository';

export interface FixateOptions {
  overlay: string;
  /** name of the new version (default: the base version's) */
  name?: string;
  snapshotName?: string;
  tags: string[];
  expire: number | null;
  /** remove the overlay once the version is complete */
  remove?: boolean;
  quiet?: boolean;
}

/** The overlay, read through its device, as a backup source. */
function overlaySource(dev: CowDevice, name: string): Source {
  let bytesRead = 0;
  return {
    url: `overlay ${name}`,
    size: dev.size,
    // Blocks written only in part are filled from the version below: several in flight hide that fetch.
    parallelReads: 8,
    get bytesRead() {
      return bytesRead;
    },
    async read(buf, offset, length) {
      await dev.readInto(buf.subarray(0, length), offset);
      bytesRead += length;
    },
    // Whole blocks the overlay zeroed (or that were holes below and stayed so) are recorded without a read.
    extents: (offset, length) => dev.extents(offset, length),
    close: () => dev.close(),
  };
}

/**
 * Turns an overlay into a new version that is a differential of the overlay's base: only blocks the overlay
 * wrote (or zeroed) are read, hashed and deduplicated against the whole repository; every other block is
 * shared with the base by copying its map entries (no data is read for them). The overlay is left as it was
 * (or removed with `remove`).
 */
export async function fixate(repo: Repository, opts: FixateOptions): Promise<BackupResult> {
  void repo.codec; // the worker threads boot while the overlay opens
  const o = await Overlay.use(repo, opts.overlay, `fixate of overlay ${opts.overlay}`);
  let dev: CowDevice | undefined;
  let result: BackupResult;
  try {
    dev = await o.open(repo.device(o.base, repo.cache()));
    const changed = dev.changedRanges();
    const opened = dev;
    log.info(`fixate of overlay ${o.name}: ${changed.length} changed range${changed.length === 1 ? '' : 's'} over version ${o.base.uid}`);
    result = await backup(repo, {
      source: `overlay ${o.name}`,
      openSource: async () => overlaySource(opened, o.name),
      name: opts.name ?? o.base.name,
      snapshotName: opts.snapshotName ?? o.name,
      tags: opts.tags,
      expire: opts.expire,
      baseUid: o.base.uid,
      changes: {
        describe: `overlay ${o.name}`,
        ranges: async () => changed.map((r) => ({ offset: r.offset, length: r.length, exists: !r.zero })),
      },
      exactChanges: true,
      quiet: opts.quiet,
    });
  } finally {
    await dev?.close().catch(() => undefined);
    await o.release();
  }
  if (opts.remove) {
    await Overlay.remove(repo, o.name);
    log.info(`removed overlay ${o.name}`);
  } else {
    log.info(`overlay ${o.name} is unchanged; remove it with "backy overlay rm ${o.name}" when it is no longer needed`);
  }
  return result;
}
