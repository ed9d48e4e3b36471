import * as fs from 'node:fs';
import type { Register } from './index';
import { IoError } from '../../util/errors';

export const register: Register = (program, wrap) => {
  program.command('export <version_uid> <file>')
    .description('write the metadata of a version as a dump ("-" = stdout): backy2\'s format when backy2 could read it, else backy\'s')
    .action(wrap(async (ctx, uid: string, file: string) => {
      const { exportVersion } = await import('../../engine/export');
      const repo = await ctx.repository();
      let fd: number | undefined;
      if (file !== '-') {
        try {
          fd = fs.openSync(file, 'w', 0o600);
        } catch (e) {
          throw new IoError(`cannot write ${file}: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`);
        }
      }
      try {
        await exportVersion(repo, uid, async (text) => {
          if (fd !== undefined) fs.writeSync(fd, text);
          else if (!process.stdout.write(text)) await new Promise((r) => process.stdout.once('drain', r));
        });
      } finally {
        if (fd !== undefined) fs.closeSync(fd);
      }
    }));
};
