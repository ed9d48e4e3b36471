import type { Register } from './index';
import { enginePasswords } from '../../meta/pg-errors';
import { log } from '../../util/log';

export const register: Register = (program, wrap) => {
  program.command('db-migrate')
    .description('copy the metadata (versions, block maps, blobs, statistics) into another, empty database: sqlite:////path or postgresql://...; storage is not touched')
    .requiredOption('--to <engine_url>', 'destination engine URL, e.g. postgresql://backy:PASSWORD@dbhost:5432/backy')
    .action(wrap(async (ctx, o: { to: string }) => {
      for (const pw of enginePasswords(o.to)) log.addSecret(pw);
      // Loaded only for this command: the other commands never need the table copier.
      const { migrateMetadata } = await import('../../engine/migrate');
      const repo = await ctx.repository();
      const r = await migrateMetadata(repo, o.to);
      if (ctx.output.json) process.stdout.write(`${JSON.stringify(r, null, 2)}\n`);
    }));
};
