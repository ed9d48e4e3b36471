import { Client, ClientConfig } from 'pg';
import { DatabaseError } from '../util/errors';
import type { LockInfo } from './types';

type Row = Record<string, unknown>;

/** Two-key advisory lock (its own key space, apart from the one-key locks below) serializing lock changes. */
const LOCK_MUTEX: [number, number] = [0x6261636b, 2];

// The advisory lock key of a lock name is hashtextextended(name, 0): a 64-bit hash, so distinct names
// practically never collide.

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
    return (await this.tryLocks([{ name, info, conflicts }]))[0];
  }

  /**
   * tryLock for each request, all in one mutex transaction and a few statements for all of them (a removal of
   * a hundred versions takes two hundred locks). Each request is decided as tryLock alone would decide it.
   */
  async tryLocks(requests: { name: string; info: LockInfo; conflicts?: string[] }[]): Promise<(LockInfo | undefined)[]> {
    if (!requests.length) return [];
    if (new Set(requests.map((r) => r.name)).size !== requests.length) {
      // The same name twice: each in turn, as separate calls would.
      const out: (LockInfo | undefined)[] = [];
      for (const r of requests) out.push((await this.tryLocks([r]))[0]);
      return out;
    }
    const acquired = new Set<string>();
    try {
      return await this.inMutex(async (c) => {
        // The advisory locks of the names not held yet, all at once.
        const fresh = requests.filter((r) => !this.held.has(r.name));
        const free = new Map<string, boolean>();
        if (fresh.length) {
          for (const r of (await c.query(`SELECT n, pg_try_advisory_lock(hashtextextended(n, 0)) AS ok FROM unnest($1::text[]) AS n`,
            [fresh.map((r) => r.name)])).rows) free.set(r.n as string, !!r.ok);
        }
        for (const r of fresh) {
          if (!free.get(r.name)) continue;
          this.held.set(r.name, r.info.session);
          acquired.add(r.name);
        }
        // The rows of every name and of every conflict (exact, or a prefix ending in '*'), per request. A
        // holder is alive while some other connection holds its advisory lock (rows of names we hold
        // ourselves are ours or stale).
        const k: number[] = [];
        const pattern: string[] = [];
        const prefix: boolean[] = [];
        requests.forEach((r, i) => {
          for (const p of [r.name, ...(r.conflicts ?? [])]) {
            const isPrefix = p !== r.name && p.endsWith('*');
            k.push(i);
            pattern.push(isPrefix ? p.slice(0, -1) : p);
            prefix.push(isPrefix);
          }
        });
        // The advisory locks of other connections are read once (pg_locks copies the server's whole lock
        // table each time it is read, and this connection may hold hundreds).
        const rows = (await c.query(`
          WITH others AS MATERIALIZED (
            SELECT p.classid::bigint AS hi, p.objid::bigint AS lo FROM pg_locks p
            WHERE p.locktype = 'advisory' AND p.granted AND p.objsubid = 1 AND p.pid <> pg_backend_pid()
              AND p.database = (SELECT oid FROM pg_database WHERE datname = current_database()))
          SELECT c.k, l.*, EXISTS (
            SELECT 1 FROM others o
            WHERE o.hi = ((hashtextextended(l.name, 0) >> 32) & 4294967295) AND o.lo = (hashtextextended(l.name, 0) & 4294967295)
          ) AS alive
          FROM unnest($1::int[], $2::text[], $3::bool[]) AS c(k, p, prefix)
          JOIN locks l ON CASE WHEN c.prefix THEN starts_with(l.name, c.p) ELSE l.name = c.p END
          ORDER BY c.k, l.since`, [k, pattern, prefix])).rows as Row[];
        const rowsOf = requests.map((): Row[] => []);
        for (const r of rows) rowsOf[Number(r.k)].push(r);

        const out: (LockInfo | undefined)[] = [];
        const stale = new Map<string, string>();
        const release: string[] = [];
        const taken: { name: string; info: LockInfo }[] = [];
        const decide = (r: { name: string; info: LockInfo }, i: number): LockInfo | undefined => {
          if (free.get(r.name) === false) {
            // A live connection holds it. Its row says who, unless it is this very process through another
            // store (same session: reentrant, as on SQLite).
            const own = rowsOf[i].find((x) => x.name === r.name);
            if (!own) return { session: '', host: 'another host', pid: 0, pidStart: '', what: 'another backy process' };
            if (own.session !== r.info.session) return holderOf(own);
          }
          for (const x of rowsOf[i]) {
            if (x.session === r.info.session) continue;
            if (x.alive) {
              if (acquired.delete(r.name)) {
                release.push(r.name);
                this.held.delete(r.name);
              }
              return holderOf(x);
            }
            stale.set(`${x.name}\n${x.session}`, x.name as string); // its holder is gone
          }
          taken.push(r);
          return undefined;
        };
        requests.forEach((r, i) => out.push(decide(r, i)));
        if (stale.size) {
          const gone = [...stale.keys()].map((key) => key.split('\n'));
          await c.query(`DELETE FROM locks l USING unnest($1::text[], $2::text[]) AS s(name, session) WHERE l.name = s.name AND l.session = s.session`,
            [gone.map((g) => g[0]), gone.map((g) => g[1])]);
        }
        if (release.length) await c.query(`SELECT pg_advisory_unlock(hashtextextended(n, 0)) FROM unnest($1::text[]) AS n`, [release]);
        if (taken.length) {
          await c.query(`INSERT INTO locks (name, session, host, pid, pid_start, what, since)
            SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::int[], $5::text[], $6::text[]), (SELECT $7::bigint) AS t
            ON CONFLICT (name) DO UPDATE SET session = excluded.session, host = excluded.host, pid = excluded.pid,
            pid_start = excluded.pid_start, what = excluded.what, since = excluded.since`,
          [taken.map((t) => t.name), taken.map((t) => t.info.session), taken.map((t) => t.info.host), taken.map((t) => t.info.pid),
            taken.map((t) => t.info.pidStart), taken.map((t) => t.info.what), Date.now()]);
        }
        return out;
      });
    } catch (e) {
      // The rows rolled back; the advisory locks taken on the way are session-level and must go too.
      if (!this.lost && this.client && acquired.size) {
        await this.client.query(`SELECT pg_advisory_unlock(hashtextextended(n, 0)) FROM unnest($1::text[]) AS n`, [[...acquired]]).catch(() => undefined);
        for (const name of acquired) this.held.delete(name);
      }
      throw e;
    }
  }

  async unlock(name: string, session: string): Promise<void> {
    await this.unlockAll([name], session);
  }

  /** unlock of several names of one session in one mutex transaction. */
  async unlockAll(names: string[], session: string): Promise<void> {
    // A broken lock connection already released everything; nothing is left to do (and no second error).
    if (this.lost || !names.length) return;
    await this.inMutex(async (c) => {
      await c.query(`DELETE FROM locks WHERE name = ANY($1::text[]) AND session = $2`, [names, session]);
      const ours = names.filter((name) => this.held.has(name));
      if (ours.length) await c.query(`SELECT pg_advisory_unlock(hashtextextended(n, 0)) FROM unnest($1::text[]) AS n`, [ours]);
      for (const name of ours) this.held.delete(name);
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
