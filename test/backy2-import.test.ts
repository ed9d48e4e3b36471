/**
 * import-backy2 with the real backy2 2.13.8 repositories of test/fixtures/backy2 (copied first: the
 * fixtures are never changed): in place and with --copy, restores by hash against expected.json, scrub,
 * NBD and FUSE reads, a differential backup against an imported version, rm + cleanup, export equal to
 * backy2's, import of backy2's exports, wrong keys, missing and damaged blobs, locks, and the 2.9 schema.
 */
import { after, before, describe, test } from 'node:test';
import * as assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { spawn } from 'node:child_process';
import Database from 'better-sqlite3';
import { RunResult, TestRepo } from './helpers/cli';
import { sha256File } from './helpers/images';
import { backy2Blobs, backyRepoFor, copyBacky2, expected, fixtureImages, FIXTURES, treeHashes, Backy2Copy } from './helpers/backy2-fixture';
import { startBackyNbd } from './helpers/backy-nbd';
import { run as runTool } from './helpers/nbd-tools';
import { forceCleanup, sha256sum, startMount } from './helpers/fuse-mount';

const exp = expected();
const R1 = exp.repositories.R1.versions;
const R0 = exp.repositories.R0.versions;
const cleanups: (() => void)[] = [];
after(() => { for (const c of cleanups.reverse()) c(); });

function track<T extends { remove?: () => void; cleanup?: () => void }>(x: T): T {
  cleanups.push(() => (x.remove ?? x.cleanup)!());
  return x;
}

function rows(r: RunResult): Record<string, string>[] {
  const [head, ...lines] = r.stdout.trim().split('\n');
  const fields = head.split('|');
  return lines.filter(Boolean).map((l) => Object.fromEntries(l.split('|').map((v, i) => [fields[i], v])));
}

function oneErrorLine(r: RunResult): string {
  const lines = r.stderr.trim().split('\n').filter((l) => l.startsWith('ERROR'));
  assert.equal(lines.length, 1, `one error line, got:\n${r.stderr}`);
  assert.doesNotMatch(r.stderr, /\n\s+at /, 'no stack trace');
  return lines[0];
}

async function restoreHash(repo: TestRepo, uid: string, args: string[] = []): Promise<string> {
  const out = path.join(repo.dir, `restore-${uid}-${args.join('')}`);
  await repo.ok(['restore', ...args, uid, `file://${out}`]);
  const h = sha256File(out);
  fs.rmSync(out);
  return h;
}

/** Imports fixture `name` in place into a new backy repository. */
async function importedInPlace(name: 'R0' | 'R1', opts: { key?: string; extra?: string; prepare?: (b2: Backy2Copy) => void } = {}): Promise<{ b2: Backy2Copy; repo: TestRepo; result: RunResult }> {
  const b2 = track(copyBacky2(name));
  opts.prepare?.(b2);
  const repo = track(backyRepoFor(b2, { key: opts.key ?? (name === 'R1' ? exp.key_hex : undefined), extra: opts.extra }));
  await repo.ok(['initdb']);
  const result = await repo.ok(['-m', 'import-backy2', b2.cfg]);
  return { b2, repo, result };
}

before(() => {
  fixtureImages();
});

describe('backy2 repositories imported in place', () => {
  test('R1 (zstd + AES-GCM): versions, tags, expiry, protection come over; restores match; scrub; export equals backy2\'s; a second import skips all', async () => {
    const { b2, repo, result } = await importedInPlace('R1');
    assert.deepEqual(rows(result).map((r) => [r.uid, r.result]), R1.map((v) => [v.uid, 'imported']));
    // backy's `ls -m` prints exactly what backy2's printed (same fields, same formats).
    const ls = await repo.ok(['-m', 'ls']);
    assert.equal(ls.stdout, fs.readFileSync(path.join(FIXTURES, 'R1/ls-m.txt'), 'utf8'));
    const stats = await repo.ok(['-m', 'stats']);
    assert.equal(stats.stdout, fs.readFileSync(path.join(FIXTURES, 'R1/stats-m.txt'), 'utf8'));
    for (const v of R1) {
      assert.equal(await restoreHash(repo, v.uid), v.expected_sha256, `restore of ${v.uid}`);
      assert.equal(await restoreHash(repo, v.uid, ['-s']), v.expected_sha256, `sparse restore of ${v.uid}`);
      const img = v.image === 'image1.img' ? fixtureImages().image1 : fixtureImages().image2;
      await repo.ok(['scrub', v.uid]);
      await repo.ok(['scrub', '-s', `file://${img}`, v.uid]);
      const out = path.join(repo.dir, `${v.uid}.csv`);
      await repo.ok(['export', v.uid, out]);
      assert.ok(fs.readFileSync(out).equals(fs.readFileSync(path.join(FIXTURES, v.export_csv))), `export of ${v.uid} equals backy2's byte for byte`);
      assert.ok((await repo.ok(['export', v.uid, '-'])).stdout === fs.readFileSync(path.join(FIXTURES, v.export_csv), 'utf8'), 'export to stdout');
    }
    // The blobs were not copied: storage holds backy2's six blob files and the metadata objects, nothing else.
    const files = [...treeHashes(b2.data).keys()];
    assert.equal(files.filter((f) => f.endsWith('.blob')).length, 6);
    assert.deepEqual(files.filter((f) => !f.endsWith('.blob') && !f.startsWith('meta/blobs/')).sort(),
      ['backy-repository.json', 'meta/repository', ...R1.map((v) => `meta/versions/${v.uid}`)].sort());
    assert.equal(files.filter((f) => f.startsWith('meta/blobs/')).length, 1, 'one pack of blob details for the batch of versions');
    const again = await repo.ok(['-m', 'import-backy2', b2.cfg]);
    assert.deepEqual(rows(again).map((r) => r.result), ['skipped', 'skipped']);
    assert.equal((await repo.ok(['-m', 'ls'])).stdout, ls.stdout, 'nothing changed by the second import');
  });

  test('R1: NBD and FUSE serve an imported version', async () => {
    const { repo } = await importedInPlace('R1');
    const v = R1[1];
    const server = await startBackyNbd(repo.cfg);
    try {
      const out = path.join(repo.dir, 'nbd.img');
      const c = await runTool('nbdcopy', [server.uri(v.uid), out], { timeoutMs: 60_000 });
      assert.equal(c.code, 0, c.stderr);
      assert.equal(sha256File(out), v.expected_sha256);
    } finally {
      await server.stop();
    }
    const dir = path.join(repo.dir, 'mnt');
    fs.mkdirSync(dir);
    const m = await startMount(repo, [v.uid, dir], dir);
    try {
      assert.equal(await sha256sum(path.join(dir, `${v.name}.img`)), v.expected_sha256);
    } finally {
      await m.stop().catch(() => undefined);
      await forceCleanup(dir, m.child);
    }
  });

  test('R1: rm + cleanup free exactly the unshared backy2 blobs; a differential backup of image 2 stores only the changed blocks', async () => {
    const { b2, repo } = await importedInPlace('R1');
    const [v1, v2] = R1;
    const all = backy2Blobs(b2.data);
    const only = (v: typeof v1, others: (typeof v1)[]) => {
      const theirs = new Set(others.flatMap((o) => o.blocks.map((b) => b.uid)));
      return [...new Set(v.blocks.map((b) => b.uid).filter((u): u is string => !!u && !theirs.has(u)))].sort();
    };
    await repo.ok(['rm', '-f', v2.uid]);
    const c1 = JSON.parse((await repo.ok(['--json', 'cleanup', '--dangerous-force'])).stdout) as { deleted: number };
    const gone2 = only(v2, [v1]);
    assert.deepEqual(gone2.length, 2);
    assert.equal(c1.deleted, gone2.length);
    assert.deepEqual(backy2Blobs(b2.data), all.filter((u) => !gone2.includes(u)));
    assert.equal(fs.existsSync(path.join(b2.data, 'meta/versions', v2.uid)), false, 'the removed version\'s metadata object is gone');

    // Image 2 against imported v1: blocks 0, 3, 4 deduplicate against backy2's blobs, 1 is sparse, 2 and 5 are new.
    const backup = await repo.ok(['--json', 'backup', '-f', v1.uid, `file://${fixtureImages().image2}`, 'vm1']);
    const s = JSON.parse(backup.stdout) as { uid: string; blocksWritten: number; blocksDedup: number; blocksSparse: number };
    assert.deepEqual([s.blocksWritten, s.blocksDedup, s.blocksSparse], [2, 3, 1]);
    assert.equal(await restoreHash(repo, s.uid), v2.expected_sha256);

    // v1 is protected; once not, removing it frees its own blobs only: the new version shares the others.
    const refused = await repo.run(['rm', '-f', v1.uid]);
    assert.equal(refused.code, 100);
    assert.match(oneErrorLine(refused), /protected/);
    await repo.ok(['unprotect', v1.uid]);
    await repo.ok(['rm', '-f', v1.uid]);
    const c2 = JSON.parse((await repo.ok(['--json', 'cleanup', '--dangerous-force'])).stdout) as { deleted: number };
    const gone1 = ['f966fba8f1goXwcdsJiAMvrfpKmLx5Go', '5aa0eadf69X5pgwrymDEwWysxZFf9VCT']; // blocks 2 and 5 of image 1
    assert.equal(c2.deleted, 2);
    assert.deepEqual(backy2Blobs(b2.data), all.filter((u) => !gone2.includes(u) && !gone1.includes(u)));
    assert.equal(await restoreHash(repo, s.uid), v2.expected_sha256, 'the new version still restores');
    // cleanup --full keeps every blob a version uses, in both namings.
    await repo.ok(['cleanup', '--full', '--dangerous-force']);
    assert.equal(await restoreHash(repo, s.uid), v2.expected_sha256);
    await repo.ok(['scrub', s.uid]);
  });

  test('R0 (plain blobs, a dedup race): restores, export, rm + cleanup frees v1\'s own blobs including the duplicate', async () => {
    const { b2, repo } = await importedInPlace('R0');
    for (const v of R0) {
      assert.equal(await restoreHash(repo, v.uid), v.expected_sha256);
      await repo.ok(['scrub', v.uid]);
      const out = path.join(repo.dir, 'x.csv');
      await repo.ok(['export', v.uid, out]);
      assert.ok(fs.readFileSync(out).equals(fs.readFileSync(path.join(FIXTURES, v.export_csv))), `export of ${v.uid}`);
    }
    assert.equal((await repo.ok(['-m', 'ls'])).stdout, fs.readFileSync(path.join(FIXTURES, 'R0/ls-m.txt'), 'utf8'));
    const all = backy2Blobs(b2.data);
    assert.equal(all.length, 7);
    await repo.ok(['unprotect', R0[0].uid]);
    await repo.ok(['rm', '-f', R0[0].uid]);
    await repo.ok(['cleanup', '--dangerous-force']);
    const gone = ['9b6b197286Eqzoe9cPcseUscm5yeC9Mc', 'cb2d2e936a9xLbfQK5hqYvUtxP5qYKWo', 'a67cec45b3GXSnp8ugiSuBg2jbmQuthM'];
    assert.deepEqual(backy2Blobs(b2.data), all.filter((u) => !gone.includes(u)));
    assert.equal(await restoreHash(repo, R0[1].uid), R0[1].expected_sha256);
  });

  test('R0: a missing blob imports and shows in scrub (exit 20) and restore (exit 6); a damaged plain blob is caught even with read_verification = tag', async () => {
    const missing = '4d45c2e59fZAfuGNPYRcc3mNDJh5LPn3'; // block 4 of both versions
    const damaged = 'a67cec45b3GXSnp8ugiSuBg2jbmQuthM'; // block 5 of v1
    const { b2, repo } = await importedInPlace('R0', {
      extra: '[DEFAULTS]\nread_verification = tag',
      prepare: (c) => fs.rmSync(path.join(c.data, '4d/45', `${missing}.blob`)),
    });
    const file = path.join(b2.data, 'a6/7c', `${damaged}.blob`);
    const bytes = fs.readFileSync(file);
    bytes[1000] ^= 1;
    fs.writeFileSync(file, bytes);
    const [v1, v2] = R0;
    const r = await repo.run(['restore', v1.uid, `file://${path.join(repo.dir, 'v1.img')}`]);
    assert.equal(r.code, 6);
    assert.match(r.stderr, /offset 16777216: .*missing/);
    assert.match(r.stderr, /offset 20971520: .*checksum mismatch/);
    const s = await repo.run(['--json', 'scrub', v1.uid]);
    assert.equal(s.code, 20, s.stderr);
    assert.equal(JSON.parse(s.stdout).badBlobs, 2);
    const ls = rows(await repo.ok(['-m', 'ls']));
    assert.deepEqual(ls.map((x) => x.valid), ['0', '0'], 'both versions use the missing blob: both invalid');
    const s2 = await repo.run(['scrub', v2.uid]);
    assert.equal(s2.code, 20);
  });

  test('versions backy2 marked invalid, or with a block backy2 found bad, are imported invalid; the rest stays valid', async () => {
    const [v1, v2] = R0;
    const { repo, result } = await importedInPlace('R0', {
      prepare: (c) => {
        const db = new Database(c.sqlite);
        db.prepare('UPDATE versions SET valid = 0 WHERE uid = ?').run(v1.uid);
        // A block row found bad: v2's block 2 (its own blob) read row by row, not in one scan.
        db.prepare('UPDATE blocks SET valid = 0 WHERE version_uid = ? AND id = 2').run(v2.uid);
        db.close();
      },
    });
    assert.deepEqual(rows(result).map((r) => [r.uid, r.result]), [[v1.uid, 'imported-invalid'], [v2.uid, 'imported-invalid']]);
    assert.deepEqual(rows(await repo.ok(['-m', 'ls'])).map((x) => x.valid), ['0', '0']);
    // The blocks are fine: both restore, and a scrub that finds nothing wrong makes them valid again.
    for (const v of R0) {
      assert.equal(await restoreHash(repo, v.uid), v.expected_sha256);
      await repo.ok(['scrub', v.uid]);
    }
    assert.deepEqual(rows(await repo.ok(['-m', 'ls'])).map((x) => x.valid), ['1', '1']);
  });

  test('a block row whose blob uid starts with "-" is not taken for a sparse block: the version is imported invalid', async () => {
    const [v1, v2] = R0;
    const { result } = await importedInPlace('R0', {
      prepare: (c) => {
        const db = new Database(c.sqlite);
        db.prepare(`UPDATE blocks SET uid = '-' || substr(uid, 2) WHERE version_uid = ?
          AND id = (SELECT min(id) FROM blocks WHERE version_uid = ? AND uid IS NOT NULL)`).run(v1.uid, v1.uid);
        db.close();
      },
    });
    assert.deepEqual(rows(result).map((r) => [r.uid, r.result]), [[v1.uid, 'imported-invalid'], [v2.uid, 'imported']]);
  });

  test('a wrong or missing key is refused before anything is imported (exit 1)', async () => {
    const b2 = track(copyBacky2('R1', { cfg: (t) => t.replace(exp.key_hex, 'ab'.repeat(32)) }));
    const repo = track(backyRepoFor(b2, { key: exp.key_hex }));
    await repo.ok(['initdb']);
    const wrong = await repo.run(['import-backy2', b2.cfg]);
    assert.equal(wrong.code, 1);
    assert.match(oneErrorLine(wrong), /is not the key this backy2 repository was written with/);
    assert.doesNotMatch(wrong.stderr + wrong.stdout, new RegExp(`${exp.key_hex}|${'ab'.repeat(32)}`), 'keys never printed');
    fs.writeFileSync(b2.cfg, fs.readFileSync(b2.cfg, 'utf8').replace(/^encryption_key:.*$/m, ''));
    const none = await repo.run(['import-backy2', b2.cfg]);
    assert.equal(none.code, 1);
    assert.match(oneErrorLine(none), /has no encryption_key/);
    assert.equal((await repo.ok(['-m', 'ls'])).stdout.trim().split('\n').length, 1, 'nothing imported');
    const db = new Database(path.join(repo.dir, 'backy.sqlite'), { readonly: true });
    try {
      assert.equal((db.prepare('SELECT COUNT(*) AS n FROM blobs').get() as { n: number }).n, 0);
    } finally {
      db.close();
    }
  });

  test('a locked or running backy2 is refused; backy2 is kept out during the import', async () => {
    const b2 = track(copyBacky2('R0'));
    const repo = track(backyRepoFor(b2));
    await repo.ok(['initdb']);
    const lockFile = path.join(b2.lockDir, `backy_${R0[0].uid}.lock`);
    const holder = spawn('flock', ['-o', lockFile, 'sleep', '60'], { stdio: 'ignore' });
    try {
      await new Promise((r) => setTimeout(r, 300));
      const r = await repo.run(['import-backy2', b2.cfg]);
      assert.equal(r.code, 100);
      assert.match(oneErrorLine(r), new RegExp(`backy2 holds the lock of ${R0[0].uid}`));
    } finally {
      holder.kill();
    }
    // A process that calls itself backy2 (as backy2's process title does) is refused too.
    const fake = path.join(b2.dir, 'backy2');
    fs.copyFileSync('/bin/sleep', fake);
    fs.chmodSync(fake, 0o755);
    const proc = spawn(fake, ['60'], { stdio: 'ignore' });
    try {
      await new Promise((r) => setTimeout(r, 300));
      const r = await repo.run(['import-backy2', b2.cfg]);
      assert.equal(r.code, 100);
      assert.match(oneErrorLine(r), new RegExp(`a backy2 process is running \\(pid ${proc.pid}\\)`));
    } finally {
      proc.kill();
    }
    assert.equal((await repo.ok(['-m', 'ls'])).stdout.trim().split('\n').length, 1, 'nothing imported');
    // During the import backy2's global lock is held (backy2 would refuse to start); afterwards it is free.
    const r = await repo.ok(['import-backy2', b2.cfg]);
    assert.match(r.stderr, /imported version/);
    const probe = spawn('flock', ['-n', path.join(b2.lockDir, 'backy_backy.lock'), 'true']);
    assert.equal(await new Promise((res) => probe.on('exit', res)), 0, 'released after the import');
  });

  test('a backy2 2.9 database (no encryption columns, no expiry) imports and exports as 2.12', async () => {
    // The 2.9 schema is the fixture's without what later migrations added (alembic chain, backy2.md §3.8):
    // versions.expire (2.10), blocks.enc_version/enc_envkey/enc_nonce (2.12/2.13), and stats keyed by
    // version_uid; alembic head 29c655b78818 (tags). R0 is rebuilt in that shape, rows copied.
    const b2 = track(copyBacky2('R0'));
    const old = path.join(b2.dir, 'backy29.sqlite');
    const db = new Database(old);
    db.exec(`ATTACH DATABASE '${b2.sqlite}' AS src;
      CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL PRIMARY KEY);
      INSERT INTO alembic_version VALUES ('29c655b78818');
      CREATE TABLE versions (uid VARCHAR(36) NOT NULL PRIMARY KEY, date DATETIME NOT NULL, name VARCHAR NOT NULL,
        snapshot_name VARCHAR DEFAULT '' NOT NULL, size BIGINT NOT NULL, size_bytes BIGINT NOT NULL, valid INTEGER NOT NULL, protected INTEGER NOT NULL);
      INSERT INTO versions SELECT uid, date, name, snapshot_name, size, size_bytes, valid, protected FROM src.versions;
      CREATE TABLE tags (version_uid VARCHAR(36) NOT NULL REFERENCES versions (uid), name VARCHAR NOT NULL, PRIMARY KEY (version_uid, name));
      INSERT INTO tags SELECT * FROM src.tags;
      CREATE TABLE blocks (uid VARCHAR(32), version_uid VARCHAR(36) NOT NULL REFERENCES versions (uid), id INTEGER NOT NULL,
        date DATETIME NOT NULL, checksum VARCHAR(128), size BIGINT, valid INTEGER NOT NULL, PRIMARY KEY (version_uid, id));
      CREATE INDEX ix_blocks_uid ON blocks (uid);
      INSERT INTO blocks SELECT uid, version_uid, id, date, checksum, size, valid FROM src.blocks;
      CREATE TABLE stats (date DATETIME NOT NULL, version_uid VARCHAR(36) NOT NULL PRIMARY KEY, version_name VARCHAR NOT NULL,
        version_size_bytes BIGINT NOT NULL, version_size_blocks BIGINT NOT NULL, bytes_read BIGINT NOT NULL, blocks_read BIGINT NOT NULL,
        bytes_written BIGINT NOT NULL, blocks_written BIGINT NOT NULL, bytes_found_dedup BIGINT NOT NULL, blocks_found_dedup BIGINT NOT NULL,
        bytes_sparse BIGINT NOT NULL, blocks_sparse BIGINT NOT NULL, duration_seconds BIGINT NOT NULL);
      INSERT INTO stats SELECT date, version_uid, version_name, version_size_bytes, version_size_blocks, bytes_read, blocks_read,
        bytes_written, blocks_written, bytes_found_dedup, blocks_found_dedup, bytes_sparse, blocks_sparse, duration_seconds FROM src.stats;
      DETACH DATABASE src;`);
    db.close();
    fs.writeFileSync(b2.cfg, fs.readFileSync(b2.cfg, 'utf8').replace(b2.sqlite, old));
    const repo = track(backyRepoFor(b2));
    await repo.ok(['initdb']);
    const r = await repo.ok(['import-backy2', b2.cfg]);
    assert.match(r.stderr, /schema 29c655b78818/);
    const ls = rows(await repo.ok(['-m', 'ls']));
    assert.deepEqual(ls.map((x) => [x.uid, x.tags, x.protected, x.expire]), R0.map((v) => [v.uid, v.tags.join(','), v.protected ? '1' : '0', '']));
    for (const v of R0) {
      assert.equal(await restoreHash(repo, v.uid), v.expected_sha256);
      // backy2 2.12's export of these rows: the same, but 2.9 knew no expiry.
      const want = fs.readFileSync(path.join(FIXTURES, v.export_csv), 'utf8').replace(/^(.*?\r\n.*),[0-9-]+\r\n/, '$1,\r\n');
      assert.equal((await repo.ok(['export', v.uid, '-'])).stdout, want);
    }
  });

  test('an import in place needs backy2\'s storage and hash function; an encrypted backy2 needs a key here', async () => {
    const b2 = track(copyBacky2('R1'));
    const elsewhere = track(backyRepoFor(b2, { key: exp.key_hex, dataDir: path.join(b2.dir, 'other') }));
    await elsewhere.ok(['initdb']);
    const r = await elsewhere.run(['import-backy2', b2.cfg]);
    assert.equal(r.code, 1);
    assert.match(oneErrorLine(r), /set \[DataBackend\] type = file, path = .*\/data in backy's configuration, or import with --copy/);
    const sha256 = track(backyRepoFor(b2, { key: exp.key_hex, extra: '[DEFAULTS]\nhash_function = sha256' }));
    await sha256.ok(['initdb']);
    const h = await sha256.run(['import-backy2', b2.cfg]);
    assert.equal(h.code, 1);
    assert.match(oneErrorLine(h), /backy2 used hash_function sha512, this repository sha256: an import in place needs a repository created with hash_function = sha512/);
    const plain = track(backyRepoFor(b2, { extra: '[DEFAULTS]\nencryption = none' }));
    await plain.ok(['initdb']);
    const p = await plain.run(['import-backy2', b2.cfg]);
    assert.equal(p.code, 1);
    assert.match(oneErrorLine(p), /this repository has no encryption_key/);
  });
});

describe('import-backy2 --copy', () => {
  test('R1 re-encoded into backy\'s own storage elsewhere, backy2\'s repository untouched; an interrupted copy continues', async () => {
    const b2 = track(copyBacky2('R1'));
    const before = treeHashes(b2.dir);
    const repo = track(backyRepoFor(b2, { dataDir: path.join(path.dirname(b2.dir), `${path.basename(b2.dir)}-backy`) }));
    cleanups.push(() => fs.rmSync(path.join(path.dirname(b2.dir), `${path.basename(b2.dir)}-backy`), { recursive: true, force: true }));
    await repo.ok(['initdb']);
    // First run: one blob cannot be read (a directory where the file should be): the copy stops, exit 6.
    const victim = path.join(b2.data, 'f2/a4/f2a4587b85QP8mGoJ6QYZzabSPToYBwP.blob');
    fs.renameSync(victim, `${victim}.away`);
    fs.mkdirSync(victim);
    const first = await repo.run(['import-backy2', '--copy', b2.cfg]);
    assert.equal(first.code, 6, first.stderr);
    fs.rmdirSync(victim);
    fs.renameSync(`${victim}.away`, victim);
    const second = await repo.ok(['import-backy2', '--copy', b2.cfg]);
    assert.match(second.stderr, new RegExp(`continuing the copy of version ${R1[1].uid}: [0-9] blocks to go`));
    assert.equal((await repo.ok(['-m', 'ls'])).stdout, fs.readFileSync(path.join(FIXTURES, 'R1/ls-m.txt'), 'utf8'));
    for (const v of R1) {
      assert.equal(await restoreHash(repo, v.uid), v.expected_sha256);
      await repo.ok(['scrub', v.uid]);
    }
    // Every block is in backy's format in backy's storage: six distinct contents, six blobs.
    const mine = [...treeHashes(path.join(path.dirname(b2.dir), `${path.basename(b2.dir)}-backy`)).keys()].filter((f) => !f.startsWith('meta/') && f !== 'backy-repository.json');
    assert.equal(mine.length, 6);
    assert.ok(mine.every((f) => /^[0-9a-f]{2}\/[0-9a-f]{2}\/[0-9a-f]{32}$/.test(f)), mine.join(' '));
    // Nothing of backy2's repository changed (database, blobs, exports).
    assert.deepEqual(treeHashes(b2.dir), before);
    const again = await repo.ok(['-m', 'import-backy2', '--copy', b2.cfg]);
    assert.deepEqual(rows(again).map((r) => r.result), ['skipped', 'skipped']);
  });
});

describe('export and import of metadata dumps', () => {
  test('backy2\'s exports import (file and stdin), restore, and export again unchanged; 22 and 23 as backy2', async () => {
    const b2 = track(copyBacky2('R1'));
    const repo = track(backyRepoFor(b2, { key: exp.key_hex }));
    await repo.ok(['initdb']);
    const [v1, v2] = R1;
    assert.equal((await repo.ok(['import', path.join(FIXTURES, v1.export_csv)])).stdout.trim(), v1.uid);
    const fromStdin = await repo.run(['import', '-'], { input: fs.readFileSync(path.join(FIXTURES, v2.export_csv), 'utf8') });
    assert.equal(fromStdin.code, 0, fromStdin.stderr);
    for (const v of R1) {
      assert.equal(await restoreHash(repo, v.uid), v.expected_sha256);
      assert.equal((await repo.ok(['export', v.uid, '-'])).stdout, fs.readFileSync(path.join(FIXTURES, v.export_csv), 'utf8'));
    }
    const twice = await repo.run(['import', path.join(FIXTURES, v1.export_csv)]);
    assert.equal(twice.code, 22);
    assert.match(oneErrorLine(twice), /already exists/);
    const junk = await repo.run(['import', '-'], { input: 'backy2 Version 9.9 metadata dump\r\n' });
    assert.equal(junk.code, 23);
    assert.match(oneErrorLine(junk), /unknown dump signature/);
  });

  test('backy\'s own dump of a version backy2 could not read round-trips with its tags', async () => {
    const b2 = track(copyBacky2('R1'));
    const repo = track(backyRepoFor(b2, { key: exp.key_hex }));
    await repo.ok(['initdb']);
    const uid = (await repo.ok(['backup', '-t', 'one,two', '-e', '2040-01-02 03:04:05', `file://${fixtureImages().image1}`, 'mine'])).stdout.trim();
    const dump = (await repo.ok(['export', uid, '-'])).stdout;
    assert.match(dump, /^backy Version 1 metadata dump\r\n/);
    const before = (await repo.ok(['-m', 'ls'])).stdout;
    await repo.ok(['rm', '-f', uid]);
    const r = await repo.run(['import', '-'], { input: dump });
    assert.equal(r.code, 0, r.stderr);
    assert.equal((await repo.ok(['-m', 'ls'])).stdout, before);
    assert.equal(await restoreHash(repo, uid), exp.images['image1.img'].sha256);
  });
});
