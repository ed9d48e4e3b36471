import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { runBacky, writeImage } from './helpers/cli';
import { sha256File } from './helpers/images';

function tmp(): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), 'backy-init-'));
}

test('init DIR: config with a fresh key (mode 600), database and data directory; never overwrites', async (t) => {
  const dir = tmp();
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  const repo = path.join(dir, 'repo');
  const r = await runBacky(['init', repo], { cwd: dir });
  assert.equal(r.code, 0, r.stderr);
  const cfgFile = path.join(repo, 'backy.cfg');
  const text = fs.readFileSync(cfgFile, 'utf8');
  const key = /encryption_key = ([0-9a-f]{64})/.exec(text)?.[1];
  assert.ok(key, 'a 64-hex key');
  assert.equal(fs.statSync(cfgFile).mode & 0o777, 0o600);
  assert.ok(fs.existsSync(path.join(repo, 'backy.sqlite')));
  assert.ok(fs.statSync(path.join(repo, 'data')).isDirectory());
  assert.ok(!r.stderr.includes(key!), 'the key is not printed');
  const again = await runBacky(['init', repo], { cwd: dir });
  assert.equal(again.code, 0);
  assert.match(again.stderr, /exists: left unchanged/);
  assert.equal(fs.readFileSync(cfgFile, 'utf8'), text);
  const img = path.join(dir, 'img');
  writeImage(img, 5 * 1024 * 1024 + 3);
  const uid = (await runBacky(['-c', cfgFile, '-m', 'backup', `file://${img}`, 'x'])).stdout.trim();
  await runBacky(['-c', cfgFile, 'restore', uid, `file://${dir}/out`]);
  assert.equal(sha256File(`${dir}/out`), sha256File(img));
});

test('init without DIR works in the current directory, and later commands find ./backy.cfg', async (t) => {
  const dir = tmp();
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  const env = { HOME: dir };
  assert.equal((await runBacky(['init'], { cwd: dir, env })).code, 0);
  assert.ok(fs.existsSync(path.join(dir, 'backy.cfg')));
  assert.ok(fs.existsSync(path.join(dir, 'backy-data', 'backy.sqlite')));
  const ls = await runBacky(['-m', 'ls'], { cwd: dir, env });
  assert.equal(ls.code, 0, ls.stderr);
  assert.equal(ls.stdout.trim(), 'date|name|snapshot_name|size|size_bytes|uid|valid|protected|tags|expire');
});

test('configuration lookup: ~/.backy.cfg then ./backy.cfg, later files win, defaults fill the rest', async (t) => {
  const dir = tmp();
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  const home = path.join(dir, 'home');
  fs.mkdirSync(home);
  const env = { HOME: home };
  assert.equal((await runBacky(['init'], { cwd: dir, env })).code, 0);
  // ~/.backy.cfg asks for 1 MiB blocks; ./backy.cfg (read later) for 2 MiB: 2 MiB wins.
  fs.writeFileSync(path.join(home, '.backy.cfg'), '[DEFAULTS]\nblock_size = 1048576\ndisallow_rm_when_younger_than_days = 0\n');
  fs.appendFileSync(path.join(dir, 'backy.cfg'), '\n[DEFAULTS]\nblock_size = 2097152\n');
  const img = path.join(dir, 'img');
  writeImage(img, 8 * 1024 * 1024);
  const uid = (await runBacky(['-m', 'backup', `file://${img}`, 'lookup'], { cwd: dir, env })).stdout.trim();
  const row = (await runBacky(['-m', '-s', 'ls', '-f', 'size'], { cwd: dir, env })).stdout.trim();
  assert.equal(row, '4', 'four 2 MiB blocks');
  // disallow_rm_when_younger_than_days = 0 from ~/.backy.cfg still applies: rm without -f works.
  const rm = await runBacky(['rm', uid], { cwd: dir, env });
  assert.equal(rm.code, 0, rm.stderr);
});

test('a key written in the wrong section: every command says so on stderr and in the log, and still runs', async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'backy-misplaced-'));
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  const cfg = path.join(dir, 'backy.cfg');
  fs.writeFileSync(cfg, `[DEFAULTS]\nlogfile = ${dir}/backy.log\nencryption = none\n[MetaBackend]\nengine = sqlite:///${dir}/db.sqlite\n` +
    `[DataBackend]\npath = ${dir}/data\ncache_size = 256M\n`);
  const init = await runBacky(['-c', cfg, 'initdb']);
  assert.equal(init.code, 0, init.stderr);
  const ls = await runBacky(['-c', cfg, 'ls']);
  assert.equal(ls.code, 0, ls.stderr);
  assert.equal(ls.stderr.trim(), 'WARN: [DataBackend] cache_size has no effect there (ignored): backy reads it in [DEFAULTS]');
  assert.match(fs.readFileSync(path.join(dir, 'backy.log'), 'utf8'), /WARN \[DataBackend\] cache_size has no effect there/);
});
