import type { Register } from './index';
import { ExitCode, UsageError } from '../../util/errors';

export const register: Register = (program, wrap) => {
  program.command('scrub <version_uid>')
    .description('verify every stored block of a version (exit 20 when something is wrong)')
    .option('-s, --source <url>', 'also compare with this source')
    .option('-p, --percentile <percent>', 'check only this share of the blocks (1..100)', '100')
    .action(wrap(async (ctx, uid: string, o: { source?: string; percentile: string }) => {
      const percent = Number(o.percentile);
      if (!Number.isInteger(percent) || percent < 1 || percent > 100) throw new UsageError(`-p expects an integer from 1 to 100, got "${o.percentile}"`);
      const { scrub } = await import('../../engine/scrub');
      const repo = await ctx.repository();
      const r = await scrub(repo, { uid, source: o.source, percent, quiet: ctx.quiet });
      if (ctx.output.json) process.stdout.write(`${JSON.stringify({ uid, ...r }, null, 2)}\n`);
      return r.ok ? ExitCode.OK : ExitCode.SCRUB;
    }));
};
