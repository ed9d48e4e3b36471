import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { execFileSync, spawn, ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { Client } from 'pg';
import { freePort } from './net';

/**
 * A throwaway PostgreSQL 15 server for tests and benchmarks: `initdb` into a temporary directory owned by
 * the `postgres` user (the server refuses to run as root), listening on 127.0.0.1 on a free port with its
 * unix socket inside the directory. The superuser `postgres` connects without a password (trust, local
 * test use only); every other role must give its password (scram), so authentication failures can be tested.
 * Starting takes a couple of seconds: share one server per test file.
 */
export const PG_BIN = process.env.BACKY_PG_BIN ?? '/usr/lib/postgresql/15/bin';

export interface TestPostgres {
  port: number;
  pid: number;
  dir: string;
  /** postgresql://postgres@127.0.0.1:PORT/DB */
  url(db?: string): string;
  /** Creates a fresh database and returns its URL. */
  createDatabase(name?: string): Promise<string>;
  /** Runs SQL as the superuser (on `db`, default postgres) and returns the rows. */
  query<T = Record<string, unknown>>(sql: string, params?: unknown[], db?: string): Promise<T[]>;
  /** Kills every backend connected to `db` (pg_terminate_backend): what a lost connection looks like. */
  terminateConnections(db: string): Promise<number>;
  /** Fast shutdown, waits for the postmaster to exit, removes the directory. Safe to call twice. */
  stop(): Promise<void>;
}


/** uid/gid to run the server as: the `postgres` user when we are root, ourselves otherwise. */
function serverUser(): { uid: number; gid: number } | undefined {
  if (process.getuid?.() !== 0) return undefined;
  const uid = Number(execFileSync('id', ['-u', 'postgres'], { encoding: 'utf8' }).trim());
  const gid = Number(execFileSync('id', ['-g', 'postgres'], { encoding: 'utf8' }).trim());
  return { uid, gid };
}

export async function startPostgres(opts: { fsync?: boolean } = {}): Promise<TestPostgres> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'backy-pg-'));
  const data = path.join(dir, 'data');
  const user = serverUser();
  let child: ChildProcess | undefined;
  let stopped = false;
  const removeDir = () => fs.rmSync(dir, { recursive: true, force: true });
  try {
    if (user) fs.chownSync(dir, user.uid, user.gid);
    fs.chmodSync(dir, 0o700);
    execFileSync(path.join(PG_BIN, 'initdb'), ['-D', data, '-U', 'postgres', '-A', 'trust', '-E', 'UTF8', '--locale=C', '--no-sync'], {
      ...user, cwd: dir, stdio: ['ignore', 'ignore', 'pipe'], env: { ...process.env, HOME: dir },
    });
    fs.writeFileSync(path.join(data, 'pg_hba.conf'), [
      'local all postgres trust',
      'host all postgres 127.0.0.1/32 trust',
      'local all all scram-sha-256',
      'host all all 127.0.0.1/32 scram-sha-256',
      '',
    ].join('\n'));
    const port = await freePort();
    const args = ['-D', data, '-k', dir, '-h', '127.0.0.1', '-p', String(port), '-c', 'max_connections=200',
      '-c', 'logging_collector=off', '-c', 'log_min_messages=fatal', '-c', `fsync=${opts.fsync ? 'on' : 'off'}`,
      '-c', `synchronous_commit=${opts.fsync ? 'on' : 'off'}`, '-c', `full_page_writes=${opts.fsync ? 'on' : 'off'}`];
    child = spawn(path.join(PG_BIN, 'postgres'), args, { ...user, cwd: dir, stdio: ['ignore', 'ignore', 'pipe'], env: { ...process.env, HOME: dir } });
    let stderr = '';
    child.stderr!.on('data', (d) => { stderr = (stderr + d).slice(-4000); });
    const exited = new Promise<void>((resolve) => child!.once('exit', () => resolve()));
    const pid = child.pid!;

    const url = (db = 'postgres') => `postgresql://postgres@127.0.0.1:${port}/${db}`;
    const query = async <T>(sql: string, params: unknown[] = [], db = 'postgres'): Promise<T[]> => {
      const c = new Client({ connectionString: url(db) });
      c.on('error', () => undefined);
      await c.connect();
      try {
        return (await c.query(sql, params)).rows as T[];
      } finally {
        await c.end().catch(() => undefined);
      }
    };

    // Ready when a connection succeeds (initdb and startup together take a second or two).
    const deadline = Date.now() + 30_000;
    for (;;) {
      if (child.exitCode !== null) throw new Error(`postgres exited at startup: ${stderr.trim().split('\n').slice(-3).join(' | ')}`);
      try {
        await query('SELECT 1');
        break;
      } catch (e) {
        if (Date.now() > deadline) throw new Error(`postgres did not accept connections within 30 s: ${(e as Error).message}`);
        await new Promise((r) => setTimeout(r, 100));
      }
    }

    const server: TestPostgres = {
      port, pid, dir, url, query,
      async createDatabase(name = `t_${randomBytes(6).toString('hex')}`) {
        await query(`CREATE DATABASE ${name}`);
        return url(name);
      },
      async terminateConnections(db) {
        const rows = await query<{ n: number }>(`SELECT count(pg_terminate_backend(pid))::int AS n FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()`, [db]);
        return rows[0].n;
      },
      async stop() {
        if (stopped) return;
        stopped = true;
        if (child!.exitCode === null && child!.signalCode === null) {
          process.kill(pid, 'SIGINT'); // fast shutdown: disconnects clients, no waiting for them
          const timer = setTimeout(() => { try { process.kill(pid, 'SIGKILL'); } catch { /* gone */ } }, 15_000);
          await exited;
          clearTimeout(timer);
        }
        removeDir();
      },
    };
    return server;
  } catch (e) {
    if (child?.pid && child.exitCode === null) {
      try { process.kill(child.pid, 'SIGKILL'); } catch { /* gone */ }
      await new Promise((r) => child!.once('exit', r));
    }
    removeDir();
    throw e;
  }
}
