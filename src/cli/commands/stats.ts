import type { Register } from './index';
import { UsageError } from '../../util/errors';
import { parseFields, printRows } from '../output';

const FIELDS = ['date', 'uid', 'name', 'size bytes', 'size blocks', 'bytes read', 'blocks read', 'bytes written', 'blocks written',
  'bytes dedup', 'blocks dedup', 'bytes sparse', 'blocks sparse', 'duration (s)'];

export const register: Register = (program, wrap) => {
  program.command('stats [version_uid]')
    .description('statistics of backups')
    .option('-f, --fields <fields>', `fields, comma separated (available: ${FIELDS.join(',')})`, FIELDS.join(','))
    .option('-l, --limit <n>', 'only the last N')
    .action(wrap(async (ctx, uid: string | undefined, o: { fields: string; limit?: string }) => {
      const fields = parseFields(o.fields, FIELDS);
      let limit: number | undefined;
      if (o.limit !== undefined) {
        limit = Number(o.limit);
        if (!Number.isInteger(limit) || limit < 0) throw new UsageError(`-l expects a number, got "${o.limit}"`);
      }
      const repo = await ctx.repository();
      const rows = await repo.meta.listStats(uid, limit);
      printRows(ctx.output, fields, rows.map((s) => ({
        date: new Date(s.date), uid: s.versionUid, name: s.versionName, 'size bytes': s.versionSizeBytes,
        'size blocks': s.versionSizeBlocks, 'bytes read': s.bytesRead, 'blocks read': s.blocksRead,
        'bytes written': s.bytesWritten, 'blocks written': s.blocksWritten, 'bytes dedup': s.bytesDedup,
        'blocks dedup': s.blocksDedup, 'bytes sparse': s.bytesSparse, 'blocks sparse': s.blocksSparse,
        'duration (s)': Math.round(s.durationSeconds * 10) / 10,
      })), {
        sizeFields: ['size bytes', 'bytes read', 'bytes written', 'bytes dedup', 'bytes sparse'],
        right: FIELDS.filter((f) => f !== 'date' && f !== 'uid' && f !== 'name'),
      });
    }));
};
