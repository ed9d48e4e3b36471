import type { Register } from './index';
import { parseFields, printRows } from '../output';

const FIELDS = ['name', 'schedulers', 'expire_date', 'due_since'];

export const register: Register = (program, wrap) => {
  program.command('due [name]')
    .description('which names need a backup now, with which scheduler tags and expiry date (for backup -t ... -e ...)')
    .option('-s, --schedulers <list>', 'scheduler sections of backy.cfg, comma separated', 'daily,weekly,monthly')
    .option('-f, --fields <fields>', `fields, comma separated (available: ${FIELDS.join(',')})`, FIELDS.join(','))
    .action(wrap(async (ctx, name: string | undefined, o: { schedulers: string; fields: string }) => {
      const { schedulersFrom } = await import('../../engine/lifecycle/schedulers');
      const { dueBackups } = await import('../../engine/lifecycle/due');
      const { now } = await import('../../util/clock');
      const fields = parseFields(o.fields, FIELDS);
      const schedulers = schedulersFrom(ctx.config(), o.schedulers);
      const repo = await ctx.repository();
      const rows = dueBackups(await repo.meta.listVersions(), schedulers, now(), name);
      printRows(ctx.output, fields, rows.map((r) => ({
        name: r.name, schedulers: r.schedulers.join(','), expire_date: new Date(r.expireDate), due_since: new Date(r.dueSince),
      })));
    }));
};
