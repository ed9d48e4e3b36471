import type { Register } from './index';
import { blockCount } from '../../meta/block-map';
import { ExitCode } from '../../util/errors';
import { parseFields, printRows } from '../output';
import { now as clock } from '../../util/clock';

const FIELDS = ['date', 'name', 'snapshot_name', 'size', 'size_bytes', 'uid', 'valid', 'protected', 'tags', 'expire'];

interface Listed {
  uid: string; name: string; snapshotName: string; date: number; size: number; blockSize: number;
  valid: boolean; protected: boolean; tags: string[]; expire: number | null;
}

export const register: Register = (program, wrap) => {
  program.command('ls [name]')
    .description('list versions (of NAME)')
    .option('-s, --snapshot-name <name>', 'only this snapshot name')
    .option('-t, --tag <tag>', 'only versions with this tag')
    .option('-e, --expired', 'only expired versions')
    .option('-f, --fields <fields>', `fields, comma separated (available: ${FIELDS.join(',')})`, FIELDS.join(','))
    .option('--from-storage', 'list the version records in storage instead of the database (works without a database)')
    .action(wrap(async (ctx, name: string | undefined, o: { snapshotName?: string; tag?: string; expired?: boolean; fields: string; fromStorage?: boolean }) => {
      const fields = parseFields(o.fields, FIELDS);
      let all: Listed[];
      let unreadable = 0;
      if (o.fromStorage) {
        const { listFromStorage } = await import('../../engine/list-storage');
        const r = await listFromStorage(ctx.config());
        all = r.versions;
        unreadable = r.unreadable.length;
      } else {
        const repo = await ctx.repository();
        all = await repo.meta.listVersions();
      }
      const now = clock();
      const versions = all.filter((v) =>
        (!name || v.name === name) && (o.snapshotName === undefined || v.snapshotName === o.snapshotName) &&
        (!o.tag || v.tags.includes(o.tag)) && (!o.expired || (v.expire !== null && v.expire < now)));
      printRows(ctx.output, fields, versions.map((v) => ({
        date: new Date(v.date), name: v.name, snapshot_name: v.snapshotName, size: blockCount(v.size, v.blockSize),
        size_bytes: v.size, uid: v.uid, valid: v.valid, protected: v.protected, tags: v.tags.join(','),
        expire: v.expire === null ? '' : new Date(v.expire),
      })), { sizeFields: ['size_bytes'], right: ['size', 'size_bytes'] });
      return unreadable ? ExitCode.STORAGE : ExitCode.OK;
    }));
};
