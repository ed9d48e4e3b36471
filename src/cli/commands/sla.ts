import type { Register } from './index';
import { ExitCode } from '../../util/errors';
import { parseFields, printRows } from '../output';

const FIELDS = ['name', 'scheduler', 'breach'];

export const register: Register = (program, wrap) => {
  program.command('sla [name]')
    .description('SLA breaches of the scheduler sections: too few, too many, too old, gaps (exit 0 unless --exit-code)')
    .option('-s, --schedulers <list>', 'scheduler sections of backy.cfg, comma separated', 'daily,weekly,monthly')
    .option('-f, --fields <fields>', `fields, comma separated (available: ${FIELDS.join(',')})`, 'name,breach')
    .option('--exit-code', 'exit 1 when there is a breach (for monitoring: Nagios, Icinga)')
    .action(wrap(async (ctx, name: string | undefined, o: { schedulers: string; fields: string; exitCode?: boolean }) => {
      const { schedulersFrom } = await import('../../engine/lifecycle/schedulers');
      const { slaBreaches } = await import('../../engine/lifecycle/sla');
      const { now } = await import('../../util/clock');
      const fields = parseFields(o.fields, FIELDS);
      const schedulers = schedulersFrom(ctx.config(), o.schedulers);
      const repo = await ctx.repository();
      const rows = slaBreaches(await repo.meta.listVersions(), schedulers, now(), name);
      printRows(ctx.output, fields, rows.map((r) => ({ name: r.name, scheduler: r.scheduler, breach: r.breach })));
      // backy2 exits 0 even with breaches; monitoring asks for a status.
      return o.exitCode && rows.length ? ExitCode.CONFIG : ExitCode.OK;
    }));
};
