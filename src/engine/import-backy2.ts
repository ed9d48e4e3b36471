import * as fs from 'node:fs';
import { Backy2Config, loadBacky2Config } from '../backy2/config';
import { Backy2Database, Backy2Version, BlockColumn, openBacky2Database } from '../backy2/database';
import { COLUMN_STRIDE } from '../backy2/block-column';
import { Backy2Blob, Backy2DataError, checkBlob, importedVersionRow, parseBacky2Date, readLayout } from '../backy2/layout';
import { holdBacky2GlobalLock, refuseIfBacky2Busy } from '../backy2/locks';
import { makeKeyInfo, unwrapDataKey } from '../codec/backy2-blob';
import { encodeBlockDates } from '../meta/block-dates';
import { blockCount, HOLE, PENDING } from '../meta/block-map';
import { PACK_HOLE, PACK_PENDING } from '../meta/storage-format';
import { BlobFormat, IMPORT_HOLE, ImportBlob, ImportOptions, ImportVersion, newBlobRef } from '../meta/types';
import type { VersionObject } from '../meta/storage-format';
import { isBacky2Uid } from '../storage/blob-keys';
import type { RecordBlob } from '../meta/version-record';
import { BackyError, ConfigError, errorLine, WrongKeyError } from '../util/errors';
import { newPackName } from './storage-meta';
import { log } from '../util/log';
import { Progress } from '../util/progress';
import { JobRunner } from '../util/job-runner';
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
      const kek = await checkKey(repo, b2, db, opts.copy);
      return await importVersions(repo, b2, db, opts, kek);
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
    throw new ConfigError(`backy2 used hash_function ${b2.hashFunction}, this repository ${repo.cfg.hashFunction}: an import in place needs a repository ` +
      `created with hash_function = ${b2.hashFunction} in backy's configuration (initdb of a new database), ${use}`);
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

/**
 * Refuses a wrong or missing key before anything is imported. In place, returns the id of the key wrapping
 * the imported blobs' data keys (backy2's, registered with this repository; 0 when it is this repository's).
 */
async function checkKey(repo: Repository, b2: Backy2Config, db: Backy2Database, copy: boolean): Promise<number> {
  const enc = await db.someEncryptedBlock();
  if (!enc) return 0;
  if (!b2.encryptionKey) throw new ConfigError(`the backy2 repository has encrypted blocks but ${b2.file} has no encryption_key`);
  if (!/^[0-9a-f]{80}$/i.test(enc.envkey)) throw new BackyError(`block ${enc.uid} of the backy2 repository has a malformed wrapped key`);
  try {
    unwrapDataKey(b2.encryptionKey, Buffer.from(enc.envkey, 'hex'));
  } catch {
    throw new WrongKeyError(`the encryption_key in ${b2.file} is not the key this backy2 repository was written with (the data key of blob ${enc.uid} does not unwrap)`);
  }
  if (copy) return 0;
  if (!repo.cfg.encryptionKey) {
    throw new ConfigError('the backy2 repository is encrypted and this repository has no encryption_key: an import in place keeps backy2\'s key wrapped with it (or import with --copy)');
  }
  return repo.registerKek(b2.encryptionKey);
}

async function importVersions(repo: Repository, b2: Backy2Config, db: Backy2Database, opts: ImportBacky2Options, kek: number): Promise<ImportBacky2Result> {
  const result: ImportBacky2Result = { imported: [], skipped: [], invalid: [], failed: [], blobs: 0 };
  const versions = await db.versions();
  const tags = await db.tags();
  const present = new Set((await repo.meta.listVersions()).map((x) => x.uid));
  // The database scans the next versions while this one is added (a worker thread for SQLite).
  const columns = new Map<string, Promise<BlockColumn | undefined>>();
  const readAhead = (from: number) => {
    if (opts.copy) return;
    for (let j = from; j < Math.min(versions.length, from + 3); j++) {
      const x = versions[j];
      if (present.has(x.uid) || columns.has(x.uid)) continue;
      const p = db.blockColumn(x);
      p.catch(() => undefined);
      columns.set(x.uid, p);
    }
  };
  const inPlace = new InPlaceImporter(repo, b2, db, kek);
  const statsDone: Promise<void>[] = [];
  const imported = (v: Backy2Version, valid: boolean, why: string) => {
    if (opts.copy === false) statsDone.push(importStats(repo, db, v));
    result.imported.push(v.uid);
    if (!valid) {
      result.invalid.push(v.uid);
      log.warn(`version ${v.uid} (${v.name}) imported as invalid: ${why}`);
    } else {
      log.info(`imported version ${v.uid} (${v.name}, ${v.date.slice(0, 19)})`);
    }
  };
  const copier = new Backy2Copier(repo, b2);
  const blobsBefore = (await repo.meta.repositoryStats()).blobs;
  const progress = new Progress('import-backy2', versions.reduce((s, v) => s + v.sizeBytes, 0), { quiet: opts.quiet });
  try {
    for (const [k, v] of versions.entries()) {
      readAhead(k);
      const there = present.has(v.uid) ? await repo.meta.getVersion(v.uid) : undefined;
      if (there && (there.complete || !opts.copy)) {
        result.skipped.push(v.uid);
        progress.add(v.sizeBytes);
        continue;
      }
      try {
        let valid = false;
        let why = '';
        if (opts.copy) {
          const layout = await readLayout(db, v, b2.blockSize, tags.get(v.uid) ?? []);
          for (const p of layout.problems) log.warn(`backy2 version ${v.uid}: ${p}`);
          valid = await copier.copy(db, layout, { progress });
          why = describeInvalid(v, layout.bad.some(Boolean), layout.problems);
        } else {
          const r = await readVersion(db, v, b2.blockSize, tags.get(v.uid) ?? [], columns.get(v.uid));
          columns.delete(v.uid);
          for (const p of r.problems) log.warn(`backy2 version ${v.uid}: ${p}`);
          // Reported once in the database (versions are added in batches).
          await inPlace.add(r, (ok) => {
            imported(v, ok, describeInvalid(v, r.bad.size > 0, r.problems));
            progress.add(v.sizeBytes);
          });
          continue;
        }
        if (!there) await importStats(repo, db, v);
        imported(v, valid, why);
      } catch (e) {
        // Only what is wrong with this version's rows spares the others; storage or database trouble stops.
        if (!(e instanceof Backy2DataError)) throw e;
        result.failed.push({ uid: v.uid, error: errorLine(e) });
        log.error(`version ${v.uid} not imported: ${errorLine(e)}`);
      }
    }
    await inPlace.flush();
    await Promise.all(statsDone);
  } finally {
    progress.finish();
    await copier.close();
    await inPlace.flush().catch(() => undefined);
  }
  result.blobs = (await repo.meta.repositoryStats()).blobs - blobsBefore;
  log.info(`import-backy2: ${result.imported.length} versions imported (${result.invalid.length} of them invalid), ` +
    `${result.skipped.length} already here, ${result.failed.length} failed; ${result.blobs} blobs added`);
  return result;
}

function describeInvalid(v: Backy2Version, bad: boolean, problems: string[]): string {
  if (!v.valid) return 'backy2 had marked it invalid';
  if (bad) return 'backy2 had found bad blocks in it';
  return problems[0] ?? 'some blocks are unusable';
}

/**
 * A version's blocks read from backy2: per block COLUMN_STRIDE bytes, its blob uid (32 characters, HOLE_SLOT
 * or PENDING_SLOT filled) and the second its row was written ('YYYY-MM-DD HH:MM:SS', PENDING_SLOT filled
 * without a row).
 */
interface ReadVersion {
  version: ImportVersion;
  rows: Buffer;
  /** blobs with a row backy2 had found bad */
  bad: Set<string>;
  problems: string[];
}

const HOLE_SLOT = 0x2d; // '-': a sparse block
const PENDING_SLOT = 0x23; // '#': no usable row

/**
 * Reads a version's blocks: regular versions (all of them, in practice) in one scan by the database (`column`,
 * possibly already under way), others row by row with every row checked (readLayout).
 */
async function readVersion(db: Backy2Database, v: Backy2Version, blockSize: number, tags: string[], column: Promise<BlockColumn | undefined> | undefined): Promise<ReadVersion> {
  const version = importedVersionRow(v, blockSize, tags);
  const col = blockCount(v.sizeBytes, blockSize) === v.size ? await column : undefined;
  if (col) return { version, rows: col.rows, bad: new Set(), problems: [] };
  const layout = await readLayout(db, v, blockSize, tags);
  const rows = Buffer.alloc(layout.map.length * COLUMN_STRIDE, PENDING_SLOT);
  const bad = new Set<string>();
  layout.map.forEach((m, i) => {
    const at = i * COLUMN_STRIDE;
    if (m === IMPORT_HOLE) rows.fill(HOLE_SLOT, at, at + 32);
    else if (m >= 0) {
      rows.write(layout.uids[m], at, 'latin1');
      if (layout.bad[m]) bad.add(layout.uids[m]);
    }
    if (!Number.isNaN(layout.dates[i])) rows.write(new Date(layout.dates[i]).toISOString().slice(0, 19).replace('T', ' '), at + 32, 'latin1');
  });
  return { version: layout.version, rows, bad, problems: layout.problems };
}

/**
 * Whether `len` bytes of `a` at `aAt` equal those of `b` at `bAt`. A plain loop: it runs for every block of
 * every version (25.6 million times in the benchmark), where Buffer.compare's call into C++ cost about 3x more.
 */
function sameBytes(a: Buffer, aAt: number, b: Buffer, bAt: number, len: number): boolean {
  for (let k = 0; k < len; k++) if (a[aAt + k] !== b[bAt + k]) return false;
  return true;
}

/** Whether the 32 bytes at `at` are all `c` (HOLE_SLOT or PENDING_SLOT filled: no blob uid starts so). */
function filledWith(rows: Buffer, at: number, c: number): boolean {
  if (rows[at] !== c) return false;
  for (let k = 1; k < 32; k++) if (rows[at + k] !== c) return false;
  return true;
}

/** Per-block dates (ms, whole seconds; NaN without a row) from the date parts of the rows. */
function datesOf(rows: Buffer, n: number): Float64Array {
  const out = new Float64Array(n);
  let last = -1;
  let ms = NaN;
  for (let i = 0; i < n; i++) {
    const at = i * COLUMN_STRIDE + 32;
    if (rows[at] === PENDING_SLOT) { out[i] = NaN; continue; }
    // Rows of one second share their date text: parse only when it changes.
    if (last < 0 || !sameBytes(rows, last, rows, at, 19)) {
      ms = plainDate(rows, at);
      if (Number.isNaN(ms)) ms = parseBacky2Date(rows.toString('latin1', at, at + 19));
      last = at;
    }
    out[i] = ms;
  }
  return out;
}

/**
 * 'YYYY-MM-DD HH:MM:SS' at `at` as parseBacky2Date reads it (Date.UTC of its numbers), NaN for any other
 * text (then parseBacky2Date decides): a million distinct seconds in the benchmark, where a string and a
 * regular expression each cost more than this.
 */
function plainDate(b: Buffer, at: number): number {
  if (b[at + 4] !== 0x2d || b[at + 7] !== 0x2d || b[at + 10] !== 0x20 || b[at + 13] !== 0x3a || b[at + 16] !== 0x3a) return NaN;
  const d = (k: number) => {
    const x = b[at + k] - 0x30;
    return x >= 0 && x <= 9 ? x : NaN;
  };
  return Date.UTC(d(0) * 1000 + d(1) * 100 + d(2) * 10 + d(3), d(5) * 10 + d(6) - 1, d(8) * 10 + d(9), d(11) * 10 + d(12), d(14) * 10 + d(15), d(17) * 10 + d(18), 0);
}

/**
 * Imports versions in place, one after the other. Consecutive versions of a machine share nearly all their
 * blobs, so each version is compared with the one before, block by block on the raw uid column: only the
 * blocks that changed are looked up, only blobs never seen are read from backy2's database and described in
 * a metadata pack. Their data keys stay as backy2 wrapped them (with backy2's key, registered as `kek`).
 * Versions are added to the database in batches (one transaction for many: blob rows are indexed by random
 * uids and checksums, and a transaction per version would rewrite the same index pages again and again).
 * Blob ids and pack places are remembered by uid (bounded).
 */
class InPlaceImporter {
  private readonly uidToG = new Map<string, number>();
  private gId: number[] = [];
  private gPack: number[] = [];
  private gIdx: number[] = [];
  /** index of a blob of the batch in `batchBlobs`, -1 otherwise */
  private gRef: number[] = [];
  private readonly packNames: string[] = [];
  private prev: { rows: Buffer; slots: Int32Array } | undefined;
  private batch: { v: ImportVersion; entries: Float64Array; opts: ImportOptions; object: VersionObject | undefined; done: (valid: boolean) => void }[] = [];
  private batchBlobs: ImportBlob[] = [];
  private batchG: number[] = [];
  private packEntries: RecordBlob[] = [];
  private packName = newPackName();
  private static readonly MAX_BLOBS = 4_000_000;
  private static readonly BATCH_VERSIONS = 64;
  private static readonly BATCH_BLOBS = 20_000;
  private readonly writes = new JobRunner(8);

  /** `kek`: the id of backy2's key in this repository (it wraps the data keys). */
  constructor(private readonly repo: Repository, private readonly b2: Backy2Config, private readonly db: Backy2Database, private readonly kek: number) {}

  /** Adds the version; `done` runs, with its validity, once it is in the database. */
  async add(r: ReadVersion, done: (valid: boolean) => void): Promise<void> {
    try {
      await this.prepare(r, done);
      if (this.batch.length >= InPlaceImporter.BATCH_VERSIONS || this.batchBlobs.length >= InPlaceImporter.BATCH_BLOBS) await this.commit();
    } catch (e) {
      this.forget(); // what it remembered may name blobs of the failed batch
      throw e;
    }
  }

  private async prepare(r: ReadVersion, done: (valid: boolean) => void): Promise<void> {
    const v = r.version;
    const n = r.rows.length / COLUMN_STRIDE;
    if (this.uidToG.size > InPlaceImporter.MAX_BLOBS && !this.batch.length) this.forget();
    // Block -> blob number g (-1 hole, -2 unusable); new uids collected for their details.
    const slots = new Int32Array(n);
    const fresh = new Map<string, number[]>();
    const prev = this.prev && this.prev.slots.length === n ? this.prev : undefined;
    const rows = r.rows;
    const prevRows = prev ? prev.rows : rows;
    const prevSlots = prev ? prev.slots : undefined;
    for (let i = 0; i < n; i++) {
      const at = i * COLUMN_STRIDE;
      if (prevSlots !== undefined && prevSlots[i] >= 0 && sameBytes(rows, at, prevRows, at, 32)) {
        slots[i] = prevSlots[i];
        continue;
      }
      if (filledWith(rows, at, HOLE_SLOT)) { slots[i] = -1; continue; }
      if (filledWith(rows, at, PENDING_SLOT)) { slots[i] = -2; continue; }
      const uid = rows.toString('latin1', at, at + 32);
      const g = this.uidToG.get(uid);
      if (g !== undefined) slots[i] = g;
      else {
        let list = fresh.get(uid);
        if (!list) fresh.set(uid, (list = []));
        list.push(i);
      }
    }
    // Blobs never seen: their details from backy2's database, into the batch's pack.
    if (fresh.size) {
      const details = await this.db.blobDetails(v.uid, [...fresh.values()].map((blocks) => blocks[0]));
      for (const [uid, blocks] of fresh) {
        const b = isBacky2Uid(uid) ? checkBlob(uid, details.get(uid), this.b2.hashFunction) : `blob ${JSON.stringify(uid)} is not a backy2 blob uid`;
        const wrongSize = typeof b !== 'string' && blocks.some((i) => b.size !== Math.min(v.blockSize, v.size - i * v.blockSize));
        if (typeof b === 'string' || wrongSize) {
          r.problems.push(typeof b === 'string' ? b : `blob ${uid} has size ${b.size}, not that of its blocks`);
          for (const i of blocks) slots[i] = -2;
          continue;
        }
        const g = this.gId.length;
        this.uidToG.set(uid, g);
        const keyInfo = b.format === BlobFormat.Backy2Aes ? makeKeyInfo(this.kek, b.envkey!, b.nonce) : null;
        this.gId.push(0);
        this.gPack.push(this.packNames.length); // the batch's pack, named when committed
        this.gIdx.push(this.packEntries.length);
        this.gRef.push(this.batchBlobs.length);
        // Written out, not spread: object spread was the dearest line of the import per new blob.
        this.packEntries.push({ uid, checksum: b.checksum, size: b.size, format: b.format, keyInfo });
        this.batchBlobs.push({
          uid, checksum: b.checksum, size: b.size, format: b.format, keyInfo, storedSize: b.format === BlobFormat.Backy2Plain ? b.size : 0,
          bad: r.bad.has(uid), metaPack: this.packName, metaIndex: this.packEntries.length - 1,
        });
        this.batchG.push(g);
        for (const i of blocks) slots[i] = g;
      }
    }
    // The block map for the database (blobs of the batch by reference) and the version object for storage.
    const entries = new Float64Array(n);
    const packs: string[] = [];
    const packNo = new Int32Array(n);
    const index = new Int32Array(n);
    // Pack number (the batch's own is packNames.length) -> its place in `packs`, -1 before its first use.
    const batchPack = this.packNames.length;
    const localPack = new Int32Array(batchPack + 1).fill(-1);
    const { gId, gRef, gPack, gIdx } = this;
    const anyBad = r.bad.size > 0;
    let unusable = 0;
    let badBlocks = 0;
    for (let i = 0; i < n; i++) {
      const g = slots[i];
      if (g === -1) { entries[i] = HOLE; packNo[i] = PACK_HOLE; continue; }
      if (g === -2) { entries[i] = PENDING; packNo[i] = PACK_PENDING; unusable++; continue; }
      const id = gId[g];
      entries[i] = id > 0 ? id : newBlobRef(gRef[g]);
      const pack = gPack[g];
      let p = localPack[pack];
      if (p < 0) {
        localPack[pack] = p = packs.length;
        packs.push(pack === batchPack ? this.packName : this.packNames[pack]);
      }
      packNo[i] = p;
      index[i] = gIdx[g];
      if (anyBad && r.bad.has(rows.toString('latin1', i * COLUMN_STRIDE, i * COLUMN_STRIDE + 32))) badBlocks++;
    }
    v.valid = v.valid && v.complete && !unusable && !badBlocks;
    const blockDates = encodeBlockDates(v.date, datesOf(r.rows, n));
    this.batch.push({ v, entries, opts: { blockDates }, object: v.complete ? { version: v, packs, packNo, index, blockDates } : undefined, done });
    this.prev = { rows: r.rows, slots };
  }

  /** Adds the batch: its pack to storage, its versions and blobs to the database, its objects to storage. */
  private async commit(): Promise<void> {
    const items = this.batch;
    if (!items.length) return;
    // In storage before the database says the blobs' details are there.
    if (this.packEntries.length) await this.repo.storageMeta.putPack(this.packName, this.packEntries);
    const res = await this.repo.meta.importVersions(items, this.batchBlobs);
    this.batchG.forEach((g, k) => {
      this.gId[g] = res.newIds[k];
      this.gRef[g] = -1;
    });
    if (this.packEntries.length) this.packNames.push(this.packName);
    this.batch = [];
    this.batchBlobs = [];
    this.batchG = [];
    this.packEntries = [];
    this.packName = newPackName();
    for (const [k, item] of items.entries()) {
      item.done(item.v.valid);
      const object = item.object;
      if (!object) continue;
      // Written while the next versions are read (a version not written yet is stale, written by a later sync).
      await this.writes.acquire();
      if (this.writes.failed) {
        this.writes.release();
        throw this.writes.failure;
      }
      this.writes.start(async () => {
        await this.repo.storageMeta.putVersion(object);
        await this.repo.meta.markStorageMetaSynced(object.version.uid, res.versions[k].metaGen);
      });
    }
  }

  /** Adds what is batched and waits for the version objects still being written. */
  async flush(): Promise<void> {
    try {
      await this.commit();
    } catch (e) {
      this.forget();
      throw e;
    }
    await this.writes.drain();
    if (this.writes.failed) throw this.writes.failure;
  }

  /** Forgets what it remembers (bounded memory, or after a failure); blobs met again are found by uid. */
  private forget(): void {
    this.uidToG.clear();
    this.gId = [];
    this.gPack = [];
    this.gIdx = [];
    this.gRef = [];
    this.batch = [];
    this.batchBlobs = [];
    this.batchG = [];
    this.packEntries = [];
    this.packName = newPackName();
    this.prev = undefined;
  }
}

async function importStats(repo: Repository, db: Backy2Database, v: Backy2Version): Promise<void> {
  for (const s of await db.stats(v.uid)) {
    await repo.meta.addStats({ ...s, date: parseBacky2Date(s.date), versionUid: v.uid });
  }
}
