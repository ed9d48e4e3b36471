/**
 * Command-line hardening: labels that would forge machine output are refused, and ones already in a database
 * are escaped; `init` writes paths that read back the same; the AWS SDK's Node version warning (and only it) is
 * silenced; every native module's install script is declared in package.json.
 */
import { after, before, describe, test } from 'node:test';
import * as assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { spawnSync } from 'node:child_process';
import Database from 'better-sqlite3';
import { makeTestRepo, runBacky, TestRepo, writeImage } from './helpers/cli';
import { sha256File } from './helpers/images';
import { startS3Server, S3Server } from './helpers/s3-server';

const MiB = 1024 * 1024;

/** Splits a machine-output line at the `|` that are not escaped. */
function cells(line: string): string[] {
  const out: string[] = [];
  let cur = '';
  for (let k = 0; k < line.length; k++) {
    if (line[k] === '\\') {
      cur += line[k] + (line[k + 1] ?? '');
      k++;
    } else if (line[k] === '|') {
      out.push(cur);
      cur = '';
    } else {
      cur += line[k];
    }
  }
  out.push(cur);
  return out;
}

describe('names, snapshot names and tags in machine output', () => {
  let repo: TestRepo;
  let img: string;
  before(async () => {
    repo = makeTestRepo('', { blockSize: MiB });
    await repo.ok(['initdb']);
    img = path.join(repo.dir, 'img');
    writeImage(img, 2 * MiB, 'random');
  });
  after(() => repo.cleanup());

  test('refused at backup time and by add-tag: exit 1, one clear line, nothing stored', async () => {
    const uid = (await repo.ok(['backup', `file://${img}`, 'good'])).stdout.trim();
    const cases: [string[], RegExp][] = [
      [['backup', `file://${img}`, 'vm\n2024-01-01 00:00:00|forged|1|1|x|1|0||'], /invalid name "vm\\n2024-01-01 00:00:00\\\|forged.*": it contains "\\n" \(U\+000A\)/],
      [['backup', '-s', 'snap|x', `file://${img}`, 'vm'], /invalid snapshot name "snap\\\|x": it contains "\|" \(U\+007C\)/],
      [['backup', '-t', 'ok,\u001b[31mred', `file://${img}`, 'vm'], /invalid tag "\\u001b\[31mred": it contains "\\u001b" \(U\+001B\)/],
      [['add-tag', uid, 'a|b'], /invalid tag "a\\\|b"/],
      [['add-tag', uid, 'line\rbreak'], /invalid tag "line\\rbreak"/],
    ];
    for (const [args, message] of cases) {
      const r = await repo.run(args);
      assert.equal(r.code, 1, `${JSON.stringify(args)}: ${r.stderr}`);
      const lines = r.stderr.trim().split('\n');
      assert.equal(lines.length, 1, r.stderr);
      assert.match(lines[0], message);
      assert.match(lines[0], /names, snapshot names and tags may not contain "\|" or control characters$/);
    }
    const versions = JSON.parse((await repo.ok(['--json', 'ls'])).stdout) as { uid: string; tags: string }[];
    assert.deepEqual(versions.map((v) => v.uid), [uid], 'no version was stored');
    assert.doesNotMatch(versions[0].tags, /a\|b|line/, 'no tag was stored');
  });

  test('labels already in a database are escaped in -m and tables, and exact in --json', async () => {
    const uid = (await repo.ok(['backup', `file://${img}`, 'plain'])).stdout.trim();
    // As an older backy (or another tool) may have stored them.
    const name = 'evil\n2024-01-01 00:00:00|forged|1|1|ffff|1|0||';
    const snapshot = 'snap|shot\\x';
    const tag = 't\u001b]0;title\u0007';
    const db = new Database(path.join(repo.dir, 'backy.sqlite'));
    db.prepare('UPDATE versions SET name = ?, snapshot_name = ? WHERE uid = ?').run(name, snapshot, uid);
    db.prepare('INSERT INTO tags (version_id, name) SELECT id, ? FROM versions WHERE uid = ?').run(tag, uid);
    db.close();

    const m = (await repo.ok(['-m', 'ls'])).stdout;
    const lines = m.trim().split('\n');
    const versions = (JSON.parse((await repo.ok(['--json', 'ls'])).stdout) as unknown[]).length;
    assert.equal(lines.length, 1 + versions, `one line per version:\n${m}`);
    const header = lines[0].split('|');
    for (const l of lines.slice(1)) assert.equal(cells(l).length, header.length, `a forged column in: ${l}`);
    const row = Object.fromEntries(cells(lines.find((l) => l.includes(uid))!).map((c, k) => [header[k], c]));
    assert.equal(row.name, 'evil\\n2024-01-01 00:00:00\\|forged\\|1\\|1\\|ffff\\|1\\|0\\|\\|');
    assert.equal(row.snapshot_name, 'snap\\|shot\\\\x');
    // Tags are one comma-separated cell (automatic schedule tags besides).
    assert.ok(row.tags.split(',').includes('t\\u001b]0;title\\u0007'), row.tags);

    const table = (await repo.ok(['ls'])).stdout;
    assert.equal(table.trim().split('\n').length, 4 + versions, `one table line per version:\n${table}`);
    assert.doesNotMatch(table, /[\u0000-\u0008\u000b-\u001f\u007f]/, 'no control characters reach the terminal');

    const json = (JSON.parse((await repo.ok(['--json', 'ls'])).stdout) as { uid: string; name: string; snapshot_name: string; tags: string }[])
      .find((v) => v.uid === uid)!;
    assert.deepEqual([json.name, json.snapshot_name], [name, snapshot]);
    assert.ok(json.tags.split(',').includes(tag));

    // Such a tag can still be removed.
    await repo.ok(['remove-tag', uid, tag]);
    const left = (JSON.parse((await repo.ok(['--json', 'ls'])).stdout) as { uid: string; tags: string }[]).find((v) => v.uid === uid)!.tags;
    assert.ok(!left.split(',').includes(tag), left);
  });
});

describe('backy init DIR', () => {
  const dirs: string[] = [];
  after(() => {
    for (const d of dirs) fs.rmSync(d, { recursive: true, force: true });
  });

  test('a directory with spaces, "#" and ";" gets a configuration that reads back the same paths', async () => {
    const top = fs.mkdtempSync(path.join(os.tmpdir(), 'backy-init-'));
    dirs.push(top);
    const dir = path.join(top, ' my backups #1 ; "q" ');
    const r = await runBacky(['init', dir], { cwd: top });
    assert.equal(r.code, 0, r.stderr);
    const cfg = path.join(dir, 'backy.cfg');
    const img = path.join(top, 'img');
    writeImage(img, 2 * MiB + 7, 'random');
    const uid = (await runBacky(['-c', cfg, 'backup', `file://${img}`, 'spaces'], { cwd: top })).stdout.trim();
    assert.match(uid, /^[0-9a-f-]{36}$/);
    // Everything landed where init said: the database, the log and the blobs inside DIR, nothing beside it.
    assert.ok(fs.existsSync(path.join(dir, 'backy.sqlite')));
    assert.match(fs.readFileSync(path.join(dir, 'backy.log'), 'utf8'), new RegExp(uid));
    assert.ok(fs.readdirSync(path.join(dir, 'data'), { recursive: true }).map(String).some((f) => /^[0-9a-f]{2}\/[0-9a-f]{2}\/[0-9a-f]{32}$/.test(f)));
    assert.deepEqual(fs.readdirSync(top).sort(), [path.basename(dir), 'img'].sort());
    const out = path.join(top, 'out');
    assert.equal((await runBacky(['-c', cfg, 'restore', uid, `file://${out}`], { cwd: top })).code, 0);
    assert.equal(sha256File(out), sha256File(img));
  });

  test('a directory name with a line break is refused with one line', async () => {
    const top = fs.mkdtempSync(path.join(os.tmpdir(), 'backy-init-'));
    dirs.push(top);
    const r = await runBacky(['init', path.join(top, 'two\nlines')], { cwd: top });
    assert.equal(r.code, 1, r.stderr);
    assert.equal(r.stderr.trim().split('\n').length, 1, r.stderr);
    assert.match(r.stderr, /cannot write a configuration for .*: a configuration value cannot contain a line break/);
  });
});

describe('warnings', () => {
  let s3: S3Server;
  before(async () => {
    s3 = await startS3Server();
  });
  after(async () => {
    await s3?.stop();
  });

  test('S3 commands do not print the AWS SDK Node version warning, and other warnings still show', async () => {
    const repo = makeTestRepo(s3.config({ max_retries: 1 }), { blockSize: 256 * 1024 });
    try {
      // Another warning of the same process, emitted after the SDK is loaded: it must still reach stderr.
      const preload = path.join(repo.dir, 'warn.js');
      fs.writeFileSync(preload, `setTimeout(() => process.emitWarning('a warning of somebody else', 'TestWarning'), 200).unref();\n`);
      await repo.ok(['initdb']);
      const img = path.join(repo.dir, 'img');
      writeImage(img, MiB, 'random');
      const env = { NODE_OPTIONS: `--require ${preload}` };
      const runs = [
        await repo.run(['backup', `file://${img}`, 's3'], { env }),
        await repo.run(['ls'], { env }),
        await repo.run(['cleanup', '--full'], { env }),
      ];
      for (const r of runs) {
        assert.equal(r.code, 0, r.stderr);
        assert.doesNotMatch(r.stderr, /NodeVersionSupportWarning|AWS SDK for JavaScript|node >=22/);
      }
      const slow = await repo.run(['restore', '-f', JSON.parse((await repo.ok(['--json', 'ls'])).stdout)[0].uid, `file://${repo.dir}/out`], { env });
      assert.equal(slow.code, 0, slow.stderr);
      assert.doesNotMatch(slow.stderr, /NodeVersionSupportWarning/);
      assert.ok(runs.concat(slow).some((r) => /TestWarning: a warning of somebody else/.test(r.stderr)), 'other warnings are not silenced');
    } finally {
      repo.cleanup();
    }
  });

  test('every dependency install script is reviewed in package.json (npm allowScripts)', (t) => {
    const root = path.resolve(__dirname, '../..');
    const v = spawnSync('npm', ['--version'], { encoding: 'utf8' }).stdout.trim().split('.').map(Number);
    if (!(v[0] > 11 || (v[0] === 11 && v[1] >= 16))) return t.skip(`npm ${v.join('.')} has no allowScripts`);
    const r = spawnSync('npm', ['approve-scripts', '--allow-scripts-pending'], { cwd: root, encoding: 'utf8', timeout: 120_000 });
    assert.equal(r.status, 0, r.stderr);
    assert.match(r.stdout, /No packages with unreviewed install scripts/, r.stdout);
    const pkg = JSON.parse(fs.readFileSync(path.join(root, 'package.json'), 'utf8')) as { allowScripts: Record<string, boolean> };
    for (const native of ['better-sqlite3', 'fuse-native', 'zstd-napi']) assert.equal(pkg.allowScripts[native], true, native);
  });
});
