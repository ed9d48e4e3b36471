/**
 * Storage hardening: a full disk never leaves a partial blob that counts as stored; a data directory whose
 * filesystem is not mounted is refused; blob uids from the database never become paths.
 */
import { after, describe, test } from 'node:test';
import * as assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { execFileSync } from 'node:child_process';
import Database from 'better-sqlite3';
import { makeTestRepo, TestRepo, writeImage } from './helpers/cli';
import { sha256File } from './helpers/images';
import { blobKey } from '../src/storage/types';

const MiB = 1024 * 1024;
const BS = 1 * MiB;
const isRoot = process.getuid?.() === 0;

function mountTmpfs(dir: string, size: string): void {
  fs.mkdirSync(dir, { recursive: true });
  execFileSync('mount', ['-t', 'tmpfs', '-o', `size=${size},mode=0700`, 'tmpfs', dir]);
}

function unmount(dir: string): void {
  try {
    execFileSync('umount', [dir], { stdio: 'ignore' });
  } catch { /* not mounted */ }
}

/** Every file under `dir` (relative paths). */
function filesUnder(dir: string): string[] {
  const out: string[] = [];
  const walk = (d: string) => {
    for (const e of fs.readdirSync(d, { withFileTypes: true })) {
      const p = path.join(d, e.name);
      if (e.isDirectory()) walk(p);
      else out.push(path.relative(dir, p));
    }
  };
  walk(dir);
  return out;
}

function blobRows(repo: TestRepo): { uid: string; state: number; stored_size: number }[] {
  const db = new Database(path.join(repo.dir, 'backy.sqlite'), { readonly: true });
  try {
    return db.prepare('SELECT uid, state, stored_size FROM blobs').all() as { uid: string; state: number; stored_size: number }[];
  } finally {
    db.close();
  }
}

async function lsJson(repo: TestRepo): Promise<{ uid: string; valid: boolean }[]> {
  return JSON.parse((await repo.ok(['--json', 'ls'])).stdout);
}

describe('a full data disk', { skip: !isRoot && 'needs root (mounts a small tmpfs)' }, () => {
  const repos: TestRepo[] = [];
  const mounts: string[] = [];
  after(() => {
    for (const m of mounts) unmount(m);
    for (const r of repos) r.cleanup();
  });

  test('fails the backup with exit 6, stores no partial blob, and the version continues once space is freed', async () => {
    const repo = makeTestRepo('', { blockSize: BS });
    repos.push(repo);
    const data = path.join(repo.dir, 'data');
    // Room for four 1 MiB blobs and part of a fifth: the fifth write() stores only part of its blob.
    mountTmpfs(data, '4500k');
    mounts.push(data);
    await repo.ok(['initdb']);
    const img = path.join(repo.dir, 'img');
    writeImage(img, 12 * MiB + 12345, 'random');

    const r = await repo.run(['backup', `file://${img}`, 'full-disk']);
    assert.equal(r.code, 6, r.stderr);
    const uid = /into version ([0-9a-f-]{36})/.exec(r.stderr)![1];
    assert.equal((await lsJson(repo)).find((v) => v.uid === uid)?.valid, false);

    // Nothing under a final blob name unless the database counts it stored with exactly that size, and no
    // temporary file left over.
    const rows = new Map(blobRows(repo).map((b) => [blobKey(b.uid), b]));
    const files = filesUnder(data).filter((f) => f.includes('/'));
    assert.deepEqual(files.filter((f) => path.basename(f).startsWith('.tmp.')), []);
    let stored = 0;
    for (const f of files) {
      const row = rows.get(f);
      assert.ok(row, `${f} is in storage but not in the database`);
      assert.equal(row.state, 1, `${f} exists but its blob is not live`);
      assert.equal(fs.statSync(path.join(data, f)).size, row.stored_size, `${f} is shorter than the blob it stands for`);
      stored++;
    }
    assert.ok(stored >= 3, `expected some blobs stored before the disk filled up, found ${stored}`);
    const errors = r.stderr.split('\n').filter((l) => l.startsWith('ERROR'));
    assert.equal(errors.length, 1, r.stderr);
    assert.match(errors[0], /no space left on the device \(ENOSPC\)/);

    // Space freed: the same version continues and restores identical.
    execFileSync('mount', ['-o', 'remount,size=64m', data]);
    await repo.ok(['backup', '-c', uid, `file://${img}`, 'full-disk']);
    assert.equal((await lsJson(repo)).find((v) => v.uid === uid)?.valid, true);
    const out = path.join(repo.dir, 'restored');
    await repo.ok(['restore', uid, `file://${out}`]);
    assert.equal(sha256File(out), sha256File(img));
    await repo.ok(['scrub', uid]);
  });
});

describe('blob uids from the database', () => {
  const repo = makeTestRepo('', { blockSize: BS });
  after(() => repo.cleanup());

  test('a planted uid never becomes a path: restore and scrub refuse the block, cleanup deletes nothing outside the blob tree', async () => {
    await repo.ok(['initdb']);
    const img = path.join(repo.dir, 'img');
    writeImage(img, 3 * MiB, 'random');
    const uid = (await repo.ok(['backup', `file://${img}`, 'planted'])).stdout.trim();
    // data/xx/../../../victim is the repository directory's "victim": what `cleanup` would unlink.
    const victim = path.join(repo.dir, 'victim');
    fs.writeFileSync(victim, 'not a blob');
    const planted = 'xx/../../../victim';
    assert.equal(path.join(repo.dir, 'data', planted.slice(0, 2), planted.slice(2, 4), planted), victim);
    const db = new Database(path.join(repo.dir, 'backy.sqlite'));
    const original = (db.prepare('SELECT uid FROM blobs WHERE id = (SELECT MIN(id) FROM blobs)').get() as { uid: string }).uid;
    db.prepare('UPDATE blobs SET uid = ? WHERE id = (SELECT MIN(id) FROM blobs)').run(planted);
    db.close();

    let r = await repo.run(['restore', uid, `file://${path.join(repo.dir, 'out')}`]);
    assert.equal(r.code, 6, r.stderr);
    assert.match(r.stderr, /invalid backy blob uid "xx\/\.\.\/\.\.\/\.\.\/victim"/);
    r = await repo.run(['scrub', uid]);
    assert.equal(r.code, 20, r.stderr);
    assert.match(r.stderr, /1 bad blobs/);

    await repo.ok(['rm', '-f', uid]);
    r = await repo.run(['cleanup', '--dangerous-force']);
    assert.equal(fs.existsSync(victim), true, 'cleanup deleted a file outside the data directory');
    assert.equal(r.code, 1, r.stderr);
    assert.match(r.stderr, /1 blob rows with invalid uids were forgotten without touching storage/);
    // The other blobs are deleted; the planted row's real object is now unknown to the database.
    assert.deepEqual(filesUnder(path.join(repo.dir, 'data')).filter((f) => f.includes('/')), [blobKey(original)]);
    await repo.ok(['cleanup', '--full']);
    assert.deepEqual(filesUnder(path.join(repo.dir, 'data')).filter((f) => f.includes('/')), []);
    assert.equal(fs.existsSync(victim), true);
  });
});
