import { formatBytes } from '../config/size';
import { uidOfKey } from '../storage/blob-keys';
import { InvalidBlobUidError } from '../storage/types';
import { DatabaseError } from '../util/errors';
import { log } from '../util/log';
import { LOCKS, Repository } from './repository';
import { PACKS_PREFIX, SYNC_LOCK } from './storage-meta';
import { lockInfo } from '../util/process-info';

export const CLEANUP_GRACE_MS = 3600 * 1000;

export interface CleanupResult {
  deleted: number;
  waiting: number;
  orphansDeleted: number;
  orphanBytes: number;
  /** cleanup --full: metadata packs in storage no blob of the database refers to */
  packsDeleted: number;
}

/**
 * Frees blobs no version references. Blobs are marked (inside one transaction that sees every block map,
 * including those of running backups), then deleted from storage, then forgotten; an interrupted cleanup
 * resumes where it stopped. A blob must have been unreferenced for the grace period first (none with
 * --dangerous-force). --full also compares storage with the database, with no backup running, and deletes
 * objects the database does not know (leftovers of crashes).
 */
export async function cleanup(repo: Repository, opts: { full: boolean; graceMs: number }): Promise<CleanupResult> {
  await repo.lock(LOCKS.cleanup, 'cleanup');
  if (opts.full) await repo.lock(LOCKS.fullCleanup, 'full cleanup', [LOCKS.anyBackup]);
  const mark = await repo.meta.markForDeletion(opts.graceMs, Date.now());
  let deleted = 0;
  const refused: string[] = [];
  for (;;) {
    const batch = await repo.meta.blobsToDelete(1000);
    if (!batch.length) break;
    // A uid that is not one backy writes (a tampered shared database) never reaches storage: such a row
    // stands for no object backy could have stored, so it is only forgotten.
    const keys: string[] = [];
    for (const b of batch) {
      try {
        keys.push(repo.keyOf(b));
      } catch (e) {
        if (!(e instanceof InvalidBlobUidError)) throw e;
        refused.push(b.uid);
        if (refused.length <= 10) log.error(e.message);
      }
    }
    await repo.store.delete(keys);
    const packs = await repo.meta.packsOf(batch.map((b) => b.id));
    await repo.meta.forgetBlobs(batch.map((b) => b.id));
    // Metadata packs whose blobs are all gone go too (their other entries describe nothing any more).
    await repo.storageMeta.deletePacks(await repo.meta.unusedPacks(packs));
    deleted += keys.length;
  }
  let orphansDeleted = 0;
  let orphanBytes = 0;
  let packsDeleted = 0;
  if (opts.full) {
    for await (const page of repo.store.list()) {
      const uids = page.map((o) => (o.partial ? undefined : uidOfKey(o.key)));
      const known = await repo.meta.knownBlobUids(uids.filter((u): u is string => !!u));
      const orphans = page.filter((_, k) => !uids[k] || !known.has(uids[k]!));
      if (orphans.length) {
        await repo.store.delete(orphans.map((o) => o.key));
        orphansDeleted += orphans.length;
        orphanBytes += orphans.reduce((s, o) => s + o.size, 0);
      }
    }
    packsDeleted = (await sweepMetadataPacks(repo)).count;
  }
  log.info(`cleanup: ${deleted} blobs deleted, ${mark.waiting} unreferenced blobs inside the grace period, ` +
    `${mark.referenced} in use${opts.full ? `; ${orphansDeleted} unknown objects (${formatBytes(orphanBytes)}) removed from storage` +
    (packsDeleted ? `, and ${packsDeleted} metadata packs no blob needs` : '') : ''}`);
  if (refused.length) {
    throw new DatabaseError(`cleanup: ${refused.length} blob rows with invalid uids were forgotten without touching storage; ` +
      'the database was changed by something other than backy');
  }
  return { deleted, waiting: mark.waiting, orphansDeleted, orphanBytes, packsDeleted };
}

/**
 * Metadata packs no blob row refers to (left by a crash between writing a pack and recording it, or by a
 * database rebuilt without the versions that used them). Only while no metadata sync runs: a pack it has just
 * written is not recorded yet.
 */
async function sweepMetadataPacks(repo: Repository): Promise<{ count: number }> {
  const out = { count: 0 };
  const info = lockInfo('full cleanup');
  if (await repo.meta.tryLock(SYNC_LOCK, info)) {
    log.warn('cleanup --full: metadata is being written to storage right now; unused metadata packs are left for the next one');
    return out;
  }
  try {
    for await (const page of repo.store.listUnder(PACKS_PREFIX)) {
      const names = page.map((o) => o.key.slice(PACKS_PREFIX.length)).filter((n) => /^[0-9a-f]{32}$/.test(n));
      const unused = await repo.meta.unusedPacks(names);
      await repo.storageMeta.deletePacks(unused);
      out.count += unused.length;
    }
  } finally {
    await repo.meta.unlock(SYNC_LOCK, info.session);
  }
  return out;
}
