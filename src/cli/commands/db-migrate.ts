import type { Register } from './index';
import { BackyError } from '../../util/errors';

export const register: Register = (program, wrap) => {
  program.command('db-migrate')
    .description('copy the metadata to another engine (not yet available)')
    .action(wrap(async () => { throw new BackyError('db-migrate is not available in this build'); }));
};
