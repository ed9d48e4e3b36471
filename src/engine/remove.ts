import { BackyError, NotFoundError } from '../util/errors';
import type { VersionRow } from '../meta/types';
import { log } from '../util/log';
import { LOCKS, Repository } from './repository';
import { overlaysOf } from './overlays';
import { now } from '../util/clock';

const DAY = 24 * 3600 * 1000;

/**
 * Removes a version's metadata; its blobs are freed by a later cleanup. Refused while a reader holds the
 * version (restore, scrub, an NBD export, a mounted image), while a backup or scrub of it runs, and when it
 * is protected (checked again inside the removal's transaction, so a `protect` cannot slip in between).
 */
export async function removeVersion(repo: Repository, uid: string, force: boolean): Promise<void> {
  const v = await repo.version(uid);
  // No new hold can start from here on, and none exists now.
  await repo.lock(LOCKS.removal(uid), `removal of ${uid}`, [LOCKS.anyHold(uid)],
    (h) => `cannot remove version ${uid}: ${h.what} holds it (pid ${h.pid} on ${h.host})`);
  try {
    await removeUnheld(repo, v, uid, force);
  } finally {
    // Removed or not, readers may come again (they find the version gone, or there).
    await repo.unlock(LOCKS.removal(uid));
  }
}

async function removeUnheld(repo: Repository, v: VersionRow, uid: string, force: boolean): Promise<void> {
  await repo.lock(LOCKS.version(uid), `removal of ${uid}`);
  if (v.protected) throw new BackyError(`version ${uid} is protected; unprotect it first`);
  // An overlay on this host needs its base while it exists, used or not.
  const overlays = await overlaysOf(repo, uid);
  if (overlays.length) {
    throw new BackyError(`version ${uid} is the base of overlay ${overlays.join(', ')}: fixate or remove ${overlays.length === 1 ? 'it' : 'them'} ("backy overlay rm") first`);
  }
  const days = repo.cfg.disallowRmWhenYoungerThanDays;
  const age = now() - v.date;
  if (!force && days > 0 && age < days * DAY) {
    throw new BackyError(`version ${uid} is younger than ${days} days (disallow_rm_when_younger_than_days); use -f to remove it anyway`);
  }
  if (!(await repo.meta.removeVersion(v.id))) throw new NotFoundError(`version ${uid} does not exist`);
  log.info(`removed version ${uid} (${v.name}); run "backy cleanup" to free its blobs`);
}
