import type { Register } from './index';
import { parseFields, printRows } from '../output';

const FIELDS = ['name', 'base_uid', 'base_name', 'size_bytes', 'changed_bytes', 'disk_bytes', 'created', 'in_use'];

export const register: Register = (program, wrap) => {
  const overlay = program.command('overlay')
    .description('copy-on-write overlays of writable exports and mounts (kept in overlay_dir until removed)');

  overlay.command('ls')
    .description('list overlays: their base version, bytes changed (as of their last flush), space used, and who uses them')
    .option('-f, --fields <fields>', `fields, comma separated (available: ${FIELDS.join(',')})`, FIELDS.join(','))
    .action(wrap(async (ctx, o: { fields: string }) => {
      const fields = parseFields(o.fields, FIELDS);
      const { listOverlays, overlayChangedBytes, overlayDiskUsage, overlayUser } = await import('../../engine/overlays');
      const repo = await ctx.repository();
      const rows = [];
      for (const info of await listOverlays(repo)) {
        rows.push({
          name: info.name, base_uid: info.base, base_name: info.baseName, size_bytes: info.size,
          changed_bytes: await overlayChangedBytes(repo, info), disk_bytes: await overlayDiskUsage(repo, info.name),
          created: new Date(info.created), in_use: (await overlayUser(repo, info.name)) ?? '',
        });
      }
      printRows(ctx.output, fields, rows, { sizeFields: ['size_bytes', 'changed_bytes', 'disk_bytes'], right: ['size_bytes', 'changed_bytes', 'disk_bytes'] });
    }));

  overlay.command('rm <name...>')
    .description('remove overlays and what was written into them (refused while one is in use)')
    .action(wrap(async (ctx, names: string[]) => {
      const { Overlay } = await import('../../engine/overlays');
      const { log } = await import('../../util/log');
      const repo = await ctx.repository();
      for (const name of names) {
        await Overlay.remove(repo, name);
        log.info(`removed overlay ${name}`);
      }
    }));
};
