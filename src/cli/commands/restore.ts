import type { Register } from './index';
import { UsageError } from '../../util/errors';
import { addServerOptions, serverSettings, ServerOptions } from './nbd';

interface Options extends ServerOptions {
  sparse?: boolean;
  force?: boolean;
  sync: boolean;
  live?: boolean;
  continue?: boolean;
  state?: string;
  exitWhenDone?: boolean;
  delta?: boolean;
  fromVersion?: string;
}

export const register: Register = (program, wrap) => {
  const cmd = program.command('restore <version_uid> <target>')
    .description('restore a version to TARGET (file:///path, file:///dev/sdX, nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH, nbds://...); '
      + 'with --live serve TARGET over NBD while it is restored; with --delta write only what differs')
    .option('-s, --sparse', 'do not write holes (they stay holes in a new file; --delta punches them)')
    .option('-f, --force', 'overwrite an existing file or device')
    .option('--no-sync', 'do not flush the target to disk at the end (faster; data may sit in the page cache)')
    .option('--tls-psk <file>', 'nbds:// targets: psktool key file ("identity:hexkey"; the identity is the URI\'s user, else the first); '
      + 'with --live: the server\'s keys, as for "backy nbd"')
    .option('--tls-certificates <dir>', 'nbds:// targets: DIR/ca-cert.pem (and client-cert.pem, client-key.pem), as qemu uses them; '
      + 'with --live: the server\'s certificates, as for "backy nbd"')
    .option('--delta', 'TARGET already holds a similar copy: read it, compare each block\'s checksum with the version\'s, write only blocks that differ')
    .option('--from-version <uid>', 'with --delta: TARGET holds this version; blocks it shares with the restored one are not even read')
    .option('--live', 'serve TARGET (a file or block device) over NBD at once, export named by the version uid, while the version is '
      + 'copied into it: reads of blocks not restored yet fetch them first, writes go to TARGET and are never overwritten')
    .option('--continue', 'with --live: continue an interrupted live restore (its progress map is beside TARGET, or --state)')
    .option('--state <file>', 'with --live: where the progress map is kept (default TARGET.backy-live; for a block device in overlay_dir)')
    .option('--exit-when-done', 'with --live: stop serving and exit once everything is restored (default: serve until stopped)');
  addServerOptions(cmd, { tlsFiles: false })
    .action(wrap(async (ctx, uid: string, target: string, o: Options) => {
      const liveOnly = ['continue', 'state', 'exitWhenDone', 'address', 'port', 'socket', 'tls', 'tlsVerifyPeer', 'insecure', 'maxConnections', 'handshakeTimeout', 'replyTimeout'] as const;
      if (!o.live) {
        const stray = liveOnly.find((k) => o[k] !== undefined);
        if (stray) throw new UsageError(`--${stray.replace(/[A-Z]/g, (c) => `-${c.toLowerCase()}`)} needs --live`);
      }
      if (o.fromVersion && !o.delta) throw new UsageError('--from-version needs --delta');
      if (o.live && o.delta) throw new UsageError('--live and --delta exclude each other');
      const repo = await ctx.repository();
      if (o.live) {
        const { runLiveRestore } = await import('../live-restore-cli');
        return runLiveRestore(ctx, repo, uid, target, o, await serverSettings(o));
      }
      const { restore, restoreFailure } = await import('../../engine/restore');
      const r = await restore(repo, {
        uid, target, sparse: !!o.sparse, force: !!o.force, sync: o.sync, quiet: ctx.quiet,
        tls: { pskFile: o.tlsPsk, certificatesDir: o.tlsCertificates },
        delta: o.delta ? { fromVersion: o.fromVersion } : undefined,
      });
      if (ctx.output.json) process.stdout.write(`${JSON.stringify({ uid, target, bytes: r.bytes, seconds: r.seconds, errors: r.errors, ...r.stats, ...r.delta }, null, 2)}\n`);
      if (r.errors.length) throw restoreFailure(r);
    }));
};
