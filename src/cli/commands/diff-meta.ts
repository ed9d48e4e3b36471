import type { Register } from './index';
import { formatBytes } from '../../config/size';
import { printRows } from '../output';

export const register: Register = (program, wrap) => {
  program.command('diff-meta <version_uid1> <version_uid2>')
    .description('byte ranges in which two versions differ, from their block maps (no data is read)')
    .action(wrap(async (ctx, uid1: string, uid2: string) => {
      const { diffVersions } = await import('../../engine/lifecycle/diff');
      const repo = await ctx.repository();
      const a = await repo.version(uid1);
      const b = await repo.version(uid2);
      const d = await diffVersions(repo.meta, a, b);
      const mode = ctx.output;
      if (mode.json) {
        process.stdout.write(`${JSON.stringify({ ranges: d.ranges, differing_bytes: d.differingBytes, differing_blocks: d.differingBlocks, compared_bytes: d.comparedBytes }, null, 2)}\n`);
        return;
      }
      printRows(mode, ['offset', 'length'], d.ranges.map((r) => ({ offset: r.offset, length: r.length })), { sizeFields: ['length'], right: ['offset', 'length'] });
      if (!mode.machine) {
        const total = mode.human ? formatBytes(d.differingBytes) : `${d.differingBytes} bytes`;
        process.stdout.write(`total: ${total} differ in ${d.ranges.length} ranges (${d.differingBlocks} blocks of ${a.blockSize} bytes), of ${d.comparedBytes} bytes\n`);
      }
    }));
};
