import { Pool, PoolClient, PoolConfig, types as pgTypes } from 'pg';
import { DatabaseError } from '../util/errors';
import { blockCount, chunkLength, decodeChunk, encodeChunk, HOLE, MAP_CHUNK } from './block-map';
import { blobSizesFromBytes, decodeSummary, deltaAgainst, DELTA_BASE_SQL, encodeSummary, mapDelta, MapSummary, MapUsage, successorsSql, summarizeChunks, SummaryTable } from './map-summary';
import { batches, blobRefFromRow, blobsToStamp, CleanupTally, statsFromRow, decideBlob, IdBitmap, importedChunks, knownBlobId, newBlobUid, newVersionChunks, ownBlobUsable } from './logic';
import { isConnectionError, maskEngineUrl, pgError } from './pg-errors';
import { PgLocks } from './pg-locks';
import { fullSchema, migrationsFrom, SCHEMA_VERSION } from './schema';
import {
  BlobFormat, BlobRef, BlobState, BlockEntry, CleanupMark, ImportBlob, ImportOptions, ImportVersion, LockInfo, MetaStore, NewVersion,
  ProtectedError, RemovalResult, RepositoryStats, ResolvedBlock, StatsRow, VersionRow,
} from './types';

type Row = Record<string, any>;
/** A version as listVersions' JSON has it: id, uid, name, snapshot_name, date, size, block_size, valid, complete, protected, expire, base_uid, tags. */
type VersionTuple = [number, string, string, string, number, number, number, number, number, number, number | null, string | null, string[]];

/** Two-key advisory lock serializing schema creation and migrations of concurrently starting processes. */
const SCHEMA_MUTEX = [0x6261636b, 1];
/** SQLSTATEs after which a transaction is simply run again: deadlock detected, serialization failure. */
const RETRY_CODES = new Set(['40P01', '40001']);
const ID_BATCH = 10_000;
/**
 * The many small commits of a running backup (recordBlocks, markUploaded) do not wait for the WAL flush,
 * like SQLite's synchronous=NORMAL. Safe: WAL is flushed in order, so any later synchronous commit (the
 * version becoming valid, a cleanup marking blobs) makes them durable first; a server crash can only lose
 * the last of them, which looks like a backup interrupted a moment earlier (version invalid, continuable; an
 * uploaded but unrecorded object is an orphan for cleanup --full).
 */
const ASYNC_COMMIT = 'SET LOCAL synchronous_commit = off';
const CURSOR_PAGE = 1000;
/** Map summaries per query of mapUsage (about 500 bytes each for a daily 1 TiB version). */
const SUMMARY_PAGE = 16_384;

/**
 * BIGINT columns (ids, sizes, ms timestamps) as JavaScript numbers: every value backy stores is far below
 * 2^53. The override is per pool, so other pg users in the process keep the driver's defaults.
 */
export const pgTypeParsers = {
  getTypeParser(oid: number, format?: string): any {
    if (oid === 20) return (v: string) => Number(v);
    const parser = pgTypes.getTypeParser as (o: number, f?: string) => (v: string) => unknown;
    if (oid === 1016) return (v: string) => (parser(1016, 'text')(v) as string[]).map(Number);
    return parser(oid, format);
  },
};

export const PG_DDL = fullSchema('postgresql');

/**
 * The metadata store on PostgreSQL, for several hosts sharing one repository. Same schema and semantics as
 * SqliteMetaStore; the engine-independent decisions come from logic.ts.
 *
 * Why cleanup can never delete a blob that a version or a running backup references, by construction:
 * every transaction that adds blob references to a block map (recordBlocks, createVersion with a base) takes
 * `blobs` in ROW EXCLUSIVE mode explicitly, before it reads anything; statements that change blob rows
 * (reservations, uploads, stamps, forgetting) take the same mode implicitly. markForDeletion takes `blobs` in
 * SHARE ROW EXCLUSIVE mode, which conflicts with ROW EXCLUSIVE (and with itself), and only then takes its
 * snapshot (REPEATABLE READ: the snapshot comes with the first query after LOCK TABLE, not with the LOCK)
 * and scans every block map, running backups' partial maps included. So each writer either committed before
 * cleanup got its lock, and then cleanup's snapshot contains the writer's map, or it starts reading after
 * cleanup committed, and then its lookup sees the blobs cleanup flipped to state 3 and never reuses them
 * (the partial unique index lets it insert a new blob for the same checksum). Nothing can add a reference
 * between the scan and the flip, and no timer is involved. A differential version copies its base's map:
 * the base row is locked FOR KEY SHARE, so removeVersion (FOR UPDATE) cannot delete it meanwhile. markBad
 * uses the same lock as cleanup so that no backup starts to use a blob between its scan and its marking.
 * The price: backups pause while cleanup scans the maps, as they do on SQLite.
 */
export class PostgresMetaStore implements MetaStore {
  readonly description: string;
  private pool: Pool | undefined;
  private readonly config: PoolConfig;
  private readonly locks: PgLocks;
  /** Decoded map chunks of versions this process is writing (it holds their locks, so nobody else writes them). */
  private writeChunks = new Map<string, Float64Array>();
  private cursorNo = 0;
  /** The last error a pooled connection reported outside a query. */
  private connectionLost: Error | undefined;

  constructor(private readonly engine: string, opts: { poolSize?: number } = {}) {
    this.description = maskEngineUrl(engine);
    this.config = {
      connectionString: engine,
      max: Math.max(1, opts.poolSize ?? 4),
      connectionTimeoutMillis: 15_000,
      idleTimeoutMillis: 30_000,
      keepAlive: true,
      application_name: 'backy',
      types: pgTypeParsers,
    } as PoolConfig;
    this.locks = new PgLocks(this.config, (e) => pgError(e, engine));
  }

  // ---- plumbing

  private fail(e: unknown): Error {
    if (this.locks.lost) return this.locks.lostError();
    // "Client has encountered a connection error and is not queryable" says nothing; the error that broke
    // the connection does.
    if (this.connectionLost && /not queryable/i.test((e as Error)?.message ?? '')) return pgError(this.connectionLost, this.engine);
    return pgError(e, this.engine);
  }

  private get p(): Pool {
    if (this.locks.lost) throw this.locks.lostError();
    if (!this.pool) {
      const pool = new Pool(this.config);
      // An idle connection that breaks (server restart, terminated backend) is dropped by the pool; the
      // next query reports the problem. Without a listener the error would end the process.
      pool.on('error', () => undefined);
      // pg-pool listens for errors only while a client is idle: one checked out, between two queries of a
      // transaction, would emit 'error' with nobody listening (57P01 from pg_terminate_backend, a server
      // restart) and end the process. Every client keeps a listener for its whole life; the query that
      // runs next fails ("not queryable") and reports the reason remembered here.
      pool.on('connect', (client) => {
        client.on('error', (e) => { this.connectionLost = e; });
      });
      this.pool = pool;
    }
    return this.pool;
  }

  private async q(sql: string, params: unknown[] = []): Promise<Row[]> {
    try {
      return (await this.p.query(sql, params)).rows;
    } catch (e) {
      throw this.fail(e);
    }
  }

  /**
   * Runs `fn` in one transaction. Deadlocks and serialization failures (possible between concurrent backups
   * reserving the same checksums) roll back and run `fn` again; `onRollback` forgets derived state.
   */
  private async tx<T>(fn: (c: PoolClient) => Promise<T>, opts: { isolation?: string; prelude?: string; onRollback?: () => void } = {}): Promise<T> {
    for (let attempt = 1; ; attempt++) {
      let c: PoolClient;
      try {
        c = await this.p.connect();
      } catch (e) {
        throw this.fail(e);
      }
      let broken: unknown;
      try {
        // BEGIN and the first lock in one round trip: a backup runs many short transactions.
        await c.query(`BEGIN${opts.isolation ? ` ISOLATION LEVEL ${opts.isolation}` : ''}${opts.prelude ? `; ${opts.prelude}` : ''}`);
        const out = await fn(c);
        await c.query('COMMIT');
        return out;
      } catch (e) {
        opts.onRollback?.();
        if (isConnectionError(e)) broken = e;
        else await c.query('ROLLBACK').catch((r) => { broken = r; });
        const code = (e as { code?: string }).code;
        if (!broken && code && RETRY_CODES.has(code) && attempt < 8) {
          await new Promise((r) => setTimeout(r, Math.random() * 20 * attempt));
          continue;
        }
        throw this.fail(e);
      } finally {
        c.release(broken ? (broken as Error) : undefined);
      }
    }
  }

  /** Rows of a query, a page at a time, through a cursor (inside a transaction). */
  private async *cursor(c: PoolClient, sql: string, params: unknown[] = []): AsyncGenerator<Row[]> {
    const name = `backy_cursor_${++this.cursorNo}`;
    await c.query(`DECLARE ${name} NO SCROLL CURSOR FOR ${sql}`, params);
    const fetch = () => {
      const p = c.query(`FETCH ${CURSOR_PAGE} FROM ${name}`);
      p.catch(() => undefined); // awaited in turn; a failure meanwhile must not count as unhandled
      return p;
    };
    let next = fetch();
    try {
      for (;;) {
        const rows = (await next).rows;
        if (!rows.length) break;
        // The server reads the next page while the caller works on this one.
        next = fetch();
        yield rows;
      }
    } finally {
      await next.catch(() => undefined);
    }
    await c.query(`CLOSE ${name}`);
  }

  // ---- schema

  async initdb(settings: Record<string, string> = {}): Promise<boolean> {
    return this.tx(async (c) => {
      await c.query('SELECT pg_advisory_xact_lock($1, $2)', SCHEMA_MUTEX);
      if ((await c.query(`SELECT to_regclass('settings') IS NOT NULL AS e`)).rows[0].e) return false;
      for (const s of PG_DDL) await c.query(s);
      await c.query(`INSERT INTO settings (key, value) VALUES ('schema_version', $1)`, [String(SCHEMA_VERSION)]);
      const keys = Object.keys(settings);
      if (keys.length) await c.query(`INSERT INTO settings (key, value) SELECT * FROM unnest($1::text[], $2::text[])`, [keys, keys.map((k) => settings[k])]);
      return true;
    });
  }

  async open(): Promise<void> {
    const version = async (c: { query: PoolClient['query'] }): Promise<number> => {
      if (!(await c.query(`SELECT to_regclass('settings') IS NOT NULL AS e`)).rows[0].e) {
        throw new DatabaseError(`database ${this.description} is not initialized: run "backy initdb"`);
      }
      return Number((await c.query(`SELECT value FROM settings WHERE key = 'schema_version'`)).rows[0]?.value ?? 0);
    };
    let v: number;
    try {
      v = await version(this.p);
    } catch (e) {
      throw this.fail(e);
    }
    if (v > SCHEMA_VERSION) throw new DatabaseError(`database ${this.description} has schema version ${v}, newer than this backy understands (${SCHEMA_VERSION}): upgrade backy`);
    if (v < SCHEMA_VERSION) {
      await this.tx(async (c) => {
        await c.query('SELECT pg_advisory_xact_lock($1, $2)', SCHEMA_MUTEX);
        const now = await version(c); // another process may have migrated while we waited
        if (now < SCHEMA_VERSION) for (const s of migrationsFrom(now, 'postgresql')) await c.query(s);
        if (now < SCHEMA_VERSION) await c.query(`UPDATE settings SET value = $1 WHERE key = 'schema_version'`, [String(SCHEMA_VERSION)]);
      });
    }
  }

  async close(): Promise<void> {
    await this.locks.close();
    const pool = this.pool;
    this.pool = undefined;
    await pool?.end().catch(() => undefined);
  }

  async getSetting(key: string): Promise<string | undefined> {
    return (await this.q(`SELECT value FROM settings WHERE key = $1`, [key]))[0]?.value;
  }

  async setSettingIfAbsent(key: string, value: string): Promise<string> {
    await this.q(`INSERT INTO settings (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING`, [key, value]);
    return (await this.q(`SELECT value FROM settings WHERE key = $1`, [key]))[0].value;
  }

  // ---- versions

  private toVersion(r: Row, tags: string[]): VersionRow {
    return {
      id: Number(r.id), uid: r.uid, name: r.name, snapshotName: r.snapshot_name, date: Number(r.date), size: Number(r.size),
      blockSize: Number(r.block_size), valid: !!r.valid, complete: !!r.complete, protected: !!r.protected,
      expire: r.expire === null ? null : Number(r.expire), baseUid: r.base_uid ?? null, tags,
    };
  }

  async createVersion(v: NewVersion, base?: { versionId: number; pending: Iterable<number> }): Promise<VersionRow> {
    const blocks = blockCount(v.size, v.blockSize);
    const pending = base ? [...base.pending] : [];
    const tags = [...new Set(v.tags)].sort();
    return this.tx(async (c) => {
      let baseInfo: { blocks: number; chunk: (n: number) => Buffer | undefined } | undefined;
      if (base) {
        // The copied map references blobs: ordered against cleanup like every such writer (see the class comment).
        await c.query('LOCK TABLE blobs IN ROW EXCLUSIVE MODE');
        const b = (await c.query(`SELECT size, block_size FROM versions WHERE id = $1 FOR KEY SHARE`, [base.versionId])).rows[0];
        if (!b) throw new DatabaseError('the base version was removed meanwhile');
        const chunks = new Map<number, Buffer>();
        for (const r of (await c.query(`SELECT chunk, data FROM block_maps WHERE version_id = $1`, [base.versionId])).rows) chunks.set(r.chunk, r.data);
        baseInfo = { blocks: blockCount(Number(b.size), Number(b.block_size)), chunk: (n) => chunks.get(n) };
      }
      const row = (await c.query(`INSERT INTO versions (uid, name, snapshot_name, date, size, block_size, valid, complete, protected, expire, base_uid)
        VALUES ($1, $2, $3, $4, $5, $6, 0, 0, 0, $7, $8) RETURNING *`,
      [v.uid, v.name, v.snapshotName, v.date, v.size, v.blockSize, v.expire, v.baseUid])).rows[0];
      const id = Number(row.id);
      if (tags.length) await c.query(`INSERT INTO tags (version_id, name) SELECT $1, unnest($2::text[]) ON CONFLICT DO NOTHING`, [id, tags]);
      // The whole map in a few statements: 256 chunk rows for a 1 TiB version.
      const chunks = [...newVersionChunks(blocks, baseInfo, pending)];
      for (const part of batches(chunks, 1000)) {
        await c.query(`INSERT INTO block_maps (version_id, chunk, data) SELECT $1, * FROM unnest($2::int[], $3::bytea[])`,
          [id, part.map((x) => x[0]), part.map((x) => x[1])]);
      }
      return this.toVersion(row, tags);
    });
  }

  async getVersion(uid: string): Promise<VersionRow | undefined> {
    const r = (await this.q(`SELECT v.*, ARRAY(SELECT name FROM tags t WHERE t.version_id = v.id ORDER BY name) AS tag_list
      FROM versions v WHERE uid = $1`, [uid]))[0];
    return r ? this.toVersion(r, r.tag_list) : undefined;
  }

  async listVersions(): Promise<VersionRow[]> {
    // One query: versions with their tags aggregated (a join with the grouped tags beats a subquery per row),
    // as one JSON text: parsing it is far quicker than the driver building and converting a row per version.
    const j = (await this.q(`SELECT json_agg(json_build_array(v.id, v.uid, v.name, v.snapshot_name, v.date, v.size, v.block_size, v.valid,
        v.complete, v.protected, v.expire, v.base_uid, COALESCE(t.tag_list, '{}')) ORDER BY v.date, v.id)::text AS j
      FROM versions v
      LEFT JOIN (SELECT version_id, array_agg(name ORDER BY name) AS tag_list FROM tags GROUP BY version_id) t ON t.version_id = v.id`))[0].j;
    return (JSON.parse(j ?? '[]') as VersionTuple[]).map(([id, uid, name, snapshotName, date, size, blockSize, valid, complete, prot, expire, baseUid, tags]) => ({
      id, uid, name, snapshotName, date, size, blockSize, valid: !!valid, complete: !!complete, protected: !!prot, expire, baseUid, tags,
    }));
  }

  async updateVersion(id: number, f: Partial<Pick<VersionRow, 'valid' | 'complete' | 'protected' | 'expire'>>): Promise<boolean> {
    const sets: string[] = [];
    const args: unknown[] = [];
    const set = (col: string, value: unknown) => { args.push(value); sets.push(`${col} = $${args.length}`); };
    if (f.valid !== undefined) set('valid', f.valid ? 1 : 0);
    if (f.complete !== undefined) set('complete', f.complete ? 1 : 0);
    if (f.protected !== undefined) set('protected', f.protected ? 1 : 0);
    if (f.expire !== undefined) set('expire', f.expire);
    if (!sets.length) return (await this.q(`SELECT 1 FROM versions WHERE id = $1`, [id])).length > 0;
    args.push(id);
    if (!f.complete) {
      return (await this.q(`UPDATE versions SET ${sets.join(', ')} WHERE id = $${args.length} RETURNING id`, args)).length > 0;
    }
    return this.tx(async (c) => {
      if (!(await c.query(`UPDATE versions SET ${sets.join(', ')} WHERE id = $${args.length} RETURNING id`, args)).rows.length) return false;
      await this.storeSummaries(c, [[id, await this.summarize(c, id, true)]]);
      return true;
    });
  }

  async addTags(id: number, tags: string[]): Promise<void> {
    if (!tags.length) return;
    await this.q(`INSERT INTO tags (version_id, name) SELECT $1, t FROM unnest($2::text[]) AS t
      WHERE EXISTS (SELECT 1 FROM versions WHERE id = $1) ON CONFLICT DO NOTHING`, [id, [...new Set(tags)]]);
  }

  async removeTags(id: number, tags: string[]): Promise<void> {
    if (!tags.length) return;
    await this.q(`DELETE FROM tags WHERE version_id = $1 AND name = ANY($2::text[])`, [id, tags]);
  }

  async removeVersion(id: number): Promise<boolean> {
    const [r] = await this.removeVersions([id]);
    if (r.result === 'protected') throw new ProtectedError(r.uid!);
    return r.result === 'removed';
  }

  async removeVersions(ids: number[]): Promise<RemovalResult[]> {
    const now = Date.now();
    const found = await this.tx(async (c) => {
      await c.query('LOCK TABLE blobs IN ROW EXCLUSIVE MODE');
      // Waits for a differential backup copying one of these maps (FOR KEY SHARE) to commit first, and for a
      // `protect` updating a row: `protected` is read as it is once the row is ours. Rows are locked in id
      // order, so two removals of overlapping sets wait for each other instead of deadlocking.
      const rows = (await c.query(`SELECT id, uid, protected FROM versions WHERE id = ANY($1::bigint[]) ORDER BY id FOR UPDATE`,
        [[...new Set(ids)]])).rows;
      const out = new Map<number, RemovalResult>(rows.map((r) => [Number(r.id), { id: Number(r.id), uid: r.uid, result: r.protected ? 'protected' : 'removed' }]));
      const doomed = rows.filter((r) => !r.protected).map((r) => Number(r.id));
      if (!doomed.length) return out;
      // Each distinct chunk of each map once, with how many chunks have it: through its summary (3 of a 1 TiB
      // version's 256 chunks, say), or all its chunks when it has none.
      const places: [number, number, number][] = [];
      const whole = new Set(doomed);
      for (const r of (await c.query(`SELECT version_id, data FROM map_summaries WHERE version_id = ANY($1::bigint[])`, [doomed])).rows) {
        const v = Number(r.version_id);
        whole.delete(v);
        for (const ch of decodeSummary(r.data).chunks) places.push([v, ch.chunk, ch.count]);
      }
      const chunks = new Map<number, { data: Uint8Array; count: number }[]>(doomed.map((id) => [id, []]));
      if (whole.size) {
        for (const r of (await c.query(`SELECT version_id, data FROM block_maps WHERE version_id = ANY($1::bigint[])`, [[...whole]])).rows) {
          chunks.get(Number(r.version_id))!.push({ data: r.data, count: 1 });
        }
      }
      const count = new Map(places.map(([v, chunk, n]) => [`${v}:${chunk}`, n]));
      for (const part of batches(places, ID_BATCH)) {
        for (const r of (await c.query(`SELECT m.version_id, m.chunk, m.data FROM block_maps m JOIN unnest($1::bigint[], $2::int[]) AS u(version_id, chunk)
          ON m.version_id = u.version_id AND m.chunk = u.chunk`, [part.map((p) => p[0]), part.map((p) => p[1])])).rows) {
          chunks.get(Number(r.version_id))!.push({ data: r.data, count: count.get(`${r.version_id}:${r.chunk}`)! });
        }
      }
      // The successors whose maps are deltas against removed ones, locked so they stay until this commits
      // (their removal waits for it, and then stamps what they used): see blobsToStamp.
      const next = (await c.query(successorsSql('postgresql'), [doomed])).rows.filter((r) => r.successor !== null);
      const kept = new Set((await c.query(`SELECT id FROM versions WHERE id = ANY($1::bigint[]) ORDER BY id FOR KEY SHARE`,
        [[...new Set(next.map((r) => Number(r.successor)))]])).rows.map((r) => Number(r.id)));
      const deltas = new Map<number, Map<number, number>>();
      if (kept.size) {
        const summaries = new Map<number, MapSummary>((await c.query(`SELECT version_id, data FROM map_summaries WHERE version_id = ANY($1::bigint[])`,
          [[...kept]])).rows.map((r) => [Number(r.version_id), decodeSummary(r.data)]));
        for (const r of next) {
          const delta = kept.has(Number(r.successor)) ? deltaAgainst(summaries.get(Number(r.successor)), Number(r.base)) : undefined;
          if (delta) deltas.set(Number(r.base), delta);
        }
      }
      const stamp = new Set<number>();
      for (const id of doomed) for (const b of blobsToStamp(chunks.get(id)!, deltas.get(id))) stamp.add(b);
      for (const part of batches([...stamp].sort((a, b) => a - b), ID_BATCH)) {
        await c.query(`UPDATE blobs SET unref_since = $1 WHERE id = ANY($2::bigint[])`, [now, part]);
      }
      await c.query(`DELETE FROM versions WHERE id = ANY($1::bigint[])`, [doomed]);
      return out;
    });
    for (const id of ids) this.forgetChunks(id);
    return ids.map((id) => found.get(id) ?? { id, uid: null, result: 'missing' });
  }

  async importVersion(v: ImportVersion, entries: Float64Array, newBlobs: ImportBlob[], opts: ImportOptions = {}): Promise<{ version: VersionRow; newIds: number[]; metaGen: number }> {
    const r = await this.importVersions([{ v, entries, opts }], newBlobs);
    return { ...r.versions[0], newIds: r.newIds };
  }

  async importVersions(items: { v: ImportVersion; entries: Float64Array; opts?: ImportOptions }[], newBlobs: ImportBlob[]): Promise<{ versions: { version: VersionRow; metaGen: number }[]; newIds: number[] }> {
    for (const { v, entries } of items) {
      if (entries.length !== blockCount(v.size, v.blockSize)) throw new DatabaseError(`version ${v.uid}: a map of ${entries.length} blocks for ${blockCount(v.size, v.blockSize)} blocks`);
    }
    const now = Date.now();
    return this.tx(async (c) => {
      const ids = new Array<number>(newBlobs.length).fill(0);
      const all = newBlobs.map((_, k) => k);
      for (const part of batches(all, ID_BATCH)) {
        const ins = await c.query(`INSERT INTO blobs (uid, checksum, size, stored_size, state, created, format, key_info, meta_pack, meta_index)
          SELECT u.uid, u.checksum, u.size, u.stored, u.state, $6, u.format, u.key_info, u.pack, u.idx
          FROM unnest($1::text[], $2::bytea[], $3::int[], $4::bigint[], $5::smallint[], $7::smallint[], $8::bytea[], $9::text[], $10::int[])
            AS u(uid, checksum, size, stored, state, format, key_info, pack, idx)
          ON CONFLICT DO NOTHING RETURNING id, uid`,
        [part.map((k) => newBlobs[k].uid), part.map((k) => newBlobs[k].checksum), part.map((k) => newBlobs[k].size),
          part.map((k) => newBlobs[k].storedSize), part.map((k) => (newBlobs[k].bad ? BlobState.Bad : BlobState.Live)), now,
          part.map((k) => newBlobs[k].format), part.map((k) => newBlobs[k].keyInfo), part.map((k) => newBlobs[k].metaPack ?? null),
          part.map((k) => newBlobs[k].metaIndex ?? null)]);
        const got = new Map<string, number>(ins.rows.map((r) => [r.uid, Number(r.id)]));
        const rest: number[] = [];
        for (const k of part) {
          const id = got.get(newBlobs[k].uid);
          if (id !== undefined) ids[k] = id;
          else rest.push(k);
        }
        if (!rest.length) continue;
        const known = new Map<string, Row>();
        for (const r of (await c.query(`SELECT id, uid, checksum, size, state, format FROM blobs WHERE uid = ANY($1::text[])`, [rest.map((k) => newBlobs[k].uid)])).rows) known.set(r.uid, r);
        for (const k of rest) {
          const r = known.get(newBlobs[k].uid);
          if (r) {
            ids[k] = knownBlobId(newBlobs[k], { id: Number(r.id), checksum: r.checksum, size: Number(r.size), state: Number(r.state), format: Number(r.format) });
            continue;
          }
          // A backy-format blob whose content the repository holds under another uid already.
          const same = (await c.query(`SELECT id FROM blobs WHERE checksum = $1 AND state <> 3 AND format = 0`, [newBlobs[k].checksum])).rows[0];
          if (!same) throw new DatabaseError(`cannot add blob ${newBlobs[k].uid}`);
          ids[k] = Number(same.id);
        }
      }
      const versions: { version: VersionRow; metaGen: number }[] = [];
      for (const { v, entries, opts = {} } of items) {
        const tags = [...new Set(v.tags)].sort();
        const row = (await c.query(`INSERT INTO versions (uid, name, snapshot_name, date, size, block_size, valid, complete, protected, expire, base_uid)
          VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) RETURNING id`,
        [v.uid, v.name, v.snapshotName, v.date, v.size, v.blockSize, v.valid ? 1 : 0, v.complete ? 1 : 0, v.protected ? 1 : 0, v.expire, v.baseUid])).rows[0];
        const id = Number(row.id);
        if (tags.length) await c.query(`INSERT INTO tags (version_id, name) SELECT $1, unnest($2::text[]) ON CONFLICT DO NOTHING`, [id, tags]);
        for (const part of batches([...importedChunks(entries, ids)], 1000)) {
          await c.query(`INSERT INTO block_maps (version_id, chunk, data) SELECT $1, * FROM unnest($2::int[], $3::bytea[])`,
            [id, part.map((x) => x[0]), part.map((x) => x[1])]);
        }
        if (opts.blockDates) await c.query(`INSERT INTO block_dates (version_id, data) VALUES ($1, $2)`, [id, opts.blockDates]);
        if (opts.synced) await c.query(`UPDATE versions SET meta_synced = meta_gen WHERE id = $1`, [id]);
        const full = (await c.query(`SELECT * FROM versions WHERE id = $1`, [id])).rows[0];
        versions.push({ version: this.toVersion(full, tags), metaGen: Number(full.meta_gen) });
      }
      return { versions, newIds: ids };
    }, { prelude: 'LOCK TABLE blobs IN ROW EXCLUSIVE MODE' });
  }

  async setBlobPacks(pack: string, ids: number[]): Promise<void> {
    for (let i = 0; i < ids.length; i += ID_BATCH) {
      const part = ids.slice(i, i + ID_BATCH);
      await this.q(`UPDATE blobs b SET meta_pack = $1, meta_index = u.idx FROM unnest($2::bigint[], $3::int[]) AS u(id, idx) WHERE b.id = u.id`,
        [pack, part, part.map((_, k) => i + k)]);
    }
  }

  async packsOf(ids: number[]): Promise<string[]> {
    const out = new Set<string>();
    for (const part of batches(ids, ID_BATCH)) {
      for (const r of await this.q(`SELECT DISTINCT meta_pack FROM blobs WHERE meta_pack IS NOT NULL AND id = ANY($1::bigint[])`, [part])) out.add(r.meta_pack);
    }
    return [...out];
  }

  async unusedPacks(names: string[]): Promise<string[]> {
    if (!names.length) return [];
    const used = new Set((await this.q(`SELECT DISTINCT meta_pack FROM blobs WHERE meta_pack = ANY($1::text[])`, [names])).map((r) => r.meta_pack as string));
    return names.filter((n) => !used.has(n));
  }

  async getBlockDates(versionId: number): Promise<Buffer | undefined> {
    return (await this.q(`SELECT data FROM block_dates WHERE version_id = $1`, [versionId]))[0]?.data;
  }

  async staleStorageMeta(limit: number): Promise<{ uid: string; metaGen: number }[]> {
    return (await this.q(`SELECT uid, meta_gen FROM versions WHERE meta_gen <> meta_synced AND complete = 1 ORDER BY id LIMIT $1`, [limit]))
      .map((r) => ({ uid: r.uid, metaGen: Number(r.meta_gen) }));
  }

  async markStorageMetaSynced(uid: string, metaGen: number): Promise<void> {
    await this.q(`UPDATE versions SET meta_synced = $1 WHERE uid = $2 AND meta_synced < $1`, [metaGen, uid]);
  }

  async removedStorageMeta(limit: number): Promise<string[]> {
    return (await this.q(`SELECT uid FROM meta_removed ORDER BY uid LIMIT $1`, [limit])).map((r) => r.uid);
  }

  async forgetRemovedStorageMeta(uids: string[]): Promise<void> {
    if (uids.length) await this.q(`DELETE FROM meta_removed WHERE uid = ANY($1::text[])`, [uids]);
  }

  async isEmpty(): Promise<boolean> {
    const r = (await this.q(`SELECT (SELECT COUNT(*) FROM versions) + (SELECT COUNT(*) FROM blobs) AS n`))[0];
    return Number(r.n) === 0;
  }

  private forgetChunks(versionId: number): void {
    for (const k of [...this.writeChunks.keys()]) if (k.startsWith(`${versionId}:`)) this.writeChunks.delete(k);
  }

  // ---- block maps

  async readMapChunk(versionId: number, chunkNo: number): Promise<Float64Array> {
    const r = (await this.q(`SELECT data FROM block_maps WHERE version_id = $1 AND chunk = $2`, [versionId, chunkNo]))[0];
    if (!r) throw new DatabaseError(`block map chunk ${chunkNo} of version ${versionId} is missing (version removed?)`);
    return decodeChunk(r.data);
  }

  async recordBlocks(versionId: number, session: string, entries: BlockEntry[]): Promise<ResolvedBlock[]> {
    if (!entries.length) return [];
    const now = Date.now();
    return this.tx(async (c) => {
      const v = (await c.query(`SELECT size, block_size FROM versions WHERE id = $1 FOR KEY SHARE`, [versionId])).rows[0];
      if (!v) throw new DatabaseError('the version was removed while it was being written');
      const blocks = blockCount(Number(v.size), Number(v.block_size));

      // Map chunks touched by this batch: cached ones, the rest in one query.
      const touched = [...new Set(entries.map((e) => Math.floor(e.index / MAP_CHUNK)))];
      const missing = touched.filter((n) => !this.writeChunks.has(`${versionId}:${n}`));
      if (missing.length) {
        const rows = (await c.query(`SELECT chunk, data FROM block_maps WHERE version_id = $1 AND chunk = ANY($2::int[])`, [versionId, missing])).rows;
        for (const r of rows) {
          const decoded = decodeChunk(r.data);
          if (decoded.length !== chunkLength(blocks, r.chunk)) throw new DatabaseError(`block map chunk ${r.chunk} of version ${versionId} has the wrong length`);
          this.writeChunks.set(`${versionId}:${r.chunk}`, decoded);
        }
        for (const n of missing) if (!this.writeChunks.has(`${versionId}:${n}`)) throw new DatabaseError(`block map chunk ${n} of version ${versionId} is missing`);
      }

      // Each distinct checksum of the batch is decided once.
      const wanted = new Map<string, { checksum: Buffer; size: number }>();
      for (const e of entries) if (!e.zero && !wanted.has(e.checksum.toString('hex'))) wanted.set(e.checksum.toString('hex'), { checksum: e.checksum, size: e.size });
      const decided = new Map<string, { blobId: number; uid: string; upload: boolean }>();
      let open = [...wanted.keys()];
      for (let round = 0; open.length; round++) {
        if (round >= 5) throw new DatabaseError('could not reserve blobs: the same checksums keep changing (concurrent cleanups?)');
        const found = new Map<string, Row>();
        const lookup = await c.query(`SELECT id, uid, checksum, state, owner FROM blobs WHERE checksum = ANY($1::bytea[]) AND state <> 3 AND format = 0`,
          [open.map((h) => wanted.get(h)!.checksum)]);
        for (const r of lookup.rows) found.set((r.checksum as Buffer).toString('hex'), r);
        // Checksums without a usable blob of backy's format may be held by a live imported (foreign) blob.
        const foreign = new Map<string, Row>();
        const unusable = open.filter((h) => {
          const r = found.get(h);
          return !ownBlobUsable(r ? { state: Number(r.state), owner: r.owner } : undefined, session);
        });
        if (unusable.length) {
          const f = await c.query(`SELECT DISTINCT ON (checksum) id, uid, checksum FROM blobs
            WHERE checksum = ANY($1::bytea[]) AND format <> 0 AND state = 1 ORDER BY checksum, id`, [unusable.map((h) => wanted.get(h)!.checksum)]);
          for (const r of f.rows) foreign.set((r.checksum as Buffer).toString('hex'), r);
        }
        const inserts: string[] = [];
        const takeOvers: number[] = [];
        for (const h of open) {
          const existing = found.get(h);
          const d = decideBlob(existing ? { state: Number(existing.state), owner: existing.owner } : undefined, session, foreign.has(h));
          if (d.kind === 'foreign') {
            const f = foreign.get(h)!;
            decided.set(h, { blobId: Number(f.id), uid: f.uid, upload: false });
            continue;
          }
          if (d.kind === 'insert') {
            inserts.push(h);
            continue;
          }
          if (d.kind === 'take-over') takeOvers.push(Number(existing!.id));
          decided.set(h, { blobId: Number(existing!.id), uid: existing!.uid, upload: d.upload });
        }
        if (takeOvers.length) {
          // Conditional: another backup may have finished storing the blob since the lookup (state 1). Taking
          // it back to "uploading" would make that backup's version look incomplete; reuse it instead.
          const taken = new Set((await c.query(`UPDATE blobs SET state = 0, owner = $1 WHERE id = ANY($2::bigint[]) AND state IN (0, 2) RETURNING id`,
            [session, takeOvers.sort((a, b) => a - b)])).rows.map((r) => Number(r.id)));
          const tried = new Set(takeOvers);
          for (const d of decided.values()) if (d.upload && tried.has(d.blobId) && !taken.has(d.blobId)) d.upload = false;
        }
        open = [];
        if (!inserts.length) break;
        // Ids in block order (consecutive ids make small map chunks), rows inserted in checksum order (two
        // backups inserting overlapping checksums wait for each other instead of deadlocking). A checksum
        // another backup reserved meanwhile conflicts on the unique index: it is looked up again next round.
        const uids = inserts.map(() => newBlobUid());
        const ins = await c.query(`INSERT INTO blobs (id, uid, checksum, size, state, owner, created)
          SELECT id, uid, checksum, size, 0, $4, $5 FROM (
            SELECT nextval('blobs_id_seq') AS id, u.uid, u.checksum, u.size
            FROM unnest($1::text[], $2::bytea[], $3::int[]) WITH ORDINALITY AS u(uid, checksum, size, ord)
            ORDER BY u.ord OFFSET 0) s
          ORDER BY checksum
          ON CONFLICT (checksum) WHERE state <> 3 AND format = 0 DO NOTHING
          RETURNING id, uid, checksum`,
        [uids, inserts.map((h) => wanted.get(h)!.checksum), inserts.map((h) => wanted.get(h)!.size), session, now]);
        for (const r of ins.rows) decided.set((r.checksum as Buffer).toString('hex'), { blobId: Number(r.id), uid: r.uid, upload: true });
        open = inserts.filter((h) => !decided.has(h));
      }

      const results: ResolvedBlock[] = [];
      const first = new Set<string>();
      const dirty = new Set<number>();
      for (const e of entries) {
        const n = Math.floor(e.index / MAP_CHUNK);
        const chunk = this.writeChunks.get(`${versionId}:${n}`)!;
        dirty.add(n);
        if (e.zero) {
          chunk[e.index % MAP_CHUNK] = HOLE;
          continue;
        }
        const h = e.checksum.toString('hex');
        const d = decided.get(h)!;
        const upload = d.upload && !first.has(h);
        first.add(h);
        chunk[e.index % MAP_CHUNK] = d.blobId;
        results.push({ index: e.index, blobId: d.blobId, uid: d.uid, upload });
      }
      const ns = [...dirty];
      await c.query(`UPDATE block_maps m SET data = u.data FROM unnest($2::int[], $3::bytea[]) AS u(chunk, data)
        WHERE m.version_id = $1 AND m.chunk = u.chunk`,
      [versionId, ns, ns.map((n) => encodeChunk(this.writeChunks.get(`${versionId}:${n}`)!))]);
      if (this.writeChunks.size > 64) {
        for (const k of [...this.writeChunks.keys()].slice(0, this.writeChunks.size - 64)) this.writeChunks.delete(k);
      }
      return results;
    }, {
      // Before any read: ordered against markForDeletion (see the class comment).
      prelude: `LOCK TABLE blobs IN ROW EXCLUSIVE MODE; ${ASYNC_COMMIT}`,
      onRollback: () => this.forgetChunks(versionId), // the cached chunks may hold rolled-back entries
    });
  }

  async markUploaded(blobs: { id: number; storedSize: number }[]): Promise<void> {
    if (!blobs.length) return;
    await this.tx(async (c) => {
      await c.query(`UPDATE blobs b SET state = 1, stored_size = COALESCE(NULLIF(u.stored, 0), b.stored_size), owner = NULL
        FROM unnest($1::bigint[], $2::int[]) AS u(id, stored) WHERE b.id = u.id AND b.state IN (0, 2)`,
      [blobs.map((b) => b.id), blobs.map((b) => b.storedSize)]);
    }, { prelude: ASYNC_COMMIT });
  }

  async getBlobs(ids: number[]): Promise<Map<number, BlobRef>> {
    const out = new Map<number, BlobRef>();
    for (const part of batches([...new Set(ids)], ID_BATCH)) {
      for (const r of await this.q(`SELECT id, uid, checksum, size, state, format, key_info, meta_pack, meta_index FROM blobs WHERE id = ANY($1::bigint[])`, [part])) {
        out.set(Number(r.id), blobRefFromRow(r));
      }
    }
    return out;
  }

  async markBad(ids: number[]): Promise<string[]> {
    if (!ids.length) return [];
    const bad = new Set(ids);
    return this.tx(async (c) => {
      // Like cleanup: no map may gain a reference to these blobs between the scan and the marking.
      await c.query('LOCK TABLE blobs IN SHARE ROW EXCLUSIVE MODE');
      for (const part of batches(ids, ID_BATCH)) await c.query(`UPDATE blobs SET state = 2 WHERE state IN (0, 1) AND id = ANY($1::bigint[])`, [part]);
      const hit: number[] = [];
      const seen = new Set<number>();
      for await (const rows of this.cursor(c, `SELECT version_id, data FROM block_maps`)) {
        for (const r of rows) {
          const vid = Number(r.version_id);
          if (seen.has(vid)) continue;
          const entries = decodeChunk(r.data);
          for (let i = 0; i < entries.length; i++) if (bad.has(entries[i])) { seen.add(vid); hit.push(vid); break; }
        }
      }
      if (!hit.length) return [];
      const uids = new Map<number, string>();
      for (const r of (await c.query(`UPDATE versions SET valid = 0 WHERE id = ANY($1::bigint[]) RETURNING id, uid`, [hit])).rows) uids.set(Number(r.id), r.uid);
      return hit.map((id) => uids.get(id)!).filter((u) => u !== undefined);
    });
  }

  // ---- cleanup

  async markForDeletion(graceMs: number, now: number): Promise<CleanupMark> {
    return this.tx(async (c) => {
      const maxId = Number((await c.query(`SELECT COALESCE(MAX(id), 0) AS m FROM blobs`)).rows[0].m);
      const refs = new IdBitmap(maxId);
      for await (const rows of this.cursor(c, `SELECT data FROM block_maps`)) for (const r of rows) refs.addChunk(r.data);
      const tally = new CleanupTally(refs, graceMs, now);
      for await (const rows of this.cursor(c, `SELECT id, unref_since FROM blobs WHERE state <> 3`)) {
        for (const r of rows) tally.add(Number(r.id), r.unref_since === null ? null : Number(r.unref_since));
      }
      for (const part of batches(tally.clear, ID_BATCH)) await c.query(`UPDATE blobs SET unref_since = NULL WHERE id = ANY($1::bigint[])`, [part]);
      for (const part of batches(tally.stamp, ID_BATCH)) await c.query(`UPDATE blobs SET unref_since = $1 WHERE id = ANY($2::bigint[])`, [now, part]);
      for (const part of batches(tally.delete, ID_BATCH)) await c.query(`UPDATE blobs SET state = 3 WHERE id = ANY($1::bigint[])`, [part]);
      return tally.mark;
    }, {
      // Lock first, snapshot after (taken by the first query, not by LOCK TABLE): see the class comment.
      // The marks must be durable before cleanup deletes the first object, whatever the server's default.
      isolation: 'REPEATABLE READ', prelude: 'LOCK TABLE blobs IN SHARE ROW EXCLUSIVE MODE; SET LOCAL synchronous_commit = on',
    });
  }

  async blobsToDelete(limit: number): Promise<{ id: number; uid: string; format: BlobFormat }[]> {
    return (await this.q(`SELECT id, uid, format FROM blobs WHERE state = 3 ORDER BY id LIMIT $1`, [limit]))
      .map((r) => ({ id: Number(r.id), uid: r.uid, format: Number(r.format) }));
  }

  async forgetBlobs(ids: number[]): Promise<void> {
    for (const part of batches(ids, ID_BATCH)) await this.q(`DELETE FROM blobs WHERE state = 3 AND id = ANY($1::bigint[])`, [part]);
  }

  async knownBlobUids(uids: string[]): Promise<Set<string>> {
    const out = new Set<string>();
    for (const part of batches(uids, ID_BATCH)) {
      for (const r of await this.q(`SELECT uid FROM blobs WHERE uid = ANY($1::text[])`, [part])) out.add(r.uid);
    }
    return out;
  }

  async *blobUidPages(pageSize: number): AsyncIterable<{ id: number; uid: string; state: BlobState }[]> {
    let after = 0;
    for (;;) {
      const rows = await this.q(`SELECT id, uid, state FROM blobs WHERE id > $1 ORDER BY id LIMIT $2`, [after, pageSize]);
      if (!rows.length) return;
      after = Number(rows[rows.length - 1].id);
      yield rows.map((r) => ({ id: Number(r.id), uid: r.uid, state: Number(r.state) }));
    }
  }

  async repositoryStats(): Promise<RepositoryStats> {
    const r = (await this.q(`SELECT (SELECT COUNT(*) FROM versions) AS v, COUNT(*) AS n,
      COALESCE(SUM(stored_size), 0)::bigint AS s, COALESCE(SUM(size), 0)::bigint AS p FROM blobs WHERE state <> 3`))[0];
    return { versions: Number(r.v), blobs: Number(r.n), storedBytes: Number(r.s), plainBytes: Number(r.p) };
  }

  /** A version's summary from its chunks; for a complete version with a delta against an earlier one. */
  private async summarize(c: PoolClient, versionId: number, complete: boolean, keep?: (digest: string, data: Uint8Array) => void): Promise<MapSummary> {
    const chunksOf = async (id: number) => (await c.query(`SELECT chunk, data FROM block_maps WHERE version_id = $1`, [id])).rows as { chunk: number; data: Buffer }[];
    const rows = await chunksOf(versionId);
    const summary = summarizeChunks(rows, keep);
    const base = complete ? (await c.query(DELTA_BASE_SQL, [versionId])).rows[0] : undefined;
    if (base) {
      const delta = mapDelta(Number(base.id), new Map((await chunksOf(Number(base.id))).map((r) => [r.chunk, r.data])), new Map(rows.map((r) => [r.chunk, r.data])));
      if (delta) summary.delta = delta;
    }
    return summary;
  }

  private async storeSummaries(c: PoolClient, summaries: [number, MapSummary][]): Promise<void> {
    for (const part of batches(summaries, 1000)) {
      await c.query(`INSERT INTO map_summaries (version_id, data)
        SELECT u.id, u.data FROM unnest($1::bigint[], $2::bytea[]) AS u(id, data) WHERE EXISTS (SELECT 1 FROM versions v WHERE v.id = u.id)
        ON CONFLICT (version_id) DO UPDATE SET data = excluded.data`, [part.map((x) => x[0]), part.map((x) => encodeSummary(x[1]))]);
    }
  }

  /**
   * Every blob's id, size and stored size (not being deleted) as of an exported snapshot, in one value of 14
   * bytes per blob: far cheaper than a row per blob.
   */
  private async blobSizes(snapshot: string): Promise<MapUsage['blobs']> {
    if (!/^[0-9A-F-]+$/i.test(snapshot)) throw new DatabaseError(`unexpected snapshot id ${snapshot}`);
    return this.tx(async (c) => {
      // Built from each row's binary forms and sent as base64: the cheapest to build and to parse (pg 8 reads
      // every value as text, so binary results are no option). In values of 2,048 blobs (about 40 kB): the
      // driver gathers each message in one buffer, and copying megabytes into fresh memory costs far more on
      // a VM than parsing a few hundred rows.
      const r = await c.query(`SELECT encode(string_agg(substr(int8send(id), 3) || int4send(size) || int4send(stored_size), ''::bytea), 'base64') AS t
        FROM blobs WHERE state <> 3 GROUP BY id >> 11`);
      return blobSizesFromBytes(r.rows.map((row) => Buffer.from(row.t, 'base64')));
    }, { isolation: 'REPEATABLE READ READ ONLY', prelude: `SET TRANSACTION SNAPSHOT '${snapshot}'` });
  }

  async mapUsage(): Promise<MapUsage> {
    const computed: [number, MapSummary][] = [];
    const usage = await this.tx(async (c): Promise<MapUsage> => {
      // The blob sizes (a scan of every blob, the longest read) come over a second connection in this very
      // snapshot, while this one reads the summaries: the server scans while this process decodes.
      const blobs = this.blobSizes((await c.query('SELECT pg_export_snapshot() AS s')).rows[0].s);
      blobs.catch(() => undefined); // awaited below; a failure meanwhile must not count as unhandled
      const summaries = new SummaryTable();
      const contents = new Map<string, Uint8Array>();
      const keep = (digest: string, data: Uint8Array) => { if (!contents.has(digest)) contents.set(digest, data); };
      const missing: { id: number; complete: boolean }[] = [];
      // The stored summaries a page of versions at a time, as values of 64 versions each (version id, length,
      // bytes; base64): far cheaper than a row per version with its bytes in hex (and see blobSizes).
      const page = (after: number) => c.query(`SELECT encode(string_agg(int8send(version_id) || int4send(length(data)) || data, ''::bytea), 'base64') AS t,
          max(version_id) AS last FROM (SELECT version_id, data FROM map_summaries WHERE version_id > $1 ORDER BY version_id LIMIT $2) s
          GROUP BY version_id >> 6`, [after, SUMMARY_PAGE]);
      let next = page(0);
      // Queued behind the first page: the server answers it while this process decodes that page.
      const unsummarized = c.query(`SELECT id, complete FROM versions v WHERE NOT EXISTS (SELECT 1 FROM map_summaries s WHERE s.version_id = v.id) ORDER BY id`);
      unsummarized.catch(() => undefined); // awaited below; a failure meanwhile must not count as unhandled
      for (;;) {
        let after = 0;
        let count = 0;
        for (const row of (await next).rows) {
          const b = Buffer.from(row.t, 'base64');
          for (let off = 0; off < b.length; count++) {
            const id = b.readUInt32BE(off) * 2 ** 32 + b.readUInt32BE(off + 4);
            const end = off + 12 + b.readUInt32BE(off + 8);
            summaries.addEncoded(id, b, off + 12, end);
            off = end;
          }
          after = Math.max(after, Number(row.last));
        }
        if (count < SUMMARY_PAGE) break; // a short page is the last: no query for an empty one
        next = page(after);
      }
      for (const r of (await unsummarized).rows) missing.push({ id: Number(r.id), complete: !!r.complete });
      for (const m of missing) {
        const summary = await this.summarize(c, m.id, m.complete, keep);
        summaries.add(m.id, summary);
        if (m.complete) computed.push([m.id, summary]);
      }
      // One representative chunk per distinct content of the roots, fetched in batches.
      const wanted = new Map<string, [number, number]>();
      for (const id of summaries.roots()) for (const ch of summaries.chunksOf(summaries.slotOf(id))) if (!contents.has(ch.digest) && !wanted.has(ch.digest)) wanted.set(ch.digest, [id, ch.chunk]);
      const byPlace = new Map<string, string>([...wanted].map(([digest, [id, chunk]]) => [`${id}:${chunk}`, digest]));
      for (const part of batches([...wanted.values()], ID_BATCH)) {
        const rows = (await c.query(`SELECT m.version_id, m.chunk, m.data FROM block_maps m
          JOIN unnest($1::bigint[], $2::int[]) AS u(version_id, chunk) ON m.version_id = u.version_id AND m.chunk = u.chunk`,
        [part.map((p) => p[0]), part.map((p) => p[1])])).rows;
        for (const r of rows) contents.set(byPlace.get(`${r.version_id}:${r.chunk}`)!, r.data);
      }
      for (const digest of wanted.keys()) if (!contents.has(digest)) throw new DatabaseError(`block map chunk ${wanted.get(digest)!.join('/')} is missing`);
      return { summaries, contents, blobs: await blobs };
    }, { isolation: 'REPEATABLE READ READ ONLY' });
    if (computed.length) {
      // A cache: losing a race with a removal is harmless.
      await this.tx((c) => this.storeSummaries(c, computed)).catch((e) => { if (!/foreign key/i.test(String((e as Error).message))) throw e; });
    }
    return usage;
  }

  // ---- stats

  async addStats(s: StatsRow): Promise<void> {
    await this.q(`INSERT INTO stats (date, version_uid, version_name, version_size_bytes, version_size_blocks, bytes_read, blocks_read,
      bytes_written, blocks_written, bytes_dedup, blocks_dedup, bytes_sparse, blocks_sparse, duration_seconds)
      VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)`, [s.date, s.versionUid, s.versionName, s.versionSizeBytes,
      s.versionSizeBlocks, s.bytesRead, s.blocksRead, s.bytesWritten, s.blocksWritten, s.bytesDedup, s.blocksDedup, s.bytesSparse,
      s.blocksSparse, s.durationSeconds]);
  }

  async listStats(versionUid?: string, limit?: number): Promise<StatsRow[]> {
    const args: unknown[] = [];
    let where = '';
    let lim = '';
    if (versionUid) { args.push(versionUid); where = `WHERE version_uid = $${args.length}`; }
    if (limit !== undefined) { args.push(limit); lim = `LIMIT $${args.length}`; }
    const rows = await this.q(`SELECT * FROM (SELECT * FROM stats ${where} ORDER BY date DESC, id DESC ${lim}) s ORDER BY date, id`, args);
    return rows.map(statsFromRow);
  }

  // ---- locks

  async tryLock(name: string, info: LockInfo, conflicts: string[] = []): Promise<LockInfo | undefined> {
    return this.locks.tryLock(name, info, conflicts);
  }

  async unlock(name: string, session: string): Promise<void> {
    await this.locks.unlock(name, session);
  }

  async tryLocks(requests: { name: string; info: LockInfo; conflicts?: string[] }[]): Promise<(LockInfo | undefined)[]> {
    return this.locks.tryLocks(requests);
  }

  async unlockAll(names: string[], session: string): Promise<void> {
    await this.locks.unlockAll(names, session);
  }
}
