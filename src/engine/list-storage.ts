import type { Config } from '../config/config';
import type { ImportVersion } from '../meta/types';
import { createBlobStore } from '../storage/open';
import { errorLine } from '../util/errors';
import { JobRunner } from '../util/job-runner';
import { log } from '../util/log';
import { checkStorageSettings } from './db-rebuild';
import { MetadataObjectError, StorageMeta } from './storage-meta';

/**
 * The versions storage has records of, read without any database (`ls --from-storage`): what a db-rebuild
 * would bring back. Unreadable records are reported and left out.
 */
export async function listFromStorage(cfg: Config): Promise<{ versions: ImportVersion[]; unreadable: string[] }> {
  await checkStorageSettings(cfg);
  const store = createBlobStore(cfg);
  const sm = new StorageMeta(store, cfg.encryptionKey);
  const versions: ImportVersion[] = [];
  const unreadable: string[] = [];
  try {
    const jobs = new JobRunner(Math.max(2, cfg.data.simultaneousReads));
    for await (const page of sm.versionUids()) {
      for (const uid of page) {
        await jobs.acquire();
        if (jobs.failed) {
          jobs.release();
          break;
        }
        jobs.start(async () => {
          try {
            const rec = await sm.getVersion(uid);
            if (rec) versions.push(rec.version);
          } catch (e) {
            if (!(e instanceof MetadataObjectError)) throw e;
            log.error(errorLine(e));
            unreadable.push(uid);
          }
        });
      }
    }
    await jobs.drain();
    if (jobs.failed) throw jobs.failure;
  } finally {
    await store.close();
  }
  versions.sort((a, b) => a.date - b.date || (a.uid < b.uid ? -1 : 1));
  return { versions, unreadable };
}
