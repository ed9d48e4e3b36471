import type { Config } from '../config/config';
import { createMetaStore } from '../meta/open';
import type { ImportBlob } from '../meta/types';
import type { VersionRecord } from '../meta/version-record';
import { createBlobStore } from '../storage/open';
import { BackyError, ConfigError, errorLine, StorageError, WrongKeyError } from '../util/errors';
import { JobRunner } from '../util/job-runner';
import { log } from '../util/log';
import { Progress } from '../util/progress';
import { keyCheckValue, LOCKS, Repository } from './repository';
import { MetadataObjectError, RepositoryInfo, StorageMeta } from './storage-meta';

export interface RebuildResult {
  versions: number;
  blobs: number;
  /** records that could not be read (the rest was rebuilt) */
  unreadable: { uid: string; error: string }[];
}

/** Blob ids remembered across versions (most blobs are shared): bounded, older entries are looked up again. */
const ID_CACHE = 4_000_000;

/**
 * Recreates the database from storage alone: the repository object says how the repository was made (and
 * proves the key), each version's record becomes its rows again, blobs shared between versions are added once.
 * Blobs no version references stay in storage, unknown to the new database, for `cleanup --full`. Only an
 * empty database is filled; the records written back count as up to date.
 */
export async function rebuildDatabase(cfg: Config, opts: { quiet?: boolean } = {}): Promise<RebuildResult> {
  await checkStorageSettings(cfg);
  const meta = createMetaStore(cfg.metaEngine);
  try {
    if (!(await meta.initdb())) {
      await meta.open();
      if (!(await meta.isEmpty())) {
        throw new BackyError(`database ${meta.description} is not empty: db-rebuild only fills an empty database (move this one away or point [MetaBackend] engine at a new one)`);
      }
    }
  } finally {
    await meta.close();
  }
  const repo = await Repository.open(cfg);
  try {
    await repo.lock('db-rebuild', 'db-rebuild', [LOCKS.anyBackup, LOCKS.cleanup, LOCKS.fullCleanup, 'version:*']);
    return await rebuildInto(repo, opts);
  } finally {
    await repo.close();
  }
}

/** Refuses a configuration that disagrees with the repository object in storage (hash, encryption, key). */
export async function checkStorageSettings(cfg: Config): Promise<void> {
  const store = createBlobStore(cfg);
  try {
    await store.check();
    let info: RepositoryInfo | undefined;
    try {
      info = await new StorageMeta(store, cfg.encryptionKey).getRepository();
    } catch (e) {
      if (e instanceof MetadataObjectError && cfg.encryptionKey) throw new WrongKeyError(`the encryption key does not open the repository object in storage (${e.message})`);
      throw e;
    }
    if (!info) {
      log.warn('storage holds no repository object (a repository never used after its initdb?): using the configuration\'s settings');
      return;
    }
    if (info.hashFunction !== cfg.hashFunction) throw new ConfigError(`the repository in storage uses hash_function ${info.hashFunction}, the configuration says ${cfg.hashFunction}`);
    if (info.encryption !== cfg.encryption) throw new ConfigError(`the repository in storage uses encryption ${info.encryption}, the configuration says ${cfg.encryption}`);
    if (info.keyCheck && cfg.encryptionKey && info.keyCheck !== keyCheckValue(cfg.encryptionKey)) throw new WrongKeyError();
  } finally {
    await store.close();
  }
}

async function rebuildInto(repo: Repository, opts: { quiet?: boolean }): Promise<RebuildResult> {
  const sm = repo.storageMeta;
  const uids: string[] = [];
  for await (const page of sm.versionUids()) uids.push(...page);
  log.info(`rebuilding the database from ${uids.length} version records in ${repo.store.description}`);
  const result: RebuildResult = { versions: 0, blobs: 0, unreadable: [] };
  const ids = new Map<string, number>();
  const progress = new Progress('db-rebuild', uids.length, { quiet: opts.quiet });
  // Records are fetched and opened several at a time; rows are added one version at a time, in the order the
  // records arrive (each version is one transaction).
  const jobs = new JobRunner(Math.max(2, repo.cfg.data.simultaneousReads));
  let inserting = Promise.resolve();
  for (const uid of uids) {
    await jobs.acquire();
    if (jobs.failed) {
      jobs.release();
      break;
    }
    jobs.start(async () => {
      let rec: VersionRecord | undefined;
      try {
        rec = await sm.getVersion(uid);
      } catch (e) {
        if (!(e instanceof MetadataObjectError)) throw e;
        result.unreadable.push({ uid, error: errorLine(e) });
        return;
      }
      if (!rec) return; // removed meanwhile
      if (rec.version.uid !== uid) {
        result.unreadable.push({ uid, error: `the record names version ${rec.version.uid}` });
        return;
      }
      const r = rec;
      inserting = inserting.then(() => addVersion(repo, r, ids, result));
      await inserting;
    }, () => progress.add(1));
  }
  await jobs.drain();
  progress.finish();
  if (jobs.failed) throw jobs.failure;
  result.blobs = (await repo.meta.repositoryStats()).blobs;
  for (const u of result.unreadable) log.error(`version ${u.uid}: ${u.error}`);
  log.info(`db-rebuild: ${result.versions} versions and ${result.blobs} blobs back in ${repo.meta.description}` +
    (result.unreadable.length ? `; ${result.unreadable.length} records could not be read` : '') +
    '. Blobs no version uses are still in storage: "backy cleanup --full" removes them.');
  if (result.unreadable.length) throw new StorageError(`${result.unreadable.length} version records could not be read (first: ${result.unreadable[0].uid}); the other versions were rebuilt`);
  return result;
}

async function addVersion(repo: Repository, rec: VersionRecord, ids: Map<string, number>, result: RebuildResult): Promise<void> {
  const blobs: ImportBlob[] = rec.blobs.map((b) => ({ ...b, storedSize: 0, bad: false, id: ids.get(b.uid) }));
  const { blobIds } = await repo.meta.importVersion(rec.version, blobs, rec.map, { blockDates: rec.blockDates, synced: true });
  if (ids.size > ID_CACHE) ids.clear();
  blobs.forEach((b, k) => ids.set(b.uid, blobIds[k]));
  result.versions++;
}
