import type { Register } from './index';
import { parseExpire, parseTags } from '../../util/dates';

export const register: Register = (program, wrap) => {
  program.command('fixate <overlay> [name]')
    .description('turn an overlay into a new version (named NAME, default: its base version\'s name): a differential of its base, '
      + 'reading only what was written; prints the new uid')
    .option('-s, --snapshot-name <name>', 'snapshot name of the new version (default: the overlay\'s name)')
    .option('-t, --tag <tags>', 'tag(s) for the new version, comma separated')
    .option('-e, --expire <date>', 'expiry date (yyyy-mm-dd or "yyyy-mm-dd HH:MM:SS")', '')
    .option('--rm', 'remove the overlay once the new version is complete')
    .action(wrap(async (ctx, overlay: string, name: string | undefined, o: { snapshotName?: string; tag?: string; expire: string; rm?: boolean }) => {
      const { fixate } = await import('../../engine/fixate');
      const expire = o.expire ? parseExpire(o.expire) : null;
      const repo = await ctx.repository();
      const r = await fixate(repo, { overlay, name, snapshotName: o.snapshotName, tags: parseTags(o.tag), expire, remove: !!o.rm, quiet: ctx.quiet });
      if (ctx.output.json) {
        process.stdout.write(`${JSON.stringify({ uid: r.uid, ...r.stats, date: new Date(r.stats.date).toISOString() }, null, 2)}\n`);
      } else {
        process.stdout.write(`${r.uid}\n`);
      }
    }));
};
