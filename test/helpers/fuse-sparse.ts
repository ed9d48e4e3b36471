import { randomUUID } from 'node:crypto';
import { loadConfig } from '../../src/config/config';
import { Repository } from '../../src/engine/repository';
import { blockCount, MAP_CHUNK } from '../../src/meta/block-map';
import type { BlockEntry } from '../../src/meta/types';
import { sessionId } from '../../src/util/process-info';

/**
 * A huge, mostly-hole version without reading terabytes of zeroes: backing up a `truncate -s 1T` file reads
 * every hole (about 1 GB/s here, 20 minutes for 1 TiB), so the version is assembled through the MetaStore
 * exactly as a backup records it: a new version, hole entries for every block, and data entries that
 * reuse the (already stored) blobs of a real backup `seedUid`, placed at `dataBlocks`.
 * Returns the new uid; block `dataBlocks[k]` holds the seed's block `k % seedBlocks`.
 */
export async function assembleSparseVersion(cfgFile: string, seedUid: string, size: number, name: string, dataBlocks: number[]): Promise<string> {
  const repo = await Repository.open(loadConfig(cfgFile));
  try {
    const seed = await repo.version(seedUid);
    const seedMap = await repo.meta.readMapChunk(seed.id, 0);
    const refs = await repo.meta.getBlobs([...seedMap].filter((e) => e > 0));
    const seedBlocks = [...seedMap].map((e) => refs.get(e)!);
    const v = await repo.meta.createVersion({
      uid: randomUUID(), name, snapshotName: '', date: Date.now(), size, blockSize: seed.blockSize, expire: null, baseUid: null, tags: [],
    });
    const data = new Map(dataBlocks.map((b, k) => [b, seedBlocks[k % seedBlocks.length]]));
    const session = sessionId();
    const blocks = blockCount(size, seed.blockSize);
    for (let start = 0; start < blocks; start += 8 * MAP_CHUNK) {
      const batch: BlockEntry[] = [];
      for (let i = start; i < Math.min(blocks, start + 8 * MAP_CHUNK); i++) {
        const ref = data.get(i);
        batch.push(ref ? { index: i, checksum: ref.checksum, size: ref.size } : { index: i, zero: true });
      }
      const resolved = await repo.meta.recordBlocks(v.id, session, batch);
      if (resolved.some((r) => r.upload)) throw new Error('a seed blob was not found in the repository');
    }
    await repo.meta.updateVersion(v.id, { complete: true, valid: true });
    return v.uid;
  } finally {
    await repo.close();
  }
}
