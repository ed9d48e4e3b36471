import * as os from 'node:os';
import * as path from 'node:path';
import { Worker } from 'node:worker_threads';
import { DatabaseError } from '../util/errors';
import type { BlockColumn, Backy2Version } from './database';

/**
 * A version's block rows put together by the database in one scan (backy2 keeps one row per block per
 * version: 25.6 million rows for a thousand 100 GiB versions). Each row becomes COLUMN_STRIDE characters:
 * its blob uid (32, or '-' * 32 for a sparse block) and the second it was written. What the scan also
 * counts says whether the version is regular enough to be read this way.
 */
export const COLUMN_STRIDE = 51;
const HOLE = `'${'-'.repeat(32)}'`;

export const COLUMN_SQL = {
  // As a blob: better-sqlite3 copies it into a Buffer once, where text (1.3 MB a version) would be decoded as
  // UTF-8 into a V8 string and then encoded again (a third of the scan's CPU time in the benchmark).
  sqlite: `SELECT CAST(group_concat(r, '') AS BLOB) AS rows, count(*) AS n, min(id) AS lo, max(id) AS hi, sum(valid) AS ok, sum(size) AS bytes
    FROM (SELECT COALESCE(uid, ${HOLE}) || substr(date, 1, 19) AS r, id, valid, size FROM blocks WHERE version_uid = ? ORDER BY id)`,
  pg: `SELECT string_agg(COALESCE(uid, ${HOLE}) || to_char(date, 'YYYY-MM-DD HH24:MI:SS'), '' ORDER BY id) AS rows, count(*) AS n,
    min(id) AS lo, max(id) AS hi, sum(valid) AS ok, sum(size) AS bytes FROM blocks WHERE version_uid = $1`,
};

export interface ColumnScan {
  rows: string | Buffer | null;
  n: unknown;
  lo: unknown;
  hi: unknown;
  ok: unknown;
  bytes: unknown;
}

/**
 * The column, when the version is regular: a row for every block (ids 0 to size-1), none found bad (valid
 * adds up to the count), sizes adding up to the version's bytes, and rows of the expected length.
 */
export function regularColumn(r: ColumnScan | Record<string, unknown> | undefined, v: Backy2Version): BlockColumn | undefined {
  if (!r || v.size === 0) return undefined;
  const n = Number(r.n);
  if (n !== v.size || Number(r.lo) !== 0 || Number(r.hi) !== v.size - 1 || Number(r.ok) !== n || Number(r.bytes) !== v.sizeBytes) return undefined;
  const rows = Buffer.isBuffer(r.rows) ? r.rows : Buffer.from(String(r.rows ?? ''), 'latin1');
  return rows.length === n * COLUMN_STRIDE ? { rows } : undefined;
}

/**
 * Scans of a SQLite backy2 database in worker threads (one per core, at most two), so the database's work on
 * the next versions goes on while this thread adds the current one. Answers are matched to requests by id.
 */
export class ColumnReader {
  private readonly workers: Worker[] = [];
  private readonly waiting = new Map<number, { v: Backy2Version; resolve: (c: BlockColumn | undefined) => void; reject: (e: Error) => void }>();
  private nextId = 1;
  private failure: Error | undefined;

  constructor(file: string, threads = Math.max(1, Math.min(2, os.availableParallelism()))) {
    const fail = (e: Error) => {
      this.failure ??= new DatabaseError(`the backy2 database reader failed: ${e.message}`);
      for (const w of this.waiting.values()) w.reject(this.failure);
      this.waiting.clear();
    };
    for (let t = 0; t < threads; t++) {
      const worker = new Worker(path.join(__dirname, 'column-worker.js'), { workerData: { file, sql: COLUMN_SQL.sqlite } });
      worker.on('message', (m: { id: number; error?: string; scan?: ColumnScan }) => {
        const w = this.waiting.get(m.id);
        if (!w) return;
        this.waiting.delete(m.id);
        if (m.error !== undefined) w.reject(new DatabaseError(`cannot read the backy2 database: ${m.error}`));
        else w.resolve(regularColumn({ ...m.scan!, rows: m.scan!.rows ? Buffer.from(m.scan!.rows as unknown as ArrayBuffer) : null }, w.v));
      });
      worker.on('error', fail);
      worker.on('exit', (code) => { if (this.waiting.size) fail(new Error(`exited with code ${code}`)); });
      this.workers.push(worker);
    }
  }

  read(v: Backy2Version): Promise<BlockColumn | undefined> {
    if (this.failure) return Promise.reject(this.failure);
    return new Promise((resolve, reject) => {
      const id = this.nextId++;
      this.waiting.set(id, { v, resolve, reject });
      this.workers[id % this.workers.length].postMessage({ id, uid: v.uid });
    });
  }

  async close(): Promise<void> {
    await Promise.all(this.workers.map((w) => w.terminate()));
  }
}
