import type { Register } from './index';
import { BackyError } from '../../util/errors';
import { log } from '../../util/log';

export const register: Register = (program, wrap) => {
  program.command('initdb')
    .description('initialize the database, fixing the encryption mode and hash function of the repository (an existing one is left unchanged, exit 100)')
    .action(wrap(async (ctx) => {
      const { Repository } = await import('../../engine/repository');
      const cfg = ctx.config();
      const r = await Repository.create(cfg);
      if (!r.created) throw new BackyError(`database ${r.description} is already initialized; nothing changed`);
      log.info(`initialized ${r.description}: encryption = ${cfg.encryption}, hash_function = ${cfg.hashFunction} (fixed for this repository)`);
    }));
};
