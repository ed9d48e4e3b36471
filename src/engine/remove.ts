import { BackyError } from '../util/errors';
import { log } from '../util/log';
import { LOCKS, Repository } from './repository';
import { now } from '../util/clock';

const DAY = 24 * 3600 * 1000;

/** Removes a version's metadata; its blobs are freed by a later cleanup. */
export async function removeVersion(repo: Repository, uid: string, force: boolean): Promise<void> {
  const v = await repo.version(uid);
  await repo.lock(LOCKS.version(uid), `removal of ${uid}`);
  if (v.protected) throw new BackyError(`version ${uid} is protected; unprotect it first`);
  const days = repo.cfg.disallowRmWhenYoungerThanDays;
  const age = now() - v.date;
  if (!force && days > 0 && age < days * DAY) {
    throw new BackyError(`version ${uid} is younger than ${days} days (disallow_rm_when_younger_than_days); use -f to remove it anyway`);
  }
  await repo.meta.removeVersion(v.id);
  log.info(`removed version ${uid} (${v.name}); run "backy cleanup" to free its blobs`);
}
