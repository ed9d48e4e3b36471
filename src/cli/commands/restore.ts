import type { Register } from './index';

export const register: Register = (program, wrap) => {
  program.command('restore <version_uid> <target>')
    .description('restore a version to TARGET (file:///path or file:///dev/sdX)')
    .option('-s, --sparse', 'do not write holes (they stay holes in a new file)')
    .option('-f, --force', 'overwrite an existing file or device')
    .option('--no-sync', 'do not flush the target to disk at the end (faster; data may sit in the page cache)')
    .action(wrap(async (ctx, uid: string, target: string, o: { sparse?: boolean; force?: boolean; sync: boolean }) => {
      const { restore, restoreFailure } = await import('../../engine/restore');
      const repo = await ctx.repository();
      const r = await restore(repo, { uid, target, sparse: !!o.sparse, force: !!o.force, sync: o.sync, quiet: ctx.quiet });
      if (ctx.output.json) process.stdout.write(`${JSON.stringify({ uid, target, bytes: r.bytes, seconds: r.seconds, errors: r.errors }, null, 2)}\n`);
      if (r.errors.length) throw restoreFailure(r);
    }));
};
