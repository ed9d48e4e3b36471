import { blockCount, chunkCount, MAP_CHUNK, PENDING } from '../../meta/block-map';
import type { MetaStore, VersionRow } from '../../meta/types';
import { BackyError } from '../../util/errors';

export interface DiffRange {
  offset: number;
  length: number;
}

export interface MetaDiff {
  ranges: DiffRange[];
  /** bytes in the ranges */
  differingBytes: number;
  /** bytes compared: the larger of the two sizes */
  comparedBytes: number;
  differingBlocks: number;
}

/**
 * Which byte ranges of two versions differ, from their block maps alone (no data is read): a block is equal
 * when both maps name the same blob or both a hole. Blocks only one version has (different sizes) and blocks
 * still pending in an incomplete version count as different. Adjacent differing blocks form one range.
 */
export async function diffVersions(meta: MetaStore, a: VersionRow, b: VersionRow): Promise<MetaDiff> {
  if (a.blockSize !== b.blockSize) {
    throw new BackyError(`versions ${a.uid} and ${b.uid} have different block sizes (${a.blockSize}, ${b.blockSize}): their maps cannot be compared`);
  }
  const bs = a.blockSize;
  const blocksA = blockCount(a.size, bs);
  const blocksB = blockCount(b.size, bs);
  const size = Math.max(a.size, b.size);
  const blocks = Math.max(blocksA, blocksB);
  // The shorter version's last block, when partial, is shorter than the same block of the longer one.
  const shorter = Math.min(a.size, b.size);
  const partial = a.size !== b.size && shorter % bs !== 0 ? Math.floor(shorter / bs) : -1;
  const ranges: DiffRange[] = [];
  let differingBlocks = 0;
  let open: DiffRange | undefined;
  for (let c = 0; c < chunkCount(blocks); c++) {
    const ea = c < chunkCount(blocksA) ? await meta.readMapChunk(a.id, c) : undefined;
    const eb = c < chunkCount(blocksB) ? await meta.readMapChunk(b.id, c) : undefined;
    const end = Math.min(MAP_CHUNK, blocks - c * MAP_CHUNK);
    for (let k = 0; k < end; k++) {
      const i = c * MAP_CHUNK + k;
      const x = ea && k < ea.length ? ea[k] : undefined;
      const y = eb && k < eb.length ? eb[k] : undefined;
      const same = x !== undefined && x === y && x !== PENDING && i !== partial;
      if (same) {
        open = undefined;
        continue;
      }
      differingBlocks++;
      const length = Math.min(bs, size - i * bs);
      if (open) open.length += length;
      else ranges.push((open = { offset: i * bs, length }));
    }
  }
  return { ranges, differingBytes: ranges.reduce((s, r) => s + r.length, 0), comparedBytes: size, differingBlocks };
}
