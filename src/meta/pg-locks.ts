import { Client, ClientConfig } from 'pg';
import { DatabaseError } from '../util/errors';
import type { LockInfo } from './types';

type Row = Record<string, unknown>;

/** Two-key advisory lock (its own key space, apart from the one-key locks below) serializing lock changes. */
const LOCK_MUTEX: [number, number] = [0x6261636b, 2];

/** The advisory lock key of a lock name: a 64-bit hash, so distinct names practically never collide. */
const KEY = `hashtextextended($1::text, 0)`;

function holderOf(r: Row): LockInfo {
  return { session: r.session as string, host: r.host as string, pid: Number(r.pid), pidStart: r.pid_start as string, what: r.what as string };
}

/**
 * Locks across hosts. A lock is a session-level advisory lock held on one dedicated connection, kept open for
 * the lock's lifetime, plus a row in `locks` saying who holds it (for the "locked by" message). When the
 * process dies, on whatever host, its connection closes and the server drops its advisory locks: a row whose
 * advisory lock nobody holds is stale. Taking and releasing run under one transaction-level advisory mutex,
 * so a check of conflicting holders and the insert of the new row happen atomically with respect to every
 * other process, just as SQLite's IMMEDIATE transaction does on one host.
 */
export class PgLocks {
  private client: Client | undefined;
  private connecting: Promise<Client> | undefined;
  /** Names whose advisory lock our connection holds, with the session that took them. */
  private held = new Map<string, string>();
  /** Set when the lock connection broke while holding locks: they are gone, this process must stop writing. */
  lost: Error | undefined;

  constructor(private readonly config: ClientConfig, private readonly fail: (e: unknown) => Error) {}

  private conn(): Promise<Client> {
    if (this.lost) return Promise.reject(this.lostError());
    if (this.client) return Promise.resolve(this.client);
    this.connecting ??= (async () => {
      const c = new Client(this.config);
      c.on('error', (e) => this.broken(c, e));
      c.on('end', () => this.broken(c, new Error('Connection terminated')));
      try {
        await c.connect();
      } catch (e) {
        this.connecting = undefined;
        throw this.fail(e);
      }
      this.client = c;
      return c;
    })();
    return this.connecting;
  }

  private broken(c: Client, e: Error): void {
    if (this.client !== c) return; // a connection that never opened, or an older one
    if (this.held.size) this.lost ??= e;
    this.client = undefined;
    this.connecting = undefined;
    this.held.clear();
  }

  lostError(): DatabaseError {
    const e = this.fail(this.lost);
    return new DatabaseError(`${e.message}; the locks of this command were released with it`);
  }

  private async inMutex<T>(fn: (c: Client) => Promise<T>): Promise<T> {
    const c = await this.conn();
    try {
      await c.query('BEGIN');
      await c.query('SELECT pg_advisory_xact_lock($1, $2)', LOCK_MUTEX);
      const out = await fn(c);
      await c.query('COMMIT');
      return out;
    } catch (e) {
      await c.query('ROLLBACK').catch(() => undefined);
      throw this.lost ? this.lostError() : this.fail(e);
    }
  }

  async tryLock(name: string, info: LockInfo, conflicts: string[]): Promise<LockInfo | undefined> {
    return this.inMutex(async (c) => {
      let acquired = false;
      if (!this.held.has(name)) {
        acquired = !!(await c.query(`SELECT pg_try_advisory_lock(${KEY}) AS ok`, [name])).rows[0].ok;
        if (!acquired) {
          // A live connection holds it. Its row says who, unless it is this very process through another
          // store (same session: reentrant, as on SQLite).
          const r = (await c.query(`SELECT * FROM locks WHERE name = $1`, [name])).rows[0] as Row | undefined;
          if (!r) return { session: '', host: 'another host', pid: 0, pidStart: '', what: 'another backy process' };
          if (r.session !== info.session) return holderOf(r);
        } else {
          this.held.set(name, info.session);
        }
      }
      const exact = conflicts.filter((p) => !p.endsWith('*'));
      const prefixes = conflicts.filter((p) => p.endsWith('*')).map((p) => p.slice(0, -1));
      // A holder is alive while some other connection holds its advisory lock (rows of names we hold
      // ourselves are ours or stale).
      const rows = (await c.query(`
        SELECT l.*, EXISTS (
          SELECT 1 FROM pg_locks p
          WHERE p.locktype = 'advisory' AND p.granted AND p.objsubid = 1 AND p.pid <> pg_backend_pid()
            AND p.database = (SELECT oid FROM pg_database WHERE datname = current_database())
            AND p.classid::bigint = ((hashtextextended(l.name, 0) >> 32) & 4294967295)
            AND p.objid::bigint = (hashtextextended(l.name, 0) & 4294967295)
        ) AS alive
        FROM locks l
        WHERE l.name = $1 OR l.name = ANY($2::text[]) OR EXISTS (SELECT 1 FROM unnest($3::text[]) AS x(p) WHERE starts_with(l.name, x.p))
        ORDER BY l.since`, [name, exact, prefixes])).rows as Row[];
      for (const r of rows) {
        if (r.session === info.session) continue;
        if (r.alive) {
          if (acquired) {
            await c.query(`SELECT pg_advisory_unlock(${KEY})`, [name]);
            this.held.delete(name);
          }
          return holderOf(r);
        }
        await c.query(`DELETE FROM locks WHERE name = $1 AND session = $2`, [r.name, r.session]); // its holder is gone
      }
      await c.query(`INSERT INTO locks (name, session, host, pid, pid_start, what, since) VALUES ($1, $2, $3, $4, $5, $6, $7)
        ON CONFLICT (name) DO UPDATE SET session = excluded.session, host = excluded.host, pid = excluded.pid,
        pid_start = excluded.pid_start, what = excluded.what, since = excluded.since`,
      [name, info.session, info.host, info.pid, info.pidStart, info.what, Date.now()]);
      return undefined;
    });
  }

  async unlock(name: string, session: string): Promise<void> {
    // A broken lock connection already released everything; nothing is left to do (and no second error).
    if (this.lost) return;
    await this.inMutex(async (c) => {
      await c.query(`DELETE FROM locks WHERE name = $1 AND session = $2`, [name, session]);
      if (this.held.has(name)) {
        await c.query(`SELECT pg_advisory_unlock(${KEY})`, [name]);
        this.held.delete(name);
      }
    });
  }

  /** Drops our rows and closes the connection (which releases every advisory lock it held). */
  async close(): Promise<void> {
    const c = this.client;
    this.client = undefined;
    this.connecting = undefined;
    if (!c) return;
    const held = [...this.held];
    this.held.clear();
    c.removeAllListeners('end');
    if (held.length && !this.lost) {
      await c.query(`DELETE FROM locks l USING unnest($1::text[], $2::text[]) AS h(name, session) WHERE l.name = h.name AND l.session = h.session`,
        [held.map((h) => h[0]), held.map((h) => h[1])]).catch(() => undefined);
    }
    await c.end().catch(() => undefined);
  }
}
