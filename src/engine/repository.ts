import { randomUUID, timingSafeEqual } from 'node:crypto';
import { unwrapDataKey, wrapDataKey } from '../codec/backy2-blob';
import type { Config } from '../config/config';
import { Codec } from '../codec/codec';
import { WorkerPool } from '../codec/pool';
import { BlobFetcher } from '../device/blob-fetcher';
import { BlockCache } from '../device/block-cache';
import { spareBuffers } from '../device/spare-buffers';
import { VersionDevice } from '../device/version-device';
import { createMetaStore } from '../meta/open';
import type { BlobFormat, LockInfo, MetaStore, VersionRow } from '../meta/types';
import { storageKey } from '../storage/blob-keys';
import { createBlobStore } from '../storage/open';
import type { BlobStore } from '../storage/types';
import { ConfigError, errorLine, LockedError, NotFoundError, WrongKeyError } from '../util/errors';
import { FileStore } from '../storage/file';
import { log } from '../util/log';
import { lockInfo } from '../util/process-info';
import { HOLD_LOCKS, VersionHold, VersionHolds } from './holds';
import { checkDataMarker, checkFixedSettings, initialSettings, keyCheckValue, MARKER_NAME, markerContent, SETTING } from './repository-settings';
import { StorageMeta, SyncContext, syncStorageMeta } from './storage-meta';

export { keyCheckValue } from './repository-settings';

/**
 * Everything one command works with: configuration, metadata, storage, the codec worker pool and the locks
 * it took. `close` releases all of it, whatever happened.
 */
export class Repository {
  private codecInstance: Codec | undefined;
  private locks: string[] = [];
  private cacheInstance: BlockCache | undefined;
  private opened = false;

  private readonly holds: VersionHolds;

  private constructor(readonly cfg: Config, readonly meta: MetaStore, readonly store: BlobStore) {
    this.holds = new VersionHolds(meta);
  }

  /**
   * Opens metadata and storage: checks storage is there (a `file` data directory carries this repository's
   * marker) and the configuration agrees with the settings fixed at initdb (encryption, hash function, key).
   */
  static async open(cfg: Config): Promise<Repository> {
    const meta = createMetaStore(cfg.metaEngine);
    await meta.open();
    const store = createBlobStore(cfg);
    const repo = new Repository(cfg, meta, store);
    try {
      await store.check();
      await checkDataMarker(meta, store);
      await checkFixedSettings(meta, store, cfg);
      await repo.loadKeks();
      repo.opened = true;
    } catch (e) {
      await repo.close();
      throw e;
    }
    return repo;
  }

  /**
   * Creates a repository (`initdb`): the schema with the settings fixed from now on, then the `file` data
   * directory and its marker. false, and nothing changed, when the database is initialized already.
   */
  static async create(cfg: Config): Promise<{ created: boolean; description: string }> {
    const meta = createMetaStore(cfg.metaEngine);
    try {
      const id = randomUUID();
      if (!(await meta.initdb(initialSettings(cfg, id)))) return { created: false, description: meta.description };
      if (cfg.data.type === 'file') {
        const store = new FileStore(cfg.data.path, cfg.data.fsync);
        await store.create();
        await store.writeMarker(markerContent(id));
        await meta.setSettingIfAbsent(SETTING.dataMarker, MARKER_NAME);
      }
      return { created: true, description: meta.description };
    } finally {
      await meta.close();
    }
  }

  /** Keys an import brought in (backy2's), by id: they wrap the data keys of imported blobs. */
  private keks = new Map<number, Buffer>();

  private async loadKeks(): Promise<void> {
    for (let id = 1; ; id++) {
      const wrapped = await this.meta.getSetting(kekSetting(id));
      if (!wrapped) return;
      if (!this.cfg.encryptionKey) throw new ConfigError('this repository holds imported encryption keys but the configuration has no encryption_key');
      try {
        this.keks.set(id, unwrapDataKey(this.cfg.encryptionKey, Buffer.from(wrapped, 'hex')));
      } catch {
        throw new WrongKeyError();
      }
    }
  }

  /**
   * The id under which `key` wraps data keys of blobs in this repository: 0 for the repository key itself,
   * else a key-encryption key kept wrapped with the repository key (in the database and in storage, for
   * db-rebuild), registered on first use. Must be called before the codec starts.
   */
  async registerKek(key: Buffer): Promise<number> {
    const own = this.cfg.encryptionKey;
    if (!own) throw new ConfigError('data keys of imported blobs are kept wrapped with this repository\'s encryption_key, and the configuration has none');
    if (timingSafeEqual(key, own)) return 0;
    for (const [id, k] of this.keks) if (timingSafeEqual(k, key)) return id;
    if (this.codecInstance) throw new Error('internal error: a key registered after the codec started');
    const wrapped = wrapDataKey(own, key).toString('hex');
    for (let id = this.keks.size + 1; id < 256; id++) {
      const got = await this.meta.setSettingIfAbsent(kekSetting(id), wrapped);
      const k = unwrapDataKey(own, Buffer.from(got, 'hex'));
      this.keks.set(id, k);
      if (timingSafeEqual(k, key)) {
        await this.storageMeta.putKek(id, wrapped);
        return id;
      }
    }
    throw new ConfigError('this repository has 255 imported encryption keys already');
  }

  get codec(): Codec {
    if (!this.codecInstance) {
      const pool = new WorkerPool({
        keyHex: this.cfg.encryptionKey?.toString('hex'),
        keks: Object.fromEntries([...this.keks].map(([id, k]) => [String(id), k.toString('hex')])),
        compression: this.cfg.compression,
        compressionLevel: this.cfg.compressionLevel,
        hashFunction: this.cfg.hashFunction,
      }, this.cfg.workers);
      this.codecInstance = new Codec(pool, {
        key: this.cfg.encryptionKey,
        compression: this.cfg.compression,
        compressionLevel: this.cfg.compressionLevel,
        hashFunction: this.cfg.hashFunction,
      }, this.cfg.readVerification === 'checksum');
    }
    return this.codecInstance;
  }

  /** The process-wide block cache (created on first use with `cache_size`, or `bytes` if given first). */
  cache(bytes = this.cfg.cacheSize): BlockCache {
    if (!this.cacheInstance) {
      this.cacheInstance = new BlockCache(bytes, {
        concurrency: this.cfg.data.simultaneousReads,
        blockSize: this.cfg.blockSize,
        shm: this.cfg.cacheMemory === 'shared',
        // A block's memory, once in shared memory, goes back to the pool its next load decodes into.
        recycle: (b) => spareBuffers.give(Buffer.from(b.buffer, 0, b.buffer.byteLength)),
      });
    }
    return this.cacheInstance;
  }

  fetcher(cache = this.cache()): BlobFetcher {
    return new BlobFetcher(this.store, this.codec, cache, (ref) => this.keyOf(ref));
  }

  /** The storage key of a blob: its format and the backend's layout decide it (imported backy2 blobs). */
  keyOf(ref: { uid: string; format: BlobFormat }): string {
    return storageKey(ref.uid, ref.format, this.cfg.data.type);
  }

  async version(uid: string): Promise<VersionRow> {
    const v = await this.meta.getVersion(uid);
    if (!v) throw new NotFoundError(`version ${uid} does not exist`);
    return v;
  }

  device(v: VersionRow, cache?: BlockCache): VersionDevice {
    return new VersionDevice(this.meta, v, this.fetcher(cache), { log: (l) => log.error(l) });
  }

  /**
   * Takes a lock or throws LockedError naming the holder (`refusal` words the message). Released by close().
   */
  async lock(name: string, what: string, conflicts: string[] = [], refusal?: (holder: LockInfo) => string): Promise<void> {
    const [refused] = await this.lockEach([{ name, what, conflicts, refusal }]);
    if (refused) throw refused;
  }

  /**
   * `lock` for several locks in one step (one transaction): per request the LockedError that refused it, or
   * undefined where the lock was taken. Released by unlockAll() or close().
   */
  async lockEach(requests: LockRequest[]): Promise<(LockedError | undefined)[]> {
    const holders = await this.meta.tryLocks(requests.map((r) => ({ name: r.name, info: lockInfo(r.what), conflicts: r.conflicts ?? [] })));
    return requests.map((r, k) => {
      const holder = holders[k];
      if (holder) return new LockedError(r.refusal?.(holder) ?? `cannot ${r.what}: ${holder.what} is running (pid ${holder.pid} on ${holder.host})`);
      this.locks.push(r.name);
      return undefined;
    });
  }

  /**
   * A shared hold on a version this command reads (restore, scrub, an NBD export, a mounted image): while
   * it lasts, `rm` of the version is refused, so its blocks stay. Returns the version as read after the
   * hold was taken. Released by `release()` or close(), and by the process's death.
   */
  holdVersion(uid: string, what: string): Promise<VersionHold> {
    return this.holds.hold(uid, what);
  }

  async unlock(name: string): Promise<void> {
    await this.unlockAll([name]);
  }

  /** Releases those of these locks this command holds, in one step. */
  async unlockAll(names: string[]): Promise<void> {
    const held = names.filter((n) => this.locks.includes(n));
    if (!held.length) return;
    const gone = new Set(held);
    this.locks = this.locks.filter((n) => !gone.has(n));
    await this.meta.unlockAll(held, lockInfo('').session);
  }

  /** The metadata objects in storage (see storage-meta.ts). */
  get storageMeta(): StorageMeta {
    return new StorageMeta(this.store, this.cfg.encryptionKey);
  }

  get syncContext(): SyncContext {
    return {
      meta: this.meta,
      storageMeta: this.storageMeta,
      repositoryInfo: async () => ({
        hashFunction: this.cfg.hashFunction, blockSize: this.cfg.blockSize, encryption: this.cfg.encryption,
        keyCheck: this.cfg.encryptionKey ? keyCheckValue(this.cfg.encryptionKey) : undefined, created: Date.now(),
        repositoryId: await this.meta.getSetting(SETTING.repositoryId),
      }),
    };
  }

  /** Brings the metadata objects in storage up to date (done by close, after every command). */
  syncStorageMeta(): Promise<{ written: number; removed: number }> {
    return syncStorageMeta(this.syncContext);
  }

  /**
   * Releases everything. Unless `syncStorageMeta` is false (a failed command: its trouble, a lost database
   * connection or storage, would only fail again), the metadata objects are brought up to date first.
   */
  async close(opts: { syncStorageMeta?: boolean } = {}): Promise<void> {
    if (this.opened && opts.syncStorageMeta !== false) {
      this.opened = false;
      try {
        await this.syncStorageMeta();
      } catch (e) {
        log.warn(`could not update the metadata copies in storage (the next command retries): ${errorLine(e)}`);
      }
    }
    await this.holds.releaseAll().catch((e) => log.warn(`could not release holds: ${(e as Error).message}`));
    for (const name of this.locks.splice(0).reverse()) {
      try {
        await this.meta.unlock(name, lockInfo('').session);
      } catch (e) {
        log.warn(`could not release lock ${name}: ${(e as Error).message}`);
      }
    }
    await this.codecInstance?.close().catch(() => undefined);
    this.cacheInstance?.close();
    await this.store.close().catch(() => undefined);
    await this.meta.close().catch(() => undefined);
  }
}

/** A lock to take: its name, what takes it, the locks it conflicts with, the refusal's words. */
export interface LockRequest {
  name: string;
  what: string;
  conflicts?: string[];
  refusal?: (holder: LockInfo) => string;
}

export function kekSetting(id: number): string {
  return `kek.${id}`;
}

export const LOCKS = {
  version: (uid: string) => `version:${uid}`,
  backup: (session: string) => `backup:${session}`,
  anyBackup: 'backup:*',
  cleanup: 'cleanup',
  fullCleanup: 'cleanup-full',
  ...HOLD_LOCKS,
};
