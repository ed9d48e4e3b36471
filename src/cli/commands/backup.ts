import type { Register } from './index';
import { parseExpire, parseTags } from '../../util/dates';
import { checkLabel } from '../../util/labels';

export const register: Register = (program, wrap) => {
  program.command('backup <source> <name>')
    .description('back up SOURCE (file:///dev/sdX, file:///path/image.raw, nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH, nbds://...) as a new version of NAME; prints the new uid')
    .option('-s, --snapshot-name <name>', 'snapshot name (e.g. of the rbd or LVM snapshot)', '')
    .option('-r, --rbd <file>', 'hints: the output of "rbd diff --format=json" since the base version (needs -f)')
    .option('-f, --from-version <uid>', 'base version: a differential backup')
    .option('-c, --continue-version <uid>', 'continue this interrupted backup')
    .option('-t, --tag <tags>', 'tag(s) for the new version, comma separated')
    .option('-e, --expire <date>', 'expiry date (yyyy-mm-dd or "yyyy-mm-dd HH:MM:SS")', '')
    .option('--bitmap <name>', 'read only what QEMU dirty bitmap NAME marks as changed since the base (nbd:// sources; needs -f)')
    .option('--tls-psk <file>', 'nbds:// sources: psktool key file ("identity:hexkey"; the identity is the URI\'s user, else the first)')
    .option('--tls-certificates <dir>', 'nbds:// sources: DIR/ca-cert.pem (and client-cert.pem, client-key.pem), as qemu uses them')
    .action(wrap(async (ctx, source: string, name: string, o: Record<string, string | undefined>) => {
      // Engine modules load when a command runs, so `backy --help` and quick commands start fast.
      const { backup } = await import('../../engine/backup');
      const { readHints } = await import('../../engine/hints');
      const tags = parseTags(o.tag);
      checkLabel('name', name);
      checkLabel('snapshot name', o.snapshotName ?? '');
      for (const t of tags) checkLabel('tag', t);
      const expire = o.expire ? parseExpire(o.expire) : null;
      const hints = o.rbd ? readHints(o.rbd) : undefined;
      const repo = await ctx.repository();
      const r = await backup(repo, {
        source, name, snapshotName: o.snapshotName ?? '', tags, expire,
        baseUid: o.fromVersion, hints, continueUid: o.continueVersion, quiet: ctx.quiet,
        bitmap: o.bitmap, tls: { pskFile: o.tlsPsk, certificatesDir: o.tlsCertificates },
      });
      if (ctx.output.json) {
        process.stdout.write(`${JSON.stringify({ uid: r.uid, ...r.stats, date: new Date(r.stats.date).toISOString() }, null, 2)}\n`);
      } else {
        process.stdout.write(`${r.uid}\n`);
      }
    }));
};
