import type { Register } from './index';
import { BackyError } from '../../util/errors';

export const register: Register = (program, wrap) => {
  program.command('nbd')
    .description('serve every version as an NBD export (not yet available)')
    .action(wrap(async () => { throw new BackyError('the NBD server is not available in this build'); }));
};
