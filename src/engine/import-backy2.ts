import * as fs from 'node:fs';
import { timingSafeEqual } from 'node:crypto';
import { Backy2Config, loadBacky2Config } from '../backy2/config';
import { Backy2Database, Backy2Version, openBacky2Database } from '../backy2/database';
import { Backy2Blob, Backy2Layout, checkBlob, parseBacky2Date, readLayout } from '../backy2/layout';
import { holdBacky2GlobalLock, refuseIfBacky2Busy } from '../backy2/locks';
import { unwrapDataKey, wrapDataKey } from '../codec/backy2-blob';
import { encodeBlockDates } from '../meta/block-dates';
import { BlobFormat, IMPORT_PENDING, ImportBlob } from '../meta/types';
import type { RecordBlob } from '../meta/version-record';
import { BackyError, ConfigError, errorLine, WrongKeyError } from '../util/errors';
import { log } from '../util/log';
import { Progress } from '../util/progress';
import { Backy2Copier } from './import-backy2-copy';
import { LOCKS, Repository } from './repository';

export interface ImportBacky2Options {
  /** backy2's backy.cfg */
  configFile: string;
  /** re-encode every block into backy's format instead of reading backy2's blobs where they are */
  copy: boolean;
  quiet?: boolean;
}

export interface ImportBacky2Result {
  imported: string[];
  /** already in this repository (an earlier run) */
  skipped: string[];
  /** imported, but invalid (backy2 had found bad blocks, or rows are missing or unusable) */
  invalid: string[];
  /** versions that could not be imported, with the reason */
  failed: { uid: string; error: string }[];
  /** blobs added to the repository */
  blobs: number;
}

/** Blob details and ids remembered between versions (versions share most blobs); cleared when it grows past this. */
const BLOB_CACHE = 1_000_000;

/**
 * Imports every version of a backy2 2.9–2.13 repository. Without --copy, backy2's blobs become blobs of this
 * repository where they are (its [DataBackend] must be backy2's), read in backy2's formats; nothing in storage
 * is written but the metadata objects. With --copy every block is re-encoded into backy's format and stored
 * anew (copy.ts). Versions already here are skipped, so a second run (or one after an interruption) adds only
 * what is missing. backy2 is kept out meanwhile (its global lock is held) and must not be running.
 */
export async function importBacky2(repo: Repository, opts: ImportBacky2Options): Promise<ImportBacky2Result> {
  const b2 = loadBacky2Config(opts.configFile);
  if (b2.engine === repo.cfg.metaEngine) throw new ConfigError('backy2 and backy use the same database: give backy a [MetaBackend] engine of its own');
  refuseIfBacky2Busy(b2.lockDir, b2.processName);
  const held = await holdBacky2GlobalLock(b2.lockDir);
  try {
    // No cleanup while blobs come in: between a blob's row and the map referencing it, it would look unused.
    await repo.lock(LOCKS.cleanup, 'import of a backy2 repository', [LOCKS.fullCleanup]);
    await repo.lock('import-backy2', 'import of a backy2 repository');
    const db = await openBacky2Database(b2.engine);
    try {
      log.info(`importing backy2 repository ${db.description} (schema ${db.schema.revision || 'unknown'}) ${opts.copy ? 'by copying every block' : 'in place'}`);
      if (!opts.copy) checkInPlace(repo, b2);
      await checkKey(repo, b2, db, opts.copy);
      return await importVersions(repo, b2, db, opts);
    } finally {
      await db.close();
    }
  } finally {
    await held.release();
  }
}

/** An import in place reads backy2's blobs through this repository's storage and checksums: both must match. */
function checkInPlace(repo: Repository, b2: Backy2Config): void {
  const use = 'or import with --copy';
  if (b2.hashFunction !== repo.cfg.hashFunction) {
    throw new ConfigError(`backy2 used hash_function ${b2.hashFunction}, this repository ${repo.cfg.hashFunction}: an import in place needs the same, ${use}`);
  }
  const d = repo.cfg.data;
  if (b2.data.type === 'file') {
    const real = (p: string) => { try { return fs.realpathSync(p); } catch { return p; } };
    if (d.type !== 'file' || real(d.path) !== real(b2.data.path)) {
      throw new ConfigError(`an import in place reads backy2's blobs where they are: set [DataBackend] type = file, path = ${b2.data.path} in backy's configuration, ${use}`);
    }
  } else {
    const norm = (e?: string) => (e ?? '').trim().replace(/\/+$/, '').toLowerCase();
    if (d.type !== 's3' || d.s3.bucketName !== b2.data.bucket || norm(d.s3.endpointUrl) !== norm(b2.data.endpoint) || d.s3.prefix) {
      throw new ConfigError(`an import in place reads backy2's blobs where they are: set [DataBackend] type = s3, bucket_name = ${b2.data.bucket}` +
        `${b2.data.endpoint ? `, endpoint_url = ${b2.data.endpoint}` : ''} and no prefix in backy's configuration, ${use}`);
    }
  }
}

/** Refuses a wrong or missing key before anything is imported. */
async function checkKey(repo: Repository, b2: Backy2Config, db: Backy2Database, copy: boolean): Promise<void> {
  const enc = await db.someEncryptedBlock();
  if (!enc) return;
  if (!b2.encryptionKey) throw new ConfigError(`the backy2 repository has encrypted blocks but ${b2.file} has no encryption_key`);
  if (!/^[0-9a-f]{80}$/i.test(enc.envkey)) throw new BackyError(`block ${enc.uid} of the backy2 repository has a malformed wrapped key`);
  try {
    unwrapDataKey(b2.encryptionKey, Buffer.from(enc.envkey, 'hex'));
  } catch {
    throw new WrongKeyError(`the encryption_key in ${b2.file} is not the key this backy2 repository was written with (the data key of blob ${enc.uid} does not unwrap)`);
  }
  if (!copy && !repo.cfg.encryptionKey) {
    throw new ConfigError('the backy2 repository is encrypted and this repository has no encryption_key: an import in place re-wraps the data keys with it (or import with --copy)');
  }
}

async function importVersions(repo: Repository, b2: Backy2Config, db: Backy2Database, opts: ImportBacky2Options): Promise<ImportBacky2Result> {
  const result: ImportBacky2Result = { imported: [], skipped: [], invalid: [], failed: [], blobs: 0 };
  const versions = await db.versions();
  const tags = await db.tags();
  const cache = new BlobCache(repo, b2);
  const copier = new Backy2Copier(repo, b2);
  const blobsBefore = (await repo.meta.repositoryStats()).blobs;
  const progress = new Progress('import-backy2', versions.reduce((s, v) => s + v.sizeBytes, 0), { quiet: opts.quiet });
  try {
    for (const v of versions) {
      const there = await repo.meta.getVersion(v.uid);
      if (there && (there.complete || !opts.copy)) {
        result.skipped.push(v.uid);
        progress.add(v.sizeBytes);
        continue;
      }
      try {
        const layout = await readLayout(db, v, b2.blockSize, tags.get(v.uid) ?? []);
        for (const p of layout.problems) log.warn(`backy2 version ${v.uid}: ${p}`);
        const valid = opts.copy
          ? await copier.copy(db, layout, { progress })
          : await importInPlace(repo, db, layout, cache);
        if (!opts.copy) progress.add(v.sizeBytes);
        if (!there) await importStats(repo, db, v);
        result.imported.push(v.uid);
        if (!valid) {
          result.invalid.push(v.uid);
          log.warn(`version ${v.uid} (${v.name}) imported as invalid: ${describeInvalid(v, layout)}`);
        } else {
          log.info(`imported version ${v.uid} (${v.name}, ${v.date.slice(0, 19)})`);
        }
      } catch (e) {
        if (!(e instanceof BackyError) || e instanceof WrongKeyError) throw e;
        result.failed.push({ uid: v.uid, error: errorLine(e) });
        log.error(`version ${v.uid} not imported: ${errorLine(e)}`);
      }
    }
  } finally {
    progress.finish();
    await copier.close();
  }
  result.blobs = (await repo.meta.repositoryStats()).blobs - blobsBefore;
  log.info(`import-backy2: ${result.imported.length} versions imported (${result.invalid.length} of them invalid), ` +
    `${result.skipped.length} already here, ${result.failed.length} failed; ${result.blobs} blobs added`);
  return result;
}

function describeInvalid(v: Backy2Version, layout: Backy2Layout): string {
  if (!v.valid) return 'backy2 had marked it invalid';
  if (layout.bad.some(Boolean)) return 'backy2 had found bad blocks in it';
  return layout.problems[0] ?? 'some blocks are unusable';
}

/**
 * The blobs of backy2's versions as blobs of this repository: details read from backy2's database once, data
 * keys re-wrapped with backy's key (backy2's `rekey`, done for each blob once), ids remembered once known.
 */
class BlobCache {
  private readonly entries = new Map<string, { blob: RecordBlob; id?: number } | string>();
  private readonly sameKey: boolean;

  constructor(private readonly repo: Repository, private readonly b2: Backy2Config) {
    const k = repo.cfg.encryptionKey;
    this.sameKey = !!k && !!b2.encryptionKey && timingSafeEqual(k, b2.encryptionKey);
  }

  async load(db: Backy2Database, uids: string[]): Promise<void> {
    const missing = uids.filter((u) => !this.entries.has(u));
    if (!missing.length) return;
    if (this.entries.size + missing.length > BLOB_CACHE) this.entries.clear();
    const details = await db.blobDetails(missing);
    for (const uid of missing) {
      const b = checkBlob(uid, details.get(uid), this.b2.hashFunction);
      this.entries.set(uid, typeof b === 'string' ? b : { blob: this.toRecordBlob(b) });
    }
  }

  get(uid: string): { blob: RecordBlob; id?: number } | string {
    return this.entries.get(uid) ?? `blob ${uid} was not loaded`;
  }

  private toRecordBlob(b: Backy2Blob): RecordBlob {
    let keyInfo: Buffer | null = null;
    if (b.format === BlobFormat.Backy2Aes) {
      let wrapped = b.envkey!;
      if (!this.sameKey) {
        try {
          wrapped = wrapDataKey(this.repo.cfg.encryptionKey!, unwrapDataKey(this.b2.encryptionKey!, b.envkey!));
        } catch {
          // A damaged row: the key is kept as it was, reads will fail and mark the blob bad.
          log.warn(`blob ${b.uid}: its data key does not unwrap with backy2's key; imported as it is`);
        }
      }
      keyInfo = b.nonce ? Buffer.concat([wrapped, b.nonce]) : wrapped;
    }
    return { uid: b.uid, checksum: b.checksum, size: b.size, format: b.format, keyInfo };
  }

  remember(uid: string, id: number): void {
    const e = this.entries.get(uid);
    if (e && typeof e !== 'string') e.id = id;
  }
}

/** Adds one version whose blobs stay where backy2 wrote them; writes its metadata object. Returns its validity. */
async function importInPlace(repo: Repository, db: Backy2Database, layout: Backy2Layout, cache: BlobCache): Promise<boolean> {
  await cache.load(db, layout.uids);
  // The version's own blob table: usable blobs in order of first use (as the database will list them).
  const blobs: ImportBlob[] = [];
  const record: RecordBlob[] = [];
  const remap = new Int32Array(layout.uids.length).fill(-1);
  const map = layout.map;
  let unusable = 0;
  for (let i = 0; i < map.length; i++) {
    const k = map[i];
    if (k < 0) continue;
    if (remap[k] < 0) {
      const e = cache.get(layout.uids[k]);
      if (typeof e === 'string') {
        layout.problems.push(e);
        log.warn(`backy2 version ${layout.version.uid}: ${e}`);
        remap[k] = -2;
      } else {
        if (e.blob.size !== Math.min(layout.version.blockSize, layout.version.size - i * layout.version.blockSize)) {
          layout.problems.push(`blob ${e.blob.uid} has size ${e.blob.size} at block ${i}`);
          remap[k] = -2;
        } else {
          remap[k] = blobs.length;
          record.push(e.blob);
          blobs.push({ ...e.blob, storedSize: e.blob.format === BlobFormat.Backy2Plain ? e.blob.size : 0, bad: layout.bad[k], id: e.id });
        }
      }
    }
    if (remap[k] === -2) {
      map[i] = IMPORT_PENDING;
      unusable++;
    } else {
      map[i] = remap[k];
    }
  }
  const v = layout.version;
  v.valid = v.valid && v.complete && !unusable && !layout.bad.some(Boolean);
  const blockDates = encodeBlockDates(v.date, layout.dates);
  const r = await repo.meta.importVersion(v, blobs, map, { blockDates });
  blobs.forEach((b, k) => cache.remember(b.uid, r.blobIds[k]));
  if (v.complete) {
    await repo.storageMeta.putVersion({ version: v, blobs: record, map, blockDates });
    await repo.meta.markStorageMetaSynced(v.uid, r.metaGen);
  }
  return v.valid;
}

async function importStats(repo: Repository, db: Backy2Database, v: Backy2Version): Promise<void> {
  for (const s of await db.stats(v.uid)) {
    await repo.meta.addStats({
      date: parseBacky2Date(s.date), versionUid: v.uid, versionName: s.versionName, versionSizeBytes: s.sizeBytes,
      versionSizeBlocks: s.sizeBlocks, bytesRead: s.bytesRead, blocksRead: s.blocksRead, bytesWritten: s.bytesWritten,
      blocksWritten: s.blocksWritten, bytesDedup: s.bytesDedup, blocksDedup: s.blocksDedup, bytesSparse: s.bytesSparse,
      blocksSparse: s.blocksSparse, durationSeconds: s.duration,
    });
  }
}
