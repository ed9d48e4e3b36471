import type { Register } from './index';
import { log } from '../../util/log';

export const register: Register = (program, wrap) => {
  program.command('protect <version_uid>')
    .description('protect a version from removal')
    .action(wrap(async (ctx, uid: string) => {
      const repo = await ctx.repository();
      const v = await repo.version(uid);
      await repo.meta.updateVersion(v.id, { protected: true });
      log.info(`version ${uid} is protected`);
    }));
};
