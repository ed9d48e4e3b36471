import type { Register } from './index';
import type { Context } from '../context';
import type { Outcome } from '../../engine/lifecycle/enforce';
import { ExitCode } from '../../util/errors';
import { log } from '../../util/log';
import { parseFields, printRows } from '../output';

export const OUTCOME_FIELDS = ['name', 'uid', 'date', 'expire', 'valid', 'protected', 'tags', 'action', 'reason'];

/** Prints what enforce or rm --expired kept and removed; exit 100 when a planned removal failed. */
export function printOutcomes(ctx: Context, outcomes: Outcome[], fields: string[], dryRun: boolean): number {
  printRows(ctx.output, fields, outcomes.map((o) => ({
    name: o.version.name, uid: o.version.uid, date: new Date(o.version.date),
    expire: o.version.expire === null ? '' : new Date(o.version.expire), valid: o.version.valid,
    protected: o.version.protected, tags: o.version.tags.join(','), action: o.action, reason: o.reason,
  })));
  const count = (a: string) => outcomes.filter((o) => o.action === a).length;
  const failed = count('failed');
  log.info(dryRun
    ? `dry run: ${count('remove')} versions would be removed, ${count('keep')} kept; nothing changed`
    : `${count('removed')} versions removed, ${count('keep')} kept${failed ? `, ${failed} could not be removed` : ''}` +
      `${count('removed') ? '; run "backy cleanup" to free their blobs' : ''}`);
  return failed ? ExitCode.OTHER : ExitCode.OK;
}

export const register: Register = (program, wrap) => {
  program.command('enforce <rules> [name]')
    .description('retention: keep versions by RULES (benji\'s syntax: latest3,hours24,days7,weeks4,months12,years2), remove the rest ' +
      '(never protected, incomplete, invalid-but-newest, or younger than disallow_rm_when_younger_than_days)')
    .option('-n, --dry-run', 'only show what would be kept and removed')
    .option('--force', 'also remove versions younger than disallow_rm_when_younger_than_days')
    .option('-f, --fields <fields>', `fields, comma separated (available: ${OUTCOME_FIELDS.join(',')})`, 'name,uid,date,action,reason')
    .action(wrap(async (ctx, spec: string, name: string | undefined, o: { dryRun?: boolean; force?: boolean; fields: string }) => {
      const { parseRules, planRetention } = await import('../../engine/lifecycle/retention');
      const { carryOut } = await import('../../engine/lifecycle/enforce');
      const { now } = await import('../../util/clock');
      const rules = parseRules(spec);
      const fields = parseFields(o.fields, OUTCOME_FIELDS);
      const repo = await ctx.repository();
      const versions = (await repo.meta.listVersions()).filter((v) => name === undefined || v.name === name);
      if (name !== undefined && !versions.length) log.warn(`no versions named "${name}"`);
      const plan = planRetention(versions, rules, now(), { youngerThanDays: repo.cfg.disallowRmWhenYoungerThanDays, force: !!o.force });
      const outcomes = await carryOut(repo, plan, { dryRun: !!o.dryRun, force: !!o.force });
      return printOutcomes(ctx, outcomes, fields, !!o.dryRun);
    }));
};
