import type { VersionRow } from '../../meta/types';
import { errorLine } from '../../util/errors';
import { log } from '../../util/log';
import { removeVersions } from '../remove';
import type { Repository } from '../repository';
import type { Decision } from './retention';

export type Action = 'keep' | 'remove' | 'removed' | 'failed';

export interface Outcome {
  version: VersionRow;
  action: Action;
  reason: string;
}

/** Removals carried out together: one step of locks and one transaction for this many versions. */
const BATCH = 500;

/**
 * Carries out a plan (enforce, rm --expired): removes the versions it marks through `rm`'s own checks
 * (removal and version locks, protected, overlays, age; removeVersions), oldest first, a batch at a time.
 * With dryRun nothing changes and planned removals read "remove". A removal that fails (held, locked,
 * protected meanwhile ...) is reported and the rest go on.
 */
export async function carryOut(repo: Repository, plan: Decision<VersionRow>[], opts: { dryRun: boolean; force: boolean }): Promise<Outcome[]> {
  const out: Outcome[] = plan.map((d) => ({ version: d.version, action: d.remove ? 'remove' : 'keep', reason: d.reason }));
  if (opts.dryRun) return out;
  const doomed = out.filter((o) => o.action === 'remove');
  for (let i = 0; i < doomed.length; i += BATCH) {
    const part = doomed.slice(i, i + BATCH);
    let errors: (Error | undefined)[];
    try {
      errors = await removeVersions(repo, part.map((o) => o.version), opts.force);
    } catch (e) {
      errors = part.map(() => e as Error);
    }
    part.forEach((o, k) => {
      const e = errors[k];
      if (!e) {
        o.action = 'removed';
        return;
      }
      log.error(`could not remove version ${o.version.uid}: ${errorLine(e)}`);
      o.action = 'failed';
      o.reason = `${errorLine(e)}; planned: ${o.reason}`;
    });
  }
  return out;
}
