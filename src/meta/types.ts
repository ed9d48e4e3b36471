import { BackyError } from '../util/errors';
import type { MapUsage } from './map-summary';

/**
 * The metadata of a repository: versions, their block maps, the blobs in storage, statistics and locks.
 * Implementations: sqlite.ts (embedded default) and postgres.ts (several hosts). Every method that changes
 * more than one row does so in one transaction; callers never see half of an operation.
 */

/** `rm` of a protected version (exit 100). */
export class ProtectedError extends BackyError {
  constructor(uid: string) {
    super(`version ${uid} is protected; unprotect it first`);
  }
}

/** What removeVersions did with one version (uid: as its row had it; null when there was none). */
export interface RemovalResult {
  id: number;
  uid: string | null;
  result: 'removed' | 'protected' | 'missing';
}

export interface VersionRow {
  id: number;
  uid: string;
  name: string;
  snapshotName: string;
  /** ms since the epoch (UTC) */
  date: number;
  /** bytes */
  size: number;
  blockSize: number;
  /** complete and every block verified readable as far as we know */
  valid: boolean;
  /** the backup finished (an invalid complete version failed a scrub; an incomplete one can be continued) */
  complete: boolean;
  protected: boolean;
  /** ms since the epoch, or null */
  expire: number | null;
  baseUid: string | null;
  tags: string[];
}

export interface NewVersion {
  uid: string;
  name: string;
  snapshotName: string;
  date: number;
  size: number;
  blockSize: number;
  expire: number | null;
  baseUid: string | null;
  tags: string[];
}

export const enum BlobState {
  Uploading = 0,
  Live = 1,
  Bad = 2,
  Deleting = 3,
}

/**
 * How a blob is stored. backy's own format, or backy2's (imported repositories, read where they are):
 * version 0 is the plain block, version 1 zstd + AES-256-GCM under a per-blob data key.
 */
export const enum BlobFormat {
  Backy = 0,
  Backy2Plain = 1,
  Backy2Aes = 2,
}

export interface BlobRef {
  id: number;
  /** storage uid (the key is derived from it and the format) */
  uid: string;
  checksum: Buffer;
  /** plaintext bytes */
  size: number;
  state: BlobState;
  format: BlobFormat;
  /** Backy2Aes: the blob's data key wrapped with the repository key (RFC 3394, 40 bytes) and its nonce (16). */
  keyInfo: Buffer | null;
  /** the metadata pack in storage holding the blob's details, and its place there (null: not written yet) */
  metaPack: string | null;
  metaIndex: number | null;
}

/** A blob an import or a rebuild brings in: found by uid, inserted when the repository lacks it. */
export interface ImportBlob {
  uid: string;
  checksum: Buffer;
  size: number;
  format: BlobFormat;
  keyInfo: Buffer | null;
  /** stored bytes when known, else 0 */
  storedSize: number;
  /** known to be damaged or missing */
  bad: boolean;
  /** where storage already holds its details (a rebuild, an import that wrote them) */
  metaPack?: string;
  metaIndex?: number;
}

export interface ImportOptions {
  /** backy2's block dates (block-dates.ts) */
  blockDates?: Buffer;
  /** its metadata in storage is up to date */
  synced?: boolean;
}

/** A complete version an import or a rebuild brings in, with its states as they were. */
export interface ImportVersion extends NewVersion {
  valid: boolean;
  complete: boolean;
  protected: boolean;
}

/** Map entry values of a VersionRecord: an index into its blob list, or one of these. */
export const IMPORT_HOLE = -1;
export const IMPORT_PENDING = -2;

/**
 * Block map entries of `importVersion`: a known blob id (> 0), HOLE (0), PENDING (-1), or newBlobRef(k) for
 * the k-th of the new blobs passed along.
 */
export function newBlobRef(k: number): number {
  return -2 - k;
}

/** One block a backup has read: all-zero, or data with its checksum. */
export type BlockEntry = { index: number; zero: true } | { index: number; zero?: false; checksum: Buffer; size: number };

/** Where a data block went: an existing blob (dedup) or a new one the caller must upload. */
export interface ResolvedBlock {
  index: number;
  blobId: number;
  uid: string;
  /** true: the caller must store the blob (new, bad, or another backup's upload still in flight) */
  upload: boolean;
}

export interface StatsRow {
  date: number;
  versionUid: string;
  versionName: string;
  versionSizeBytes: number;
  versionSizeBlocks: number;
  bytesRead: number;
  blocksRead: number;
  bytesWritten: number;
  blocksWritten: number;
  bytesDedup: number;
  blocksDedup: number;
  bytesSparse: number;
  blocksSparse: number;
  durationSeconds: number;
}

export interface LockInfo {
  /** unique per process run */
  session: string;
  host: string;
  pid: number;
  /** process start time (from /proc), to tell a reused pid from the holder */
  pidStart: string;
  /** what the holder does, for the "locked by" message */
  what: string;
}

export interface CleanupMark {
  /** blobs unreferenced for at least the grace period, now marked for deletion */
  marked: number;
  /** blobs unreferenced but still inside the grace period */
  waiting: number;
  /** blobs referenced by at least one version */
  referenced: number;
}

export interface RepositoryStats {
  versions: number;
  blobs: number;
  storedBytes: number;
  plainBytes: number;
}

export interface MetaStore {
  /** Engine description without credentials. */
  readonly description: string;

  /** Creates the schema, with `settings`. false when it already existed (nothing is changed then). */
  initdb(settings?: Record<string, string>): Promise<boolean>;
  /** Connects and checks the schema (migrating it if older). Throws DatabaseError when there is none. */
  open(): Promise<void>;
  close(): Promise<void>;

  getSetting(key: string): Promise<string | undefined>;
  /** Stores the value unless the key has one; returns the value in effect. */
  setSettingIfAbsent(key: string, value: string): Promise<string>;

  /**
   * Creates an incomplete, invalid version. Its map starts all PENDING, or, with `base`, as a copy of the
   * base version's map with the listed block indices (and any beyond the base's end) set to PENDING.
   */
  createVersion(v: NewVersion, base?: { versionId: number; pending: Iterable<number> }): Promise<VersionRow>;
  getVersion(uid: string): Promise<VersionRow | undefined>;
  listVersions(): Promise<VersionRow[]>;
  /** false when the version does not exist (any more). */
  updateVersion(id: number, fields: Partial<Pick<VersionRow, 'valid' | 'complete' | 'protected' | 'expire'>>): Promise<boolean>;
  addTags(id: number, tags: string[]): Promise<void>;
  removeTags(id: number, tags: string[]): Promise<void>;
  /**
   * Removes the version, its map and tags; its blobs start their grace period. A protected version is
   * refused (ProtectedError), checked in the same transaction, so a concurrent `protect` either comes first
   * and wins, or finds the version gone. false when the version does not exist (any more).
   */
  removeVersion(id: number): Promise<boolean>;
  /**
   * removeVersion for several versions in one transaction (enforce, rm --expired): each is checked in it as
   * removeVersion checks it (rows locked in id order); a protected one is kept and reported, one that does
   * not exist (any more) is reported, the others are removed. One result per id, in the order given.
   */
  removeVersions(ids: number[]): Promise<RemovalResult[]>;

  /**
   * Adds a finished version with its map in one transaction (import, db-rebuild). `entries` are its block
   * map entries, naming known blobs by id and `newBlobs` by newBlobRef(k); a new blob whose uid the
   * repository knows already is that blob (after checking it is the same). `blockDates`: backy2's block dates
   * (see block-dates.ts). `synced`: its metadata in storage is up to date. Returns the version, the ids of the
   * new blobs, and the generation of its metadata (see staleStorageMeta).
   */
  importVersion(v: ImportVersion, entries: Float64Array, newBlobs: ImportBlob[], opts?: ImportOptions): Promise<{ version: VersionRow; newIds: number[]; metaGen: number }>;
  /**
   * Several versions as importVersion adds one, in one transaction: their entries refer to `newBlobs`, shared
   * by the batch (an import adds versions that introduce blobs the next ones use; one transaction for many
   * makes the random index updates of blob rows much cheaper). Returns, per version, its row and generation.
   */
  importVersions(items: { v: ImportVersion; entries: Float64Array; opts?: ImportOptions }[], newBlobs: ImportBlob[]): Promise<{ versions: { version: VersionRow; metaGen: number }[]; newIds: number[] }>;
  /** The details of these blobs are entry k of metadata pack `pack` for ids[k]. */
  setBlobPacks(pack: string, ids: number[]): Promise<void>;
  /** The metadata packs holding details of these blobs. */
  packsOf(ids: number[]): Promise<string[]>;
  /** Of these packs, those no blob row refers to any more (their objects can go). */
  unusedPacks(names: string[]): Promise<string[]>;
  /** backy2's block dates of an imported version, if it has them. */
  getBlockDates(versionId: number): Promise<Buffer | undefined>;
  /** Complete versions whose metadata copy in storage is out of date, oldest first. */
  staleStorageMeta(limit: number): Promise<{ uid: string; metaGen: number }[]>;
  /** The copy of generation `metaGen` is in storage. */
  markStorageMetaSynced(uid: string, metaGen: number): Promise<void>;
  /** Uids of removed versions whose copies may still be in storage. */
  removedStorageMeta(limit: number): Promise<string[]>;
  forgetRemovedStorageMeta(uids: string[]): Promise<void>;
  /** Whether the database holds no version and no blob (db-rebuild refuses otherwise). */
  isEmpty(): Promise<boolean>;

  /** Entries of one chunk of a version's map (length chunkLength(blocks, chunkNo)). */
  readMapChunk(versionId: number, chunkNo: number): Promise<Float64Array>;

  /**
   * Records blocks of a running backup, in one transaction: looks up each checksum, reserves a new blob for
   * unknown ones, and writes every entry into the version's map, so a blob is referenced the moment it is
   * found or reserved (cleanup can never take it away from under the backup).
   */
  recordBlocks(versionId: number, session: string, entries: BlockEntry[]): Promise<ResolvedBlock[]>;
  /** The blobs are now safely in storage. */
  markUploaded(blobs: { id: number; storedSize: number }[]): Promise<void>;
  getBlobs(ids: number[]): Promise<Map<number, BlobRef>>;
  /** Marks blobs bad and every version using them invalid; returns the uids of those versions. */
  markBad(ids: number[]): Promise<string[]>;

  /** Cleanup step 1: under an exclusive lock, marks blobs unreferenced for `graceMs` for deletion. */
  markForDeletion(graceMs: number, now: number): Promise<CleanupMark>;
  /** Cleanup step 2: blobs marked for deletion, a batch at a time. */
  blobsToDelete(limit: number): Promise<{ id: number; uid: string; format: BlobFormat }[]>;
  /** Cleanup step 3: forget blobs whose objects are gone. */
  forgetBlobs(ids: number[]): Promise<void>;
  /** Of these uids, those any blob row (in any state) has. */
  knownBlobUids(uids: string[]): Promise<Set<string>>;
  /** Every blob uid in the repository, page by page (cleanup --full checks storage has them). */
  blobUidPages(pageSize: number): AsyncIterable<{ id: number; uid: string; state: BlobState }[]>;
  repositoryStats(): Promise<RepositoryStats>;
  /**
   * For du: every version's block map as counts of distinct chunk contents, each distinct chunk's bytes once,
   * and the sizes of all blobs, in one consistent read. A complete version's map never changes: its summary
   * is stored when it becomes complete (updateVersion), or here on first use.
   */
  mapUsage(): Promise<MapUsage>;

  addStats(row: StatsRow): Promise<void>;
  listStats(versionUid?: string, limit?: number): Promise<StatsRow[]>;

  /**
   * Takes lock `name` unless it, or a lock matching one of `conflicts` (exact names, or prefixes ending in
   * '*'), is held by a live process. Returns undefined on success, else the holder.
   */
  tryLock(name: string, info: LockInfo, conflicts?: string[]): Promise<LockInfo | undefined>;
  unlock(name: string, session: string): Promise<void>;
  /**
   * tryLock for several locks in one step, each decided as tryLock decides it (in the order given, so a
   * later one sees the earlier ones): per request the holder, or undefined where the lock was taken.
   */
  tryLocks(requests: { name: string; info: LockInfo; conflicts?: string[] }[]): Promise<(LockInfo | undefined)[]>;
  /** unlock for several locks of one session in one step. */
  unlockAll(names: string[], session: string): Promise<void>;
}
