import { InvalidArgumentError } from 'commander';
import type { Register } from './index';
import { UsageError } from '../../util/errors';

function seconds(text: string): number {
  if (!/^\d+(\.\d+)?$/.test(text) || Number(text) <= 0 || Number(text) > 86400) throw new InvalidArgumentError('expected seconds, more than 0 and at most 86400');
  return Number(text);
}

export const register: Register = (program, wrap) => {
  program.command('mount <version_uid_or_dir> [dir]')
    .usage('[options] [version_uid] <dir>')
    .description('mount a version (DIR/<name>.img and info files), or all versions (DIR/by_version_uid, DIR/by_name), read-only with FUSE; runs until Ctrl-C or "backy umount DIR"')
    .option('-p, --partitions', 'also attach the image to a loop device and mount its filesystems read-only under DIR/partN (or DIR/fs); root only')
    .option('--allow-other', 'let other users read the mount (FUSE allow_other; non-root needs user_allow_other in /etc/fuse.conf)')
    .option('-w, --writable <uid[:overlay]>', 'mount version UID with a writable image: writes go to a copy-on-write overlay named OVERLAY '
      + '(default UID-rw) in overlay_dir, kept until "backy overlay rm"; an existing overlay may be named alone')
    .option('--read-timeout <seconds>', 'a read that storage does not answer within this time fails with ETIMEDOUT instead of hanging the reader (default 120)', seconds)
    .action(wrap(async (ctx, first: string, second: string | undefined, o: { partitions?: boolean; allowOther?: boolean; writable?: string; readTimeout?: number }) => {
      const [uid, dir] = second === undefined ? [undefined, first] : [first, second];
      if (o.writable && o.partitions) throw new UsageError('-w and --partitions cannot be combined: attach the writable image with losetup yourself');
      const repo = await ctx.repository();
      const { serveMount } = await import('../../fuse/mount');
      await serveMount(repo, {
        dir, uid, partitions: !!o.partitions, allowOther: !!o.allowOther, writable: o.writable,
        readTimeoutMs: o.readTimeout === undefined ? undefined : o.readTimeout * 1000,
      });
    }));
};
