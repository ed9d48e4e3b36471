import type { Register } from './index';

export const register: Register = (program, wrap) => {
  program.command('cleanup')
    .description('delete blobs no version uses (after a grace period of one hour)')
    .option('-f, --full', 'also compare storage with the database and delete unknown objects (no backup may run)')
    .option('--dangerous-force', 'no grace period (testing only)')
    .action(wrap(async (ctx, o: { full?: boolean; dangerousForce?: boolean }) => {
      const { cleanup, CLEANUP_GRACE_MS } = await import('../../engine/cleanup');
      const repo = await ctx.repository();
      const r = await cleanup(repo, { full: !!o.full, graceMs: o.dangerousForce ? 0 : CLEANUP_GRACE_MS });
      if (ctx.output.json) process.stdout.write(`${JSON.stringify(r, null, 2)}\n`);
    }));
};
