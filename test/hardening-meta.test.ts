/**
 * Metadata hardening: cleanup's decision is on disk before it deletes anything; a dead (zombie) lock holder
 * holds nothing.
 */
import { after, describe, test } from 'node:test';
import * as assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { execFileSync, spawnSync } from 'node:child_process';
import Database from 'better-sqlite3';
import { BACKY, makeTestRepo, TestRepo, writeImage } from './helpers/cli';

const MiB = 1024 * 1024;
const hasStrace = spawnSync('strace', ['-V']).status === 0;

describe('cleanup on SQLite', () => {
  const repos: TestRepo[] = [];
  after(() => {
    for (const r of repos) r.cleanup();
  });

  test('the marks are synced to disk before the first blob is deleted', { skip: !hasStrace && 'needs strace' }, async () => {
    const repo = makeTestRepo('', { blockSize: MiB });
    repos.push(repo);
    await repo.ok(['initdb']);
    const img = path.join(repo.dir, 'img');
    writeImage(img, 4 * MiB, 'random');
    const uid = (await repo.ok(['backup', `file://${img}`, 'durable'])).stdout.trim();
    await repo.ok(['rm', '-f', uid]);
    // An empty WAL: no automatic checkpoint (which would sync the WAL by itself) happens during the cleanup.
    const db = new Database(path.join(repo.dir, 'backy.sqlite'));
    db.pragma('wal_checkpoint(TRUNCATE)');
    db.close();

    const trace = path.join(repo.dir, 'strace.txt');
    execFileSync('strace', ['-f', '-qq', '-y', '-e', 'trace=pwrite64,write,fsync,fdatasync,unlink,unlinkat', '-o', trace,
      process.execPath, BACKY, '-c', repo.cfg, 'cleanup', '--dangerous-force'], { stdio: 'ignore' });
    const lines = fs.readFileSync(trace, 'utf8').split('\n');
    const dataDir = path.join(repo.dir, 'data');
    const firstDelete = lines.findIndex((l) => /unlink(at)?\(/.test(l) && l.includes(`${dataDir}/`) && !l.includes('.tmp.'));
    assert.ok(firstDelete >= 0, `cleanup deleted no blob:\n${lines.join('\n')}`);
    // Every WAL write before the first delete (the marks' commit is the last of them) is followed by a sync of
    // the WAL before that delete. (A sync of the new WAL's header when the first transaction starts does not
    // count: the marks are written after it.)
    const before = lines.slice(0, firstDelete);
    let lastWalWrite = -1;
    before.forEach((l, k) => { if (/p?write(64)?\(\d+<[^>]*backy\.sqlite-wal>/.test(l)) lastWalWrite = k; });
    assert.ok(lastWalWrite >= 0, 'the marks were written to the WAL');
    const walSync = before.findIndex((l, k) => k > lastWalWrite && /f(data)?sync\(\d+<[^>]*backy\.sqlite-wal>\)/.test(l));
    assert.ok(walSync > lastWalWrite,
      `the WAL holding the marks was not synced before the first delete:\n${lines.slice(0, firstDelete + 1).filter((l) => /sqlite-wal|unlink/.test(l)).join('\n')}`);
    assert.equal(fs.readdirSync(dataDir, { recursive: true }).filter((f) => /[0-9a-f]{32}$/.test(String(f))).length, 0);
  });
});
