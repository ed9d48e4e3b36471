import { createHmac, randomUUID } from 'node:crypto';
import { availableHashes, digestLength, fastestHash, hashAvailable } from '../codec/hashes';
import type { Config } from '../config/config';
import { BlobFormatError, identifyBlob } from '../codec/blob-format';
import { BlobState, MetaStore } from '../meta/types';
import { blobKey, BlobStore, InvalidBlobUidError } from '../storage/types';
import { BlobNotFoundError, ConfigError, StorageError, WrongKeyError } from '../util/errors';
import { log } from '../util/log';
import { MARKER_NAME } from '../storage/file';

/**
 * What is fixed when a repository is created (`initdb`) and what every configuration that opens it must agree
 * with: the encryption mode and the hash function (compression is free to change: every blob says whether it
 * is compressed). Plus the key's fingerprint, the repository's id, and whether its `file` data directory
 * carries a marker. Repositories from before a setting existed get it on first open, from what their
 * blobs and key show.
 */
export const SETTING = {
  hashFunction: 'hash_function',
  encryption: 'encryption',
  keyCheck: 'key_check',
  repositoryId: 'repository_id',
  /** Present once the data directory has its marker: from then on a missing marker means "not mounted". */
  dataMarker: 'data_marker',
};

export { MARKER_NAME } from '../storage/file';

/** A short, non-reversible fingerprint of the key, stored in the database to catch a wrong key at once. */
export function keyCheckValue(key: Buffer): string {
  return createHmac('sha256', key).update('backy key check v1').digest('hex').slice(0, 32);
}

/**
 * The settings a new repository starts with (written in initdb's transaction). Without hash_function in the
 * configuration the repository gets the fastest hash on this machine, and `cfg` says so from then on.
 */
export function initialSettings(cfg: Config, repositoryId: string): Record<string, string> {
  if (!cfg.hashFunctionConfigured) cfg.hashFunction = fastestHash();
  return {
    [SETTING.hashFunction]: cfg.hashFunction,
    [SETTING.encryption]: cfg.encryption,
    [SETTING.repositoryId]: repositoryId,
    ...(cfg.encryptionKey ? { [SETTING.keyCheck]: keyCheckValue(cfg.encryptionKey) } : {}),
  };
}

export function markerContent(repositoryId: string): string {
  return `${JSON.stringify({ backy: 'data directory of a backy repository', repository: repositoryId, created: new Date().toISOString() }, null, 2)}\n`;
}

/** A few live blobs of the repository (the first ones by id), to look at what is really in storage. */
async function liveBlobs(meta: MetaStore, n: number): Promise<{ id: number; uid: string }[]> {
  for await (const page of meta.blobUidPages(1000)) {
    const live = page.filter((b) => b.state === BlobState.Live).slice(0, n);
    if (live.length) return live;
  }
  return [];
}

/** The first of `uids` that storage has, read whole; undefined when storage has none of them. */
async function firstStored(store: BlobStore, blobs: { uid: string }[]): Promise<Buffer | undefined> {
  for (const { uid } of blobs) {
    try {
      return await store.get(blobKey(uid));
    } catch (e) {
      if (!(e instanceof BlobNotFoundError) && !(e instanceof InvalidBlobUidError)) throw e;
    }
  }
  return undefined;
}

/**
 * A `file` data directory must carry this repository's marker. A directory whose filesystem is not mounted
 * looks empty: without this check scrub would mark every blob bad and backups would fill the root disk.
 * A repository from before markers gets one written, but only where its blobs are found (an empty mountpoint
 * has none of them), or while it has no blobs at all.
 */
export async function checkDataMarker(meta: MetaStore, store: BlobStore): Promise<void> {
  if (!store.readMarker || !store.writeMarker) return;
  const id = await meta.setSettingIfAbsent(SETTING.repositoryId, randomUUID());
  const text = await store.readMarker();
  if (text !== undefined) {
    let owner: unknown;
    try {
      owner = (JSON.parse(text) as { repository?: unknown }).repository;
    } catch {
      owner = undefined;
    }
    if (owner !== id) {
      throw new StorageError(`${store.description} belongs to another repository: its ${MARKER_NAME} names ${JSON.stringify(String(owner).slice(0, 40))}, ` +
        `this database is repository ${id} (check [DataBackend] path and [MetaBackend] engine)`);
    }
    if (!(await meta.getSetting(SETTING.dataMarker))) await meta.setSettingIfAbsent(SETTING.dataMarker, MARKER_NAME);
    return;
  }
  const unmounted = `${store.description} has no ${MARKER_NAME}: it looks unmounted (mount it, or correct [DataBackend] path)`;
  if (await meta.getSetting(SETTING.dataMarker)) throw new StorageError(unmounted);
  const sample = await liveBlobs(meta, 5);
  if (sample.length && !(await firstStored(store, sample))) {
    throw new StorageError(`${unmounted}: none of the blobs the database lists is there`);
  }
  try {
    await store.writeMarker(markerContent(id));
  } catch (e) {
    // The blobs are there (or there are none yet): a read-only data directory may still be read.
    log.warn(`could not write ${MARKER_NAME} into ${store.description}: ${(e as Error).message}`);
    return;
  }
  await meta.setSettingIfAbsent(SETTING.dataMarker, MARKER_NAME);
  log.info(`wrote ${MARKER_NAME} into ${store.description}: from now on backy refuses to run when it is missing (an unmounted directory)`);
}

/**
 * The encryption mode of a repository that has none recorded: encrypted if a key was ever checked against
 * it, otherwise what a stored blob shows; the configuration's when there are no blobs yet.
 */
async function observedEncryption(meta: MetaStore, store: BlobStore, cfg: Config): Promise<string> {
  if (await meta.getSetting(SETTING.keyCheck)) return 'aes-256-gcm';
  const blob = await firstStored(store, await liveBlobs(meta, 5));
  if (!blob) return cfg.encryption;
  try {
    return identifyBlob(blob).encrypted ? 'aes-256-gcm' : 'none';
  } catch (e) {
    if (e instanceof BlobFormatError) return cfg.encryption;
    throw e;
  }
}

/**
 * Checks the configuration against the settings fixed at initdb (recording missing ones first): a
 * configuration that disagrees is refused with one line (exit 1), before anything is read or written.
 */
export async function checkFixedSettings(meta: MetaStore, store: BlobStore, cfg: Config): Promise<void> {
  let hash = await meta.getSetting(SETTING.hashFunction);
  // Not configured: the repository's own, whatever it is (the configuration follows it from here on).
  if (hash !== undefined && !cfg.hashFunctionConfigured) {
    if (!hashAvailable(hash)) throw new ConfigError(`this repository uses hash_function = ${hash}, which this machine cannot compute (available: ${availableHashes().join(', ')})`);
    cfg.hashFunction = hash;
  }
  if (hash === undefined) {
    // Checksums of existing blobs must at least have the configured hash's length.
    const [first] = await liveBlobs(meta, 1);
    const ref = first ? (await meta.getBlobs([first.id])).get(first.id) : undefined;
    if (ref && ref.checksum.length !== digestLength(cfg.hashFunction)) {
      throw new ConfigError(`this repository's checksums have ${ref.checksum.length} bytes: hash_function = ${cfg.hashFunction} cannot be its hash function`);
    }
    hash = await meta.setSettingIfAbsent(SETTING.hashFunction, cfg.hashFunction);
  }
  if (hash !== cfg.hashFunction) {
    throw new ConfigError(`this repository uses hash_function = ${hash} (fixed when it was created); the configuration says ${cfg.hashFunction}`);
  }
  let encryption = await meta.getSetting(SETTING.encryption);
  encryption ??= await meta.setSettingIfAbsent(SETTING.encryption, await observedEncryption(meta, store, cfg));
  if (encryption !== cfg.encryption) {
    throw new ConfigError(encryption === 'none'
      ? 'this repository is not encrypted (encryption = none, fixed when it was created); set encryption = none in the configuration'
      : `this repository is encrypted (encryption = ${encryption}, fixed when it was created); the configuration says encryption = ${cfg.encryption}`);
  }
  if (cfg.encryptionKey) {
    const kcv = await meta.setSettingIfAbsent(SETTING.keyCheck, keyCheckValue(cfg.encryptionKey));
    if (kcv !== keyCheckValue(cfg.encryptionKey)) throw new WrongKeyError();
  }
}
