import type { Register } from './index';
import { UsageError } from '../../util/errors';

export const register: Register = (program, wrap) => {
  program.command('rm [version_uid]')
    .description('remove a version (its blobs are freed by a later cleanup); --expired: every expired version')
    .option('-f, --force', 'remove even if younger than disallow_rm_when_younger_than_days')
    .option('-e, --expired', 'remove every version whose expiry date has passed (not protected, incomplete or invalid-but-newest ones)')
    .option('-n, --dry-run', 'with --expired: only show what would be removed')
    .action(wrap(async (ctx, uid: string | undefined, o: { force?: boolean; expired?: boolean; dryRun?: boolean }) => {
      if (o.expired) {
        if (uid !== undefined) throw new UsageError('rm --expired takes no version uid');
        const { rmExpired } = await import('./rm-expired');
        return rmExpired(ctx, { force: !!o.force, dryRun: !!o.dryRun });
      }
      if (uid === undefined) throw new UsageError('rm needs a version uid (or --expired)');
      if (o.dryRun) throw new UsageError('--dry-run goes with --expired');
      const { removeVersion } = await import('../../engine/remove');
      const repo = await ctx.repository();
      await removeVersion(repo, uid, !!o.force);
    }));
};
