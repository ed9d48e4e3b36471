import type { Register } from './index';
import { formatBytes } from '../../config/size';
import type { RepositoryUsage, VersionUsage } from '../../engine/lifecycle/usage';
import { NotFoundError } from '../../util/errors';
import { OutputMode, parseFields, printObject, printRows, Value } from '../output';

const BACKY2_FIELDS = ['Real', 'Null', 'Dedup Own', 'Dedup Others', 'Individual', 'Est. Space', 'Est. Space freed'];
const SIZE_FIELDS = [...BACKY2_FIELDS, 'Est. Stored', 'Stored freed'];
const FIELDS = ['uid', 'name', 'date', ...SIZE_FIELDS];
/** backy2's columns first (scripts read them by position), then what storage frees, then which version. */
const DEFAULT_FIELDS = [...BACKY2_FIELDS, 'Stored freed', 'uid', 'name'];

function row(u: VersionUsage): Record<string, Value> {
  return {
    uid: u.version.uid, name: u.version.name, date: new Date(u.version.date), Real: u.real, Null: u.null, 'Dedup Own': u.dedupOwn,
    'Dedup Others': u.dedupOthers, Individual: u.individual, 'Est. Space': u.estSpace, 'Est. Space freed': u.estSpaceFreed,
    'Est. Stored': u.estStored, 'Stored freed': u.storedFreed,
  };
}

function totalsObject(t: RepositoryUsage, mode: OutputMode): Record<string, Value> {
  const bytes = (n: number) => (mode.human && !mode.json ? formatBytes(n) : n);
  const ratio = (x: number) => Math.round(x * 100) / 100;
  return {
    versions: t.versions, blobs: t.blobs, 'stored bytes': bytes(t.storedBytes), 'plain bytes': bytes(t.plainBytes),
    'logical bytes': bytes(t.logicalBytes), 'sparse bytes': bytes(t.sparseBytes), 'dedup ratio': ratio(t.dedupRatio),
    'compression ratio': ratio(t.compressionRatio), 'unreferenced blobs': t.unreferencedBlobs,
    'unreferenced stored bytes': bytes(t.unreferencedStoredBytes),
  };
}

export const register: Register = (program, wrap) => {
  program.command('du [version_uid]')
    .description('space per version (backy2\'s columns, from the block maps) and repository totals; "Stored freed" is what rm + cleanup frees')
    .option('-f, --fields <fields>', `fields, comma separated (available: ${FIELDS.join(',')})`, DEFAULT_FIELDS.join(','))
    .option('--totals', 'only the repository totals')
    .action(wrap(async (ctx, uid: string | undefined, o: { fields: string; totals?: boolean }) => {
      const { computeUsage } = await import('../../engine/lifecycle/usage');
      const fields = parseFields(o.fields, FIELDS);
      const repo = await ctx.repository();
      // Both reads at once (PostgreSQL runs them on connections of their own).
      const [versions, usage] = await Promise.all([repo.meta.listVersions(), repo.meta.mapUsage()]);
      if (uid !== undefined && !versions.some((v) => v.uid === uid)) throw new NotFoundError(`version ${uid} does not exist`);
      const { rows, totals } = computeUsage(versions, usage);
      const shown = rows.filter((r) => uid === undefined || r.version.uid === uid).map(row);
      const mode = ctx.output;
      if (o.totals) {
        printObject(mode, totalsObject(totals, mode));
      } else if (mode.json) {
        const pick = (r: Record<string, Value>) => Object.fromEntries(fields.map((f) => [f, r[f] instanceof Date ? (r[f] as Date).toISOString() : r[f]]));
        process.stdout.write(`${JSON.stringify({ versions: shown.map(pick), totals: totalsObject(totals, mode) }, null, 2)}\n`);
      } else {
        printRows(mode, fields, shown, { sizeFields: SIZE_FIELDS, right: SIZE_FIELDS });
        if (!mode.machine) {
          process.stdout.write('\n');
          printObject(mode, totalsObject(totals, mode));
        }
      }
    }));
};
