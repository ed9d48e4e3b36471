import type { Register } from './index';
import { parseTags } from '../../util/dates';

export const register: Register = (program, wrap) => {
  program.command('remove-tag <version_uid> <tags>')
    .description('remove tag(s), comma separated, from a version')
    // Not checked like add-tag: a tag with "|" or control characters that an older backy stored can be removed.
    .action(wrap(async (ctx, uid: string, tags: string) => {
      const repo = await ctx.repository();
      const v = await repo.version(uid);
      await repo.meta.removeTags(v.id, parseTags(tags));
    }));
};
