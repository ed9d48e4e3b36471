/**
 * Metadata hardening: cleanup's decision is on disk before it deletes anything; a dead (zombie) lock holder
 * holds nothing.
 */
import { after, describe, test } from 'node:test';
import * as assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { execFileSync, spawn, spawnSync } from 'node:child_process';
import Database from 'better-sqlite3';
import { BACKY, makeTestRepo, restoredHash, TestRepo, writeImage } from './helpers/cli';
import { sha256File } from './helpers/images';

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

/** The state letter of a process (field 3 of /proc/PID/stat), or '' when it is gone. */
function processState(pid: number): string {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2).split(' ')[0];
  } catch {
    return '';
  }
}

async function waitFor(what: string, cond: () => boolean | Promise<boolean>, ms = 60_000): Promise<void> {
  const end = Date.now() + ms;
  while (!(await cond())) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

describe('a dead lock holder', () => {
  const repo = makeTestRepo('[DataBackend]\nbandwidth_write = 4M\n', { blockSize: MiB });
  after(() => repo.cleanup());

  test('a killed backup whose parent has not reaped it (a zombie) holds nothing: backup -c continues at once', async () => {
    await repo.ok(['initdb']);
    const img = path.join(repo.dir, 'img');
    writeImage(img, 32 * MiB, 'random');
    // A parent that starts the backup and never waits for it, as a shell script stuck elsewhere would.
    const parent = spawn('python3', ['-c', [
      'import os, sys, time',
      'pid = os.fork()',
      'if pid == 0:',
      '    fd = os.open(sys.argv[3], os.O_WRONLY | os.O_CREAT, 0o600); os.dup2(fd, 1); os.dup2(fd, 2)',
      '    os.execv(sys.argv[1], [sys.argv[1], sys.argv[2], "-c", sys.argv[4], "backup", "file://" + sys.argv[5], "zombie"])',
      'print(pid, flush=True)',
      'time.sleep(600)',
    ].join('\n'), process.execPath, BACKY, path.join(repo.dir, 'zombie.out'), repo.cfg, img], { stdio: ['ignore', 'pipe', 'inherit'] });
    try {
      const pid = await new Promise<number>((resolve) => parent.stdout.once('data', (d) => resolve(Number(String(d).trim()))));
      let uid = '';
      await waitFor('the backup to start storing blocks', () => {
        const out = path.join(repo.dir, 'zombie.out');
        uid = fs.existsSync(out) ? /into version ([0-9a-f-]{36})/.exec(fs.readFileSync(out, 'utf8'))?.[1] ?? '' : '';
        return !!uid;
      });
      process.kill(pid, 'SIGKILL');
      await waitFor('the killed backup to become a zombie', () => processState(pid) === 'Z');
      const r = await repo.run(['backup', '-c', uid, `file://${img}`, 'zombie']);
      assert.equal(processState(pid), 'Z', 'the holder was still a zombie during the continued backup');
      assert.equal(r.code, 0, r.stderr);
      assert.equal(r.stdout.trim(), uid);
      assert.equal(await restoredHash(repo, uid), sha256File(img));
    } finally {
      parent.kill('SIGKILL');
    }
  });
});
