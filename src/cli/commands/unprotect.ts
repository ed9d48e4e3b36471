import type { Register } from './index';
import { NotFoundError } from '../../util/errors';
import { log } from '../../util/log';

export const register: Register = (program, wrap) => {
  program.command('unprotect <version_uid>')
    .description('allow removal of a protected version')
    .action(wrap(async (ctx, uid: string) => {
      const repo = await ctx.repository();
      const v = await repo.version(uid);
      if (!(await repo.meta.updateVersion(v.id, { protected: false }))) throw new NotFoundError(`version ${uid} does not exist`);
      log.info(`version ${uid} is no longer protected`);
    }));
};
