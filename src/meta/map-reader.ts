import { blockCount, chunkLength } from './block-map';
import type { BlobRef, MetaStore, VersionRow } from './types';

export interface ChunkWithBlobs {
  entries: Float64Array;
  /** the blobs the chunk's entries refer to, by id */
  refs: Map<number, BlobRef>;
}

/** One chunk of a version's block map with the blobs it refers to (two queries, whatever the chunk holds). */
export async function readChunkWithBlobs(meta: MetaStore, v: VersionRow, chunkNo: number): Promise<ChunkWithBlobs> {
  const entries = await meta.readMapChunk(v.id, chunkNo);
  if (entries.length !== chunkLength(blockCount(v.size, v.blockSize), chunkNo)) {
    throw new Error(`block map chunk ${chunkNo} of version ${v.uid} has the wrong length`);
  }
  const ids: number[] = [];
  for (let i = 0; i < entries.length; i++) if (entries[i] > 0) ids.push(entries[i]);
  return { entries, refs: await meta.getBlobs(ids) };
}
