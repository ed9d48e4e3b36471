import { formatBytes } from '../config/size';
import { blobKey, InvalidBlobUidError, uidFromKey } from '../storage/types';
import { DatabaseError } from '../util/errors';
import { log } from '../util/log';
import { LOCKS, Repository } from './repository';

export const CLEANUP_GRACE_MS = 3600 * 1000;

export interface CleanupResult {
  deleted: number;
  waiting: number;
  orphansDeleted: number;
  orphanBytes: number;
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
        keys.push(blobKey(b.uid));
      } catch (e) {
        if (!(e instanceof InvalidBlobUidError)) throw e;
        refused.push(b.uid);
        if (refused.length <= 10) log.error(e.message);
      }
    }
    await repo.store.delete(keys);
    await repo.meta.forgetBlobs(batch.map((b) => b.id));
    deleted += keys.length;
  }
  let orphansDeleted = 0;
  let orphanBytes = 0;
  if (opts.full) {
    for await (const page of repo.store.list()) {
      const uids = page.map((o) => (o.partial ? undefined : uidFromKey(o.key)));
      const known = await repo.meta.knownBlobUids(uids.filter((u): u is string => !!u));
      const orphans = page.filter((_, k) => !uids[k] || !known.has(uids[k]!));
      if (orphans.length) {
        await repo.store.delete(orphans.map((o) => o.key));
        orphansDeleted += orphans.length;
        orphanBytes += orphans.reduce((s, o) => s + o.size, 0);
      }
    }
  }
  log.info(`cleanup: ${deleted} blobs deleted, ${mark.waiting} unreferenced blobs inside the grace period, ` +
    `${mark.referenced} in use${opts.full ? `; ${orphansDeleted} unknown objects (${formatBytes(orphanBytes)}) removed from storage` : ''}`);
  if (refused.length) {
    throw new DatabaseError(`cleanup: ${refused.length} blob rows with invalid uids were forgotten without touching storage; ` +
      'the database was changed by something other than backy');
  }
  return { deleted, waiting: mark.waiting, orphansDeleted, orphanBytes };
}
