import { BackyError, NotFoundError } from '../util/errors';
import { ProtectedError, VersionRow } from '../meta/types';
import { log } from '../util/log';
import { LOCKS, Repository } from './repository';
import { listOverlays } from './overlays';
import { now } from '../util/clock';

const DAY = 24 * 3600 * 1000;

/**
 * Removes a version's metadata; its blobs are freed by a later cleanup. Refused while a reader holds the
 * version (restore, scrub, an NBD export, a mounted image), while a backup or scrub of it runs, and when it
 * is protected (checked again inside the removal's transaction, so a `protect` cannot slip in between).
 */
export async function removeVersion(repo: Repository, uid: string, force: boolean): Promise<void> {
  const [refused] = await removeVersions(repo, [await repo.version(uid)], force);
  if (refused) throw refused;
}

/**
 * Removes versions (rows as read before: their uid, id and date count) each exactly as `removeVersion` does,
 * in a few steps for all of them instead of a few per version: the removal locks of all (each refused while
 * a hold of its version exists), then their version locks, the checks, and one removal transaction that
 * checks `protected` of each again. Per version the error that kept it, undefined where it was removed.
 */
export async function removeVersions(repo: Repository, versions: VersionRow[], force: boolean): Promise<(Error | undefined)[]> {
  const errors: (Error | undefined)[] = versions.map(() => undefined);
  // No new hold can start from here on, and none exists now (per version whose removal lock was taken).
  const removal = await repo.lockEach(versions.map((v) => ({
    name: LOCKS.removal(v.uid), what: `removal of ${v.uid}`, conflicts: [LOCKS.anyHold(v.uid)],
    refusal: (h) => `cannot remove version ${v.uid}: ${h.what} holds it (pid ${h.pid} on ${h.host})`,
  })));
  const held = versions.map((_, k) => k).filter((k) => {
    errors[k] = removal[k];
    return !removal[k];
  });
  let locked: number[] = [];
  try {
    const own = await repo.lockEach(held.map((k) => ({ name: LOCKS.version(versions[k].uid), what: `removal of ${versions[k].uid}` })));
    locked = held.filter((k, i) => {
      errors[k] = own[i];
      return !own[i];
    });
    // An overlay on this host needs its base while it exists, used or not. Listed once: a new overlay takes
    // a hold of its base first, which the removal locks refuse from now on.
    const overlays = locked.length ? await listOverlays(repo) : [];
    const days = repo.cfg.disallowRmWhenYoungerThanDays;
    const t = now();
    const checked = locked.filter((k) => {
      const v = versions[k];
      errors[k] = refusal(v, overlays.filter((o) => o.base === v.uid).map((o) => o.name), days, t, force);
      return !errors[k];
    });
    if (!checked.length) return errors;
    const results = await repo.meta.removeVersions(checked.map((k) => versions[k].id));
    checked.forEach((k, i) => {
      const v = versions[k];
      const r = results[i];
      if (r.result === 'removed') log.info(`removed version ${v.uid} (${v.name}); run "backy cleanup" to free its blobs`);
      else if (r.result === 'protected') errors[k] = new ProtectedError(v.uid);
      else errors[k] = new NotFoundError(`version ${v.uid} does not exist`);
    });
  } catch (e) {
    // The removal transaction failed (or a lock step): nothing of it happened.
    for (const k of held) errors[k] ??= e as Error;
  } finally {
    // Removed or not, readers may come again (they find the version gone, or there).
    await repo.unlockAll([...held.map((k) => LOCKS.removal(versions[k].uid)), ...locked.map((k) => LOCKS.version(versions[k].uid))]);
  }
  return errors;
}

/** Why a version whose locks are taken must stay, or undefined. */
function refusal(v: VersionRow, overlays: string[], days: number, t: number, force: boolean): Error | undefined {
  if (v.protected) return new BackyError(`version ${v.uid} is protected; unprotect it first`);
  if (overlays.length) {
    return new BackyError(`version ${v.uid} is the base of overlay ${overlays.join(', ')}: fixate or remove ${overlays.length === 1 ? 'it' : 'them'} ("backy overlay rm") first`);
  }
  if (!force && days > 0 && t - v.date < days * DAY) {
    return new BackyError(`version ${v.uid} is younger than ${days} days (disallow_rm_when_younger_than_days); use -f to remove it anyway`);
  }
  return undefined;
}
