import * as fs from 'node:fs';
import * as path from 'node:path';
import Database from 'better-sqlite3';
import { DatabaseError } from '../util/errors';
import { holderAlive } from '../util/process-info';
import { blockCount, chunkLength, decodeChunk, encodeChunk, MAP_CHUNK, HOLE } from './block-map';
import { blobSizesFromHex, decodeSummary, deltaAgainst, DELTA_BASE_SQL, encodeSummary, mapDelta, MapSummary, MapUsage, successorsSql, summarizeChunks, SummaryTable } from './map-summary';
import { blobRefFromRow, blobsToStamp, CleanupTally, knownBlobId, statsFromRow, decideBlob, IdBitmap, importedChunks, newBlobUid, newVersionChunks, ownBlobUsable } from './logic';
import { fullSchema, migrationsFrom, SCHEMA_VERSION } from './schema';
import {
  BlobFormat, BlobRef, BlobState, BlockEntry, CleanupMark, ImportBlob, ImportOptions, ImportVersion, LockInfo, MetaStore, NewVersion,
  ProtectedError, RemovalResult, RepositoryStats, ResolvedBlock, StatsRow, VersionRow,
} from './types';

type Row = Record<string, unknown>;

/** A list of ids or uids passed as one JSON parameter: one statement whatever the list's length. */
const IN_LIST = '(SELECT value FROM json_each(?))';

/**
 * The embedded metadata store: one SQLite file in WAL mode (readers never wait for the writer). better-sqlite3
 * is synchronous; each method is one short transaction, so it blocks the event loop only briefly.
 */
export class SqliteMetaStore implements MetaStore {
  readonly description: string;
  private db: Database.Database | undefined;
  /** Decoded map chunks of versions this process is writing (it holds their locks, so nobody else writes them). */
  private writeChunks = new Map<string, Float64Array>();

  constructor(readonly file: string) {
    this.description = `sqlite ${file}`;
  }

  private get d(): Database.Database {
    if (!this.db) throw new DatabaseError('database is not open');
    return this.db;
  }

  /** Statements are compiled once per connection: recordBlocks and friends run thousands of times a backup. */
  private statements = new Map<string, Database.Statement>();

  private st(sql: string): Database.Statement {
    let s = this.statements.get(sql);
    if (!s) this.statements.set(sql, (s = this.d.prepare(sql)));
    return s;
  }

  private connect(create: boolean): Database.Database {
    try {
      if (create && this.file !== ':memory:') fs.mkdirSync(path.dirname(this.file), { recursive: true, mode: 0o700 });
      const db = new Database(this.file, { fileMustExist: !create, timeout: 60_000 });
      db.pragma('journal_mode = WAL');
      db.pragma('synchronous = NORMAL');
      db.pragma('foreign_keys = ON');
      // Blob rows are found by uid and checksum at random: their indexes of a large repository are tens of MB,
      // and SQLite's default 2 MB cache would read their pages back from the OS over and over.
      db.pragma('cache_size = -65536');
      db.defaultSafeIntegers(false);
      return db;
    } catch (e) {
      const msg = (e as Error).message;
      if (!create && /does not exist|unable to open/i.test(msg) && !fs.existsSync(this.file)) {
        throw new DatabaseError(`database ${this.file} does not exist: run "backy initdb" (or "backy init")`);
      }
      throw new DatabaseError(`cannot open database ${this.file}: ${msg}`);
    }
  }

  private hasSchema(db: Database.Database): boolean {
    return !!db.prepare(`SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'settings'`).get();
  }

  async initdb(settings: Record<string, string> = {}): Promise<boolean> {
    const db = this.connect(true);
    this.db = db;
    if (this.hasSchema(db)) return false;
    const ddl = fullSchema('sqlite');
    db.transaction(() => {
      for (const s of ddl) db.exec(s);
      db.prepare(`INSERT INTO settings (key, value) VALUES ('schema_version', ?)`).run(String(SCHEMA_VERSION));
      const put = db.prepare(`INSERT INTO settings (key, value) VALUES (?, ?)`);
      for (const [k, v] of Object.entries(settings)) put.run(k, v);
    }).immediate();
    return true;
  }

  async open(): Promise<void> {
    const db = this.connect(false);
    this.db = db;
    if (!this.hasSchema(db)) throw new DatabaseError(`database ${this.file} is not initialized: run "backy initdb"`);
    const v = Number((db.prepare(`SELECT value FROM settings WHERE key = 'schema_version'`).get() as Row | undefined)?.value ?? 0);
    if (v > SCHEMA_VERSION) throw new DatabaseError(`database ${this.file} has schema version ${v}, newer than this backy understands (${SCHEMA_VERSION}): upgrade backy`);
    if (v < SCHEMA_VERSION) {
      db.transaction(() => {
        for (const s of migrationsFrom(v, 'sqlite')) db.exec(s);
        db.prepare(`UPDATE settings SET value = ? WHERE key = 'schema_version'`).run(String(SCHEMA_VERSION));
      }).immediate();
    }
  }

  async close(): Promise<void> {
    this.statements.clear();
    this.db?.close();
    this.db = undefined;
  }

  async getSetting(key: string): Promise<string | undefined> {
    return (this.st(`SELECT value FROM settings WHERE key = ?`).get(key) as Row | undefined)?.value as string | undefined;
  }

  async setSettingIfAbsent(key: string, value: string): Promise<string> {
    const db = this.d;
    return db.transaction(() => {
      this.st(`INSERT INTO settings (key, value) VALUES (?, ?) ON CONFLICT (key) DO NOTHING`).run(key, value);
      return (this.st(`SELECT value FROM settings WHERE key = ?`).get(key) as Row).value as string;
    }).immediate();
  }

  // ---- versions

  private toVersion(r: Row, tags: string[]): VersionRow {
    return {
      id: Number(r.id), uid: r.uid as string, name: r.name as string, snapshotName: r.snapshot_name as string,
      date: Number(r.date), size: Number(r.size), blockSize: Number(r.block_size), valid: !!r.valid,
      complete: !!r.complete, protected: !!r.protected, expire: r.expire === null ? null : Number(r.expire),
      baseUid: (r.base_uid as string | null) ?? null, tags,
    };
  }

  private tagsOf(id: number): string[] {
    return (this.st(`SELECT name FROM tags WHERE version_id = ? ORDER BY name`).all(id) as Row[]).map((r) => r.name as string);
  }

  async createVersion(v: NewVersion, base?: { versionId: number; pending: Iterable<number> }): Promise<VersionRow> {
    const db = this.d;
    const blocks = blockCount(v.size, v.blockSize);
    return db.transaction(() => {
      const info = this.st(`INSERT INTO versions (uid, name, snapshot_name, date, size, block_size, valid, complete, protected, expire, base_uid)
        VALUES (?, ?, ?, ?, ?, ?, 0, 0, 0, ?, ?)`).run(v.uid, v.name, v.snapshotName, v.date, v.size, v.blockSize, v.expire, v.baseUid);
      const id = Number(info.lastInsertRowid);
      const tag = this.st(`INSERT OR IGNORE INTO tags (version_id, name) VALUES (?, ?)`);
      for (const t of v.tags) tag.run(id, t);
      let baseInfo: { blocks: number; chunk: (c: number) => Buffer | undefined } | undefined;
      if (base) {
        const b = this.st(`SELECT size, block_size FROM versions WHERE id = ?`).get(base.versionId) as Row | undefined;
        if (!b) throw new DatabaseError('the base version was removed meanwhile');
        const get = this.st(`SELECT data FROM block_maps WHERE version_id = ? AND chunk = ?`);
        baseInfo = {
          blocks: blockCount(Number(b.size), Number(b.block_size)),
          chunk: (c) => (get.get(base.versionId, c) as Row | undefined)?.data as Buffer | undefined,
        };
      }
      const put = this.st(`INSERT INTO block_maps (version_id, chunk, data) VALUES (?, ?, ?)`);
      for (const [c, data] of newVersionChunks(blocks, baseInfo, base?.pending ?? [])) put.run(id, c, data);
      const row = this.st(`SELECT * FROM versions WHERE id = ?`).get(id) as Row;
      return this.toVersion(row, [...new Set(v.tags)].sort());
    }).immediate();
  }

  async getVersion(uid: string): Promise<VersionRow | undefined> {
    const r = this.st(`SELECT * FROM versions WHERE uid = ?`).get(uid) as Row | undefined;
    return r ? this.toVersion(r, this.tagsOf(Number(r.id))) : undefined;
  }

  async listVersions(): Promise<VersionRow[]> {
    const rows = this.st(`SELECT * FROM versions ORDER BY date, id`).all() as Row[];
    const tags = new Map<number, string[]>();
    for (const t of this.st(`SELECT version_id, name FROM tags ORDER BY name`).all() as Row[]) {
      const id = Number(t.version_id);
      if (!tags.has(id)) tags.set(id, []);
      tags.get(id)!.push(t.name as string);
    }
    return rows.map((r) => this.toVersion(r, tags.get(Number(r.id)) ?? []));
  }

  async updateVersion(id: number, f: Partial<Pick<VersionRow, 'valid' | 'complete' | 'protected' | 'expire'>>): Promise<boolean> {
    const sets: string[] = [];
    const args: unknown[] = [];
    if (f.valid !== undefined) { sets.push('valid = ?'); args.push(f.valid ? 1 : 0); }
    if (f.complete !== undefined) { sets.push('complete = ?'); args.push(f.complete ? 1 : 0); }
    if (f.protected !== undefined) { sets.push('protected = ?'); args.push(f.protected ? 1 : 0); }
    if (f.expire !== undefined) { sets.push('expire = ?'); args.push(f.expire); }
    if (!sets.length) return !!this.st(`SELECT 1 FROM versions WHERE id = ?`).get(id);
    return this.d.transaction(() => {
      if (this.st(`UPDATE versions SET ${sets.join(', ')} WHERE id = ?`).run(...args, id).changes === 0) return false;
      if (f.complete) this.storeSummary(id, this.summarize(id, true));
      return true;
    }).immediate();
  }

  async addTags(id: number, tags: string[]): Promise<void> {
    const st = this.st(`INSERT OR IGNORE INTO tags (version_id, name) VALUES (?, ?)`);
    this.d.transaction(() => { for (const t of tags) st.run(id, t); })();
  }

  async removeTags(id: number, tags: string[]): Promise<void> {
    const st = this.st(`DELETE FROM tags WHERE version_id = ? AND name = ?`);
    this.d.transaction(() => { for (const t of tags) st.run(id, t); })();
  }

  async removeVersion(id: number): Promise<boolean> {
    const [r] = await this.removeVersions([id]);
    if (r.result === 'protected') throw new ProtectedError(r.uid!);
    return r.result === 'removed';
  }

  async removeVersions(ids: number[]): Promise<RemovalResult[]> {
    const db = this.d;
    const now = Date.now();
    const results = db.transaction(() => {
      const out = ids.map((id): RemovalResult => {
        const v = this.st(`SELECT uid, protected FROM versions WHERE id = ?`).get(id) as Row | undefined;
        if (!v) return { id, uid: null, result: 'missing' };
        return { id, uid: v.uid as string, result: v.protected ? 'protected' : 'removed' };
      });
      const doomed = [...new Set(out.filter((r) => r.result === 'removed').map((r) => r.id))];
      if (!doomed.length) return out;
      // See blobsToStamp: what the next version of the name still uses is left to the removal of that one.
      const stamp = new Set<number>();
      const list = JSON.stringify(doomed);
      for (const r of this.st(successorsSql('sqlite')).all(list, list) as Row[]) {
        const base = Number(r.base);
        const next = r.successor === null ? undefined : this.st(`SELECT data FROM map_summaries WHERE version_id = ?`).get(r.successor) as Row | undefined;
        const delta = next ? deltaAgainst(decodeSummary(next.data as Buffer), base) : undefined;
        for (const b of blobsToStamp(this.distinctChunks(base), delta)) stamp.add(b);
      }
      this.st(`UPDATE blobs SET unref_since = ? WHERE id IN ${IN_LIST}`).run(now, JSON.stringify([...stamp]));
      this.st(`DELETE FROM versions WHERE id IN ${IN_LIST}`).run(JSON.stringify(doomed));
      return out;
    }).immediate();
    for (const k of [...this.writeChunks.keys()]) if (ids.some((id) => k.startsWith(`${id}:`))) this.writeChunks.delete(k);
    return results;
  }

  async importVersion(v: ImportVersion, entries: Float64Array, newBlobs: ImportBlob[], opts: ImportOptions = {}): Promise<{ version: VersionRow; newIds: number[]; metaGen: number }> {
    const r = await this.importVersions([{ v, entries, opts }], newBlobs);
    return { ...r.versions[0], newIds: r.newIds };
  }

  async importVersions(items: { v: ImportVersion; entries: Float64Array; opts?: ImportOptions }[], newBlobs: ImportBlob[]): Promise<{ versions: { version: VersionRow; metaGen: number }[]; newIds: number[] }> {
    const db = this.d;
    for (const { v, entries } of items) {
      if (entries.length !== blockCount(v.size, v.blockSize)) throw new DatabaseError(`version ${v.uid}: a map of ${entries.length} blocks for ${blockCount(v.size, v.blockSize)} blocks`);
    }
    const now = Date.now();
    const insert = this.st(`INSERT INTO blobs (uid, checksum, size, stored_size, state, created, format, key_info, meta_pack, meta_index)
      VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING`);
    const byUid = this.st(`SELECT id, checksum, size, state, format FROM blobs WHERE uid = ?`);
    const byChecksum = this.st(`SELECT id FROM blobs WHERE checksum = ? AND state <> 3 AND format = 0`);
    return db.transaction(() => {
      const ids = newBlobs.map((b) => {
        const info = insert.run(b.uid, b.checksum, b.size, b.storedSize, b.bad ? BlobState.Bad : BlobState.Live, now, b.format, b.keyInfo,
          b.metaPack ?? null, b.metaIndex ?? null);
        if (info.changes === 1) return Number(info.lastInsertRowid);
        const known = byUid.get(b.uid) as Row | undefined;
        if (known) return knownBlobId(b, { id: Number(known.id), checksum: known.checksum as Buffer, size: Number(known.size), state: Number(known.state), format: Number(known.format) });
        // A backy-format blob whose content the repository holds under another uid already.
        const same = byChecksum.get(b.checksum) as Row | undefined;
        if (!same) throw new DatabaseError(`cannot add blob ${b.uid}`);
        return Number(same.id);
      });
      const versions = items.map(({ v, entries, opts = {} }) => {
        const info = this.st(`INSERT INTO versions (uid, name, snapshot_name, date, size, block_size, valid, complete, protected, expire, base_uid)
          VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`).run(v.uid, v.name, v.snapshotName, v.date, v.size, v.blockSize, v.valid ? 1 : 0,
          v.complete ? 1 : 0, v.protected ? 1 : 0, v.expire, v.baseUid);
        const id = Number(info.lastInsertRowid);
        const tag = this.st(`INSERT OR IGNORE INTO tags (version_id, name) VALUES (?, ?)`);
        for (const t of v.tags) tag.run(id, t);
        const put = this.st(`INSERT INTO block_maps (version_id, chunk, data) VALUES (?, ?, ?)`);
        for (const [c, data] of importedChunks(entries, ids)) put.run(id, c, data);
        if (opts.blockDates) this.st(`INSERT INTO block_dates (version_id, data) VALUES (?, ?)`).run(id, opts.blockDates);
        if (opts.synced) this.st(`UPDATE versions SET meta_synced = meta_gen WHERE id = ?`).run(id);
        const row = this.st(`SELECT * FROM versions WHERE id = ?`).get(id) as Row;
        return { version: this.toVersion(row, [...new Set(v.tags)].sort()), metaGen: Number(row.meta_gen) };
      });
      return { versions, newIds: ids };
    }).immediate();
  }

  async setBlobPacks(pack: string, ids: number[]): Promise<void> {
    const st = this.st(`UPDATE blobs SET meta_pack = ?, meta_index = ? WHERE id = ?`);
    this.d.transaction(() => ids.forEach((id, k) => st.run(pack, k, id))).immediate();
  }

  async packsOf(ids: number[]): Promise<string[]> {
    return (this.st(`SELECT DISTINCT meta_pack FROM blobs WHERE meta_pack IS NOT NULL AND id IN ${IN_LIST}`).all(JSON.stringify(ids)) as Row[]).map((r) => r.meta_pack as string);
  }

  async unusedPacks(names: string[]): Promise<string[]> {
    const used = this.st(`SELECT 1 FROM blobs WHERE meta_pack = ? LIMIT 1`);
    return names.filter((n) => !used.get(n));
  }

  async getBlockDates(versionId: number): Promise<Buffer | undefined> {
    return (this.st(`SELECT data FROM block_dates WHERE version_id = ?`).get(versionId) as Row | undefined)?.data as Buffer | undefined;
  }

  async staleStorageMeta(limit: number): Promise<{ uid: string; metaGen: number }[]> {
    return (this.st(`SELECT uid, meta_gen FROM versions WHERE meta_gen <> meta_synced AND complete = 1 ORDER BY id LIMIT ?`).all(limit) as Row[])
      .map((r) => ({ uid: r.uid as string, metaGen: Number(r.meta_gen) }));
  }

  async markStorageMetaSynced(uid: string, metaGen: number): Promise<void> {
    this.st(`UPDATE versions SET meta_synced = ? WHERE uid = ? AND meta_synced < ?`).run(metaGen, uid, metaGen);
  }

  async removedStorageMeta(limit: number): Promise<string[]> {
    return (this.st(`SELECT uid FROM meta_removed ORDER BY uid LIMIT ?`).all(limit) as Row[]).map((r) => r.uid as string);
  }

  async forgetRemovedStorageMeta(uids: string[]): Promise<void> {
    this.st(`DELETE FROM meta_removed WHERE uid IN ${IN_LIST}`).run(JSON.stringify(uids));
  }

  async isEmpty(): Promise<boolean> {
    const r = this.st(`SELECT (SELECT COUNT(*) FROM versions) + (SELECT COUNT(*) FROM blobs) AS n`).get() as Row;
    return Number(r.n) === 0;
  }

  // ---- block maps

  async readMapChunk(versionId: number, chunkNo: number): Promise<Float64Array> {
    const r = this.st(`SELECT data FROM block_maps WHERE version_id = ? AND chunk = ?`).get(versionId, chunkNo) as Row | undefined;
    if (!r) throw new DatabaseError(`block map chunk ${chunkNo} of version ${versionId} is missing (version removed?)`);
    return decodeChunk(r.data as Buffer);
  }

  async recordBlocks(versionId: number, session: string, entries: BlockEntry[]): Promise<ResolvedBlock[]> {
    const db = this.d;
    const now = Date.now();
    const find = this.st(`SELECT id, uid, state, owner FROM blobs WHERE checksum = ? AND state <> 3 AND format = 0`);
    const findForeign = this.st(`SELECT id, uid FROM blobs WHERE checksum = ? AND format <> 0 AND state = 1 ORDER BY id LIMIT 1`);
    const insert = this.st(`INSERT INTO blobs (uid, checksum, size, state, owner, created) VALUES (?, ?, ?, 0, ?, ?)`);
    const takeOver = this.st(`UPDATE blobs SET state = 0, owner = ? WHERE id = ? AND state IN (0, 2)`);
    const getChunk = this.st(`SELECT data FROM block_maps WHERE version_id = ? AND chunk = ?`);
    const putChunk = this.st(`UPDATE block_maps SET data = ? WHERE version_id = ? AND chunk = ?`);
    const size = this.st(`SELECT size, block_size FROM versions WHERE id = ?`);
    const run = db.transaction(() => {
      const v = size.get(versionId) as Row | undefined;
      if (!v) throw new DatabaseError('the version was removed while it was being written');
      const blocks = blockCount(Number(v.size), Number(v.block_size));
      const results: ResolvedBlock[] = [];
      const seen = new Map<string, ResolvedBlock>();
      const dirty = new Map<number, Float64Array>();
      const chunkOf = (c: number): Float64Array => {
        const key = `${versionId}:${c}`;
        let entries = this.writeChunks.get(key);
        if (!entries) {
          const r = getChunk.get(versionId, c) as Row | undefined;
          if (!r) throw new DatabaseError(`block map chunk ${c} of version ${versionId} is missing`);
          entries = decodeChunk(r.data as Buffer);
          if (entries.length !== chunkLength(blocks, c)) throw new DatabaseError(`block map chunk ${c} of version ${versionId} has the wrong length`);
          if (this.writeChunks.size > 64) this.writeChunks.delete(this.writeChunks.keys().next().value!);
          this.writeChunks.set(key, entries);
        }
        dirty.set(c, entries);
        return entries;
      };
      for (const e of entries) {
        const c = Math.floor(e.index / MAP_CHUNK);
        const chunk = chunkOf(c);
        if (e.zero) {
          chunk[e.index % MAP_CHUNK] = HOLE;
          continue;
        }
        const hex = e.checksum.toString('hex');
        let res = seen.get(hex);
        if (res) {
          res = { index: e.index, blobId: res.blobId, uid: res.uid, upload: false };
        } else {
          const existing = find.get(e.checksum) as Row | undefined;
          const own = existing ? { state: Number(existing.state), owner: existing.owner as string | null } : undefined;
          const foreign = ownBlobUsable(own, session) ? undefined : findForeign.get(e.checksum) as Row | undefined;
          const d = decideBlob(own, session, !!foreign);
          if (d.kind === 'foreign') {
            res = { index: e.index, blobId: Number(foreign!.id), uid: foreign!.uid as string, upload: false };
          } else if (d.kind === 'insert') {
            const uid = newBlobUid();
            const id = Number(insert.run(uid, e.checksum, e.size, session, now).lastInsertRowid);
            res = { index: e.index, blobId: id, uid, upload: true };
          } else {
            const id = Number(existing!.id);
            if (d.kind === 'take-over') takeOver.run(session, id);
            res = { index: e.index, blobId: id, uid: existing!.uid as string, upload: d.upload };
          }
          seen.set(hex, res);
        }
        chunk[e.index % MAP_CHUNK] = res.blobId;
        results.push(res);
      }
      for (const [c, chunk] of dirty) putChunk.run(encodeChunk(chunk), versionId, c);
      return results;
    });
    try {
      return run.immediate();
    } catch (e) {
      // The cached chunks may hold entries of the rolled-back transaction.
      for (const k of [...this.writeChunks.keys()]) if (k.startsWith(`${versionId}:`)) this.writeChunks.delete(k);
      throw e;
    }
  }

  async markUploaded(blobs: { id: number; storedSize: number }[]): Promise<void> {
    const st = this.st(`UPDATE blobs SET state = 1, stored_size = COALESCE(NULLIF(?, 0), stored_size), owner = NULL WHERE id = ? AND state IN (0, 2)`);
    this.d.transaction(() => { for (const b of blobs) st.run(b.storedSize, b.id); }).immediate();
  }

  async getBlobs(ids: number[]): Promise<Map<number, BlobRef>> {
    const out = new Map<number, BlobRef>();
    if (ids.length) {
      const rows = this.st(`SELECT id, uid, checksum, size, state, format, key_info, meta_pack, meta_index FROM blobs WHERE id IN ${IN_LIST}`).all(JSON.stringify(ids)) as Row[];
      for (const r of rows) out.set(Number(r.id), blobRefFromRow(r));
    }
    return out;
  }

  async markBad(ids: number[]): Promise<string[]> {
    if (!ids.length) return [];
    const db = this.d;
    const bad = new Set(ids);
    return db.transaction(() => {
      this.st(`UPDATE blobs SET state = 2 WHERE state IN (0, 1) AND id IN ${IN_LIST}`).run(JSON.stringify(ids));
      const hit = new Set<number>();
      for (const r of this.st(`SELECT version_id, data FROM block_maps`).iterate() as Iterable<Row>) {
        const vid = Number(r.version_id);
        if (hit.has(vid)) continue;
        const entries = decodeChunk(r.data as Buffer);
        for (let i = 0; i < entries.length; i++) if (bad.has(entries[i])) { hit.add(vid); break; }
      }
      const uids: string[] = [];
      for (const vid of hit) {
        this.st(`UPDATE versions SET valid = 0 WHERE id = ?`).run(vid);
        uids.push((this.st(`SELECT uid FROM versions WHERE id = ?`).get(vid) as Row).uid as string);
      }
      return uids;
    }).immediate();
  }

  // ---- cleanup

  async markForDeletion(graceMs: number, now: number): Promise<CleanupMark> {
    const db = this.d;
    // The marks must be on disk before cleanup deletes the first object. With synchronous = NORMAL a WAL
    // commit reaches the disk only at the next checkpoint: an OS crash after the deletes could roll the
    // marks back, and later backups would deduplicate against blobs that no longer exist. FULL syncs the WAL
    // at this commit, which makes every earlier commit durable too: one fsync per cleanup (a checkpoint
    // would also copy the WAL into the database and wait for readers, for nothing more).
    db.pragma('synchronous = FULL');
    try {
      return this.markInOneTransaction(graceMs, now);
    } finally {
      db.pragma('synchronous = NORMAL');
    }
  }

  private markInOneTransaction(graceMs: number, now: number): CleanupMark {
    const db = this.d;
    // One IMMEDIATE transaction: no backup can record a block between the scan and the marking, so a blob
    // that any map references at the moment of marking is never marked.
    return db.transaction(() => {
      const maxId = Number((this.st(`SELECT COALESCE(MAX(id), 0) AS m FROM blobs`).get() as Row).m);
      const refs = new IdBitmap(maxId);
      for (const r of this.st(`SELECT data FROM block_maps`).iterate() as Iterable<Row>) refs.addChunk(r.data as Buffer);
      const tally = new CleanupTally(refs, graceMs, now);
      for (const r of this.st(`SELECT id, unref_since FROM blobs WHERE state <> 3`).iterate() as Iterable<Row>) {
        tally.add(Number(r.id), r.unref_since === null ? null : Number(r.unref_since));
      }
      this.st(`UPDATE blobs SET unref_since = NULL WHERE id IN ${IN_LIST}`).run(JSON.stringify(tally.clear));
      this.st(`UPDATE blobs SET unref_since = ? WHERE id IN ${IN_LIST}`).run(now, JSON.stringify(tally.stamp));
      this.st(`UPDATE blobs SET state = 3 WHERE id IN ${IN_LIST}`).run(JSON.stringify(tally.delete));
      return tally.mark;
    }).immediate();
  }

  async blobsToDelete(limit: number): Promise<{ id: number; uid: string; format: BlobFormat }[]> {
    return (this.st(`SELECT id, uid, format FROM blobs WHERE state = 3 ORDER BY id LIMIT ?`).all(limit) as Row[])
      .map((r) => ({ id: Number(r.id), uid: r.uid as string, format: Number(r.format) }));
  }

  async forgetBlobs(ids: number[]): Promise<void> {
    const db = this.d;
    db.transaction(() => {
      this.st(`DELETE FROM blobs WHERE state = 3 AND id IN ${IN_LIST}`).run(JSON.stringify(ids));
    }).immediate();
  }

  async knownBlobUids(uids: string[]): Promise<Set<string>> {
    const out = new Set<string>();
    for (const r of this.st(`SELECT uid FROM blobs WHERE uid IN ${IN_LIST}`).all(JSON.stringify(uids)) as Row[]) out.add(r.uid as string);
    return out;
  }

  async *blobUidPages(pageSize: number): AsyncIterable<{ id: number; uid: string; state: BlobState }[]> {
    let after = 0;
    for (;;) {
      const rows = this.st(`SELECT id, uid, state FROM blobs WHERE id > ? ORDER BY id LIMIT ?`).all(after, pageSize) as Row[];
      if (!rows.length) return;
      after = Number(rows[rows.length - 1].id);
      yield rows.map((r) => ({ id: Number(r.id), uid: r.uid as string, state: Number(r.state) }));
    }
  }

  async repositoryStats(): Promise<RepositoryStats> {
    const v = this.st(`SELECT COUNT(*) AS n FROM versions`).get() as Row;
    const b = this.st(`SELECT COUNT(*) AS n, COALESCE(SUM(stored_size), 0) AS s, COALESCE(SUM(size), 0) AS p FROM blobs WHERE state <> 3`).get() as Row;
    return { versions: Number(v.n), blobs: Number(b.n), storedBytes: Number(b.s), plainBytes: Number(b.p) };
  }

  /**
   * Each distinct chunk of a version's map once: through its summary (3 of a 1 TiB version's 256 chunks, say),
   * or all chunks when it has none.
   */
  /** A map's distinct chunks, each with how many chunks of the map have it (through its summary, if any). */
  private distinctChunks(versionId: number): { data: Buffer; count: number }[] {
    const s = this.st(`SELECT data FROM map_summaries WHERE version_id = ?`).get(versionId) as Row | undefined;
    if (!s) return (this.st(`SELECT data FROM block_maps WHERE version_id = ?`).all(versionId) as Row[]).map((r) => ({ data: r.data as Buffer, count: 1 }));
    const counts = new Map(decodeSummary(s.data as Buffer).chunks.map((c) => [c.chunk, c.count]));
    return (this.st(`SELECT chunk, data FROM block_maps WHERE version_id = ? AND chunk IN ${IN_LIST}`).all(versionId, JSON.stringify([...counts.keys()])) as Row[])
      .map((r) => ({ data: r.data as Buffer, count: counts.get(Number(r.chunk))! }));
  }

  /** A version's summary from its chunks; for a complete version with a delta against an earlier one. */
  private summarize(versionId: number, complete: boolean, keep?: (digest: string, data: Uint8Array) => void): MapSummary {
    const chunksOf = (id: number) => this.st(`SELECT chunk, data FROM block_maps WHERE version_id = ?`).all(id) as { chunk: number; data: Buffer }[];
    const rows = chunksOf(versionId);
    const summary = summarizeChunks(rows, keep);
    const base = complete ? this.st(DELTA_BASE_SQL.replace('$1', '?')).get(versionId) as Row | undefined : undefined;
    if (base) {
      const delta = mapDelta(Number(base.id), new Map(chunksOf(Number(base.id)).map((r) => [r.chunk, r.data])), new Map(rows.map((r) => [r.chunk, r.data])));
      if (delta) summary.delta = delta;
    }
    return summary;
  }

  private storeSummary(versionId: number, summary: MapSummary): void {
    this.st(`INSERT INTO map_summaries (version_id, data) SELECT id, ? FROM versions WHERE id = ?
      ON CONFLICT (version_id) DO UPDATE SET data = excluded.data`).run(encodeSummary(summary), versionId);
  }

  async mapUsage(): Promise<MapUsage> {
    const db = this.d;
    const computed: [number, MapSummary][] = [];
    // A deferred transaction: one WAL snapshot for all reads, no writer waits.
    const usage = db.transaction((): MapUsage => {
      const summaries = new SummaryTable();
      const contents = new Map<string, Uint8Array>();
      const keep = (digest: string, data: Uint8Array) => { if (!contents.has(digest)) contents.set(digest, data); };
      for (const r of this.st(`SELECT v.id, v.complete, s.data FROM versions v LEFT JOIN map_summaries s ON s.version_id = v.id`).all() as Row[]) {
        const id = Number(r.id);
        if (r.data) summaries.addEncoded(id, r.data as Buffer, 0, (r.data as Buffer).length);
        else {
          const summary = this.summarize(id, !!r.complete, keep);
          summaries.add(id, summary);
          if (r.complete) computed.push([id, summary]);
        }
      }
      // One representative chunk per distinct content of the roots, all in one statement.
      const wanted = new Map<string, [number, number]>();
      for (const id of summaries.roots()) for (const c of summaries.chunksOf(summaries.slotOf(id))) if (!contents.has(c.digest) && !wanted.has(c.digest)) wanted.set(c.digest, [id, c.chunk]);
      const places = [...wanted.values()];
      const rows = this.st(`SELECT j.key AS k, m.data FROM json_each(?) j JOIN block_maps m ON m.version_id = j.value ->> 0 AND m.chunk = j.value ->> 1`)
        .all(JSON.stringify(places)) as Row[];
      const digests = [...wanted.keys()];
      for (const r of rows) contents.set(digests[Number(r.k)], r.data as Buffer);
      if (rows.length !== places.length) throw new DatabaseError('a block map chunk of the summaries is missing');
      // Every blob's id, size and stored size in one hex string: far cheaper than a row per blob. From the covering
      // index of just these (schema 4), a fraction of the table to read.
      const b = this.st(`SELECT group_concat(printf('%012x%08x%08x', id, size, stored_size), '') AS t FROM blobs INDEXED BY blobs_sizes WHERE state <> 3`).get() as Row;
      return { summaries, contents, blobs: blobSizesFromHex((b.t as string | null) ?? '') };
    })();
    if (computed.length) {
      // A cache: a version removed meanwhile simply gets no row.
      db.transaction(() => { for (const [id, s] of computed) this.storeSummary(id, s); }).immediate();
    }
    return usage;
  }

  // ---- stats

  async addStats(s: StatsRow): Promise<void> {
    this.st(`INSERT INTO stats (date, version_uid, version_name, version_size_bytes, version_size_blocks, bytes_read, blocks_read,
      bytes_written, blocks_written, bytes_dedup, blocks_dedup, bytes_sparse, blocks_sparse, duration_seconds)
      VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`).run(s.date, s.versionUid, s.versionName, s.versionSizeBytes, s.versionSizeBlocks,
      s.bytesRead, s.blocksRead, s.bytesWritten, s.blocksWritten, s.bytesDedup, s.blocksDedup, s.bytesSparse, s.blocksSparse, s.durationSeconds);
  }

  async listStats(versionUid?: string, limit?: number): Promise<StatsRow[]> {
    const where = versionUid ? 'WHERE version_uid = ?' : '';
    const lim = limit !== undefined ? 'LIMIT ?' : '';
    const args: unknown[] = [];
    if (versionUid) args.push(versionUid);
    if (limit !== undefined) args.push(limit);
    const rows = this.st(`SELECT * FROM (SELECT * FROM stats ${where} ORDER BY date DESC, id DESC ${lim}) ORDER BY date, id`).all(...args) as Row[];
    return rows.map(statsFromRow);
  }

  // ---- locks

  async tryLock(name: string, info: LockInfo, conflicts: string[] = []): Promise<LockInfo | undefined> {
    const db = this.d;
    return db.transaction(() => this.take(name, info, conflicts)).immediate();
  }

  /** One lock of tryLock(s), inside the caller's transaction. */
  private take(name: string, info: LockInfo, conflicts: string[]): LockInfo | undefined {
    const holders: Row[] = [];
    for (const c of [name, ...conflicts]) {
      if (c.endsWith('*')) holders.push(...(this.st(`SELECT * FROM locks WHERE substr(name, 1, ?) = ?`).all(c.length - 1, c.slice(0, -1)) as Row[]));
      else holders.push(...(this.st(`SELECT * FROM locks WHERE name = ?`).all(c) as Row[]));
    }
    for (const h of holders) {
      const holder: LockInfo = { session: h.session as string, host: h.host as string, pid: Number(h.pid), pidStart: h.pid_start as string, what: h.what as string };
      if (holder.session === info.session) continue;
      if (holderAlive(holder)) return holder;
      this.st(`DELETE FROM locks WHERE name = ? AND session = ?`).run(h.name, h.session); // stale: its process died
    }
    this.st(`INSERT INTO locks (name, session, host, pid, pid_start, what, since) VALUES (?, ?, ?, ?, ?, ?, ?)
      ON CONFLICT (name) DO UPDATE SET session = excluded.session, host = excluded.host, pid = excluded.pid,
      pid_start = excluded.pid_start, what = excluded.what, since = excluded.since`)
      .run(name, info.session, info.host, info.pid, info.pidStart, info.what, Date.now());
    return undefined;
  }

  async unlock(name: string, session: string): Promise<void> {
    this.st(`DELETE FROM locks WHERE name = ? AND session = ?`).run(name, session);
  }

  async tryLocks(requests: { name: string; info: LockInfo; conflicts?: string[] }[]): Promise<(LockInfo | undefined)[]> {
    const db = this.d;
    return db.transaction(() => requests.map((r) => this.take(r.name, r.info, r.conflicts ?? []))).immediate();
  }

  async unlockAll(names: string[], session: string): Promise<void> {
    const db = this.d;
    db.transaction(() => { for (const name of names) this.st(`DELETE FROM locks WHERE name = ? AND session = ?`).run(name, session); }).immediate();
  }
}
