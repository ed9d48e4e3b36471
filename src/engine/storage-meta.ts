import { randomBytes } from 'node:crypto';
import { openObject, sealObject, SealedObjectError } from '../codec/sealed-object';
import { blockCount, chunkCount, HOLE, MAP_CHUNK, PENDING } from '../meta/block-map';
import { readChunkWithBlobs } from '../meta/map-reader';
import { decodePack, decodeVersionObject, encodePack, encodeVersionObject, PACK_HOLE, PACK_PENDING, StorageFormatError, VersionObject } from '../meta/storage-format';
import { BlobRef, IMPORT_HOLE, IMPORT_PENDING, MetaStore, VersionRow } from '../meta/types';
import type { RecordBlob, VersionRecord } from '../meta/version-record';
import type { BlobStore, StoredObject } from '../storage/types';
import { BackyError, BlobNotFoundError, errorLine, StorageError } from '../util/errors';
import { JobRunner } from '../util/job-runner';
import { log } from '../util/log';
import { lockInfo } from '../util/process-info';

/**
 * The database's knowledge, kept in storage too, so that losing the database loses nothing: per finished
 * version an object under meta/versions/<uid> (its row, tags and block map), the details of the blobs they
 * use in packs under meta/blobs/<name> (storage-format.ts says why they are apart), and the settings fixed
 * when the repository was created under meta/repository. `db-rebuild` recreates the database from them.
 *
 * Keeping them current needs no help from the commands: database triggers bump a version's generation
 * whenever anything its object holds changes (tags, expiry, protection, validity, completion) and remember
 * the uids of removed versions; `syncStorageMeta` (run when a repository closes, i.e. after every command, and
 * by scrub) writes what is stale and deletes what was removed. A crash in between leaves the version stale,
 * and the next command catches up. Packs go when cleanup has forgotten every blob in them.
 */
export const VERSIONS_PREFIX = 'meta/versions/';
export const PACKS_PREFIX = 'meta/blobs/';
export const REPOSITORY_KEY = 'meta/repository';
/** Imported key-encryption keys (backy2's), wrapped with the repository key, by id. */
export const KEKS_PREFIX = 'meta/keys/';
const SYNCED_SETTING = 'storage_repository_object';
/** Held while metadata objects are written (and by cleanup --full while it removes unused packs). */
export const SYNC_LOCK = 'storage-meta-sync';
/** Blobs per pack: bounds what a rebuild keeps in memory per pack. */
const PACK_MAX = 65_536;
const UID_PATTERN = /^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$/;

export function versionObjectKey(uid: string): string {
  if (!UID_PATTERN.test(uid)) throw new BackyError(`version uid ${JSON.stringify(uid.slice(0, 100))} cannot name a storage object`);
  return VERSIONS_PREFIX + uid;
}

export function packKey(name: string): string {
  if (!/^[0-9a-f]{32}$/.test(name)) throw new BackyError(`invalid metadata pack name ${JSON.stringify(name.slice(0, 40))}`);
  return PACKS_PREFIX + name;
}

export function newPackName(): string {
  return randomBytes(16).toString('hex');
}

/** The settings a repository is created with; what db-rebuild needs before it reads any version. */
export interface RepositoryInfo {
  hashFunction: string;
  blockSize: number;
  encryption: 'aes-256-gcm' | 'none';
  /** keyCheckValue of the key (encrypted repositories) */
  keyCheck?: string;
  created: number;
  /** the repository's id (its data directory's marker names it) */
  repositoryId?: string;
}

export class MetadataObjectError extends StorageError {}

/** Reading and writing the metadata objects of one repository. */
export class StorageMeta {
  constructor(private readonly store: BlobStore, private readonly key: Buffer | undefined) {}

  async putVersion(o: VersionObject): Promise<void> {
    await this.put(versionObjectKey(o.version.uid), encodeVersionObject(o));
  }

  /** The stored object, undefined when there is none; MetadataObjectError when it cannot be read. */
  async getVersion(uid: string): Promise<VersionObject | undefined> {
    return this.get(versionObjectKey(uid), decodeVersionObject);
  }

  async putPack(name: string, blobs: RecordBlob[]): Promise<void> {
    await this.put(packKey(name), encodePack(blobs));
  }

  async getPack(name: string): Promise<RecordBlob[] | undefined> {
    return this.get(packKey(name), decodePack);
  }

  async deleteVersion(uid: string): Promise<void> {
    await this.store.delete([versionObjectKey(uid)]);
  }

  async deletePacks(names: string[]): Promise<void> {
    if (names.length) await this.store.delete(names.map(packKey));
  }

  /** Uids of the versions storage has objects of, page by page. */
  async *versionUids(): AsyncIterable<string[]> {
    for await (const page of this.store.listUnder(VERSIONS_PREFIX) as AsyncIterable<StoredObject[]>) {
      yield page.map((o) => o.key.slice(VERSIONS_PREFIX.length)).filter((u) => UID_PATTERN.test(u));
    }
  }

  async putKek(id: number, wrappedHex: string): Promise<void> {
    await this.put(`${KEKS_PREFIX}${id}`, Buffer.from(wrappedHex));
  }

  /** The imported keys storage holds, by id (wrapped, hex). */
  async keks(): Promise<Map<number, string>> {
    const out = new Map<number, string>();
    for await (const page of this.store.listUnder(KEKS_PREFIX)) {
      for (const o of page) {
        const id = o.key.slice(KEKS_PREFIX.length);
        if (!/^[1-9][0-9]{0,2}$/.test(id)) continue;
        const hex = await this.get(o.key, (b) => b.toString());
        if (hex && /^[0-9a-f]{80}$/.test(hex)) out.set(Number(id), hex);
      }
    }
    return out;
  }

  async putRepository(info: RepositoryInfo): Promise<void> {
    await this.put(REPOSITORY_KEY, Buffer.from(JSON.stringify({ format: 1, ...info })));
  }

  async getRepository(): Promise<RepositoryInfo | undefined> {
    const o = await this.get(REPOSITORY_KEY, (b) => JSON.parse(b.toString()) as RepositoryInfo & { format: number });
    if (o && o.format !== 1) throw new MetadataObjectError(`${REPOSITORY_KEY} has an unknown format ${o.format}`);
    return o;
  }

  private async put(name: string, payload: Buffer): Promise<void> {
    await this.store.put(name, sealObject(name, payload, this.key));
  }

  private async get<T>(name: string, decode: (payload: Buffer) => T): Promise<T | undefined> {
    let raw: Buffer;
    try {
      raw = await this.store.get(name);
    } catch (e) {
      if (e instanceof BlobNotFoundError) return undefined;
      throw e;
    }
    try {
      return decode(openObject(name, raw, this.key));
    } catch (e) {
      if (e instanceof SealedObjectError || e instanceof StorageFormatError || e instanceof SyntaxError) {
        throw new MetadataObjectError(`metadata object ${name} is unreadable: ${e.message}`);
      }
      throw e;
    }
  }
}

/**
 * The record of a version as the database holds it (blobs in order of first use, so equal states compare
 * equal), and the blob rows in the same order.
 */
export async function recordFromDb(meta: MetaStore, v: VersionRow): Promise<{ record: VersionRecord; refs: BlobRef[] }> {
  const blocks = blockCount(v.size, v.blockSize);
  const map = new Int32Array(blocks);
  const index = new Map<number, number>();
  const blobs: RecordBlob[] = [];
  const refs: BlobRef[] = [];
  for (let c = 0; c < chunkCount(blocks); c++) {
    const { entries, refs: chunkRefs } = await readChunkWithBlobs(meta, v, c);
    for (let k = 0; k < entries.length; k++) {
      const e = entries[k];
      const i = c * MAP_CHUNK + k;
      if (e === HOLE) map[i] = IMPORT_HOLE;
      else if (e === PENDING) map[i] = IMPORT_PENDING;
      else {
        let at = index.get(e);
        if (at === undefined) {
          const ref = chunkRefs.get(e);
          if (!ref) throw new BackyError(`block ${i} of version ${v.uid} refers to blob ${e}, which is not in the database`);
          at = blobs.length;
          index.set(e, at);
          blobs.push({ uid: ref.uid, checksum: ref.checksum, size: ref.size, format: ref.format, keyInfo: ref.keyInfo });
          refs.push(ref);
        }
        map[i] = at;
      }
    }
  }
  const record: VersionRecord = {
    version: {
      uid: v.uid, name: v.name, snapshotName: v.snapshotName, date: v.date, size: v.size, blockSize: v.blockSize, expire: v.expire,
      baseUid: v.baseUid, tags: v.tags, valid: v.valid, complete: v.complete, protected: v.protected,
    },
    blobs, map, blockDates: await meta.getBlockDates(v.id),
  };
  return { record, refs };
}

/** The version object of a record whose blobs (refs, in table order) all have their pack. */
export function versionObjectOf(record: VersionRecord, refs: { metaPack: string | null; metaIndex: number | null }[]): VersionObject {
  const packs: string[] = [];
  const packNoOf = new Map<string, number>();
  const tablePack = refs.map((r) => {
    let p = packNoOf.get(r.metaPack!);
    if (p === undefined) {
      p = packs.length;
      packNoOf.set(r.metaPack!, p);
      packs.push(r.metaPack!);
    }
    return p;
  });
  const n = record.map.length;
  const packNo = new Int32Array(n);
  const index = new Int32Array(n);
  for (let i = 0; i < n; i++) {
    const m = record.map[i];
    if (m === IMPORT_HOLE) packNo[i] = PACK_HOLE;
    else if (m === IMPORT_PENDING) packNo[i] = PACK_PENDING;
    else {
      packNo[i] = tablePack[m];
      index[i] = refs[m].metaIndex!;
    }
  }
  return { version: record.version, packs, packNo, index, blockDates: record.blockDates };
}

export interface SyncContext {
  meta: MetaStore;
  storageMeta: StorageMeta;
  repositoryInfo(): Promise<RepositoryInfo>;
}

/** Puts the details of blobs that have no pack yet into new packs (and says so in the database). */
async function packMissing(ctx: SyncContext, refs: BlobRef[]): Promise<void> {
  const missing = refs.filter((r) => !r.metaPack);
  for (let i = 0; i < missing.length; i += PACK_MAX) {
    const part = missing.slice(i, i + PACK_MAX);
    const name = newPackName();
    await ctx.storageMeta.putPack(name, part.map((r) => ({ uid: r.uid, checksum: r.checksum, size: r.size, format: r.format, keyInfo: r.keyInfo })));
    await ctx.meta.setBlobPacks(name, part.map((r) => r.id));
    part.forEach((r, k) => {
      r.metaPack = name;
      r.metaIndex = k;
    });
  }
}

/** Writes a version's object (and packs for its blobs that lack one) from the database. */
export async function writeVersionFromDb(ctx: SyncContext, v: VersionRow): Promise<void> {
  const { record, refs } = await recordFromDb(ctx.meta, v);
  await packMissing(ctx, refs);
  await ctx.storageMeta.putVersion(versionObjectOf(record, refs));
}

/**
 * Writes the objects of stale versions and deletes those of removed ones (and the repository object, once).
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
      await storageMeta.putRepository(await ctx.repositoryInfo());
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
      // One version at a time: versions share blobs, and a blob's pack is written by the first that needs it.
      let progressed = false;
      for (const s of stale) {
        const v = await meta.getVersion(s.uid);
        if (!v?.complete) continue;
        try {
          await writeVersionFromDb(ctx, v);
        } catch (e) {
          // What the database holds cannot be written (a damaged row): the others still are; this one stays stale.
          if (!(e instanceof StorageFormatError)) throw e;
          log.warn(`the metadata of version ${v.uid} cannot be written to storage: ${e.message}`);
          continue;
        }
        await meta.markStorageMetaSynced(s.uid, s.metaGen);
        done.written++;
        progressed = true;
      }
      if (!progressed) break;
    }
  } finally {
    await meta.unlock(SYNC_LOCK, info.session);
  }
  return done;
}

/** A version as storage has it: its object with the blob details from its packs. */
export async function recordFromStorage(sm: StorageMeta, uid: string, packs = new Map<string, RecordBlob[]>()): Promise<VersionRecord | undefined> {
  const o = await sm.getVersion(uid);
  if (!o) return undefined;
  const tables: RecordBlob[][] = [];
  for (const name of o.packs) {
    let t = packs.get(name);
    if (!t) {
      t = await sm.getPack(name);
      if (!t) throw new MetadataObjectError(`metadata pack ${packKey(name)} of version ${uid} is missing`);
      packs.set(name, t);
    }
    tables.push(t);
  }
  const blobs: RecordBlob[] = [];
  const at = new Map<string, number>();
  const map = new Int32Array(o.packNo.length);
  for (let i = 0; i < map.length; i++) {
    const p = o.packNo[i];
    if (p === PACK_HOLE) map[i] = IMPORT_HOLE;
    else if (p === PACK_PENDING) map[i] = IMPORT_PENDING;
    else {
      const b = tables[p][o.index[i]];
      if (!b) throw new MetadataObjectError(`version ${uid}: block ${i} refers to entry ${o.index[i]} of pack ${o.packs[p]}, which has ${tables[p].length}`);
      const key = `${p}:${o.index[i]}`;
      let k = at.get(key);
      if (k === undefined) {
        k = blobs.length;
        at.set(key, k);
        blobs.push(b);
      }
      map[i] = k;
    }
  }
  return { version: o.version, blobs, map, blockDates: o.blockDates };
}

function sameRecord(a: VersionRecord, b: VersionRecord): boolean {
  const va = { ...a.version, tags: [...a.version.tags].sort() };
  const vb = { ...b.version, tags: [...b.version.tags].sort() };
  if (JSON.stringify(va) !== JSON.stringify(vb)) return false;
  if (a.map.length !== b.map.length || !Buffer.from(a.map.buffer, a.map.byteOffset, a.map.byteLength).equals(Buffer.from(b.map.buffer, b.map.byteOffset, b.map.byteLength))) return false;
  if (!(a.blockDates ?? Buffer.alloc(0)).equals(b.blockDates ?? Buffer.alloc(0))) return false;
  if (a.blobs.length !== b.blobs.length) return false;
  return a.blobs.every((x, k) => {
    const y = b.blobs[k];
    return x.uid === y.uid && x.size === y.size && x.format === y.format && x.checksum.equals(y.checksum) &&
      (x.keyInfo ?? Buffer.alloc(0)).equals(y.keyInfo ?? Buffer.alloc(0));
  });
}

/** Whether storage holds the version as the database has it; repairs it when not. A line describing the problem. */
export async function checkStoredRecord(ctx: SyncContext, v: VersionRow): Promise<string | undefined> {
  const { record, refs } = await recordFromDb(ctx.meta, v);
  let problem: string | undefined;
  try {
    const got = await recordFromStorage(ctx.storageMeta, v.uid);
    if (!got) problem = `the metadata object of version ${v.uid} is missing from storage`;
    else if (!sameRecord(got, record)) problem = `the metadata of version ${v.uid} in storage differs from the database`;
  } catch (e) {
    if (!(e instanceof MetadataObjectError)) throw e;
    problem = e.message;
  }
  if (problem) {
    // Rewritten whole: new packs for all its blobs (whatever was wrong with the old ones), then the object.
    try {
      for (const r of refs) r.metaPack = null;
      await packMissing(ctx, refs);
      await ctx.storageMeta.putVersion(versionObjectOf(record, refs));
      problem += ' (rewritten from the database)';
    } catch (e) {
      if (!(e instanceof StorageFormatError) && !(e instanceof BackyError)) throw e;
      problem += ` (and it cannot be rewritten: ${errorLine(e)})`;
    }
  }
  return problem;
}

/** Runs `fn` for each item, `limit` at a time. */
export async function eachLimited<T>(items: Iterable<T>, limit: number, fn: (item: T) => Promise<void>): Promise<void> {
  const jobs = new JobRunner(limit);
  for (const item of items) {
    await jobs.acquire();
    if (jobs.failed) {
      jobs.release();
      break;
    }
    jobs.start(() => fn(item));
  }
  await jobs.drain();
  if (jobs.failed) throw jobs.failure;
}
