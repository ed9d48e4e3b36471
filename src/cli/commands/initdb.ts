import type { Register } from './index';
import { BackyError } from '../../util/errors';
import { log } from '../../util/log';

export const register: Register = (program, wrap) => {
  program.command('initdb')
    .description('initialize the database (an existing one is left unchanged, exit 100)')
    .action(wrap(async (ctx) => {
      const { createMetaStore } = await import('../../meta/open');
      const { FileStore } = await import('../../storage/file');
      const cfg = ctx.config();
      const meta = createMetaStore(cfg.metaEngine);
      try {
        if (!(await meta.initdb())) throw new BackyError(`database ${meta.description} is already initialized; nothing changed`);
      } finally {
        await meta.close();
      }
      if (cfg.data.type === 'file') await new FileStore(cfg.data.path).create();
      log.info(`initialized ${meta.description}`);
    }));
};
