/**
 * What is fixed at initdb (encryption mode, hash function) cannot be changed by a configuration; an encrypted
 * repository never serves a plaintext blob; a `file` data directory that is not mounted is refused; zstd
 * output is bounded by the block's size.
 */
import { after, describe, test } from 'node:test';
import * as assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { execFileSync, spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import Database from 'better-sqlite3';
import { blobFileOf, makeTestRepo, restoredHash, TestRepo, writeImage } from './helpers/cli';
import { sha256File } from './helpers/images';
import { encodeBlob } from '../src/codec/blob-format';
import { fastestHash } from '../src/codec/hashes';

const MiB = 1024 * 1024;
const BS = MiB;
const isRoot = process.getuid?.() === 0;

/** The repository's config with `extra` appended ([DEFAULTS] keys), as a second file. */
function variant(repo: TestRepo, name: string, extra: string): string {
  const file = path.join(repo.dir, `${name}.cfg`);
  fs.writeFileSync(file, `${fs.readFileSync(repo.cfg, 'utf8')}\n[DEFAULTS]\n${extra}\n`);
  return file;
}

function settings(repo: TestRepo): Record<string, string> {
  const db = new Database(path.join(repo.dir, 'backy.sqlite'), { readonly: true });
  try {
    return Object.fromEntries((db.prepare('SELECT key, value FROM settings').all() as { key: string; value: string }[]).map((r) => [r.key, r.value]));
  } finally {
    db.close();
  }
}

function sql(repo: TestRepo, statement: string, ...args: unknown[]): void {
  const db = new Database(path.join(repo.dir, 'backy.sqlite'));
  try {
    db.prepare(statement).run(...args);
  } finally {
    db.close();
  }
}

function oneErrorLine(stderr: string): string {
  const lines = stderr.trim().split('\n');
  assert.equal(lines.length, 1, stderr);
  return lines[0];
}

/** Every blob file (shard directories) of a data directory. */
function blobFiles(dir: string): string[] {
  return fs.readdirSync(dir, { recursive: true }).map(String).filter((f) => /^[0-9a-f]{2}\/[0-9a-f]{2}\/[0-9a-f]{32}$/.test(f));
}

describe('settings fixed at initdb', () => {
  const repos: TestRepo[] = [];
  const fresh = (extra = '') => {
    const r = makeTestRepo(extra, { blockSize: BS });
    repos.push(r);
    return r;
  };
  after(() => {
    for (const r of repos) r.cleanup();
  });

  test('an encrypted repository refuses a configuration that switches encryption off (exit 1, one line), and writes nothing', async () => {
    const repo = fresh();
    await repo.ok(['initdb']);
    const img = path.join(repo.dir, 'img');
    writeImage(img, 3 * MiB, 'random');
    const plain = variant(repo, 'plain', 'encryption = none');
    const r = await repo.run(['-c', plain, 'backup', `file://${img}`, 'plain']);
    assert.equal(blobFiles(path.join(repo.dir, 'data')).length, 0, `blobs were written (exit ${r.code})`);
    assert.equal(r.code, 1, r.stderr);
    assert.match(oneErrorLine(r.stderr), /^ERROR: this repository is encrypted \(encryption = aes-256-gcm, fixed when it was created\); the configuration says encryption = none$/);
    assert.equal(settings(repo).encryption, 'aes-256-gcm');
  });

  test('the hash function is fixed at initdb, not by whichever configuration opens the repository first', async () => {
    const repo = fresh();
    await repo.ok(['-c', variant(repo, 'sha256', 'hash_function = sha256'), 'initdb']);
    const r = await repo.run(['-c', variant(repo, 'sha512', 'hash_function = sha512'), 'ls']);
    assert.equal(r.code, 1, r.stderr);
    assert.match(oneErrorLine(r.stderr), /this repository uses hash_function = sha256 \(fixed when it was created\); the configuration says sha512/);
    assert.equal(settings(repo).hash_function, 'sha256');
    // A configuration that does not name one uses the repository's.
    const img = path.join(repo.dir, 'img');
    writeImage(img, 3 * MiB, 'random');
    const uid = (await repo.ok(['backup', `file://${img}`, 'any'])).stdout.trim();
    assert.equal(await restoredHash(repo, uid), sha256File(img));
    assert.equal(settings(repo).hash_function, 'sha256');
  });

  test('a new repository gets the fastest hash of this machine unless the configuration names one', async () => {
    const auto = fresh();
    const r = await auto.ok(['-v', 'initdb']);
    const chosen = settings(auto).hash_function;
    assert.equal(chosen, fastestHash());
    assert.match(r.stderr, new RegExp(`hash_function = ${chosen} \\(fixed for this repository\\)`));
    const named = fresh();
    await named.ok(['-c', variant(named, 'sha512', 'hash_function = sha512'), 'initdb']);
    assert.equal(settings(named).hash_function, 'sha512');
  });

  test('an unencrypted repository refuses a configuration with encryption on', async () => {
    const repo = fresh();
    const plain = variant(repo, 'plain', 'encryption = none');
    await repo.ok(['-c', plain, 'initdb']);
    const r = await repo.run(['ls']);
    assert.equal(r.code, 1, r.stderr);
    assert.equal(settings(repo).encryption, 'none');
    assert.equal(settings(repo).key_check, undefined);
    assert.match(oneErrorLine(r.stderr), /this repository is not encrypted \(encryption = none, fixed when it was created\); set encryption = none/);
    const img = path.join(repo.dir, 'img');
    writeImage(img, 2 * MiB, 'random');
    const uid = (await repo.ok(['-c', plain, 'backup', `file://${img}`, 'plain'])).stdout.trim();
    const out = path.join(repo.dir, 'out');
    await repo.ok(['-c', plain, 'restore', uid, `file://${out}`]);
    assert.equal(sha256File(out), sha256File(img));
  });

  test('a plaintext blob in an encrypted repository is refused on read, and scrub counts it bad', async () => {
    const repo = fresh();
    await repo.ok(['initdb']);
    const img = path.join(repo.dir, 'img');
    writeImage(img, 3 * MiB, 'random');
    const uid = (await repo.ok(['backup', `file://${img}`, 'planted'])).stdout.trim();
    // The block's own data, stored as a valid unencrypted blob in place of its encrypted one.
    const block = Buffer.alloc(BS);
    const fd = fs.openSync(img, 'r');
    fs.readSync(fd, block, 0, BS, BS);
    fs.closeSync(fd);
    const sum = createHash('sha512').update(block).digest();
    fs.writeFileSync(blobFileOf(repo, uid, 1), encodeBlob(block, sum, { compression: 'none', compressionLevel: 1, hashFunction: 'sha512' }));

    const out = path.join(repo.dir, 'out');
    const r = await repo.run(['restore', uid, `file://${out}`]);
    assert.equal(r.code, 6, r.stderr);
    assert.match(r.stderr, new RegExp(`offset ${BS}: blob .* is corrupt: blob is not encrypted, but this repository is: refused`));
    const s = await repo.run(['scrub', uid]);
    assert.equal(s.code, 20, s.stderr);
    assert.match(s.stderr, /1 bad blobs/);
    // The next backup of the same data stores the block again, encrypted.
    await repo.ok(['backup', `file://${img}`, 'planted']);
    await repo.ok(['scrub', uid]);
    assert.equal(await restoredHash(repo, uid), sha256File(img));
  });

  test('repositories from before these settings get them recorded on first open, from their key and blobs', async () => {
    const img = (repo: TestRepo) => {
      const f = path.join(repo.dir, 'img');
      writeImage(f, 2 * MiB, 'random');
      return f;
    };
    // Encrypted, key fingerprint known: encrypted. (Such repositories are sha512: no other default existed.)
    const a = fresh();
    const a512 = variant(a, 'sha512', 'hash_function = sha512');
    await a.ok(['-c', a512, 'initdb']);
    await a.ok(['-c', a512, 'backup', `file://${img(a)}`, 'a']);
    sql(a, `DELETE FROM settings WHERE key IN ('encryption', 'hash_function')`);
    assert.equal((await a.run(['-c', variant(a, 'plain', 'encryption = none'), 'ls'])).code, 1);
    assert.deepEqual([settings(a).encryption, settings(a).hash_function], ['aes-256-gcm', 'sha512']);
    // Encrypted, no fingerprint: the blobs say so.
    const b = fresh();
    await b.ok(['initdb']);
    await b.ok(['backup', `file://${img(b)}`, 'b']);
    sql(b, `DELETE FROM settings WHERE key IN ('encryption', 'key_check')`);
    const r = await b.run(['-c', variant(b, 'plain', 'encryption = none'), 'ls']);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /this repository is encrypted/);
    assert.equal(settings(b).encryption, 'aes-256-gcm');
    await b.ok(['ls']);
    // Unencrypted blobs: unencrypted; a configuration with a key is refused from then on.
    const c = fresh();
    const plain = variant(c, 'plain', 'encryption = none');
    await c.ok(['-c', plain, 'initdb']);
    await c.ok(['-c', plain, 'backup', `file://${img(c)}`, 'c']);
    sql(c, `DELETE FROM settings WHERE key = 'encryption'`);
    assert.equal((await c.run(['ls'])).code, 1);
    assert.equal(settings(c).encryption, 'none');
    // No blobs yet: the configuration's mode.
    const d = fresh();
    await d.ok(['initdb']);
    sql(d, `DELETE FROM settings WHERE key IN ('encryption', 'key_check')`);
    await d.ok(['ls']);
    assert.equal(settings(d).encryption, 'aes-256-gcm');
  });
});

describe('the data directory marker', () => {
  const repos: TestRepo[] = [];
  const mounts: string[] = [];
  after(() => {
    for (const m of mounts.reverse()) spawnSync('umount', [m]);
    for (const r of repos) r.cleanup();
  });

  test('a data directory whose filesystem is not mounted is refused (exit 6); mounted again, all is well', { skip: !isRoot && 'needs root (bind mounts)' }, async () => {
    const repo = makeTestRepo('', { blockSize: BS });
    repos.push(repo);
    // The data directory is a mount point: a bind mount of the real storage.
    const real = path.join(repo.dir, 'disk');
    const data = path.join(repo.dir, 'data');
    fs.mkdirSync(real);
    fs.mkdirSync(data);
    execFileSync('mount', ['--bind', real, data]);
    mounts.push(data);
    await repo.ok(['initdb']);
    const img = path.join(repo.dir, 'img');
    writeImage(img, 4 * MiB, 'random');
    const uid = (await repo.ok(['backup', `file://${img}`, 'mounted'])).stdout.trim();

    execFileSync('umount', [data]);
    mounts.pop();
    for (const args of [['backup', `file://${img}`, 'unmounted'], ['scrub', uid], ['restore', uid, `file://${repo.dir}/out`], ['ls']]) {
      const r = await repo.run(args);
      assert.deepEqual(fs.readdirSync(data), [], `${args[0]} (exit ${r.code}) wrote onto the unmounted mount point`);
      assert.equal(r.code, 6, `${args[0]}: ${r.stderr}`);
      assert.match(oneErrorLine(r.stderr), new RegExp(`^ERROR: directory ${data} has no backy-repository.json: it looks unmounted`));
    }

    execFileSync('mount', ['--bind', real, data]);
    mounts.push(data);
    assert.ok(fs.existsSync(path.join(data, 'backy-repository.json')));
    await repo.ok(['scrub', uid]);
    assert.equal(await restoredHash(repo, uid), sha256File(img));
  });

  test('repositories from before the marker: it is written where their blobs are, never on an empty mount point', async () => {
    const repo = makeTestRepo('', { blockSize: BS });
    repos.push(repo);
    await repo.ok(['initdb']);
    const img = path.join(repo.dir, 'img');
    writeImage(img, 3 * MiB, 'random');
    const uid = (await repo.ok(['backup', `file://${img}`, 'old'])).stdout.trim();
    const data = path.join(repo.dir, 'data');
    const marker = path.join(data, 'backy-repository.json');
    // As an older backy left it: no marker, nothing about it in the database.
    fs.rmSync(marker);
    sql(repo, `DELETE FROM settings WHERE key IN ('data_marker', 'repository_id')`);
    // Its data directory "unmounted": an empty directory where the blobs were.
    fs.renameSync(data, `${data}.away`);
    fs.mkdirSync(data);
    const r = await repo.run(['ls']);
    assert.equal(r.code, 6, r.stderr);
    assert.match(oneErrorLine(r.stderr), /has no backy-repository.json: it looks unmounted .*: none of the blobs the database lists is there/);
    assert.deepEqual(fs.readdirSync(data), []);
    // "Mounted": the marker is written on first open and required from then on.
    fs.rmdirSync(data);
    fs.renameSync(`${data}.away`, data);
    const ok = await repo.ok(['ls']);
    assert.match(ok.stderr, /wrote backy-repository.json/);
    assert.ok(fs.existsSync(marker));
    fs.renameSync(data, `${data}.away`);
    fs.mkdirSync(data);
    assert.equal((await repo.run(['ls'])).code, 6);
    fs.rmdirSync(data);
    fs.renameSync(`${data}.away`, data);
    assert.equal(await restoredHash(repo, uid), sha256File(img));
  });

  test('the data directory of another repository is refused', async () => {
    const a = makeTestRepo('', { blockSize: BS });
    const b = makeTestRepo('', { blockSize: BS });
    repos.push(a, b);
    await a.ok(['initdb']);
    await b.ok(['initdb']);
    fs.copyFileSync(path.join(a.dir, 'data', 'backy-repository.json'), path.join(b.dir, 'data', 'backy-repository.json'));
    const r = await b.run(['ls']);
    assert.equal(r.code, 6, r.stderr);
    assert.match(oneErrorLine(r.stderr), /belongs to another repository/);
  });
});

describe('zstd output is bounded by the block size', () => {
  /**
   * A valid zstd frame that declares and really produces `size` zero bytes in 128 KiB RLE blocks: a few
   * bytes per 128 KiB, so 1 GiB fits in 32 KiB.
   */
  function zeroBomb(size: number): Buffer {
    const blocks = Math.ceil(size / (128 * 1024));
    const out = Buffer.alloc(4 + 1 + 8 + blocks * 4);
    out.writeUInt32LE(0xfd2fb528, 0);
    out[4] = (3 << 6) | (1 << 5); // 8-byte content size, single segment (no window descriptor)
    out.writeBigUInt64LE(BigInt(size), 5);
    let at = 13;
    for (let k = 0; k < blocks; k++) {
      const n = Math.min(128 * 1024, size - k * 128 * 1024);
      const header = (k === blocks - 1 ? 1 : 0) | (1 << 1) | (n << 3); // last?, RLE, regenerated size
      out.writeUIntLE(header, at, 3);
      out[at + 3] = 0;
      at += 4;
    }
    return out;
  }

  test('a crafted frame that inflates to 1 GiB is refused without allocating it', () => {
    const frame = zeroBomb(1024 * MiB);
    const blob = Buffer.concat([Buffer.from('BKY1'), Buffer.from([1, 0, 0, 0]), frame]); // zstd, not encrypted
    const file = path.join(fs.mkdtempSync('/tmp/backy-zstd-'), 'blob');
    fs.writeFileSync(file, blob);
    try {
      // In a child process, so its peak memory is that of the decode alone.
      const script = `
        const { decodeBlob } = require(${JSON.stringify(path.resolve(__dirname, '../src/codec/blob-format.js'))});
        const blob = require('node:fs').readFileSync(process.argv[1]);
        let error = '';
        try { decodeBlob(blob, Buffer.alloc(64), 4 * 1024 * 1024, { compression: 'zstd', compressionLevel: 1, hashFunction: 'sha512' }); }
        catch (e) { error = e.message; }
        console.log(JSON.stringify({ error, maxRssKiB: process.resourceUsage().maxRSS }));`;
      const r = spawnSync(process.execPath, ['-e', script, file], { encoding: 'utf8' });
      assert.equal(r.status, 0, r.stderr);
      const { error, maxRssKiB } = JSON.parse(r.stdout) as { error: string; maxRssKiB: number };
      assert.ok(maxRssKiB < 256 * 1024, `decoding peaked at ${Math.round(maxRssKiB / 1024)} MiB`);
      assert.equal(error, 'decompresses to more than 4194304 bytes');
    } finally {
      fs.rmSync(path.dirname(file), { recursive: true, force: true });
    }
  });
});
