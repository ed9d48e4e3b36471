import type { Config } from '../config/config';
import { createMetaStore } from '../meta/open';
import { HOLE, PENDING } from '../meta/block-map';
import { PACK_HOLE, PACK_PENDING, VersionObject } from '../meta/storage-format';
import { ImportBlob, ImportVersion, newBlobRef } from '../meta/types';
import type { RecordBlob } from '../meta/version-record';
import { createBlobStore } from '../storage/open';
import { BackyError, ConfigError, errorLine, StorageError, WrongKeyError } from '../util/errors';
import { JobRunner } from '../util/job-runner';
import { log } from '../util/log';
import { Progress } from '../util/progress';
import { randomUUID } from 'node:crypto';
import { kekSetting, keyCheckValue, LOCKS, Repository } from './repository';
import { initialSettings, MARKER_NAME, SETTING } from './repository-settings';
import { MetadataObjectError, RepositoryInfo, StorageMeta } from './storage-meta';

export interface RebuildResult {
  versions: number;
  blobs: number;
  /** records that could not be read (the rest was rebuilt) */
  unreadable: { uid: string; error: string }[];
}

/**
 * Recreates the database from storage alone: the repository object says how the repository was made (and
 * proves the key), each version's record becomes its rows again, blobs shared between versions are added once.
 * Blobs no version references stay in storage, unknown to the new database, for `cleanup --full`. Only an
 * empty database is filled; the records written back count as up to date.
 */
export async function rebuildDatabase(cfg: Config, opts: { quiet?: boolean } = {}): Promise<RebuildResult> {
  const info = await checkStorageSettings(cfg);
  const meta = createMetaStore(cfg.metaEngine);
  const store = createBlobStore(cfg);
  try {
    // The settings fixed when the repository was created, its id above all: its data directory's marker names it.
    const marker = await store.readMarker?.();
    let markerId: string | undefined;
    try {
      markerId = marker ? String((JSON.parse(marker) as { repository?: unknown }).repository ?? '') || undefined : undefined;
    } catch {
      markerId = undefined;
    }
    const settings = initialSettings(cfg, info?.repositoryId ?? markerId ?? randomUUID());
    if (marker !== undefined) settings[SETTING.dataMarker] = MARKER_NAME;
    if (!(await meta.initdb(settings))) {
      await meta.open();
      if (!(await meta.isEmpty())) {
        throw new BackyError(`database ${meta.description} is not empty: db-rebuild only fills an empty database (move this one away or point [MetaBackend] engine at a new one)`);
      }
    }
    // Keys an import brought in: the data keys of imported blobs are wrapped with them.
    for (const [id, hex] of await new StorageMeta(store, cfg.encryptionKey).keks()) await meta.setSettingIfAbsent(kekSetting(id), hex);
  } finally {
    await meta.close();
    await store.close();
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
export async function checkStorageSettings(cfg: Config): Promise<RepositoryInfo | undefined> {
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
      return undefined;
    }
    // A configuration without hash_function uses the repository's (as for an open repository).
    if (!cfg.hashFunctionConfigured) {
      cfg.hashFunction = info.hashFunction;
      cfg.hashFunctionConfigured = true;
    }
    if (info.hashFunction !== cfg.hashFunction) throw new ConfigError(`the repository in storage uses hash_function ${info.hashFunction}, the configuration says ${cfg.hashFunction}`);
    if (info.encryption !== cfg.encryption) throw new ConfigError(`the repository in storage uses encryption ${info.encryption}, the configuration says ${cfg.encryption}`);
    if (info.keyCheck && cfg.encryptionKey && info.keyCheck !== keyCheckValue(cfg.encryptionKey)) throw new WrongKeyError();
    return info;
  } finally {
    await store.close();
  }
}

async function rebuildInto(repo: Repository, opts: { quiet?: boolean }): Promise<RebuildResult> {
  const sm = repo.storageMeta;
  const uids: string[] = [];
  for await (const page of sm.versionUids()) uids.push(...page);
  log.info(`rebuilding the database from ${uids.length} version objects in ${repo.store.description}`);
  const result: RebuildResult = { versions: 0, blobs: 0, unreadable: [] };
  const packs = new PackCache(sm);
  const progress = new Progress('db-rebuild', uids.length, { quiet: opts.quiet });
  // Objects are fetched and opened several at a time; versions are added in batches, one transaction each
  // (blob rows are indexed by random uids and checksums: a transaction per version would rewrite the same
  // index pages again and again).
  const adder = new BatchAdder(repo, packs);
  const jobs = new JobRunner(Math.max(2, repo.cfg.data.simultaneousReads));
  for (const uid of uids) {
    await jobs.acquire();
    if (jobs.failed) {
      jobs.release();
      break;
    }
    jobs.start(async () => {
      let o: VersionObject | undefined;
      try {
        o = await sm.getVersion(uid);
        if (o && o.version.uid !== uid) throw new MetadataObjectError(`the object names version ${o.version.uid}`);
        if (o) await packs.load(o.packs);
      } catch (e) {
        if (!(e instanceof MetadataObjectError)) throw e;
        result.unreadable.push({ uid, error: errorLine(e) });
        return;
      }
      if (!o) return; // removed meanwhile
      await adder.add(o);
      result.versions++;
    }, () => progress.add(1));
  }
  await jobs.drain();
  if (!jobs.failed) await adder.flush();
  progress.finish();
  if (jobs.failed) throw jobs.failure;
  result.blobs = (await repo.meta.repositoryStats()).blobs;
  for (const u of result.unreadable) log.error(`version ${u.uid}: ${u.error}`);
  log.info(`db-rebuild: ${result.versions} versions and ${result.blobs} blobs back in ${repo.meta.description}` +
    (result.unreadable.length ? `; ${result.unreadable.length} version objects could not be read` : '') +
    '. Blobs no version uses are still in storage: "backy cleanup --full" removes them.');
  if (result.unreadable.length) throw new StorageError(`${result.unreadable.length} version objects could not be read (first: ${result.unreadable[0].uid}); the other versions were rebuilt`);
  return result;
}

/**
 * Blob packs read for a rebuild, with the database id of each entry once known: a block of a later version
 * referring to the same entry needs no lookup. Bounded; an evicted pack is read again if needed.
 */
class PackCache {
  private readonly packs = new Map<string, { blobs: RecordBlob[]; ids: Float64Array }>();
  private static readonly MAX = 4096;

  constructor(private readonly sm: StorageMeta) {}

  async load(names: string[]): Promise<void> {
    for (const name of names) {
      if (this.packs.has(name)) continue;
      const blobs = await this.sm.getPack(name);
      if (!blobs) throw new MetadataObjectError(`metadata pack ${name} is missing`);
      if (this.packs.size >= PackCache.MAX) this.packs.delete(this.packs.keys().next().value!);
      this.packs.set(name, { blobs, ids: new Float64Array(blobs.length) });
    }
  }

  async get(name: string): Promise<{ blobs: RecordBlob[]; ids: Float64Array }> {
    if (!this.packs.has(name)) await this.load([name]);
    return this.packs.get(name)!;
  }
}

/** Versions collected into batches: one importVersions call (one transaction) per batch, one at a time. */
class BatchAdder {
  private items: { v: ImportVersion; entries: Float64Array; opts: { blockDates?: Buffer; synced: boolean } }[] = [];
  private newBlobs: ImportBlob[] = [];
  private newAt = new Map<string, number>();
  private pending: { ids: Float64Array; index: number }[] = [];
  private committing = Promise.resolve();

  constructor(private readonly repo: Repository, private readonly packs: PackCache) {}

  async add(o: VersionObject): Promise<void> {
    const tables = await Promise.all(o.packs.map((name) => this.packs.get(name)));
    const entries = new Float64Array(o.packNo.length);
    for (let i = 0; i < entries.length; i++) {
      const p = o.packNo[i];
      if (p === PACK_HOLE) { entries[i] = HOLE; continue; }
      if (p === PACK_PENDING) { entries[i] = PENDING; continue; }
      const t = tables[p];
      const k = o.index[i];
      const id = t.ids[k];
      if (id > 0) { entries[i] = id; continue; }
      const key = `${o.packs[p]}:${k}`;
      let n = this.newAt.get(key);
      if (n === undefined) {
        const b = t.blobs[k];
        if (!b) throw new MetadataObjectError(`version ${o.version.uid}: block ${i} refers to entry ${k} of pack ${o.packs[p]}, which has ${t.blobs.length}`);
        n = this.newBlobs.length;
        this.newAt.set(key, n);
        this.newBlobs.push({ ...b, storedSize: 0, bad: false, metaPack: o.packs[p], metaIndex: k });
        this.pending.push({ ids: t.ids, index: k });
      }
      entries[i] = newBlobRef(n);
    }
    this.items.push({ v: o.version, entries, opts: { blockDates: o.blockDates, synced: true } });
    if (this.items.length >= 64 || this.newBlobs.length >= 20_000) await this.flush();
  }

  /** Adds the batch collected so far (after the batch before it). */
  flush(): Promise<void> {
    const items = this.items;
    const newBlobs = this.newBlobs;
    const pending = this.pending;
    this.items = [];
    this.newBlobs = [];
    this.newAt = new Map();
    this.pending = [];
    this.committing = this.committing.then(async () => {
      if (!items.length) return;
      const { newIds } = await this.repo.meta.importVersions(items, newBlobs);
      pending.forEach((x, n) => (x.ids[x.index] = newIds[n]));
    });
    return this.committing;
  }
}
