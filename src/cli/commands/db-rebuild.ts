import type { Register } from './index';

export const register: Register = (program, wrap) => {
  program.command('db-rebuild')
    .description('recreate the whole database (which must be empty or missing) from the metadata objects in storage; unreferenced blobs are left for "cleanup --full"')
    .action(wrap(async (ctx) => {
      const { rebuildDatabase } = await import('../../engine/db-rebuild');
      const r = await rebuildDatabase(ctx.config(), { quiet: ctx.quiet });
      if (ctx.output.json) process.stdout.write(`${JSON.stringify(r, null, 2)}\n`);
      else if (ctx.output.machine) process.stdout.write(`${ctx.output.skipHeader ? '' : 'versions|blobs\n'}${r.versions}|${r.blobs}\n`);
    }));
};
