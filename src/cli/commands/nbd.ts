import { InvalidArgumentError } from 'commander';
import type { Register } from './index';
import { UsageError } from '../../util/errors';

function port(text: string): number {
  if (!/^\d{1,5}$/.test(text) || Number(text) > 65535) throw new InvalidArgumentError('expected a port number from 0 to 65535 (0: any free port)');
  return Number(text);
}

export const register: Register = (program, wrap) => {
  program.command('nbd')
    .description('serve every version as a read-only NBD export named by its uid, and writable overlays (-w) (until SIGTERM or Ctrl-C)')
    // Defaults are applied below, not by commander, so that -a/-p together with --socket can be refused.
    .option('-a, --address <addr>', 'address to listen on (default 127.0.0.1)')
    .option('-p, --port <port>', 'TCP port (default 10809; 0 picks a free port, printed at start)', port)
    .option('--socket <path>', 'listen on this Unix socket instead of TCP')
    .option('-r, --read-only', 'every export read-only (the default without -w)')
    .option('-w, --writable <uid[:overlay]>', 'also serve a writable export of version UID: writes go to a copy-on-write overlay named OVERLAY '
      + '(default UID-rw, the export name) in overlay_dir, kept until "backy overlay rm"; an existing overlay may be named alone; repeatable',
    (v: string, prev: string[] = []) => [...prev, v])
    .action(wrap(async (ctx, o: { address?: string; port?: number; socket?: string; readOnly?: boolean; writable?: string[] }) => {
      if (o.socket !== undefined && (o.address !== undefined || o.port !== undefined)) throw new UsageError('--socket cannot be combined with -a or -p');
      if (o.socket === '') throw new UsageError('--socket needs a path');
      if (o.address === '') throw new UsageError('-a needs an address');
      if (o.readOnly && o.writable?.length) throw new UsageError('-r and -w exclude each other');
      const repo = await ctx.repository();
      const { serveUntilSignal } = await import('../../engine/nbd-service');
      await serveUntilSignal(repo, {
        listen: o.socket ? { path: o.socket } : { host: o.address ?? '127.0.0.1', port: o.port ?? 10809 },
        readOnly: !!o.readOnly,
        writable: o.writable,
      });
    }));
};
