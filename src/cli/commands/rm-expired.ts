import type { Context } from '../context';
import { OUTCOME_FIELDS, printOutcomes } from './enforce';

/** `rm --expired`: every version whose expiry date has passed, with enforce's guards and output. */
export async function rmExpired(ctx: Context, opts: { force: boolean; dryRun: boolean; name?: string }): Promise<number> {
  const { planExpired } = await import('../../engine/lifecycle/retention');
  const { carryOut } = await import('../../engine/lifecycle/enforce');
  const { now } = await import('../../util/clock');
  const repo = await ctx.repository();
  const versions = (await repo.meta.listVersions()).filter((v) => opts.name === undefined || v.name === opts.name);
  const plan = planExpired(versions, now(), { youngerThanDays: repo.cfg.disallowRmWhenYoungerThanDays, force: opts.force });
  const outcomes = await carryOut(repo, plan, opts);
  return printOutcomes(ctx, outcomes, OUTCOME_FIELDS.filter((f) => ['name', 'uid', 'date', 'expire', 'action', 'reason'].includes(f)), opts.dryRun);
}
