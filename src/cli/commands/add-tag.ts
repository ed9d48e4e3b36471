import type { Register } from './index';
import { parseTags } from '../../util/dates';
import { checkLabel } from '../../util/labels';

export const register: Register = (program, wrap) => {
  program.command('add-tag <version_uid> <tags>')
    .description('add tag(s), comma separated, to a version')
    .action(wrap(async (ctx, uid: string, tags: string) => {
      const list = parseTags(tags);
      for (const t of list) checkLabel('tag', t);
      const repo = await ctx.repository();
      const v = await repo.version(uid);
      await repo.meta.addTags(v.id, list);
    }));
};
