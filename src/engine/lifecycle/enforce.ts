import type { VersionRow } from '../../meta/types';
import { errorLine } from '../../util/errors';
import { log } from '../../util/log';
import { removeVersion } from '../remove';
import { LOCKS, Repository } from '../repository';
import type { Decision } from './retention';

export type Action = 'keep' | 'remove' | 'removed' | 'failed';

export interface Outcome {
  version: VersionRow;
  action: Action;
  reason: string;
}

/**
 * Carries out a plan (enforce, rm --expired): removes the versions it marks, one at a time through `rm`'s
 * own checks (version lock, protected, age), oldest first. With dryRun nothing changes and planned removals
 * read "remove". A removal that fails (locked, protected meanwhile ...) is reported and the rest go on.
 */
export async function carryOut(repo: Repository, plan: Decision<VersionRow>[], opts: { dryRun: boolean; force: boolean }): Promise<Outcome[]> {
  const out: Outcome[] = [];
  for (const d of plan) {
    if (!d.remove) {
      out.push({ version: d.version, action: 'keep', reason: d.reason });
      continue;
    }
    if (opts.dryRun) {
      out.push({ version: d.version, action: 'remove', reason: d.reason });
      continue;
    }
    try {
      await removeVersion(repo, d.version.uid, opts.force);
      out.push({ version: d.version, action: 'removed', reason: d.reason });
    } catch (e) {
      log.error(`could not remove version ${d.version.uid}: ${errorLine(e)}`);
      out.push({ version: d.version, action: 'failed', reason: `${errorLine(e)}; planned: ${d.reason}` });
    } finally {
      await repo.unlock(LOCKS.version(d.version.uid));
    }
  }
  return out;
}
