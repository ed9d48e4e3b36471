import { randomUUID } from 'node:crypto';
import type { Config } from '../config/config';
import { Codec } from '../codec/codec';
import { WorkerPool } from '../codec/pool';
import { BlobFetcher } from '../device/blob-fetcher';
import { BlockCache } from '../device/block-cache';
import { VersionDevice } from '../device/version-device';
import { createMetaStore } from '../meta/open';
import type { LockInfo, MetaStore, VersionRow } from '../meta/types';
import { createBlobStore } from '../storage/open';
import type { BlobStore } from '../storage/types';
import { LockedError, NotFoundError } from '../util/errors';
import { FileStore } from '../storage/file';
import { log } from '../util/log';
import { lockInfo } from '../util/process-info';
import { HOLD_LOCKS, VersionHold, VersionHolds } from './holds';
import { checkDataMarker, checkFixedSettings, initialSettings, MARKER_NAME, markerContent, SETTING } from './repository-settings';

export { keyCheckValue } from './repository-settings';

/**
 * Everything one command works with: configuration, metadata, storage, the codec worker pool and the locks
 * it took. `close` releases all of it, whatever happened.
 */
export class Repository {
  private codecInstance: Codec | undefined;
  private locks: string[] = [];
  private cacheInstance: BlockCache | undefined;

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

  get codec(): Codec {
    if (!this.codecInstance) {
      const pool = new WorkerPool({
        keyHex: this.cfg.encryptionKey?.toString('hex'),
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
    if (!this.cacheInstance) this.cacheInstance = new BlockCache(bytes, { concurrency: this.cfg.data.simultaneousReads });
    return this.cacheInstance;
  }

  fetcher(cache = this.cache()): BlobFetcher {
    return new BlobFetcher(this.store, this.codec, cache);
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
    const info = lockInfo(what);
    const holder = await this.meta.tryLock(name, info, conflicts);
    if (holder) {
      throw new LockedError(refusal?.(holder) ?? `cannot ${what}: ${holder.what} is running (pid ${holder.pid} on ${holder.host})`);
    }
    this.locks.push(name);
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
    const i = this.locks.indexOf(name);
    if (i < 0) return;
    this.locks.splice(i, 1);
    await this.meta.unlock(name, lockInfo('').session);
  }

  async close(): Promise<void> {
    await this.holds.releaseAll().catch((e) => log.warn(`could not release holds: ${(e as Error).message}`));
    for (const name of this.locks.splice(0).reverse()) {
      try {
        await this.meta.unlock(name, lockInfo('').session);
      } catch (e) {
        log.warn(`could not release lock ${name}: ${(e as Error).message}`);
      }
    }
    await this.codecInstance?.close().catch(() => undefined);
    await this.store.close().catch(() => undefined);
    await this.meta.close().catch(() => undefined);
  }
}

export const LOCKS = {
  version: (uid: string) => `version:${uid}`,
  backup: (session: string) => `backup:${session}`,
  anyBackup: 'backup:*',
  cleanup: 'cleanup',
  fullCleanup: 'cleanup-full',
  ...HOLD_LOCKS,
};
