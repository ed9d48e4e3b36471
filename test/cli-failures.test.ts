import { after, before, describe, test } from 'node:test';
import * as assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import Database from 'better-sqlite3';
import { BACKY, blobFileOf, makeTestRepo, runBacky, TestRepo, writeImage } from './helpers/cli';
import { sha256File } from './helpers/images';

const MiB = 1024 * 1024;
const BS = 4 * MiB;

/** Every blob file of a repository, by storage key (metadata objects under meta/ are not blobs). */
function blobFiles(repo: TestRepo): string[] {
  const root = path.join(repo.dir, 'data');
  const out: string[] = [];
  const walk = (d: string) => {
    for (const e of fs.readdirSync(d, { withFileTypes: true })) {
      if (e.isDirectory() && d === root && e.name === 'meta') continue;
      if (e.isDirectory()) walk(path.join(d, e.name));
      else out.push(path.join(d, e.name));
    }
  };
  if (fs.existsSync(root)) walk(root);
  return out;
}


function lsJson(repo: TestRepo, name?: string) {
  return repo.ok(['--json', 'ls', ...(name ? [name] : [])]).then((r) => JSON.parse(r.stdout) as { uid: string; valid: boolean }[]);
}

describe('failures and exit codes', () => {
  let repo: TestRepo;
  let img: string;
  let uid: string;
  before(async () => {
    repo = makeTestRepo();
    await repo.ok(['initdb']);
    img = path.join(repo.dir, 'img');
    writeImage(img, 6 * BS + 100, 'random');
    uid = (await repo.ok(['backup', `file://${img}`, 'img'])).stdout.trim();
  });
  after(() => repo.cleanup());

  test('initdb on an existing database: exit 100, nothing changed', async () => {
    const r = await repo.run(['initdb']);
    assert.equal(r.code, 100);
    assert.match(r.stderr, /already initialized/);
    assert.equal((await lsJson(repo)).length, 1);
  });

  test('usage errors exit 2, help and version exit 0', async () => {
    assert.equal((await repo.run(['nosuchcommand'])).code, 2);
    assert.equal((await repo.run(['restore', uid])).code, 2);
    assert.equal((await repo.run(['ls', '--nosuchoption'])).code, 2);
    assert.equal((await repo.run(['scrub', '-p', '500', uid])).code, 2);
    assert.equal((await runBacky([])).code, 2);
    assert.equal((await runBacky(['--help'])).code, 0);
    const v = await runBacky(['-V']);
    assert.equal(v.code, 0);
    assert.match(v.stdout, /^\d+\.\d+\.\d+/);
  });

  test('unknown uid: one line, exit 100', async () => {
    for (const args of [['restore', 'nope', `file://${repo.dir}/x`], ['scrub', 'nope'], ['rm', 'nope'], ['protect', 'nope']]) {
      const r = await repo.run(args);
      assert.equal(r.code, 100, args.join(' '));
      assert.equal(r.stderr.trim().split('\n').length, 1);
      assert.match(r.stderr, /does not exist/);
    }
  });

  test('configuration errors: exit 1, one line naming the key', async () => {
    const bad = path.join(repo.dir, 'bad.cfg');
    fs.writeFileSync(bad, fs.readFileSync(repo.cfg, 'utf8') + '\n[DEFAULTS]\nblock_size = huge\n');
    const r = await runBacky(['-c', bad, 'ls']);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /block_size/);
    assert.equal(r.stderr.trim().split('\n').length, 1);
    assert.equal((await runBacky(['-c', path.join(repo.dir, 'missing.cfg'), 'ls'])).code, 1);
    const nokey = path.join(repo.dir, 'nokey.cfg');
    fs.writeFileSync(nokey, fs.readFileSync(repo.cfg, 'utf8').replace(/encryption_key = .*/, ''));
    const k = await runBacky(['-c', nokey, 'ls']);
    assert.equal(k.code, 1);
    assert.match(k.stderr, /no encryption_key/);
  });

  test('wrong key: refused at once with a clear message, exit 1, nothing touched', async () => {
    const wrong = path.join(repo.dir, 'wrong.cfg');
    fs.writeFileSync(wrong, fs.readFileSync(repo.cfg, 'utf8').replace(repo.key, randomBytes(32).toString('hex')));
    for (const args of [['ls'], ['restore', uid, `file://${repo.dir}/wrongkey.out`], ['backup', `file://${img}`, 'x']]) {
      const r = await runBacky(['-c', wrong, ...args]);
      assert.equal(r.code, 1, args.join(' '));
      assert.match(r.stderr, /encryption key does not match/);
      assert.doesNotMatch(r.stderr, /at .*\.js:\d+/, 'no stack trace');
    }
    assert.ok(!fs.existsSync(`${repo.dir}/wrongkey.out`));
    assert.equal((await lsJson(repo)).length, 1);
  });

  test('restore refuses an existing target unless -f', async () => {
    const out = path.join(repo.dir, 'exists.out');
    fs.writeFileSync(out, 'precious');
    const r = await repo.run(['restore', uid, `file://${out}`]);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /already exists/);
    assert.equal(fs.readFileSync(out, 'utf8'), 'precious');
    await repo.ok(['restore', '-f', uid, `file://${out}`]);
    assert.equal(sha256File(out), sha256File(img));
  });

  test('flipped bit: restore reports the offset and exits 6, scrub exits 20 and invalidates; a repaired blob scrubs valid again', async () => {
    const file = blobFileOf(repo, uid, 2);
    const original = fs.readFileSync(file);
    const bad = Buffer.from(original);
    bad[bad.length >> 1] ^= 0x10;
    fs.writeFileSync(file, bad);
    const out = path.join(repo.dir, 'flip.out');
    const r = await repo.run(['restore', uid, `file://${out}`]);
    assert.equal(r.code, 6);
    assert.match(r.stderr, new RegExp(`offset ${2 * BS}.*authentication failed`));
    // Everything else was restored.
    const got = fs.readFileSync(out);
    const want = fs.readFileSync(img);
    assert.ok(got.subarray(0, 2 * BS).equals(want.subarray(0, 2 * BS)));
    assert.ok(got.subarray(3 * BS).equals(want.subarray(3 * BS)));
    const s = await repo.run(['scrub', uid]);
    assert.equal(s.code, 20);
    assert.equal((await lsJson(repo, 'img'))[0].valid, false);
    // A new backup of the same data stores the bad block again (repairs the blob for every version).
    const again = JSON.parse((await repo.ok(['--json', 'backup', `file://${img}`, 'img'])).stdout);
    assert.equal(again.blocksWritten, 1, 'the bad blob is written again');
    await repo.ok(['scrub', uid]);
    assert.equal((await lsJson(repo, 'img')).find((v) => v.uid === uid)!.valid, true, 'valid again after a clean full scrub');
    fs.rmSync(out);
    await repo.ok(['restore', uid, `file://${out}`]);
    assert.equal(sha256File(out), sha256File(img));
  });

  test('deleted blob: restore exit 6 with the offset, the rest restored; scrub exit 20; scrub -s compares with the source', async () => {
    const img2 = path.join(repo.dir, 'img2');
    writeImage(img2, 3 * BS, 'random');
    const u2 = (await repo.ok(['backup', `file://${img2}`, 'img2'])).stdout.trim();
    await repo.ok(['scrub', '-s', `file://${img2}`, u2]);
    const other = path.join(repo.dir, 'img2-changed');
    fs.copyFileSync(img2, other);
    const fd = fs.openSync(other, 'r+');
    fs.writeSync(fd, Buffer.from('changed'), 0, 7, BS + 5);
    fs.closeSync(fd);
    const mismatch = await repo.run(['scrub', '-s', `file://${other}`, u2]);
    assert.equal(mismatch.code, 20);
    assert.match(mismatch.stderr, new RegExp(`offset ${BS}: source and backup differ`));
    fs.rmSync(blobFileOf(repo, u2, 1));
    const out = path.join(repo.dir, 'del.out');
    const r = await repo.run(['restore', u2, `file://${out}`]);
    assert.equal(r.code, 6);
    assert.match(r.stderr, new RegExp(`offset ${BS}.*missing`));
    const got = fs.readFileSync(out);
    const want = fs.readFileSync(img2);
    assert.ok(got.subarray(0, BS).equals(want.subarray(0, BS)));
    assert.ok(got.subarray(2 * BS).equals(want.subarray(2 * BS)));
    assert.equal((await repo.run(['scrub', '-p', '100', u2])).code, 20);
    assert.equal((await lsJson(repo, 'img2'))[0].valid, false);
  });

  test('rm: protected and young versions refused (exit 100), -f overrides age only', async () => {
    const small = path.join(repo.dir, 'rm.img');
    writeImage(small, 1000);
    const u = (await repo.ok(['backup', `file://${small}`, 'rm'])).stdout.trim();
    await repo.ok(['protect', u]);
    const p = await repo.run(['rm', '-f', u]);
    assert.equal(p.code, 100);
    assert.match(p.stderr, /protected/);
    await repo.ok(['unprotect', u]);
    const y = await repo.run(['rm', u]);
    assert.equal(y.code, 100);
    assert.match(y.stderr, /younger than 6 days/);
    await repo.ok(['rm', '-f', u]);
    assert.equal((await lsJson(repo, 'rm')).length, 0);
  });

  test('cleanup: grace period, then deletion; --full removes unknown objects and keeps known ones', async () => {
    const small = path.join(repo.dir, 'gc.img');
    writeImage(small, 2 * BS, 'random');
    const u = (await repo.ok(['backup', `file://${small}`, 'gc'])).stdout.trim();
    const before = blobFiles(repo).length;
    await repo.ok(['rm', '-f', u]);
    const first = JSON.parse((await repo.ok(['--json', 'cleanup'])).stdout);
    assert.equal(first.deleted, 0, 'inside the grace period nothing is deleted');
    assert.ok(first.waiting >= 2, `the two blobs wait: ${first.waiting}`);
    assert.equal(blobFiles(repo).length, before);
    // Let the grace period pass: move the unreferenced stamps an hour and a minute back.
    const db = new Database(path.join(repo.dir, 'backy.sqlite'));
    db.prepare('UPDATE blobs SET unref_since = unref_since - 3660000 WHERE unref_since IS NOT NULL').run();
    db.close();
    const second = JSON.parse((await repo.ok(['--json', 'cleanup'])).stdout);
    assert.equal(second.deleted, first.waiting);
    assert.equal(second.waiting, 0);
    assert.equal(blobFiles(repo).length, before - second.deleted);
    // Leftovers: an object no database row knows, and a temporary file of an interrupted write.
    const orphan = path.join(repo.dir, 'data', 'ab', 'cd', 'abcd' + '0'.repeat(28));
    fs.mkdirSync(path.dirname(orphan), { recursive: true });
    fs.writeFileSync(orphan, 'junk');
    fs.writeFileSync(path.join(path.dirname(orphan), '.tmp.abcd0000.1234'), 'partial');
    const full = JSON.parse((await repo.ok(['--json', 'cleanup', '--full'])).stdout);
    assert.equal(full.orphansDeleted, 2);
    assert.ok(!fs.existsSync(orphan));
    const out = path.join(repo.dir, 'gc.out');
    await repo.ok(['restore', uid, `file://${out}`]);
    assert.equal(sha256File(out), sha256File(img), 'known blobs were kept');
  });

  test('cleanup --dangerous-force deletes unreferenced blobs at once, never referenced ones', async () => {
    const small = path.join(repo.dir, 'df.img');
    writeImage(small, BS + 1, 'random');
    const keep = (await repo.ok(['backup', `file://${small}`, 'df'])).stdout.trim();
    const gone = (await repo.ok(['backup', `file://${small}`, 'df'])).stdout.trim();
    await repo.ok(['rm', '-f', gone]);
    const r = JSON.parse((await repo.ok(['--json', 'cleanup', '--dangerous-force'])).stdout);
    assert.equal(r.waiting, 0);
    await repo.ok(['scrub', keep]);
    const out = path.join(repo.dir, 'df.out');
    await repo.ok(['restore', keep, `file://${out}`]);
    assert.equal(sha256File(out), sha256File(small), 'blobs still used by another version were kept');
    const again = JSON.parse((await repo.ok(['--json', 'cleanup', '--dangerous-force'])).stdout);
    assert.equal(again.deleted, 0, 'nothing unreferenced is left');
  });

  test('storage errors exit 6: data directory missing', async () => {
    const moved = path.join(repo.dir, 'data-moved');
    fs.renameSync(path.join(repo.dir, 'data'), moved);
    try {
      const r = await repo.run(['restore', uid, `file://${repo.dir}/nodata.out`]);
      assert.equal(r.code, 6);
      assert.match(r.stderr, /data directory .* does not exist/);
    } finally {
      fs.renameSync(moved, path.join(repo.dir, 'data'));
    }
  });

  test('source errors exit 1: missing source, source that shrinks during the backup', async () => {
    const r = await repo.run(['backup', `file://${repo.dir}/nosuchfile`, 'x']);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /cannot open source/);
    // Small blocks and a slow store: few bytes are read ahead, so the source shrinks under the reader.
    const slowCfg = path.join(repo.dir, 'slow.cfg');
    fs.writeFileSync(slowCfg, fs.readFileSync(repo.cfg, 'utf8').replace(/block_size = \d+/, 'block_size = 65536') + '\n[DataBackend]\nbandwidth_write = 2M\n');
    const shrink = path.join(repo.dir, 'shrink.img');
    writeImage(shrink, 16 * MiB, 'random');
    const p = runBacky(['-c', slowCfg, 'backup', `file://${shrink}`, 'shrink']);
    await new Promise((res) => setTimeout(res, 1500));
    fs.truncateSync(shrink, 5 * MiB);
    const res = await p;
    assert.equal(res.code, 1, res.stderr);
    assert.match(res.stderr, /ended at offset/);
    const v = (await lsJson(repo, 'shrink'))[0];
    assert.equal(v.valid, false);
  });
});

describe('kill -9 and continue', () => {
  let repo: TestRepo;
  before(async () => {
    repo = makeTestRepo('[DataBackend]\nbandwidth_write = 16M\n');
    await repo.ok(['initdb']);
  });
  after(() => repo.cleanup());

  test('a backup killed with SIGKILL leaves an invalid version; locks are released; -c continues it byte-identical', async () => {
    const img = path.join(repo.dir, 'kill.img');
    writeImage(img, 24 * BS + 999, 'random');
    const child = spawn(process.execPath, [BACKY, '-c', repo.cfg, 'backup', `file://${img}`, 'kill'], { stdio: 'ignore' });
    // Kill once some blocks are stored (not after a fixed time: a loaded machine may not have started yet),
    // and while most are still to do (16 MiB/s: about 6 of 25 blocks per second).
    const blobs = () => countFiles(path.join(repo.dir, 'data'));
    for (let i = 0; i < 600 && blobs() < 3; i++) await new Promise((res) => setTimeout(res, 50));
    assert.ok(blobs() >= 3 && blobs() < 20, `killed mid-backup (${blobs()} blobs stored)`);
    child.kill('SIGKILL');
    await new Promise((res) => child.on('close', res));
    const v = JSON.parse((await repo.ok(['--json', 'ls', 'kill'])).stdout)[0];
    assert.equal(v.valid, false);
    const stored = JSON.parse((await repo.ok(['--json', 'stats'])).stdout);
    assert.equal(stored.length, 0, 'no statistics for an unfinished backup');
    // The dead holder's locks do not block anybody: a scrub is allowed (and reports the missing blocks).
    const s = await repo.run(['scrub', v.uid]);
    assert.equal(s.code, 20);
    assert.match(s.stderr, /never backed up/);
    const c = JSON.parse((await repo.ok(['--json', 'backup', '-c', v.uid, `file://${img}`, 'kill'])).stdout);
    assert.equal(c.uid, v.uid);
    assert.ok(c.blocksRead < 25, `only the rest was read (${c.blocksRead} blocks)`);
    const out = path.join(repo.dir, 'kill.out');
    await repo.ok(['restore', v.uid, `file://${out}`]);
    assert.equal(sha256File(out), sha256File(img));
    await repo.ok(['scrub', v.uid]);
    assert.equal((await repo.run(['backup', '-c', v.uid, `file://${img}`, 'kill'])).code, 100, 'a complete version cannot be continued');
  });

  test('a running backup holds its locks: rm of it and cleanup --full are refused with the holder named', async () => {
    const img = path.join(repo.dir, 'busy.img');
    writeImage(img, 24 * BS, 'random');
    const p = repo.run(['backup', `file://${img}`, 'busy']);
    let uid = '';
    for (let i = 0; i < 50 && !uid; i++) {
      await new Promise((res) => setTimeout(res, 100));
      const l = JSON.parse((await repo.ok(['--json', 'ls', 'busy'])).stdout);
      if (l.length) uid = l[0].uid;
    }
    assert.ok(uid, 'the version appears while the backup runs');
    const rm = await repo.run(['rm', '-f', uid]);
    assert.equal(rm.code, 100);
    assert.match(rm.stderr, /backup of .* is running \(pid \d+/);
    const full = await repo.run(['cleanup', '--full']);
    assert.equal(full.code, 100);
    assert.match(full.stderr, /backup of busy is running/);
    const done = await p;
    assert.equal(done.code, 0, done.stderr);
    await repo.ok(['rm', '-f', uid]);
  });
});

describe('interrupting a backup', () => {
  test('SIGINT stops the backup cleanly: one message with the continue command, exit 100, version continuable', async (t) => {
    const repo = makeTestRepo('[DataBackend]\nbandwidth_write = 16M\n');
    t.after(() => repo.cleanup());
    await repo.ok(['initdb']);
    const img = path.join(repo.dir, 'int.img');
    writeImage(img, 32 * BS, 'random');
    const child = spawn(process.execPath, [BACKY, '-c', repo.cfg, 'backup', `file://${img}`, 'int'], { stdio: ['ignore', 'pipe', 'pipe'] });
    let stderr = '';
    child.stderr.on('data', (d) => (stderr += d));
    await new Promise((res) => setTimeout(res, 1500));
    child.kill('SIGINT');
    const code = await new Promise<number>((res) => child.on('close', (c) => res(c ?? -1)));
    assert.equal(code, 100, stderr);
    assert.match(stderr, /interrupted by SIGINT: version (\S+) is incomplete; continue it with "backy backup -c \1 /);
    const v = JSON.parse((await repo.ok(['--json', 'ls', 'int'])).stdout)[0];
    assert.equal(v.valid, false);
    await repo.ok(['backup', '-c', v.uid, `file://${img}`, 'int']);
    const out = path.join(repo.dir, 'int.out');
    await repo.ok(['restore', v.uid, `file://${out}`]);
    assert.equal(sha256File(out), sha256File(img));
  });
});

/** Regular files below `dir` whose names look like blobs (not temporary files, not the marker). */
function countFiles(dir: string): number {
  let n = 0;
  for (const e of fs.readdirSync(dir, { withFileTypes: true, recursive: true })) {
    if (e.isFile() && /^[0-9a-f]{32}$/.test(e.name)) n++;
  }
  return n;
}
