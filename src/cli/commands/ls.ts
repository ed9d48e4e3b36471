import type { Register } from './index';
import { blockCount } from '../../meta/block-map';
import { parseFields, printRows } from '../output';
import { now as clock } from '../../util/clock';

const FIELDS = ['date', 'name', 'snapshot_name', 'size', 'size_bytes', 'uid', 'valid', 'protected', 'tags', 'expire'];

export const register: Register = (program, wrap) => {
  program.command('ls [name]')
    .description('list versions (of NAME)')
    .option('-s, --snapshot-name <name>', 'only this snapshot name')
    .option('-t, --tag <tag>', 'only versions with this tag')
    .option('-e, --expired', 'only expired versions')
    .option('-f, --fields <fields>', `fields, comma separated (available: ${FIELDS.join(',')})`, FIELDS.join(','))
    .action(wrap(async (ctx, name: string | undefined, o: { snapshotName?: string; tag?: string; expired?: boolean; fields: string }) => {
      const fields = parseFields(o.fields, FIELDS);
      const repo = await ctx.repository();
      const now = clock();
      const versions = (await repo.meta.listVersions()).filter((v) =>
        (!name || v.name === name) && (o.snapshotName === undefined || v.snapshotName === o.snapshotName) &&
        (!o.tag || v.tags.includes(o.tag)) && (!o.expired || (v.expire !== null && v.expire < now)));
      printRows(ctx.output, fields, versions.map((v) => ({
        date: new Date(v.date), name: v.name, snapshot_name: v.snapshotName, size: blockCount(v.size, v.blockSize),
        size_bytes: v.size, uid: v.uid, valid: v.valid, protected: v.protected, tags: v.tags.join(','),
        expire: v.expire === null ? '' : new Date(v.expire),
      })), { sizeFields: ['size_bytes'], right: ['size', 'size_bytes'] });
    }));
};
