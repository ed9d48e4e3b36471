import { after, before, describe, test } from 'node:test';
import * as assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { makeTestRepo, TestRepo, writeImage } from './helpers/cli';
import { sha256File } from './helpers/images';

const MiB = 1024 * 1024;

describe('backup and restore round trips', () => {
  let repo: TestRepo;
  before(async () => {
    repo = makeTestRepo();
    await repo.ok(['initdb']);
  });
  after(() => repo.cleanup());

  const sizes: [string, number][] = [
    ['empty', 0], ['1 byte', 1], ['4 MiB - 1', 4 * MiB - 1], ['4 MiB + 1', 4 * MiB + 1], ['10 MiB + 513', 10 * MiB + 513],
  ];
  for (const [label, size] of sizes) {
    test(`${label}: restore equals the original`, async () => {
      const img = path.join(repo.dir, `img-${size}`);
      writeImage(img, size, 'random', size);
      const b = await repo.ok(['backup', `file://${img}`, `rt-${size}`]);
      const uid = b.stdout.trim().split('\n').pop()!;
      assert.match(uid, /^[0-9a-f-]{36}$/);
      const out = path.join(repo.dir, `out-${size}`);
      await repo.ok(['restore', uid, `file://${out}`]);
      assert.equal(fs.statSync(out).size, size);
      assert.equal(sha256File(out), sha256File(img));
      await repo.ok(['scrub', uid]);
      const quick = path.join(repo.dir, `quick-${size}`);
      await repo.ok(['restore', '--no-sync', uid, `file://${quick}`]);
      assert.equal(sha256File(quick), sha256File(img), 'restore --no-sync');
    });
  }

  test('zero-heavy image: zero blocks are holes, never stored; sparse restore keeps them holes', async () => {
    const img = path.join(repo.dir, 'zero-heavy');
    const fd = fs.openSync(img, 'w');
    fs.ftruncateSync(fd, 64 * MiB + 100);
    fs.writeSync(fd, Buffer.alloc(4 * MiB, 0x5a), 0, 4 * MiB, 8 * MiB);
    fs.writeSync(fd, Buffer.from('tail'), 0, 4, 64 * MiB + 96);
    fs.closeSync(fd);
    const r = await repo.ok(['--json', 'backup', `file://${img}`, 'zeros']);
    const stats = JSON.parse(r.stdout);
    assert.equal(stats.blocksSparse, 15, 'fifteen all-zero blocks');
    assert.equal(stats.blocksWritten, 2);
    assert.ok(stats.bytesWritten < 100 * 1024, `compressed: ${stats.bytesWritten}`);
    const out = path.join(repo.dir, 'zero-heavy.out');
    await repo.ok(['restore', '-s', stats.uid, `file://${out}`]);
    assert.equal(sha256File(out), sha256File(img));
    const allocated = fs.statSync(out).blocks * 512;
    assert.ok(allocated <= 9 * MiB, `holes stay holes: ${allocated} bytes allocated`);
    const full = path.join(repo.dir, 'zero-heavy.full');
    await repo.ok(['restore', stats.uid, `file://${full}`]);
    assert.equal(sha256File(full), sha256File(img));
    assert.ok(fs.statSync(full).blocks * 512 >= 64 * MiB, 'without -s the zeroes are written');
  });

  test('duplicate-heavy image: each distinct block stored once, also within the running backup', async () => {
    const img = path.join(repo.dir, 'dups');
    const a = Buffer.alloc(4 * MiB, 1);
    const b = Buffer.alloc(4 * MiB, 2);
    a.write('block-a-unique-header');
    b.write('block-b-unique-header');
    const fd = fs.openSync(img, 'w');
    for (let i = 0; i < 12; i++) fs.writeSync(fd, i % 2 ? b : a, 0, a.length, i * a.length);
    fs.closeSync(fd);
    const r = JSON.parse((await repo.ok(['--json', 'backup', `file://${img}`, 'dups'])).stdout);
    assert.equal(r.blocksWritten, 2);
    assert.equal(r.blocksDedup, 10);
    const again = JSON.parse((await repo.ok(['--json', 'backup', `file://${img}`, 'dups2'])).stdout);
    assert.equal(again.blocksWritten, 0, 'global dedup across names');
    const out = path.join(repo.dir, 'dups.out');
    await repo.ok(['restore', again.uid, `file://${out}`]);
    assert.equal(sha256File(out), sha256File(img));
  });

  test('ls: table, -m with header, -s without, --json, filters and fields', async () => {
    const img = path.join(repo.dir, 'small');
    writeImage(img, 5000);
    const uid = (await repo.ok(['backup', '-s', 'snap1', '-t', 'daily,keep', '-e', '2099-01-01', `file://${img}`, 'lsname'])).stdout.trim();
    const m = (await repo.ok(['-m', 'ls', 'lsname'])).stdout.trim().split('\n');
    assert.equal(m[0], 'date|name|snapshot_name|size|size_bytes|uid|valid|protected|tags|expire');
    const f = m[1].split('|');
    assert.deepEqual(f.slice(1), ['lsname', 'snap1', '1', '5000', uid, '1', '0', 'daily,keep', '2099-01-01 00:00:00']);
    const noHeader = (await repo.ok(['-m', '-s', 'ls', '-f', 'uid,valid', 'lsname'])).stdout.trim();
    assert.equal(noHeader, `${uid}|1`);
    const json = JSON.parse((await repo.ok(['--json', 'ls', '-t', 'keep'])).stdout);
    assert.equal(json.length, 1);
    assert.equal(json[0].uid, uid);
    assert.equal(json[0].valid, true);
    assert.equal((await repo.ok(['-m', '-s', 'ls', '-s', 'nosuchsnap'])).stdout, '');
    const table = (await repo.ok(['ls', 'lsname'])).stdout;
    assert.match(table, /\| lsname +\| snap1/);
    assert.equal((await repo.run(['ls', '-f', 'nosuchfield'])).code, 2);
    const human = (await repo.ok(['-m', '-r', '-s', 'ls', '-f', 'size_bytes', 'lsname'])).stdout.trim();
    assert.equal(human, '4.88 KiB');
    const st = (await repo.ok(['-m', 'stats', uid])).stdout.trim().split('\n');
    assert.equal(st.length, 2);
    assert.match(st[0], /^date\|uid\|name\|size bytes/);
    assert.equal((await repo.ok(['-m', '-s', 'stats', '-l', '2'])).stdout.trim().split('\n').length, 2);
  });

  test('backup -m prints the uid alone; logs never reach stdout', async () => {
    const img = path.join(repo.dir, 'm');
    writeImage(img, 10000);
    const r = await repo.ok(['-m', 'backup', `file://${img}`, 'mname']);
    assert.match(r.stdout, /^[0-9a-f-]{36}\n$/);
    assert.doesNotMatch(r.stderr, /complete and valid/, '-m keeps the console to errors');
    const log = fs.readFileSync(path.join(repo.dir, 'backy.log'), 'utf8');
    assert.match(log, /complete and valid/);
    assert.ok(!log.includes(repo.key), 'the key never appears in the log');
  });

  test('tags, expire, protect via their commands', async () => {
    const img = path.join(repo.dir, 't');
    writeImage(img, 1000);
    const uid = (await repo.ok(['backup', `file://${img}`, 'tagged'])).stdout.trim();
    await repo.ok(['add-tag', uid, 'a,b']);
    await repo.ok(['remove-tag', uid, 'a']);
    await repo.ok(['expire', uid, '2001-02-03']);
    await repo.ok(['protect', uid]);
    const row = JSON.parse((await repo.ok(['--json', 'ls', 'tagged'])).stdout)[0];
    assert.equal(row.tags, 'b,b_daily,b_monthly,b_weekly', 'b besides the automatic tags of a first backup');
    assert.equal(row.protected, true);
    assert.equal(row.expire, '2001-02-03T00:00:00.000Z');
    assert.equal(JSON.parse((await repo.ok(['--json', 'ls', '-e'])).stdout).length, 1, 'listed as expired');
    await repo.ok(['unprotect', uid]);
    await repo.ok(['expire', uid, '']);
    assert.equal(JSON.parse((await repo.ok(['--json', 'ls', 'tagged'])).stdout)[0].expire, '');
  });
});
