import type { Register } from './index';
import { ExitCode } from '../../util/errors';
import { printRows } from '../output';

export const register: Register = (program, wrap) => {
  program.command('import-backy2 <backy2_cfg>')
    .description('import every version of a backy2 repository (its backy.cfg): in place, reading its blobs where they are ' +
      '([DataBackend] must be backy2\'s), or with --copy into this repository\'s storage; versions already here are skipped')
    .option('--copy', 're-encode every block into backy\'s format (resumable; backy2\'s repository is only read)')
    .action(wrap(async (ctx, cfgFile: string, o: { copy?: boolean }) => {
      const { importBacky2 } = await import('../../engine/import-backy2');
      const repo = await ctx.repository();
      const r = await importBacky2(repo, { configFile: cfgFile, copy: !!o.copy, quiet: ctx.quiet });
      const invalid = new Set(r.invalid);
      const rows = [
        ...r.imported.map((uid) => ({ uid, result: invalid.has(uid) ? 'imported-invalid' : 'imported', error: '' })),
        ...r.skipped.map((uid) => ({ uid, result: 'skipped', error: '' })),
        ...r.failed.map((f) => ({ uid: f.uid, result: 'failed', error: f.error })),
      ];
      if (ctx.output.json) process.stdout.write(`${JSON.stringify(r, null, 2)}\n`);
      else if (ctx.output.machine) printRows(ctx.output, ['uid', 'result', 'error'], rows);
      return r.failed.length ? ExitCode.OTHER : ExitCode.OK;
    }));
};
