import type { Register } from './index';
import { NotFoundError } from '../../util/errors';
import { log } from '../../util/log';

export const register: Register = (program, wrap) => {
  program.command('protect <version_uid>')
    .description('protect a version from removal')
    .action(wrap(async (ctx, uid: string) => {
      const repo = await ctx.repository();
      const v = await repo.version(uid);
      // A removal that got the row first leaves nothing to protect: say so instead of claiming success.
      if (!(await repo.meta.updateVersion(v.id, { protected: true }))) throw new NotFoundError(`version ${uid} does not exist`);
      log.info(`version ${uid} is protected`);
    }));
};
