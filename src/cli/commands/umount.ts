import type { Register } from './index';
import { log } from '../../util/log';

export const register: Register = (program, wrap) => {
  program.command('umount <dir>')
    .description('unmount a backy mount (also one left by a killed process): its partition mounts, loop device, then DIR')
    .action(wrap(async (_ctx, dir: string) => {
      const { unmountDir } = await import('../../fuse/unmount');
      for (const note of await unmountDir(dir)) log.warn(note);
    }));
};
