import type { Register } from './index';
import { BackyError } from '../../util/errors';

export const register: Register = (program, wrap) => {
  program.command('umount')
    .description('unmount a backy mount (not yet available)')
    .action(wrap(async () => { throw new BackyError('FUSE mounts are not available in this build'); }));
};
