import type { Register } from './index';

export const register: Register = (program, wrap) => {
  program.command('restore <version_uid> <target>')
    .description('restore a version to TARGET (file:///path, file:///dev/sdX, nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH, nbds://...)')
    .option('-s, --sparse', 'do not write holes (they stay holes in a new file)')
    .option('-f, --force', 'overwrite an existing file or device')
    .option('--no-sync', 'do not flush the target to disk at the end (faster; data may sit in the page cache)')
    .option('--tls-psk <file>', 'nbds:// targets: psktool key file ("identity:hexkey"; the identity is the URI\'s user, else the first)')
    .option('--tls-certificates <dir>', 'nbds:// targets: DIR/ca-cert.pem (and client-cert.pem, client-key.pem), as qemu uses them')
    .action(wrap(async (ctx, uid: string, target: string, o: { sparse?: boolean; force?: boolean; sync: boolean; tlsPsk?: string; tlsCertificates?: string }) => {
      const { restore, restoreFailure } = await import('../../engine/restore');
      const repo = await ctx.repository();
      const r = await restore(repo, {
        uid, target, sparse: !!o.sparse, force: !!o.force, sync: o.sync, quiet: ctx.quiet,
        tls: { pskFile: o.tlsPsk, certificatesDir: o.tlsCertificates },
      });
      if (ctx.output.json) process.stdout.write(`${JSON.stringify({ uid, target, bytes: r.bytes, seconds: r.seconds, errors: r.errors, ...r.stats }, null, 2)}\n`);
      if (r.errors.length) throw restoreFailure(r);
    }));
};
