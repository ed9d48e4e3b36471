import Database from 'better-sqlite3';
import { sqlitePath } from '../config/config';
import { maskEngineUrl, pgError } from '../meta/pg-errors';
import type { StatsRow } from '../meta/types';
import { DatabaseError } from '../util/errors';
import { ColumnReader, COLUMN_SQL, regularColumn } from './block-column';

/**
 * Read-only access to a backy2 database (SQLite or PostgreSQL), any schema from 2.9 (no encryption columns,
 * expire missing or a date) to 2.13 (metadata format 2.12). Dates come as backy2 stored them: naive UTC text.
 */
export interface Backy2Version {
  uid: string;
  date: string;
  name: string;
  snapshotName: string;
  /** blocks */
  size: number;
  sizeBytes: number;
  valid: boolean;
  protected: boolean;
  expire: string | null;
}

/** One block row as a version lists it: which blob (null: sparse), when, and whether it was found bad. */
export type Backy2BlockRow = [id: number, uid: string | null, date: string, valid: number, size: number | null];

export interface Backy2BlobDetails {
  checksum: string | null;
  size: number;
  encVersion: number;
  envkey: string | null;
  nonce: string | null;
}

/** A row of backy2's stats table: backy's own stats row, its date as backy2 wrote it (text, naive UTC). */
export type Backy2Stats = Omit<StatsRow, 'date'> & { date: string };

export interface Backy2Schema {
  /** alembic revision, '' when the table is missing */
  revision: string;
  snapshotName: boolean;
  protected: boolean;
  expire: boolean;
  tags: boolean;
  encryption: boolean;
  nonce: boolean;
  stats: boolean;
}

/**
 * A complete, regular version's block rows in block order, COLUMN_STRIDE bytes each: the blob uid (32
 * characters, '-' * 32 for a sparse block) and the second the row was written ('YYYY-MM-DD HH:MM:SS').
 */
export interface BlockColumn {
  rows: Buffer;
}

export interface Backy2Database {
  readonly description: string;
  readonly schema: Backy2Schema;
  versions(): Promise<Backy2Version[]>;
  tags(): Promise<Map<string, string[]>>;
  /** The block rows of a version in block order, a page at a time. */
  blockRows(versionUid: string): AsyncIterable<Backy2BlockRow[]>;
  /**
   * The fast way to read a version: its rows in one piece, put together by the database. Undefined unless
   * the version is regular (a row for every block, none found bad, sizes and uids adding up): then its rows
   * are read one by one.
   */
  blockColumn(v: Backy2Version): Promise<BlockColumn | undefined>;
  /** Checksum, size and encryption of the blobs of these blocks of a version, by blob uid. */
  blobDetails(versionUid: string, blockIds: number[]): Promise<Map<string, Backy2BlobDetails>>;
  /** Some encrypted block's wrapped key, to check the key before importing anything. */
  someEncryptedBlock(): Promise<{ uid: string; envkey: string } | undefined>;
  stats(versionUid: string): Promise<Backy2Stats[]>;
  close(): Promise<void>;
}

const PAGE = 10_000;
type Row = Record<string, unknown>;
function statsOf(r: Row): Backy2Stats {
  return {
    date: String(r.date), versionUid: String(r.version_uid), versionName: String(r.version_name), versionSizeBytes: Number(r.version_size_bytes),
    versionSizeBlocks: Number(r.version_size_blocks), bytesRead: Number(r.bytes_read), blocksRead: Number(r.blocks_read),
    bytesWritten: Number(r.bytes_written), blocksWritten: Number(r.blocks_written), bytesDedup: Number(r.bytes_found_dedup),
    blocksDedup: Number(r.blocks_found_dedup), bytesSparse: Number(r.bytes_sparse), blocksSparse: Number(r.blocks_sparse),
    durationSeconds: Number(r.duration_seconds),
  };
}

function versionSelect(s: Backy2Schema): string {
  return `SELECT uid, date, name, ${s.snapshotName ? 'snapshot_name' : "'' AS snapshot_name"}, size, size_bytes, valid,
    ${s.protected ? 'protected' : '0 AS protected'}, ${s.expire ? 'expire' : 'NULL AS expire'} FROM versions ORDER BY date, uid`;
}

function versionOf(r: Row): Backy2Version {
  return {
    uid: String(r.uid), date: String(r.date), name: String(r.name ?? ''), snapshotName: String(r.snapshot_name ?? ''), size: Number(r.size),
    sizeBytes: Number(r.size_bytes), valid: Number(r.valid) === 1, protected: Number(r.protected) === 1,
    expire: r.expire === null || r.expire === undefined ? null : String(r.expire),
  };
}

function schemaOf(tables: Set<string>, cols: (table: string) => Set<string>, revision: string): Backy2Schema {
  if (!tables.has('versions') || !tables.has('blocks')) throw new DatabaseError('this database has no backy2 versions and blocks tables');
  const v = cols('versions');
  const b = cols('blocks');
  return {
    revision, snapshotName: v.has('snapshot_name'), protected: v.has('protected'), expire: v.has('expire'), tags: tables.has('tags'),
    encryption: b.has('enc_version') && b.has('enc_envkey'), nonce: b.has('enc_nonce'), stats: tables.has('stats'),
  };
}

class SqliteBacky2 implements Backy2Database {
  readonly description: string;
  readonly schema: Backy2Schema;
  private db: Database.Database;
  private columns: ColumnReader | undefined;
  /** statements run once per version, prepared once */
  private readonly statements = new Map<string, Database.Statement>();

  constructor(private readonly file: string) {
    this.description = `sqlite ${file}`;
    try {
      this.db = new Database(file, { readonly: true, fileMustExist: true });
      this.db.defaultSafeIntegers(false);
    } catch (e) {
      throw new DatabaseError(`cannot open backy2 database ${file}: ${(e as Error).message}`);
    }
    try {
      const tables = new Set((this.db.prepare(`SELECT name FROM sqlite_master WHERE type = 'table'`).all() as Row[]).map((r) => String(r.name)));
      const cols = (t: string) => new Set((this.db.prepare(`PRAGMA table_info(${t})`).all() as Row[]).map((r) => String(r.name)));
      const revision = tables.has('alembic_version') ? String((this.db.prepare('SELECT version_num FROM alembic_version').get() as Row | undefined)?.version_num ?? '') : '';
      this.schema = schemaOf(tables, cols, revision);
    } catch (e) {
      this.db.close();
      throw e instanceof DatabaseError ? new DatabaseError(`${file}: ${e.message}`) : new DatabaseError(`cannot read backy2 database ${file}: ${(e as Error).message}`);
    }
  }

  async versions(): Promise<Backy2Version[]> {
    return (this.db.prepare(versionSelect(this.schema)).all() as Row[]).map(versionOf);
  }

  async tags(): Promise<Map<string, string[]>> {
    const out = new Map<string, string[]>();
    if (!this.schema.tags) return out;
    for (const r of this.db.prepare('SELECT version_uid, name FROM tags ORDER BY name').all() as Row[]) {
      const uid = String(r.version_uid);
      if (!out.has(uid)) out.set(uid, []);
      out.get(uid)!.push(String(r.name));
    }
    return out;
  }

  async *blockRows(versionUid: string): AsyncIterable<Backy2BlockRow[]> {
    const st = this.db.prepare('SELECT id, uid, date, valid, size FROM blocks WHERE version_uid = ? ORDER BY id').raw(true);
    let page: Backy2BlockRow[] = [];
    for (const r of st.iterate(versionUid) as Iterable<Backy2BlockRow>) {
      page.push(r);
      if (page.length >= PAGE) {
        yield page;
        page = [];
      }
    }
    if (page.length) yield page;
  }

  async blockColumn(v: Backy2Version): Promise<BlockColumn | undefined> {
    if (!this.columns) this.columns = new ColumnReader(this.file);
    return this.columns.read(v);
  }

  async blobDetails(versionUid: string, blockIds: number[]): Promise<Map<string, Backy2BlobDetails>> {
    const s = this.schema;
    // By primary key: one row per block asked for (a blob's own rows can be thousands, one per version).
    const st = this.prepared(`SELECT uid, checksum, size, ${s.encryption ? 'enc_version, enc_envkey' : '0 AS enc_version, NULL AS enc_envkey'},
      ${s.nonce ? 'enc_nonce' : 'NULL AS enc_nonce'} FROM blocks WHERE version_uid = ? AND id IN (SELECT value FROM json_each(?)) AND uid IS NOT NULL`);
    const out = new Map<string, Backy2BlobDetails>();
    for (let i = 0; i < blockIds.length; i += PAGE) {
      for (const r of st.all(versionUid, JSON.stringify(blockIds.slice(i, i + PAGE))) as Row[]) out.set(String(r.uid), detailsOf(r));
    }
    return out;
  }

  async someEncryptedBlock(): Promise<{ uid: string; envkey: string } | undefined> {
    if (!this.schema.encryption) return undefined;
    const r = this.db.prepare('SELECT uid, enc_envkey FROM blocks WHERE enc_version = 1 AND uid IS NOT NULL LIMIT 1').get() as Row | undefined;
    return r ? { uid: String(r.uid), envkey: String(r.enc_envkey ?? '') } : undefined;
  }

  async stats(versionUid: string): Promise<Backy2Stats[]> {
    if (!this.schema.stats) return [];
    return (this.prepared('SELECT * FROM stats WHERE version_uid = ? ORDER BY date').all(versionUid) as Row[]).map(statsOf);
  }

  private prepared(sql: string): Database.Statement {
    let st = this.statements.get(sql);
    if (!st) this.statements.set(sql, (st = this.db.prepare(sql)));
    return st;
  }

  async close(): Promise<void> {
    await this.columns?.close();
    this.db.close();
  }
}

function detailsOf(r: Row): Backy2BlobDetails {
  return {
    checksum: r.checksum === null ? null : String(r.checksum), size: Number(r.size), encVersion: Number(r.enc_version ?? 0),
    envkey: r.enc_envkey === null || r.enc_envkey === undefined ? null : String(r.enc_envkey),
    nonce: r.enc_nonce === null || r.enc_nonce === undefined ? null : String(r.enc_nonce),
  };
}

class PgBacky2 implements Backy2Database {
  readonly description: string;
  schema!: Backy2Schema;
  private client: import('pg').Client;
  private cursorNo = 0;

  constructor(private readonly url: string) {
    this.description = maskEngineUrl(url);
    // eslint-disable-next-line @typescript-eslint/no-require-imports
    const pg = require('pg') as typeof import('pg');
    // Dates as text: backy2 stored naive UTC; the driver would read them in the local time zone.
    const raw = (oid: number) => (oid === 1114 || oid === 1082 || oid === 1184 ? (v: string) => v : pg.types.getTypeParser(oid));
    this.client = new pg.Client({ connectionString: url, application_name: 'backy import-backy2', types: { getTypeParser: raw } as never, connectionTimeoutMillis: 15_000 });
    this.client.on('error', () => undefined);
  }

  async connect(): Promise<void> {
    try {
      await this.client.connect();
      await this.client.query('BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY');
      const tables = new Set((await this.q(`SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()`)).map((r) => String(r.table_name)));
      const colRows = await this.q(`SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = current_schema()`);
      const cols = (t: string) => new Set(colRows.filter((r) => r.table_name === t).map((r) => String(r.column_name)));
      const revision = tables.has('alembic_version') ? String((await this.q('SELECT version_num FROM alembic_version'))[0]?.version_num ?? '') : '';
      this.schema = schemaOf(tables, cols, revision);
    } catch (e) {
      await this.client.end().catch(() => undefined);
      if (e instanceof DatabaseError) throw new DatabaseError(`${this.description}: ${e.message}`);
      throw pgError(e, this.url);
    }
  }

  private async q(sql: string, params: unknown[] = []): Promise<Row[]> {
    try {
      return (await this.client.query(sql, params)).rows;
    } catch (e) {
      throw pgError(e, this.url);
    }
  }

  async versions(): Promise<Backy2Version[]> {
    return (await this.q(versionSelect(this.schema))).map(versionOf);
  }

  async tags(): Promise<Map<string, string[]>> {
    const out = new Map<string, string[]>();
    if (!this.schema.tags) return out;
    for (const r of await this.q('SELECT version_uid, name FROM tags ORDER BY name')) {
      const uid = String(r.version_uid);
      if (!out.has(uid)) out.set(uid, []);
      out.get(uid)!.push(String(r.name));
    }
    return out;
  }

  async *blockRows(versionUid: string): AsyncIterable<Backy2BlockRow[]> {
    const name = `backy2_blocks_${++this.cursorNo}`;
    await this.q(`DECLARE ${name} NO SCROLL CURSOR FOR SELECT id, uid, date, valid, size FROM blocks WHERE version_uid = $1 ORDER BY id`, [versionUid]);
    for (;;) {
      const rows = await this.q(`FETCH ${PAGE} FROM ${name}`);
      if (!rows.length) break;
      yield rows.map((r) => [Number(r.id), r.uid === null ? null : String(r.uid), String(r.date), Number(r.valid), r.size === null ? null : Number(r.size)]);
    }
    await this.q(`CLOSE ${name}`);
  }

  async blockColumn(v: Backy2Version): Promise<BlockColumn | undefined> {
    const r = (await this.q(COLUMN_SQL.pg, [v.uid]))[0];
    return regularColumn(r, v);
  }

  async blobDetails(versionUid: string, blockIds: number[]): Promise<Map<string, Backy2BlobDetails>> {
    const s = this.schema;
    const out = new Map<string, Backy2BlobDetails>();
    for (let i = 0; i < blockIds.length; i += PAGE) {
      const rows = await this.q(`SELECT uid, checksum, size, ${s.encryption ? 'enc_version, enc_envkey' : '0 AS enc_version, NULL AS enc_envkey'},
        ${s.nonce ? 'enc_nonce' : 'NULL AS enc_nonce'} FROM blocks WHERE version_uid = $1 AND id = ANY($2::int[]) AND uid IS NOT NULL`,
      [versionUid, blockIds.slice(i, i + PAGE)]);
      for (const r of rows) out.set(String(r.uid), detailsOf(r));
    }
    return out;
  }

  async someEncryptedBlock(): Promise<{ uid: string; envkey: string } | undefined> {
    if (!this.schema.encryption) return undefined;
    const r = (await this.q('SELECT uid, enc_envkey FROM blocks WHERE enc_version = 1 AND uid IS NOT NULL LIMIT 1'))[0];
    return r ? { uid: String(r.uid), envkey: String(r.enc_envkey ?? '') } : undefined;
  }

  async stats(versionUid: string): Promise<Backy2Stats[]> {
    if (!this.schema.stats) return [];
    return (await this.q('SELECT * FROM stats WHERE version_uid = $1 ORDER BY date', [versionUid])).map(statsOf);
  }

  async close(): Promise<void> {
    await this.client.query('ROLLBACK').catch(() => undefined);
    await this.client.end().catch(() => undefined);
  }
}

export async function openBacky2Database(engine: string): Promise<Backy2Database> {
  const file = sqlitePath(engine);
  if (file) return new SqliteBacky2(file);
  const pg = new PgBacky2(engine);
  await pg.connect();
  return pg;
}
