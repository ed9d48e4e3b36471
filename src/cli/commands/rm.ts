import type { Register } from './index';

export const register: Register = (program, wrap) => {
  program.command('rm <version_uid>')
    .description('remove a version (its blobs are freed by a later cleanup)')
    .option('-f, --force', 'remove even if younger than disallow_rm_when_younger_than_days')
    .action(wrap(async (ctx, uid: string, o: { force?: boolean }) => {
      const { removeVersion } = await import('../../engine/remove');
      const repo = await ctx.repository();
      await removeVersion(repo, uid, !!o.force);
    }));
};
