/**
 * End-to-end tests of the PostgreSQL metadata backend with the real CLI in child processes, against a real
 * PostgreSQL 15 (one throwaway server for the file, one database per test).
 */
import { after, before, test } from 'node:test';
import * as assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { spawn } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { BACKY, makeTestRepo, RunResult, runBacky, TestRepo, writeImage } from './helpers/cli';
import { sha256File } from './helpers/images';
import { startPostgres, TestPostgres } from './helpers/postgres';

const BS = 64 * 1024;
let pg: TestPostgres;
const repos: TestRepo[] = [];

before(async () => {
  pg = await startPostgres();
});
after(async () => {
  for (const r of repos) r.cleanup();
  await pg?.stop();
});

interface PgRepo {
  repo: TestRepo;
  url: string;
  db: string;
  /** SQL on the repository's database */
  sql<T = Record<string, unknown>>(q: string, params?: unknown[]): Promise<T[]>;
}

async function pgRepo(extra = ''): Promise<PgRepo> {
  const url = await pg.createDatabase();
  const db = url.split('/').pop()!;
  const repo = makeTestRepo(`[MetaBackend]\nengine = ${url}\n[DataBackend]\nfsync = false\n${extra}`, { blockSize: BS });
  repos.push(repo);
  await repo.ok(['initdb']);
  return { repo, url, db, sql: (q, params) => pg.query(q, params, db) };
}

/** An image of `blocks` blocks; `content(i)` names block i's content (equal names, equal bytes; null: zeroes). */
function blockImage(file: string, blocks: number, content: (i: number) => string | null): void {
  const fd = fs.openSync(file, 'w');
  try {
    for (let i = 0; i < blocks; i++) {
      const name = content(i);
      let buf: Buffer;
      if (name === null) buf = Buffer.alloc(BS);
      else {
        buf = Buffer.alloc(BS);
        // Deterministic per name, incompressible enough to be stored as written.
        let seed = Buffer.from(name);
        for (let off = 0; off < BS; off += 64) {
          seed = createHash('sha512').update(seed).digest();
          seed.copy(buf, off);
        }
      }
      fs.writeSync(fd, buf, 0, BS, i * BS);
    }
  } finally {
    fs.closeSync(fd);
  }
}

/** Stored objects under the data directory (temporary files and the repository marker excluded). */
function storedObjects(repo: TestRepo): number {
  let n = 0;
  const walk = (d: string) => {
    for (const e of fs.readdirSync(d, { withFileTypes: true })) {
      if (e.isDirectory()) walk(path.join(d, e.name));
      else if (!e.name.startsWith('.tmp.') && e.name !== 'backy-repository.json') n++;
    }
  };
  walk(path.join(repo.dir, 'data'));
  return n;
}

async function backup(repo: TestRepo, image: string, name: string, more: string[] = []): Promise<string> {
  const r = await repo.ok(['backup', ...more, `file://${image}`, name]);
  return r.stdout.trim();
}

async function restoresIdentical(repo: TestRepo, uid: string, image: string): Promise<void> {
  const out = path.join(repo.dir, `restore-${randomBytes(4).toString('hex')}.img`);
  await repo.ok(['restore', uid, `file://${out}`]);
  assert.equal(sha256File(out), sha256File(image), `version ${uid} restores ${image} byte for byte`);
  fs.rmSync(out);
}

async function versions(repo: TestRepo): Promise<{ uid: string; valid: boolean; name: string }[]> {
  return JSON.parse((await repo.ok(['--json', 'ls'])).stdout);
}

/** Starts backy in a child process we can kill; `done` resolves when it exits. */
function startBacky(repo: TestRepo, args: string[]): { pid: number; kill: (s: NodeJS.Signals) => void; stderr: () => string; done: Promise<RunResult> } {
  const child = spawn(process.execPath, [BACKY, '-c', repo.cfg, ...args], { cwd: repo.dir, stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (d) => (stdout += d));
  child.stderr.on('data', (d) => (stderr += d));
  const done = new Promise<RunResult>((resolve) => child.on('close', (code, signal) => resolve({ code: code ?? (signal ? 128 : -1), stdout, stderr })));
  return { pid: child.pid!, kill: (s) => child.kill(s), stderr: () => stderr, done };
}

async function waitFor(what: string, cond: () => boolean | Promise<boolean>, ms = 30_000): Promise<void> {
  const end = Date.now() + ms;
  while (!(await cond())) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

test('full cycle on PostgreSQL: backup, ls, restore, scrub, rm, cleanup', async () => {
  const { repo, sql } = await pgRepo();
  const img = path.join(repo.dir, 'a.img');
  writeImage(img, 6 * 1024 * 1024 + 12345, 'mixed');
  const r = await repo.run(['initdb']);
  assert.equal(r.code, 100);
  assert.match(r.stderr, /already initialized/);
  const uid = await backup(repo, img, 'vm1', ['-t', 'daily']);
  const list = await versions(repo);
  assert.deepEqual(list.map((v) => [v.uid, v.name, v.valid]), [[uid, 'vm1', true]]);
  await restoresIdentical(repo, uid, img);
  // A differential backup from it, with a changed block.
  const fd = fs.openSync(img, 'r+');
  fs.writeSync(fd, randomBytes(BS), 0, BS, 3 * BS);
  fs.closeSync(fd);
  const hints = path.join(repo.dir, 'hints.json');
  fs.writeFileSync(hints, JSON.stringify([{ offset: 3 * BS, length: BS, exists: 'true' }]));
  const uid2 = await backup(repo, img, 'vm1', ['-f', uid, '-r', hints]);
  await restoresIdentical(repo, uid2, img);
  await repo.ok(['scrub', uid]);
  await repo.ok(['scrub', uid2]);
  await repo.ok(['rm', '-f', uid]);
  await repo.ok(['cleanup', '--dangerous-force']);
  const [{ n }] = await sql<{ n: number }>(`SELECT count(*)::int AS n FROM blobs`);
  assert.equal(storedObjects(repo), n, 'storage holds exactly the blobs the database knows');
  await restoresIdentical(repo, uid2, img);
  await repo.ok(['rm', '-f', uid2]);
  await repo.ok(['cleanup', '--dangerous-force']);
  assert.equal(storedObjects(repo), 0);
  assert.deepEqual(await sql(`SELECT * FROM blobs`), []);
  assert.deepEqual(await versions(repo), []);
});

test('two backups started together share their new blocks: stored once, both restore', async () => {
  const { repo, sql } = await pgRepo('bandwidth_write = 4M\n');
  const a = path.join(repo.dir, 'a.img');
  const b = path.join(repo.dir, 'b.img');
  // 96 shared blocks at the same places, 32 of each image's own, some zero blocks.
  const blocks = 160;
  const shared = (i: number) => (i % 5 === 4 ? null : i % 5 === 3 ? 'own' : `shared-${i}`);
  blockImage(a, blocks, (i) => (shared(i) === 'own' ? `a-${i}` : shared(i)));
  blockImage(b, blocks, (i) => (shared(i) === 'own' ? `b-${i}` : shared(i)));
  const [ra, rb] = await Promise.all([
    repo.run(['backup', `file://${a}`, 'vm-a']),
    repo.run(['backup', `file://${b}`, 'vm-b']),
  ]);
  assert.equal(ra.code, 0, ra.stderr);
  assert.equal(rb.code, 0, rb.stderr);
  const list = await versions(repo);
  assert.equal(list.length, 2);
  assert.ok(list.every((v) => v.valid));
  const sharedCount = Array.from({ length: blocks }, (_, i) => shared(i)).filter((s) => s !== null && s !== 'own').length;
  const own = Array.from({ length: blocks }, (_, i) => shared(i)).filter((s) => s === 'own').length;
  const [{ n }] = await sql<{ n: number }>(`SELECT count(*)::int AS n FROM blobs`);
  assert.equal(n, sharedCount + 2 * own, 'one blob per distinct block');
  assert.equal(storedObjects(repo), n, 'one object per blob');
  await restoresIdentical(repo, ra.stdout.trim(), a);
  await restoresIdentical(repo, rb.stdout.trim(), b);
});

test('cleanup without grace in a loop while backups run: every version restores and scrubs clean', async () => {
  const { repo } = await pgRepo();
  const blocks = 48;
  const images: string[] = [];
  const img = (k: number, content: (i: number) => string | null) => {
    const f = path.join(repo.dir, `img${k}.img`);
    blockImage(f, blocks, content);
    images.push(f);
    return f;
  };
  // Every image shares half its blocks with a pool of blocks that removed versions keep leaving behind.
  const common = (i: number) => `common-${i}`;
  const first = img(0, common);
  await repo.ok(['rm', '-f', await backup(repo, first, 'seed')]); // its blobs are now garbage, racing every later backup

  let stop = false;
  let cleanups = 0;
  let failed: RunResult | undefined;
  const loop = (async () => {
    while (!stop && !failed) {
      const r = await repo.run(['cleanup', '--dangerous-force']);
      if (r.code !== 0) failed = r;
      cleanups++;
    }
  })();
  const kept = new Map<string, string>();
  try {
    for (let round = 1; round <= 4; round++) {
      const x = img(round * 2, (i) => (i % 2 ? common(i) : `x${round}-${i}`));
      const y = img(round * 2 + 1, (i) => (i % 3 ? common(i) : `y${round}-${i}`));
      const [ux, uy] = await Promise.all([backup(repo, x, 'x'), backup(repo, y, 'y')]);
      kept.set(ux, x);
      if (round % 2) await repo.ok(['rm', '-f', uy]); // more garbage sharing blocks with what still runs
      else kept.set(uy, y);
    }
  } finally {
    stop = true;
    await loop;
  }
  assert.equal(failed, undefined, `cleanup failed: ${failed?.stderr}`);
  assert.ok(cleanups >= 3, `cleanup ran ${cleanups} times`);
  await repo.ok(['cleanup', '--dangerous-force']);
  for (const [uid, file] of kept) {
    await repo.ok(['scrub', uid]);
    await restoresIdentical(repo, uid, file);
  }
  assert.equal((await versions(repo)).length, kept.size);
});

test('a backup killed with SIGKILL: locks released, version invalid, continued with -c', async () => {
  const { repo, sql } = await pgRepo('bandwidth_write = 2M\n');
  const img = path.join(repo.dir, 'k.img');
  writeImage(img, 12 * 1024 * 1024, 'random');
  const b = startBacky(repo, ['backup', `file://${img}`, 'vm-k']);
  let uid = '';
  try {
    await waitFor('the backup to start', () => {
      const m = /into version ([0-9a-f-]{36})/.exec(b.stderr());
      if (m) uid = m[1];
      return !!m;
    });
    await waitFor('some blobs', async () => (await sql<{ n: number }>(`SELECT count(*)::int AS n FROM blobs WHERE state = 1`))[0].n >= 5);
    const locks = await sql<{ name: string }>(`SELECT name FROM locks ORDER BY name`);
    assert.ok(locks.some((l) => l.name === `version:${uid}`), 'the backup holds its version lock');
    // While it runs, its version is locked.
    const refused = await repo.run(['scrub', uid]);
    assert.equal(refused.code, 100);
    assert.match(refused.stderr, /cannot scrub of .*: backup of .* is running \(pid \d+ on /);
  } finally {
    b.kill('SIGKILL');
  }
  const killed = await b.done;
  assert.notEqual(killed.code, 0);
  // The dead holder's locks are gone with its connection: a scrub is not refused as locked (it reports the
  // unfinished blocks instead).
  const scrub = await repo.run(['scrub', uid]);
  assert.equal(scrub.code, 20, scrub.stderr);
  assert.doesNotMatch(scrub.stderr, /is running/);
  assert.match(scrub.stderr, /never backed up/);
  const v = (await versions(repo)).find((x) => x.uid === uid)!;
  assert.equal(v.valid, false);
  const cont = await repo.ok(['backup', '-c', uid, `file://${img}`, 'vm-k']);
  assert.equal(cont.stdout.trim(), uid);
  assert.equal((await versions(repo)).find((x) => x.uid === uid)!.valid, true);
  await restoresIdentical(repo, uid, img);
  await repo.ok(['scrub', uid]);
});

test('db-migrate SQLite -> PostgreSQL -> SQLite: every version restores byte-identical', async () => {
  const repo = makeTestRepo('[DataBackend]\nfsync = false\n', { blockSize: BS });
  repos.push(repo);
  await repo.ok(['initdb']);
  const imgs = ['m1', 'm2', 'm3'].map((n, k) => {
    const f = path.join(repo.dir, `${n}.img`);
    writeImage(f, (3 + k) * 1024 * 1024 + 777 * k, 'mixed', k + 1);
    return f;
  });
  const u1 = await backup(repo, imgs[0], 'vm1', ['-t', 'a,b']);
  const u2 = await backup(repo, imgs[1], 'vm2');
  const gone = await backup(repo, imgs[2], 'vm3');
  await repo.ok(['rm', '-f', gone]);
  await repo.ok(['cleanup', '--dangerous-force']); // leaves a gap at the top of the blob ids
  await repo.ok(['protect', u2]);
  const before = await versions(repo);

  const url = await pg.createDatabase();
  const db = url.split('/').pop()!;
  const bad = await repo.run(['db-migrate', '--to', 'mysql://x']);
  assert.equal(bad.code, 2);
  await repo.ok(['db-migrate', '--to', url]);
  const again = await repo.run(['db-migrate', '--to', url]);
  assert.equal(again.code, 100);
  assert.match(again.stderr, /is not empty/);

  const pgCfg = path.join(repo.dir, 'pg.cfg');
  fs.writeFileSync(pgCfg, `${fs.readFileSync(repo.cfg, 'utf8')}\n[MetaBackend]\nengine = ${url}\n`);
  const onPg = (args: string[]) => runBacky(['-c', pgCfg, ...args], { cwd: repo.dir });
  assert.deepEqual(JSON.parse((await onPg(['--json', 'ls'])).stdout), before);
  for (const [uid, img] of [[u1, imgs[0]], [u2, imgs[1]]]) {
    const out = path.join(repo.dir, `pg-${uid}.img`);
    assert.equal((await onPg(['restore', uid, `file://${out}`])).code, 0);
    assert.equal(sha256File(out), sha256File(img));
  }
  // New ids continue after the highest the source ever handed out.
  const [{ maxsrc }] = await pg.query<{ maxsrc: number }>(`SELECT last_value::int AS maxsrc FROM blobs_id_seq`, [], db);
  const u4 = (await onPg(['backup', `file://${imgs[2]}`, 'vm4'])).stdout.trim();
  const [{ minnew }] = await pg.query<{ minnew: number }>(`SELECT min(id)::int AS minnew FROM blobs WHERE id > $1`, [maxsrc], db);
  assert.ok(minnew > maxsrc);
  const [{ n: pgBlobs }] = await pg.query<{ n: number }>(`SELECT count(*)::int AS n FROM blobs`, [], db);

  const back = path.join(repo.dir, 'back.sqlite');
  assert.equal((await onPg(['db-migrate', '--to', `sqlite:///${back}`])).code, 0);
  const sqCfg = path.join(repo.dir, 'back.cfg');
  fs.writeFileSync(sqCfg, `${fs.readFileSync(repo.cfg, 'utf8')}\n[MetaBackend]\nengine = sqlite:///${back}\n`);
  const onSq = (args: string[]) => runBacky(['-c', sqCfg, ...args], { cwd: repo.dir });
  const finalList = JSON.parse((await onSq(['--json', 'ls'])).stdout);
  assert.deepEqual(finalList, JSON.parse((await onPg(['--json', 'ls'])).stdout));
  assert.equal(finalList.length, 3);
  for (const [uid, img] of [[u1, imgs[0]], [u2, imgs[1]], [u4, imgs[2]]]) {
    const out = path.join(repo.dir, `sq-${uid}.img`);
    const r = await onSq(['restore', uid, `file://${out}`]);
    assert.equal(r.code, 0, r.stderr);
    assert.equal(sha256File(out), sha256File(img));
    assert.equal((await onSq(['scrub', uid])).code, 0);
  }
  const stats = JSON.parse((await onSq(['--json', 'stats'])).stdout);
  assert.equal(stats.length, 4, 'statistics came along');
  const cleanupJson = JSON.parse((await onSq(['--json', 'cleanup', '--full', '--dangerous-force'])).stdout);
  assert.equal(cleanupJson.orphansDeleted, 0, 'storage and the copied database agree');
  assert.equal(pgBlobs, storedObjects(repo));
});

test('connection trouble: one clear line, exit 1, no password; a backup cut off stays invalid and continuable', async () => {
  const base = makeTestRepo(`[MetaBackend]\nengine = postgresql://backy:hunter2-secret@127.0.0.1:1/none\n`, { blockSize: BS });
  repos.push(base);
  let r = await base.run(['ls']);
  assert.equal(r.code, 1);
  assert.equal(r.stderr.trim().split('\n').length, 1, r.stderr);
  assert.match(r.stderr, /cannot connect to PostgreSQL at 127\.0\.0\.1:1\/none: connection refused/);
  assert.doesNotMatch(r.stderr + r.stdout + fs.readFileSync(path.join(base.dir, 'backy.log'), 'utf8'), /hunter2/);

  await pg.query(`DO $$ BEGIN CREATE ROLE backy_cli LOGIN PASSWORD 'the-real-one'; EXCEPTION WHEN duplicate_object THEN NULL; END $$`);
  const wrongPw = makeTestRepo(`[MetaBackend]\nengine = postgresql://backy_cli:hunter2-secret@127.0.0.1:${pg.port}/postgres\n`, { blockSize: BS });
  repos.push(wrongPw);
  r = await wrongPw.run(['ls']);
  assert.equal(r.code, 1);
  assert.equal(r.stderr.trim().split('\n').length, 1, r.stderr);
  assert.match(r.stderr, /refused the password of user "backy_cli"/);
  assert.doesNotMatch(r.stderr, /hunter2/);

  const noDb = makeTestRepo(`[MetaBackend]\nengine = ${pg.url('missing_db')}\n`, { blockSize: BS });
  repos.push(noDb);
  r = await noDb.run(['ls']);
  assert.equal(r.code, 1);
  assert.match(r.stderr, /database "missing_db" does not exist/);

  const notInit = makeTestRepo(`[MetaBackend]\nengine = ${await pg.createDatabase()}\n`, { blockSize: BS });
  repos.push(notInit);
  r = await notInit.run(['ls']);
  assert.equal(r.code, 1);
  assert.match(r.stderr, /not initialized: run "backy initdb"/);

  // Connections killed in the middle of a backup.
  const { repo, db } = await pgRepo('bandwidth_write = 2M\n');
  const img = path.join(repo.dir, 'c.img');
  writeImage(img, 12 * 1024 * 1024, 'random');
  const b = startBacky(repo, ['backup', `file://${img}`, 'vm-c']);
  let uid = '';
  let cut: RunResult;
  try {
    await waitFor('the backup to start', () => {
      const m = /into version ([0-9a-f-]{36})/.exec(b.stderr());
      if (m) uid = m[1];
      return !!m;
    });
    await new Promise((res) => setTimeout(res, 1000));
    assert.ok((await pg.terminateConnections(db)) > 0);
    cut = await b.done;
  } finally {
    b.kill('SIGKILL');
  }
  assert.equal(cut.code, 1, cut.stderr);
  const lines = cut.stderr.trim().split('\n').filter((l) => !l.startsWith('backup of '));
  assert.equal(lines.length, 1, cut.stderr);
  assert.match(lines[0], /^ERROR: lost the connection to PostgreSQL at 127\.0\.0\.1:\d+\/\w+: /);
  const v = (await versions(repo)).find((x) => x.uid === uid)!;
  assert.equal(v.valid, false);
  await repo.ok(['backup', '-c', uid, `file://${img}`, 'vm-c']);
  await restoresIdentical(repo, uid, img);
  await repo.ok(['scrub', uid]);
});
