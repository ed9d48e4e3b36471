import { openTarget } from '../io/registry';
import type { TlsFiles } from '../io/types';
import { formatBytes } from '../config/size';
import { StorageError } from '../util/errors';
import { log } from '../util/log';
import { Progress } from '../util/progress';
import { BlockCache } from '../device/block-cache';
import { VersionDevice } from '../device/version-device';
import { Repository } from './repository';
import { BlockCopier, CopyStats } from './restore-copier';
import { deltaHooks, DeltaStats } from './delta-restore';

export interface RestoreOptions {
  uid: string;
  target: string;
  sparse: boolean;
  force: boolean;
  /** false: do not flush the target to disk at the end */
  sync?: boolean;
  quiet?: boolean;
  /** credentials for nbds:// targets */
  tls?: TlsFiles;
  /**
   * --delta: the target holds an older or slightly different copy; only blocks whose content differs from
   * the version's are written (see delta-restore.ts). `fromVersion`: the version the target is known to hold.
   */
  delta?: { fromVersion?: string };
}

export interface RestoreResult {
  bytes: number;
  errors: { offset: number; message: string }[];
  seconds: number;
  stats?: CopyStats;
  delta?: DeltaStats;
}

/**
 * Copies a version to a target through the same read path as the NBD server (VersionDevice), many blocks in
 * flight, each verified (see BlockCopier). A block that cannot be read is reported with its offset and
 * skipped; the rest is still restored, and the caller exits 6.
 */
export async function restore(repo: Repository, opts: RestoreOptions): Promise<RestoreResult> {
  void repo.codec; // start the worker threads now: they boot while the target is prepared
  // Held until the command ends: `rm` of the version is refused meanwhile, so its blobs stay.
  const v = (await repo.holdVersion(opts.uid, `restore of ${opts.uid}`)).version;
  if (!v.complete) log.warn(`version ${v.uid} is incomplete: blocks never backed up will be reported as errors`);
  else if (!v.valid) log.warn(`version ${v.uid} is marked invalid: some blocks may fail verification`);
  const base = opts.delta?.fromVersion ? await repo.version(opts.delta.fromVersion) : undefined;
  const target = await openTarget(opts.target, {
    size: v.size, force: opts.force, sparse: opts.sparse, tls: opts.tls, existing: !!opts.delta,
    direct: !opts.delta && (opts.sync ?? true),
    blockingWrites: true,
  });
  // No block cache: restore reads each blob once (repeats are copied from their first copy in the target).
  const fetcher = repo.fetcher(new BlockCache(0));
  const dev = new VersionDevice(repo.meta, v, fetcher);
  const progress = new Progress(`restore ${v.uid.slice(0, 8)}`, v.size, { quiet: opts.quiet });
  const delta = opts.delta ? await deltaHooks(repo, v, target, base) : undefined;
  const copier = new BlockCopier(dev, fetcher, target, {
    inFlight: Math.max(2, repo.cfg.data.simultaneousReads),
    hooks: delta?.hooks,
    onProgress: (n) => progress.add(n),
  });
  const started = Date.now();
  let failure: unknown;
  try {
    await copier.run();
    // A restore reports success only once the data is durable (unless the caller chose otherwise).
    if (opts.sync ?? true) await target.flush();
  } catch (e) {
    failure = e;
  } finally {
    progress.finish();
    await target.close().catch((e) => (failure ??= e));
  }
  if (failure) throw failure;
  const seconds = (Date.now() - started) / 1000;
  const errors = copier.errors;
  for (const e of errors) log.error(`offset ${e.offset}: ${e.message}`);
  log.info(`restored version ${v.uid} to ${opts.target}: ${formatBytes(v.size)} in ${seconds.toFixed(1)} s ` +
    `(${formatBytes(v.size / Math.max(seconds, 0.001))}/s)${errors.length ? `, ${errors.length} blocks could not be restored` : ''}`);
  if (delta) {
    const s = copier.stats;
    log.info(`delta restore: ${delta.stats.blocksCompared} blocks compared` +
      `${base ? `, ${delta.stats.blocksSkippedByBase} skipped (same as ${base.uid})` : ''}, ${s.blocksUnchanged} unchanged, ` +
      `${s.blocksWritten + s.blocksRepeated + s.blocksZeroed} written (${s.blocksZeroed} as zeroes)`);
  }
  return { bytes: v.size, errors, seconds, stats: copier.stats, delta: delta?.stats };
}

export function restoreFailure(r: RestoreResult): StorageError {
  return new StorageError(`${r.errors.length} blocks could not be restored (first at offset ${r.errors[0].offset})`);
}
