import type { Register } from './index';
import { parseExpire } from '../../util/dates';

export const register: Register = (program, wrap) => {
  program.command('expire <version_uid> <expire>')
    .description('set the expiry date of a version (yyyy-mm-dd or "yyyy-mm-dd HH:MM:SS"; "" clears it)')
    .action(wrap(async (ctx, uid: string, expire: string) => {
      const when = expire ? parseExpire(expire) : null;
      const repo = await ctx.repository();
      const v = await repo.version(uid);
      await repo.meta.updateVersion(v.id, { expire: when });
    }));
};
