import * as fs from 'node:fs';
import type { Register } from './index';
import { IoError } from '../../util/errors';

export const register: Register = (program, wrap) => {
  program.command('import <file>')
    .description('add the version of a metadata dump ("-" = stdin): backy2\'s export (2.1 to 2.12) or backy\'s; prints its uid')
    .option('--backy2-config <file>', 'backy2\'s configuration, whose encryption_key wrapped the data keys in the dump (default: this repository\'s key)')
    .action(wrap(async (ctx, file: string, o: { backy2Config?: string }) => {
      const { importDump } = await import('../../engine/import-dump');
      let backy2Key: Buffer | undefined;
      if (o.backy2Config) {
        const { loadBacky2Config } = await import('../../backy2/config');
        backy2Key = loadBacky2Config(o.backy2Config).encryptionKey;
      }
      let text: string;
      try {
        text = fs.readFileSync(file === '-' ? 0 : file, 'utf8');
      } catch (e) {
        throw new IoError(`cannot read ${file}: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`);
      }
      const repo = await ctx.repository();
      const r = await importDump(repo, text, { backy2Key });
      if (ctx.output.json) process.stdout.write(`${JSON.stringify(r, null, 2)}\n`);
      else process.stdout.write(`${r.uid}\n`);
    }));
};
