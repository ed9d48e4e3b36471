/**
 * Readers hold the versions they read: restore, scrub, an NBD export and a FUSE mount. `rm` of a held version
 * is refused naming the holder; cleanup therefore never deletes a block under a reader; a holder that dies
 * holds nothing. `rm` checks `protected` inside its transaction. On SQLite and PostgreSQL.
 */
import { after, before, describe, test } from 'node:test';
import * as assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as fsp from 'node:fs/promises';
import * as os from 'node:os';
import * as path from 'node:path';
import { spawn } from 'node:child_process';
import Database from 'better-sqlite3';
import { BACKY, makeTestRepo, RunResult, TestRepo, writeImage } from './helpers/cli';
import { sha256File } from './helpers/images';
import { startBackyNbd } from './helpers/backy-nbd';
import { forceCleanup, startMount } from './helpers/fuse-mount';
import { startPostgres, TestPostgres } from './helpers/postgres';
import { NbdClient } from '../nbd/client';
import { processStart } from '../src/util/process-info';

const MiB = 1024 * 1024;
const BS = MiB;
const IMAGE = 16 * MiB;

/** A second configuration of the same repository whose reads are slow (2 MiB/s): a restore that takes a while. */
function slowConfig(repo: TestRepo): string {
  const file = path.join(repo.dir, 'slow.cfg');
  fs.writeFileSync(file, `${fs.readFileSync(repo.cfg, 'utf8')}\nbandwidth_read = 2M\n`);
  return file;
}

async function waitFor(what: string, cond: () => boolean | Promise<boolean>, ms = 60_000): Promise<void> {
  const end = Date.now() + ms;
  while (!(await cond())) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** Bytes a process has written with write(2) and friends so far (its target, mostly). */
function written(pid: number): number {
  try {
    return Number(/wchar: (\d+)/.exec(fs.readFileSync(`/proc/${pid}/io`, 'utf8'))?.[1] ?? 0);
  } catch {
    return 0;
  }
}

/** Runs backy in a child process; `pid` is known at once. */
function startBacky(cfg: string, args: string[]): { pid: number; done: Promise<RunResult> } {
  const child = spawn(process.execPath, [BACKY, '-c', cfg, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (d) => (stdout += d));
  child.stderr.on('data', (d) => (stderr += d));
  const done = new Promise<RunResult>((resolve) => child.on('close', (code, signal) => resolve({ code: code ?? (signal ? 128 : -1), stdout, stderr })));
  return { pid: child.pid!, done };
}

/** Whether a promise has settled, without waiting for it. */
async function settled(p: Promise<unknown>): Promise<boolean> {
  const marker = Symbol('pending');
  return (await Promise.race([p.then(() => true, () => true), new Promise((r) => setImmediate(() => r(marker)))])) !== marker;
}

/** Hold rows of a SQLite repository's lock table. */
function sqliteHolds(repo: TestRepo, uid: string): { name: string; what: string; pid: number }[] {
  const db = new Database(path.join(repo.dir, 'backy.sqlite'), { readonly: true });
  try {
    return db.prepare(`SELECT name, what, pid FROM locks WHERE name LIKE ?`).all(`hold:${uid}:%`) as { name: string; what: string; pid: number }[];
  } finally {
    db.close();
  }
}

/**
 * The race of a long restore with `rm` and `cleanup`: the restore has started writing when both run, and is
 * still running when both have finished. The removal is refused naming the restore, the cleanup deletes
 * nothing of it, and the restore completes byte-identical.
 */
async function restoreSurvivesRmAndCleanup(repo: TestRepo, uid: string, img: string): Promise<void> {
  const out = path.join(repo.dir, `restore-${uid}`);
  const { pid, done: restore } = startBacky(slowConfig(repo), ['restore', uid, `file://${out}`]);
  await waitFor('the restore to write its first blocks', () => written(pid) >= 2 * MiB);
  const rm = await repo.run(['rm', '-f', uid]);
  const cleanup = await repo.run(['cleanup', '--dangerous-force']);
  assert.equal(await settled(restore), false, 'the restore was still running while rm and cleanup ran');
  assert.ok(written(pid) < IMAGE, 'the restore had not written everything yet');
  assert.equal(cleanup.code, 0, cleanup.stderr);
  const r = await restore;
  assert.equal(r.code, 0, `the restore failed after rm (exit ${rm.code}) and cleanup:\n${r.stderr}`);
  assert.equal(sha256File(out), sha256File(img));
  assert.equal(rm.code, 100, rm.stderr);
  assert.match(rm.stderr, new RegExp(`cannot remove version ${uid}: restore of ${uid} holds it \\(pid ${pid} on ${os.hostname()}\\)`));
  fs.rmSync(out);
  // The hold ends with the restore.
  await repo.ok(['rm', '-f', uid]);
}

/** `-m` rows of enforce as objects. */
function outcomeRows(stdout: string): Record<string, string>[] {
  const [header, ...lines] = stdout.trim().split('\n');
  const keys = header.split('|');
  return lines.map((l) => Object.fromEntries(l.split('|').map((v, k) => [keys[k], v])));
}

/** Three small versions of name `name`, oldest first. */
async function threeVersions(repo: TestRepo, name: string, seed: number): Promise<string[]> {
  const uids: string[] = [];
  for (let k = 0; k < 3; k++) {
    const img = path.join(repo.dir, `${name}-${k}`);
    writeImage(img, 2 * MiB, 'random', seed + k);
    uids.push((await repo.ok(['backup', `file://${img}`, name])).stdout.trim());
    fs.rmSync(img);
  }
  return uids;
}

/**
 * enforce removes several versions in one step: a hold another process has on one of them (its lock row, as a
 * restore's) keeps that one, named in its outcome; the other planned one is removed. Once the hold is gone,
 * enforce removes the rest.
 */
async function enforceSkipsHeld(repo: TestRepo, url: string): Promise<void> {
  const uids = await threeVersions(repo, 'batch', 40);
  const { createMetaStore } = await import('../src/meta/open');
  const other = createMetaStore(url);
  await other.open();
  try {
    const info = { session: 'test-reader', host: os.hostname(), pid: process.pid, pidStart: processStart(process.pid), what: `restore of ${uids[0]}` };
    assert.equal(await other.tryLock(`hold:${uids[0]}:test-reader`, info, [`remove:${uids[0]}`]), undefined);
    const r = await repo.run(['-m', 'enforce', '--force', 'latest1', 'batch']);
    assert.equal(r.code, 100, r.stderr);
    const rows = outcomeRows(r.stdout);
    assert.deepEqual(rows.map((x) => [x.uid, x.action]), [[uids[0], 'failed'], [uids[1], 'removed'], [uids[2], 'keep']]);
    assert.match(rows[0].reason, new RegExp(`^cannot remove version ${uids[0]}: restore of ${uids[0]} holds it \\(pid ${process.pid} on `));
    assert.deepEqual(JSON.parse((await repo.ok(['--json', 'ls', 'batch'])).stdout).map((v: { uid: string }) => v.uid).sort(), [uids[0], uids[2]].sort());
    await other.unlock(`hold:${uids[0]}:test-reader`, 'test-reader');
  } finally {
    await other.close();
  }
  const again = outcomeRows((await repo.ok(['-m', 'enforce', '--force', 'latest1', 'batch'])).stdout);
  assert.deepEqual(again.map((x) => [x.uid, x.action]).sort(), [[uids[0], 'removed'], [uids[2], 'keep']].sort());
}

describe('holds on SQLite', () => {
  let repo: TestRepo;
  const imgs: string[] = [];
  const uids: string[] = [];
  before(async () => {
    repo = makeTestRepo('', { blockSize: BS });
    await repo.ok(['initdb']);
    for (let k = 0; k < 5; k++) {
      const img = path.join(repo.dir, `img${k}`);
      writeImage(img, IMAGE, 'random', k + 1);
      imgs.push(img);
      uids.push((await repo.ok(['backup', `file://${img}`, `held${k}`])).stdout.trim());
    }
  });
  after(() => repo.cleanup());

  test('a running restore holds its version: rm is refused naming it, cleanup deletes none of its blocks', async () => {
    await restoreSurvivesRmAndCleanup(repo, uids[0], imgs[0]);
  });

  test('enforce removing several versions at once skips the one a reader holds, naming it', async () => {
    await enforceSkipsHeld(repo, `sqlite:///${path.join(repo.dir, 'backy.sqlite')}`);
  });

  test('a killed restore holds nothing', async () => {
    const uid = uids[1];
    const out = path.join(repo.dir, 'killed');
    const child = spawn(process.execPath, [BACKY, '-c', slowConfig(repo), 'restore', uid, `file://${out}`], { stdio: 'ignore' });
    const gone = new Promise((r) => child.on('exit', r));
    await waitFor('the restore to hold its version', () => sqliteHolds(repo, uid).length === 1);
    assert.match(sqliteHolds(repo, uid)[0].what, /^restore of /);
    child.kill('SIGKILL');
    await gone;
    assert.equal(sqliteHolds(repo, uid).length, 1, 'the dead holder left its row behind');
    await repo.ok(['rm', '-f', uid]);
    assert.equal(sqliteHolds(repo, uid).length, 0);
  });

  test('a client of the NBD server holds the version it opened until it disconnects', async () => {
    const uid = uids[2];
    const nbd = await startBackyNbd(repo.cfg);
    try {
      const client = await NbdClient.connect({ host: '127.0.0.1', port: nbd.port }, { exportName: uid });
      const first = await client.read(0, BS);
      const rm = await repo.run(['rm', '-f', uid]);
      assert.equal(rm.code, 100, rm.stderr);
      assert.match(rm.stderr, new RegExp(`cannot remove version ${uid}: NBD export of ${uid} holds it \\(pid ${nbd.pid} on `));
      await repo.ok(['cleanup', '--dangerous-force']);
      // Still readable after the refused removal and a cleanup.
      const last = await client.read(IMAGE - BS, BS);
      const fd = fs.openSync(imgs[2], 'r');
      const want = Buffer.alloc(BS);
      fs.readSync(fd, want, 0, BS, 0);
      assert.ok(first.equals(want));
      fs.readSync(fd, want, 0, BS, IMAGE - BS);
      fs.closeSync(fd);
      assert.ok(last.equals(want));
      await client.close();
      await waitFor('the export to be released', () => sqliteHolds(repo, uid).length === 0, 15_000);
      await repo.ok(['rm', '-f', uid]);
    } finally {
      await nbd.stop();
    }
  });

  test('a FUSE mount of one version holds it; a mount of all versions holds each image while it is open', { skip: process.getuid?.() !== 0 && 'needs root' }, async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'backy-holds-mnt-'));
    try {
      const single = await startMount(repo, [uids[3], dir], dir);
      let rm = await repo.run(['rm', '-f', uids[3]]);
      assert.equal(rm.code, 100, rm.stderr);
      assert.match(rm.stderr, new RegExp(`FUSE mount of ${uids[3]} holds it \\(pid ${single.pid} on `));
      assert.equal(await single.stop(), 0);

      const all = await startMount(repo, [dir], dir);
      try {
        const image = (await fsp.readdir(path.join(dir, 'by_version_uid', uids[3]))).find((f) => f.endsWith('.img'))!;
        // Another process keeps the image open (and has read from it) until told to stop.
        const reader = spawn('python3', ['-c', 'import sys; f = open(sys.argv[1], "rb"); f.read(4096); print("open", flush=True); sys.stdin.read()',
          path.join(dir, 'by_version_uid', uids[3], image)], { stdio: ['pipe', 'pipe', 'inherit'] });
        await new Promise((r) => reader.stdout.once('data', r));
        rm = await repo.run(['rm', '-f', uids[3]]);
        assert.equal(rm.code, 100, rm.stderr);
        assert.match(rm.stderr, new RegExp(`open image of ${uids[3]} holds it \\(pid ${all.pid} on `));
        // Versions whose images nobody has open are not held.
        await repo.ok(['rm', '-f', uids[4]]);
        reader.stdin.end();
        await new Promise((r) => reader.on('exit', r));
        await waitFor('the image to be released', () => sqliteHolds(repo, uids[3]).length === 0, 15_000);
        await repo.ok(['rm', '-f', uids[3]]);
      } finally {
        await all.stop();
      }
    } finally {
      await forceCleanup(dir);
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe('holds on PostgreSQL', () => {
  let pg: TestPostgres;
  const repos: TestRepo[] = [];
  before(async () => {
    pg = await startPostgres();
  });
  after(async () => {
    for (const r of repos) r.cleanup();
    await pg?.stop();
  });

  async function pgRepo(): Promise<{ repo: TestRepo; db: string }> {
    const url = await pg.createDatabase();
    const repo = makeTestRepo(`[MetaBackend]\nengine = ${url}\n[DataBackend]\nfsync = false\n`, { blockSize: BS });
    repos.push(repo);
    await repo.ok(['initdb']);
    return { repo, db: url.split('/').pop()! };
  }

  /**
   * Runs `command` while another transaction holds the row of version `uid` (`lock`); once the command waits
   * for that row (pg_stat_activity shows a lock wait on a query like `waiting`), `then` runs in the holding
   * transaction, which then commits. The command's result.
   */
  async function whileRowHeld(db: string, uid: string, lock: 'FOR KEY SHARE' | 'FOR UPDATE', command: () => Promise<RunResult>, what: string,
    waiting: string, then: (c: import('pg').Client) => Promise<unknown>): Promise<RunResult> {
    const { Client } = await import('pg');
    const c = new Client({ connectionString: pg.url(db) });
    c.on('error', () => undefined);
    await c.connect();
    try {
      await c.query('BEGIN');
      await c.query(`SELECT 1 FROM versions WHERE uid = $1 ${lock}`, [uid]);
      const result = command();
      await waitFor(`${what} to wait for the version row`, async () => (await pg.query(
        `SELECT 1 FROM pg_stat_activity WHERE datname = $1 AND wait_event_type = 'Lock' AND query ILIKE $2`, [db, waiting], db)).length > 0);
      await then(c);
      await c.query('COMMIT');
      return await result;
    } finally {
      await c.end().catch(() => undefined);
    }
  }

  test('a running restore holds its version across processes: rm is refused, cleanup deletes none of its blocks', async () => {
    const { repo } = await pgRepo();
    const img = path.join(repo.dir, 'img');
    writeImage(img, IMAGE, 'random', 7);
    const uid = (await repo.ok(['backup', `file://${img}`, 'held'])).stdout.trim();
    await restoreSurvivesRmAndCleanup(repo, uid, img);
  });

  test('rm re-checks protected in its transaction: a protect committed while rm waits for the row wins', async () => {
    const { repo, db } = await pgRepo();
    const img = path.join(repo.dir, 'img');
    writeImage(img, 2 * MiB, 'random', 8);
    const uid = (await repo.ok(['backup', `file://${img}`, 'prot'])).stdout.trim();
    // A transaction holding the version's row stands for a `protect` in progress. rm reads the version (not
    // protected), takes its locks, then waits for the row in its removal transaction.
    const r = await whileRowHeld(db, uid, 'FOR KEY SHARE', () => repo.run(['rm', '-f', uid]), 'rm', '%FROM versions%FOR UPDATE%',
      (c) => c.query('UPDATE versions SET protected = 1 WHERE uid = $1', [uid]));
    assert.equal(r.code, 100, r.stderr);
    assert.match(r.stderr, new RegExp(`version ${uid} is protected; unprotect it first`));
    const ls = JSON.parse((await repo.ok(['--json', 'ls'])).stdout) as { uid: string; protected: boolean }[];
    assert.deepEqual(ls.map((v) => [v.uid, v.protected]), [[uid, true]]);
  });

  test('enforce removing several versions at once skips the one a reader holds, naming it', async () => {
    const { repo, db } = await pgRepo();
    await enforceSkipsHeld(repo, pg.url(db));
  });

  test('enforce re-checks protected of each version in its one removal transaction: a protect committed meanwhile wins', async () => {
    const { repo, db } = await pgRepo();
    const uids = await threeVersions(repo, 'prot3', 50);
    // The transaction holding the oldest version's row stands for a `protect` in progress; enforce has planned
    // both older versions' removal, taken their locks, and waits for the row in its removal transaction.
    const r = await whileRowHeld(db, uids[0], 'FOR KEY SHARE', () => repo.run(['-m', 'enforce', '--force', 'latest1', 'prot3']), 'enforce',
      '%FROM versions%FOR UPDATE%', (c) => c.query('UPDATE versions SET protected = 1 WHERE uid = $1', [uids[0]]));
    assert.equal(r.code, 100, r.stderr);
    const rows = outcomeRows(r.stdout);
    assert.deepEqual(rows.map((x) => [x.uid, x.action]), [[uids[0], 'failed'], [uids[1], 'removed'], [uids[2], 'keep']]);
    assert.match(rows[0].reason, new RegExp(`^version ${uids[0]} is protected; unprotect it first; planned: `));
    const ls = JSON.parse((await repo.ok(['--json', 'ls', 'prot3'])).stdout) as { uid: string; protected: boolean }[];
    assert.deepEqual(ls.map((v) => [v.uid, v.protected]).sort(), [[uids[0], true], [uids[2], false]].sort());
  });

  test('protect racing a removal that commits first says the version is gone instead of claiming success', async () => {
    const { repo, db } = await pgRepo();
    const img = path.join(repo.dir, 'img');
    writeImage(img, 2 * MiB, 'random', 9);
    const uid = (await repo.ok(['backup', `file://${img}`, 'prot2'])).stdout.trim();
    // The transaction stands for a removal in progress: it has the row; protect has read the version and
    // waits in its UPDATE; then the removal commits.
    const p = await whileRowHeld(db, uid, 'FOR UPDATE', () => repo.run(['protect', uid]), 'protect', 'UPDATE versions SET protected%',
      (c) => c.query('DELETE FROM versions WHERE uid = $1', [uid]));
    assert.equal(p.code, 100, p.stderr);
    assert.match(p.stderr, new RegExp(`version ${uid} does not exist`));
    assert.doesNotMatch(p.stderr, /is protected/);
  });
});
