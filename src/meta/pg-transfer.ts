import Database from 'better-sqlite3';
import { Client } from 'pg';
import { sqlitePath } from '../config/config';
import { ConfigError, DatabaseError } from '../util/errors';
import { pgError } from './pg-errors';
import { pgTypeParsers } from './postgres';

/**
 * Row-level access to a repository database for `db-migrate`, on either engine: a consistent read of every
 * table (one snapshot), and an all-or-nothing write into an empty database whose schema already exists.
 * Values travel as the drivers give them (numbers, strings, Buffers, null), which both accept back, so ids,
 * uids, checksums and map chunks arrive bit for bit.
 */

/** The tables that make a repository, parents first (foreign keys), with the order rows are copied in. */
export const COPIED_TABLES: { name: string; order: string }[] = [
  { name: 'settings', order: 'key' },
  { name: 'versions', order: 'id' },
  { name: 'tags', order: 'version_id, name' },
  { name: 'block_maps', order: 'version_id, chunk' },
  { name: 'block_dates', order: 'version_id' },
  { name: 'map_summaries', order: 'version_id' },
  { name: 'blobs', order: 'id' },
  { name: 'stats', order: 'id' },
  { name: 'meta_removed', order: 'uid' },
];
/** Tables whose ids come from a sequence: the destination continues after the source's high-water mark. */
export const ID_TABLES = ['versions', 'blobs', 'stats'];

type Row = Record<string, unknown>;

export interface TableReader {
  /** Pages of rows of one table. */
  rows(table: string, order: string): AsyncIterable<Row[]>;
  /** The highest id each sequence ever handed out (ids are never reused, not even after a delete). */
  idHighWater(): Promise<Record<string, number>>;
  close(): Promise<void>;
}

export interface TableWriter {
  /** What the database holds besides its schema, or '' when it is empty. */
  contents(): Promise<string>;
  begin(): Promise<void>;
  insert(table: string, rows: Row[]): Promise<void>;
  /** Sets the sequences past the copied ids and past the source's high-water marks. */
  setIdHighWater(hw: Record<string, number>): Promise<void>;
  commit(): Promise<void>;
  close(): Promise<void>;
}

const PAGE = 1000;

function contentsOf(counts: Record<string, number>): string {
  return Object.entries(counts).filter(([, n]) => n > 0).map(([t, n]) => `${n} ${t === 'settings' ? 'settings' : `${t} rows`}`).join(', ');
}

// ---- SQLite

class SqliteTables implements TableReader, TableWriter {
  private db: Database.Database;
  private reading = false;

  constructor(file: string, write: boolean) {
    try {
      this.db = new Database(file, { fileMustExist: true, readonly: !write, timeout: 60_000 });
      this.db.defaultSafeIntegers(false);
      if (write) this.db.pragma('foreign_keys = ON');
    } catch (e) {
      throw new DatabaseError(`cannot open database ${file}: ${(e as Error).message}`);
    }
  }

  async *rows(table: string, order: string): AsyncIterable<Row[]> {
    // One read transaction for all tables: a WAL reader sees one snapshot until it ends.
    if (!this.reading) {
      this.db.exec('BEGIN');
      this.reading = true;
    }
    let page: Row[] = [];
    for (const r of this.db.prepare(`SELECT * FROM ${table} ORDER BY ${order}`).iterate() as Iterable<Row>) {
      page.push(r);
      if (page.length >= PAGE) {
        yield page;
        page = [];
      }
    }
    if (page.length) yield page;
  }

  async idHighWater(): Promise<Record<string, number>> {
    const out: Record<string, number> = {};
    const hasSeq = this.db.prepare(`SELECT 1 FROM sqlite_master WHERE name = 'sqlite_sequence'`).get();
    for (const t of ID_TABLES) {
      const max = Number((this.db.prepare(`SELECT COALESCE(MAX(id), 0) AS m FROM ${t}`).get() as Row).m);
      const seq = hasSeq ? Number((this.db.prepare(`SELECT seq FROM sqlite_sequence WHERE name = ?`).get(t) as Row | undefined)?.seq ?? 0) : 0;
      out[t] = Math.max(max, seq);
    }
    return out;
  }

  async contents(): Promise<string> {
    const counts: Record<string, number> = {};
    for (const { name } of COPIED_TABLES) {
      const where = name === 'settings' ? `WHERE key <> 'schema_version'` : '';
      counts[name] = Number((this.db.prepare(`SELECT COUNT(*) AS n FROM ${name} ${where}`).get() as Row).n);
    }
    return contentsOf(counts);
  }

  async begin(): Promise<void> {
    this.db.exec('BEGIN IMMEDIATE');
  }

  async insert(table: string, rows: Row[]): Promise<void> {
    if (!rows.length) return;
    const cols = Object.keys(rows[0]);
    const verb = table === 'settings' ? 'INSERT OR REPLACE' : 'INSERT';
    const st = this.db.prepare(`${verb} INTO ${table} (${cols.join(', ')}) VALUES (${cols.map((c) => `@${c}`).join(', ')})`);
    for (const r of rows) st.run(r);
  }

  async setIdHighWater(hw: Record<string, number>): Promise<void> {
    for (const t of ID_TABLES) {
      const want = hw[t] ?? 0;
      if (!want) continue;
      const row = this.db.prepare(`SELECT seq FROM sqlite_sequence WHERE name = ?`).get(t) as Row | undefined;
      if (!row) this.db.prepare(`INSERT INTO sqlite_sequence (name, seq) VALUES (?, ?)`).run(t, want);
      else if (Number(row.seq) < want) this.db.prepare(`UPDATE sqlite_sequence SET seq = ? WHERE name = ?`).run(want, t);
    }
  }

  async commit(): Promise<void> {
    this.db.exec('COMMIT');
  }

  async close(): Promise<void> {
    if (this.db.inTransaction) this.db.exec('ROLLBACK');
    this.db.close();
  }
}

// ---- PostgreSQL

class PgTables implements TableReader, TableWriter {
  private client: Client;
  private connected = false;
  private reading = false;
  private cursorNo = 0;

  constructor(private readonly url: string) {
    this.client = new Client({ connectionString: url, types: pgTypeParsers, application_name: 'backy db-migrate', connectionTimeoutMillis: 15_000 } as never);
    this.client.on('error', () => undefined); // reported by the query that fails
  }

  private async q(sql: string, params: unknown[] = []): Promise<Row[]> {
    try {
      if (!this.connected) {
        await this.client.connect();
        this.connected = true;
      }
      return (await this.client.query(sql, params)).rows;
    } catch (e) {
      throw pgError(e, this.url);
    }
  }

  async *rows(table: string, order: string): AsyncIterable<Row[]> {
    if (!this.reading) {
      await this.q('BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY');
      this.reading = true;
    }
    const name = `backy_copy_${++this.cursorNo}`;
    await this.q(`DECLARE ${name} NO SCROLL CURSOR FOR SELECT * FROM ${table} ORDER BY ${order}`);
    for (;;) {
      const rows = await this.q(`FETCH ${PAGE} FROM ${name}`);
      if (!rows.length) break;
      yield rows;
    }
    await this.q(`CLOSE ${name}`);
  }

  async idHighWater(): Promise<Record<string, number>> {
    const out: Record<string, number> = {};
    for (const t of ID_TABLES) {
      const s = (await this.q(`SELECT last_value, is_called FROM ${t}_id_seq`))[0];
      const max = Number((await this.q(`SELECT COALESCE(MAX(id), 0) AS m FROM ${t}`))[0].m);
      out[t] = Math.max(max, s.is_called ? Number(s.last_value) : 0);
    }
    return out;
  }

  async contents(): Promise<string> {
    const counts: Record<string, number> = {};
    for (const { name } of COPIED_TABLES) {
      const where = name === 'settings' ? `WHERE key <> 'schema_version'` : '';
      counts[name] = Number((await this.q(`SELECT COUNT(*) AS n FROM ${name} ${where}`))[0].n);
    }
    return contentsOf(counts);
  }

  async begin(): Promise<void> {
    await this.q('BEGIN');
    // Nobody else may use the new database before the copy is complete.
    await this.q(`LOCK TABLE ${COPIED_TABLES.map((t) => t.name).join(', ')} IN EXCLUSIVE MODE`);
  }

  async insert(table: string, rows: Row[]): Promise<void> {
    if (!rows.length) return;
    const cols = Object.keys(rows[0]);
    // At most 65535 parameters per statement.
    const per = Math.max(1, Math.floor(30_000 / cols.length));
    for (let i = 0; i < rows.length; i += per) {
      const part = rows.slice(i, i + per);
      const params: unknown[] = [];
      const values = part.map((r) => `(${cols.map((c) => { params.push(r[c]); return `$${params.length}`; }).join(', ')})`);
      const conflict = table === 'settings' ? ' ON CONFLICT (key) DO UPDATE SET value = excluded.value' : '';
      await this.q(`INSERT INTO ${table} (${cols.join(', ')}) VALUES ${values.join(', ')}${conflict}`, params);
    }
  }

  async setIdHighWater(hw: Record<string, number>): Promise<void> {
    for (const t of ID_TABLES) {
      // setval(seq, n, true): the next id is n + 1; with nothing to continue after, the sequence starts at 1.
      await this.q(`SELECT setval('${t}_id_seq', GREATEST($1::bigint, (SELECT COALESCE(MAX(id), 0) FROM ${t}), 1), GREATEST($1::bigint, (SELECT COALESCE(MAX(id), 0) FROM ${t})) > 0)`, [hw[t] ?? 0]);
    }
  }

  async commit(): Promise<void> {
    await this.q('COMMIT');
  }

  async close(): Promise<void> {
    if (this.connected) await this.client.end().catch(() => undefined);
    this.connected = false;
  }
}

/** Row access to the database of an engine URL (its schema must exist). */
export function openTables(engine: string, mode: 'read' | 'write'): TableReader & TableWriter {
  const file = sqlitePath(engine);
  if (file) return new SqliteTables(file, mode === 'write');
  if (engine.startsWith('postgresql://')) return new PgTables(engine);
  throw new ConfigError('db-migrate: expected sqlite:////absolute/path or postgresql://user:password@host:port/db');
}
