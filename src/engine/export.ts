import { dumpLines, fitsBacky2 } from '../backy2/dump';
import { BlobState } from '../meta/types';
import type { Repository } from './repository';
import { recordFromDb } from './storage-meta';

/**
 * `export UID FILE`: one version's metadata as a dump: backy2's format (2.12) when backy2 could read every
 * blob of it (imported versions: byte for byte what backy2 exported), backy's own otherwise. `write` takes
 * the text a chunk at a time. Returns the format written.
 */
export async function exportVersion(repo: Repository, uid: string, write: (text: string) => Promise<void>): Promise<'backy2' | 'backy'> {
  const v = await repo.version(uid);
  const { record, refs } = await recordFromDb(repo.meta, v);
  for (const chunk of dumpLines(record, (k) => refs[k].state === BlobState.Bad)) await write(chunk);
  return fitsBacky2(record) ? 'backy2' : 'backy';
}
