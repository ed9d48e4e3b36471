/**
 * Disaster recovery: the database is lost, storage alone brings it back (`db-rebuild`), on the file backend,
 * on S3 (a real s3rver) and into PostgreSQL. Versions with tags, expiry and protection (changed after they
 * were made, so the metadata objects must have followed), restores by hash, a differential backup that
 * deduplicates against rebuilt versions, blobs of a version removed before the loss left for cleanup --full,
 * ls --from-storage without a database, refusals (a non-empty database, a wrong key), and an imported backy2
 * version whose export stays byte-equal to backy2's after the rebuild.
 */
import { after, before, describe, test } from 'node:test';
import * as assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { randomBytes } from 'node:crypto';
import Database from 'better-sqlite3';
import { makeTestRepo, RunResult, TestRepo, writeImage } from './helpers/cli';
import { sha256File } from './helpers/images';
import { startS3Server, S3Server } from './helpers/s3-server';
import { startPostgres, TestPostgres } from './helpers/postgres';
import { backyRepoFor, copyBacky2, expected, FIXTURES } from './helpers/backy2-fixture';

const BS = 64 * 1024;
let s3: S3Server;
let pg: TestPostgres;
before(async () => {
  [s3, pg] = await Promise.all([startS3Server(), startPostgres()]);
});
after(async () => {
  await Promise.all([s3?.stop(), pg?.stop()]);
});

function oneErrorLine(r: RunResult): string {
  const lines = r.stderr.trim().split('\n').filter((l) => l.startsWith('ERROR'));
  assert.equal(lines.length, 1, `one error line, got:\n${r.stderr}`);
  return lines[0];
}

interface Backend {
  name: string;
  repo(t: { after(fn: () => void | Promise<void>): void }): Promise<{ repo: TestRepo; dropDatabase(): Promise<void>; blobCount(): Promise<number> }>;
}

function fileBlobCount(dir: string): number {
  let n = 0;
  const walk = (d: string) => {
    for (const e of fs.readdirSync(d, { withFileTypes: true })) {
      if (e.isDirectory()) { if (!(d === dir && e.name === 'meta')) walk(path.join(d, e.name)); } else if (!e.name.startsWith('.')) n++;
    }
  };
  walk(dir);
  return n;
}

function dropSqlite(repo: TestRepo): void {
  for (const f of fs.readdirSync(repo.dir)) if (f.startsWith('backy.sqlite')) fs.rmSync(path.join(repo.dir, f));
}

const backends: Backend[] = [
  {
    name: 'file backend, SQLite',
    async repo(t) {
      const repo = makeTestRepo('[DataBackend]\nfsync = false', { blockSize: BS });
      t.after(() => repo.cleanup());
      return { repo, dropDatabase: async () => dropSqlite(repo), blobCount: async () => fileBlobCount(path.join(repo.dir, 'data')) };
    },
  },
  {
    name: 'S3 (s3rver), SQLite',
    async repo(t) {
      const prefix = `dr-${randomBytes(4).toString('hex')}/`;
      const repo = makeTestRepo(s3.config({ prefix, max_retries: 2 }), { blockSize: BS });
      t.after(() => repo.cleanup());
      const direct = s3.store(prefix);
      t.after(() => direct.close());
      return {
        repo, dropDatabase: async () => dropSqlite(repo),
        async blobCount() {
          let n = 0;
          for await (const page of direct.list()) n += page.length;
          return n;
        },
      };
    },
  },
  {
    name: 'file backend, PostgreSQL',
    async repo(t) {
      const url = await pg.createDatabase();
      const db = url.split('/').pop()!;
      const repo = makeTestRepo(`[MetaBackend]\nengine = ${url}\n[DataBackend]\nfsync = false`, { blockSize: BS });
      t.after(() => repo.cleanup());
      return {
        repo,
        async dropDatabase() {
          await pg.query(`DROP DATABASE ${db} WITH (FORCE)`);
          await pg.query(`CREATE DATABASE ${db}`);
        },
        blobCount: async () => fileBlobCount(path.join(repo.dir, 'data')),
      };
    },
  },
];

describe('db-rebuild', () => {
  for (const backend of backends) {
    test(`${backend.name}: lose the database, rebuild it from storage, everything as before`, async (t) => {
      const { repo, dropDatabase, blobCount } = await backend.repo(t);
      await repo.ok(['initdb']);
      const img = (name: string, seed: number) => {
        const f = path.join(repo.dir, name);
        writeImage(f, 40 * BS + 1234, 'mixed', seed);
        return f;
      };
      const a = img('a.img', 1);
      const b = img('b.img', 2);
      const gone = img('gone.img', 3);
      const uid = async (args: string[]) => (await repo.ok(['backup', ...args])).stdout.trim();
      const v1 = await uid(['-t', 'daily,keep', '-e', '2031-12-31', `file://${a}`, 'web']);
      // a's second state: one block changed
      const a2 = path.join(repo.dir, 'a2.img');
      fs.copyFileSync(a, a2);
      const fd = fs.openSync(a2, 'r+');
      fs.writeSync(fd, randomBytes(100), 0, 100, 5 * BS + 7);
      fs.closeSync(fd);
      const v2 = await uid(['-f', v1, '-s', 'snap-2', `file://${a2}`, 'web']);
      const v3 = await uid(['-t', 'monthly', `file://${b}`, 'db']);
      const v4 = await uid([`file://${gone}`, 'tmp']);
      // Changes after the backups: the metadata objects must follow them.
      await repo.ok(['protect', v3]);
      await repo.ok(['add-tag', v2, 'extra']);
      await repo.ok(['remove-tag', v1, 'keep']);
      await repo.ok(['expire', v2, '2030-06-30 18:30:00']);
      await repo.ok(['rm', '-f', v4]); // its blobs stay in storage until a cleanup (which never comes)
      const lsBefore = (await repo.ok(['-m', 'ls'])).stdout;
      assert.equal(lsBefore.trim().split('\n').length, 4);
      const blobsBefore = await blobCount();

      await dropDatabase();
      const missing = await repo.run(['ls']);
      assert.equal(missing.code, 1, 'no database');
      assert.equal((await repo.ok(['-m', 'ls', '--from-storage'])).stdout, lsBefore, 'storage alone lists the same versions');
      const rebuilt = JSON.parse((await repo.ok(['--json', 'db-rebuild'])).stdout) as { versions: number; blobs: number };
      assert.equal(rebuilt.versions, 3);
      assert.equal((await repo.ok(['-m', 'ls'])).stdout, lsBefore);
      const hashes: [string, string][] = [[v1, a], [v2, a2], [v3, b]];
      for (const [u, file] of hashes) {
        const out = path.join(repo.dir, `r-${u}`);
        await repo.ok(['restore', u, `file://${out}`]);
        assert.equal(sha256File(out), sha256File(file), `version ${u} restores byte-identical`);
        fs.rmSync(out);
        await repo.ok(['scrub', u]);
      }
      // Protection came back: rm refuses.
      assert.equal((await repo.run(['rm', '-f', v3])).code, 100);
      // A new differential backup deduplicates against the rebuilt versions: one changed block is stored.
      const a3 = path.join(repo.dir, 'a3.img');
      fs.copyFileSync(a2, a3);
      const fd2 = fs.openSync(a3, 'r+');
      fs.writeSync(fd2, randomBytes(100), 0, 100, 20 * BS + 3);
      fs.closeSync(fd2);
      const diff = JSON.parse((await repo.ok(['--json', 'backup', '-f', v2, `file://${a3}`, 'web'])).stdout) as { blocksWritten: number; blocksDedup: number };
      assert.equal(diff.blocksWritten, 1);
      // The removed version's blobs are unknown to the new database: cleanup --full removes exactly them.
      const full = JSON.parse((await repo.ok(['--json', 'cleanup', '--full', '--dangerous-force'])).stdout) as { orphansDeleted: number; packsDeleted: number };
      assert.ok(full.orphansDeleted > 0);
      assert.equal(full.packsDeleted, 1, 'the removed version\'s pack of blob details');
      assert.equal(await blobCount(), blobsBefore + 1 - full.orphansDeleted);
      for (const [u, file] of hashes) {
        const out = path.join(repo.dir, `r2-${u}`);
        await repo.ok(['restore', u, `file://${out}`]);
        assert.equal(sha256File(out), sha256File(file));
        fs.rmSync(out);
      }
      // Scrub checks each version's object: a lost one is reported (exit 20) and written again.
      if (backend.name.startsWith('file')) {
        const obj = path.join(repo.dir, 'data', 'meta/versions', v1);
        fs.rmSync(obj);
        const s1 = await repo.run(['scrub', v1]);
        assert.equal(s1.code, 20, s1.stderr);
        assert.match(oneErrorLine(s1), /metadata object of version .* is missing from storage \(rewritten from the database\)/);
        assert.ok(fs.existsSync(obj));
        await repo.ok(['scrub', v1]);
        // Another version's object put in its place does not pass for it (the name is authenticated).
        fs.copyFileSync(path.join(repo.dir, 'data', 'meta/versions', v3), obj);
        const s2 = await repo.run(['scrub', v1]);
        assert.equal(s2.code, 20, s2.stderr);
        assert.match(oneErrorLine(s2), /unreadable: authentication failed/);
        await repo.ok(['scrub', v1]);
      }
      // Only an empty database is filled.
      const again = await repo.run(['db-rebuild']);
      assert.equal(again.code, 100);
      assert.match(oneErrorLine(again), /is not empty/);
    });
  }

  test('a wrong key is refused (exit 1), nothing is written', async (t) => {
    const repo = makeTestRepo('[DataBackend]\nfsync = false', { blockSize: BS });
    t.after(() => repo.cleanup());
    await repo.ok(['initdb']);
    const f = path.join(repo.dir, 'x.img');
    writeImage(f, 5 * BS, 'random');
    await repo.ok(['backup', `file://${f}`, 'x']);
    dropSqlite(repo);
    fs.writeFileSync(repo.cfg, fs.readFileSync(repo.cfg, 'utf8').replace(repo.key, 'cd'.repeat(32)));
    for (const args of [['db-rebuild'], ['ls', '--from-storage']]) {
      const r = await repo.run(args);
      assert.equal(r.code, 1, r.stderr);
      assert.match(oneErrorLine(r), /key/);
    }
    assert.equal(fs.readdirSync(repo.dir).filter((n) => n.startsWith('backy.sqlite')).length, 0, 'no database was created');
  });

  test('an imported backy2 version survives the loss of the database: restore and byte-equal export', async (t) => {
    const exp = expected();
    const b2 = copyBacky2('R1');
    t.after(() => b2.remove());
    // Backups of real size take minutes, so backy2's block dates differ from the version's: give block 3 of
    // v1 a later second (and the export that backy2 would write for it) to see block dates survive.
    const v1 = exp.repositories.R1.versions[0];
    const db = new Database(b2.sqlite);
    db.prepare(`UPDATE blocks SET date = '2026-11-26 06:37:01.250000' WHERE version_uid = ? AND id = 3`).run(v1.uid);
    db.close();
    const wants = new Map(exp.repositories.R1.versions.map((v) => [v.uid, fs.readFileSync(path.join(FIXTURES, v.export_csv), 'utf8')]));
    wants.set(v1.uid, wants.get(v1.uid)!.replace(`${v1.uid},3,2026-11-26 06:36:16,`, `${v1.uid},3,2026-11-26 06:37:01,`));
    assert.notEqual(wants.get(v1.uid), fs.readFileSync(path.join(FIXTURES, v1.export_csv), 'utf8'));
    // backy's own key differs from backy2's: backy2's is kept as a key-encryption key, in storage too.
    const repo = backyRepoFor(b2);
    t.after(() => repo.cleanup());
    await repo.ok(['initdb']);
    await repo.ok(['import-backy2', b2.cfg]);
    assert.ok(fs.existsSync(path.join(b2.data, 'meta/keys/1')));
    for (const v of exp.repositories.R1.versions) assert.equal((await repo.ok(['export', v.uid, '-'])).stdout, wants.get(v.uid));
    const lsBefore = (await repo.ok(['-m', 'ls'])).stdout;
    dropSqlite(repo);
    await repo.ok(['db-rebuild']);
    assert.equal((await repo.ok(['-m', 'ls'])).stdout, lsBefore);
    for (const v of exp.repositories.R1.versions) {
      assert.equal((await repo.ok(['export', v.uid, '-'])).stdout, wants.get(v.uid));
      const out = path.join(repo.dir, `r-${v.uid}`);
      await repo.ok(['restore', v.uid, `file://${out}`]);
      assert.equal(sha256File(out), v.expected_sha256);
    }
  });
});
