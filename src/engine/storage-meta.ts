import { openObject, sealObject, SealedObjectError } from '../codec/sealed-object';
import { blockCount, chunkCount, HOLE, MAP_CHUNK, PENDING } from '../meta/block-map';
import { readChunkWithBlobs } from '../meta/map-reader';
import { BlobState, IMPORT_HOLE, IMPORT_PENDING, MetaStore, VersionRow } from '../meta/types';
import { decodeVersionRecord, encodeVersionRecord, RecordBlob, VersionRecord } from '../meta/version-record';
import type { BlobStore, StoredObject } from '../storage/types';
import { BackyError, BlobNotFoundError, StorageError } from '../util/errors';
import { JobRunner } from '../util/job-runner';
import { log } from '../util/log';
import { lockInfo } from '../util/process-info';

/**
 * The database's knowledge, kept in storage too, so that losing the database loses nothing: one sealed object
 * per finished version (its VersionRecord) under meta/versions/<uid>, and one object with the settings fixed
 * when the repository was created under meta/repository. `db-rebuild` recreates the database from them.
 *
 * Keeping them current needs no help from the commands: database triggers bump a version's generation
 * whenever anything its record holds changes (tags, expiry, protection, validity, completion) and remember
 * the uids of removed versions; `syncStorageMeta` (run when a repository closes, i.e. after every command, and
 * by scrub) writes what is stale and deletes what was removed. A crash in between leaves the version stale,
 * and the next command catches up.
 */
export const VERSIONS_PREFIX = 'meta/versions/';
export const REPOSITORY_KEY = 'meta/repository';
const SYNCED_SETTING = 'storage_repository_object';
const SYNC_LOCK = 'storage-meta-sync';

export function versionObjectKey(uid: string): string {
  if (!/^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$/.test(uid)) throw new BackyError(`version uid ${JSON.stringify(uid.slice(0, 100))} cannot name a storage object`);
  return VERSIONS_PREFIX + uid;
}

/** The settings a repository is created with; what db-rebuild needs before it reads any version. */
export interface RepositoryInfo {
  hashFunction: string;
  blockSize: number;
  encryption: 'aes-256-gcm' | 'none';
  /** keyCheckValue of the key (encrypted repositories) */
  keyCheck?: string;
  created: number;
}

export class MetadataObjectError extends StorageError {}

/** Reading and writing the metadata objects of one repository. */
export class StorageMeta {
  constructor(private readonly store: BlobStore, private readonly key: Buffer | undefined) {}

  async putVersion(r: VersionRecord): Promise<void> {
    const name = versionObjectKey(r.version.uid);
    await this.store.put(name, sealObject(name, encodeVersionRecord(r), this.key));
  }

  /** The stored record, undefined when there is none; MetadataObjectError when it cannot be read. */
  async getVersion(uid: string): Promise<VersionRecord | undefined> {
    const name = versionObjectKey(uid);
    const raw = await this.getRaw(name);
    if (!raw) return undefined;
    try {
      return decodeVersionRecord(openObject(name, raw, this.key));
    } catch (e) {
      throw new MetadataObjectError(`metadata object ${name} is unreadable: ${(e as Error).message}`);
    }
  }

  async deleteVersion(uid: string): Promise<void> {
    await this.store.delete([versionObjectKey(uid)]);
  }

  /** Uids of the versions storage has records of, page by page. */
  async *versionUids(): AsyncIterable<string[]> {
    for await (const page of this.store.listUnder(VERSIONS_PREFIX) as AsyncIterable<StoredObject[]>) {
      yield page.map((o) => o.key.slice(VERSIONS_PREFIX.length)).filter((u) => /^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$/.test(u));
    }
  }

  async putRepository(info: RepositoryInfo): Promise<void> {
    await this.store.put(REPOSITORY_KEY, sealObject(REPOSITORY_KEY, Buffer.from(JSON.stringify({ format: 1, ...info })), this.key));
  }

  async getRepository(): Promise<RepositoryInfo | undefined> {
    const raw = await this.getRaw(REPOSITORY_KEY);
    if (!raw) return undefined;
    let text: Buffer;
    try {
      text = openObject(REPOSITORY_KEY, raw, this.key);
    } catch (e) {
      throw new MetadataObjectError(`${REPOSITORY_KEY} is unreadable: ${(e as SealedObjectError).message}`);
    }
    const o = JSON.parse(text.toString()) as RepositoryInfo & { format: number };
    if (o.format !== 1) throw new MetadataObjectError(`${REPOSITORY_KEY} has an unknown format ${o.format}`);
    return o;
  }

  private async getRaw(name: string): Promise<Buffer | undefined> {
    try {
      return await this.store.get(name);
    } catch (e) {
      if (e instanceof BlobNotFoundError) return undefined;
      throw e;
    }
  }
}

/**
 * The record of a version as the database holds it (blobs in order of first use, so equal states encode
 * equally). `states`, when given, receives each blob's state.
 */
export async function recordFromDb(meta: MetaStore, v: VersionRow, states?: BlobState[]): Promise<VersionRecord> {
  const blocks = blockCount(v.size, v.blockSize);
  const map = new Int32Array(blocks);
  const index = new Map<number, number>();
  const blobs: RecordBlob[] = [];
  for (let c = 0; c < chunkCount(blocks); c++) {
    const { entries, refs } = await readChunkWithBlobs(meta, v, c);
    for (let k = 0; k < entries.length; k++) {
      const e = entries[k];
      const i = c * MAP_CHUNK + k;
      if (e === HOLE) map[i] = IMPORT_HOLE;
      else if (e === PENDING) map[i] = IMPORT_PENDING;
      else {
        let at = index.get(e);
        if (at === undefined) {
          const ref = refs.get(e);
          if (!ref) throw new BackyError(`block ${i} of version ${v.uid} refers to blob ${e}, which is not in the database`);
          at = blobs.length;
          index.set(e, at);
          blobs.push({ uid: ref.uid, checksum: ref.checksum, size: ref.size, format: ref.format, keyInfo: ref.keyInfo });
          states?.push(ref.state);
        }
        map[i] = at;
      }
    }
  }
  return {
    version: {
      uid: v.uid, name: v.name, snapshotName: v.snapshotName, date: v.date, size: v.size, blockSize: v.blockSize, expire: v.expire,
      baseUid: v.baseUid, tags: v.tags, valid: v.valid, complete: v.complete, protected: v.protected,
    },
    blobs, map, blockDates: await meta.getBlockDates(v.id),
  };
}

export interface SyncContext {
  meta: MetaStore;
  storageMeta: StorageMeta;
  repositoryInfo(): RepositoryInfo;
}

/**
 * Writes the records of stale versions and deletes those of removed ones (and the repository object, once).
 * One process at a time (a lock); another one syncing now will see our changes or leave them stale for the
 * next command, never marked as written. Returns what it did.
 */
export async function syncStorageMeta(ctx: SyncContext): Promise<{ written: number; removed: number }> {
  const { meta, storageMeta } = ctx;
  const done = { written: 0, removed: 0 };
  const hasRepoObject = !!(await meta.getSetting(SYNCED_SETTING));
  if (hasRepoObject && !(await meta.staleStorageMeta(1)).length && !(await meta.removedStorageMeta(1)).length) return done;
  const info = lockInfo('metadata sync');
  if (await meta.tryLock(SYNC_LOCK, info)) return done; // someone else is at it
  try {
    if (!hasRepoObject) {
      await storageMeta.putRepository(ctx.repositoryInfo());
      await meta.setSettingIfAbsent(SYNCED_SETTING, String(Date.now()));
    }
    for (;;) {
      const uids = await meta.removedStorageMeta(1000);
      if (!uids.length) break;
      for (const uid of uids) {
        if (await meta.getVersion(uid)) continue; // added again since (an import): the object is the new one's
        await storageMeta.deleteVersion(uid);
        done.removed++;
      }
      await meta.forgetRemovedStorageMeta(uids);
    }
    let announced = false;
    for (;;) {
      const stale = await meta.staleStorageMeta(256);
      if (!stale.length) break;
      if (!announced && stale.length > 20) {
        log.info('writing the metadata of versions to storage (once after an upgrade; later only what changes)');
        announced = true;
      }
      const jobs = new JobRunner(8);
      for (const s of stale) {
        await jobs.acquire();
        if (jobs.failed) {
          jobs.release();
          break;
        }
        jobs.start(async () => {
          const v = await meta.getVersion(s.uid);
          if (!v?.complete) return;
          await storageMeta.putVersion(await recordFromDb(meta, v));
          await meta.markStorageMetaSynced(s.uid, s.metaGen);
          done.written++;
        }, () => undefined);
      }
      await jobs.drain();
      if (jobs.failed) throw jobs.failure;
    }
  } finally {
    await meta.unlock(SYNC_LOCK, info.session);
  }
  return done;
}

/** Whether storage holds the record of `v` as the database has it; repairs it when not. A line per problem. */
export async function checkStoredRecord(ctx: SyncContext, v: VersionRow): Promise<string | undefined> {
  const want = await recordFromDb(ctx.meta, v);
  let problem: string | undefined;
  try {
    const got = await ctx.storageMeta.getVersion(v.uid);
    if (!got) problem = `the metadata object of version ${v.uid} is missing from storage`;
    else if (!encodeVersionRecord(got).equals(encodeVersionRecord(want))) problem = `the metadata object of version ${v.uid} in storage differs from the database`;
  } catch (e) {
    if (!(e instanceof MetadataObjectError)) throw e;
    problem = e.message;
  }
  if (problem) {
    await ctx.storageMeta.putVersion(want);
    problem += ' (rewritten from the database)';
  }
  return problem;
}
