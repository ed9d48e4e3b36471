import { createHmac } from 'node:crypto';
import type { Config } from '../config/config';
import { Codec } from '../codec/codec';
import { WorkerPool } from '../codec/pool';
import { BlobFetcher } from '../device/blob-fetcher';
import { BlockCache } from '../device/block-cache';
import { VersionDevice } from '../device/version-device';
import { createMetaStore } from '../meta/open';
import type { MetaStore, VersionRow } from '../meta/types';
import { createBlobStore } from '../storage/open';
import type { BlobStore } from '../storage/types';
import { ConfigError, LockedError, NotFoundError, WrongKeyError } from '../util/errors';
import { log } from '../util/log';
import { lockInfo } from '../util/process-info';

/** A short, non-reversible fingerprint of the key, stored in the database to catch a wrong key at once. */
export function keyCheckValue(key: Buffer): string {
  return createHmac('sha256', key).update('backy key check v1').digest('hex').slice(0, 32);
}

/**
 * Everything one command works with: configuration, metadata, storage, the codec worker pool and the locks
 * it took. `close` releases all of it, whatever happened.
 */
export class Repository {
  private codecInstance: Codec | undefined;
  private locks: string[] = [];
  private cacheInstance: BlockCache | undefined;

  private constructor(readonly cfg: Config, readonly meta: MetaStore, readonly store: BlobStore) {}

  /** Opens metadata and storage and checks the key and hash function against the repository's. */
  static async open(cfg: Config): Promise<Repository> {
    const meta = createMetaStore(cfg.metaEngine);
    await meta.open();
    const store = createBlobStore(cfg);
    const repo = new Repository(cfg, meta, store);
    try {
      await repo.checkRepositorySettings();
      await store.check();
    } catch (e) {
      await repo.close();
      throw e;
    }
    return repo;
  }

  private async checkRepositorySettings(): Promise<void> {
    const hash = await this.meta.setSettingIfAbsent('hash_function', this.cfg.hashFunction);
    if (hash !== this.cfg.hashFunction) {
      throw new ConfigError(`this repository uses hash_function ${hash}, the configuration says ${this.cfg.hashFunction}`);
    }
    if (this.cfg.encryptionKey) {
      const kcv = await this.meta.setSettingIfAbsent('key_check', keyCheckValue(this.cfg.encryptionKey));
      if (kcv !== keyCheckValue(this.cfg.encryptionKey)) throw new WrongKeyError();
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

  /** Takes a lock or throws LockedError naming the holder. Released by close(). */
  async lock(name: string, what: string, conflicts: string[] = []): Promise<void> {
    const info = lockInfo(what);
    const holder = await this.meta.tryLock(name, info, conflicts);
    if (holder) {
      throw new LockedError(`cannot ${what}: ${holder.what} is running (pid ${holder.pid} on ${holder.host})`);
    }
    this.locks.push(name);
  }

  async unlock(name: string): Promise<void> {
    const i = this.locks.indexOf(name);
    if (i < 0) return;
    this.locks.splice(i, 1);
    await this.meta.unlock(name, lockInfo('').session);
  }

  async close(): Promise<void> {
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
};
