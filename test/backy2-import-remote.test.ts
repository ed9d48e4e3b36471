/**
 * import-backy2 of a backy2 repository whose metadata is in PostgreSQL and whose blobs are in S3 (a real
 * PostgreSQL 15 and s3rver): fixture R1 moved there the way backy2 would have stored it (its tables in
 * PostgreSQL with timestamp columns, its blobs at the top of the bucket under their bare uids). In place on
 * the same bucket, and --copy into a file backend.
 */
import { after, before, test } from 'node:test';
import * as assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import Database from 'better-sqlite3';
import { makeTestRepo, TestRepo } from './helpers/cli';
import { sha256File } from './helpers/images';
import { startS3Server, S3Server, S3RVER_KEY, S3RVER_SECRET } from './helpers/s3-server';
import { startPostgres, TestPostgres } from './helpers/postgres';
import { copyBacky2, expected, FIXTURES, Backy2Copy } from './helpers/backy2-fixture';
import type { S3Store } from '../src/storage/s3';
import { StorageMeta, VERSIONS_PREFIX } from '../src/engine/storage-meta';

const exp = expected();
const R1 = exp.repositories.R1.versions;
const BUCKET = 'backy2data';
let s3: S3Server;
let pg: TestPostgres;
let b2: Backy2Copy;
let bucket: S3Store;
let pgUrl: string;

/** backy2's tables as SQLAlchemy creates them on PostgreSQL (metadata format 2.12). */
const PG_SCHEMA = [
  `CREATE TABLE versions (uid VARCHAR(36) NOT NULL PRIMARY KEY, date TIMESTAMP NOT NULL, expire TIMESTAMP, name VARCHAR(2048) NOT NULL,
    snapshot_name VARCHAR(2048) DEFAULT '' NOT NULL, size BIGINT NOT NULL, size_bytes BIGINT NOT NULL, valid INTEGER NOT NULL, protected INTEGER NOT NULL)`,
  `CREATE TABLE tags (version_uid VARCHAR(36) NOT NULL REFERENCES versions (uid), name VARCHAR(2048) NOT NULL, PRIMARY KEY (version_uid, name))`,
  `CREATE TABLE blocks (uid VARCHAR(32), version_uid VARCHAR(36) NOT NULL REFERENCES versions (uid), id INTEGER NOT NULL, date TIMESTAMP NOT NULL,
    checksum VARCHAR(128), size BIGINT, valid INTEGER NOT NULL, enc_version INTEGER NOT NULL, enc_envkey VARCHAR(80), enc_nonce VARCHAR(32),
    PRIMARY KEY (version_uid, id))`,
  `CREATE INDEX ix_blocks_uid ON blocks (uid)`,
  `CREATE TABLE stats (date TIMESTAMP NOT NULL, id SERIAL PRIMARY KEY, version_uid VARCHAR(36), version_name VARCHAR(2048) NOT NULL,
    version_size_bytes BIGINT NOT NULL, version_size_blocks BIGINT NOT NULL, bytes_read BIGINT NOT NULL, blocks_read BIGINT NOT NULL,
    bytes_written BIGINT NOT NULL, blocks_written BIGINT NOT NULL, bytes_found_dedup BIGINT NOT NULL, blocks_found_dedup BIGINT NOT NULL,
    bytes_sparse BIGINT NOT NULL, blocks_sparse BIGINT NOT NULL, duration_seconds BIGINT NOT NULL)`,
  `CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL PRIMARY KEY)`,
];

before(async () => {
  [s3, pg] = await Promise.all([startS3Server({ extraBuckets: [BUCKET] }), startPostgres()]);
  b2 = copyBacky2('R1');
  pgUrl = await pg.createDatabase();
  const dbName = pgUrl.split('/').pop()!;
  for (const s of PG_SCHEMA) await pg.query(s, [], dbName);
  const src = new Database(b2.sqlite, { readonly: true });
  try {
    for (const table of ['versions', 'tags', 'blocks', 'stats', 'alembic_version']) {
      for (const row of src.prepare(`SELECT * FROM ${table}`).all() as Record<string, unknown>[]) {
        const cols = Object.keys(row);
        await pg.query(`INSERT INTO ${table} (${cols.join(', ')}) VALUES (${cols.map((_, i) => `$${i + 1}`).join(', ')})`, cols.map((c) => row[c]), dbName);
      }
    }
  } finally {
    src.close();
  }
  bucket = s3.store('', { bucket_name: BUCKET });
  for (const v of R1) {
    for (const blk of v.blocks) {
      if (blk.uid) await bucket.put(blk.uid, fs.readFileSync(path.join(b2.data, blk.uid.slice(0, 2), blk.uid.slice(2, 4), `${blk.uid}.blob`)));
    }
  }
  fs.writeFileSync(b2.cfg, [
    '[DEFAULTS]', `lock_dir: ${b2.lockDir}`, 'hash_function: sha512', 'block_size: 4194304', `encryption_key: ${exp.key_hex}`, 'encryption_version: 1',
    '[MetaBackend]', 'type: backy2.meta_backends.sql', `engine: ${pgUrl.replace('postgresql://', 'postgresql+psycopg2://')}`,
    '[DataBackend]', 'type: backy2.data_backends.s3', `aws_access_key_id: ${S3RVER_KEY}`, `aws_secret_access_key: ${S3RVER_SECRET}`,
    `endpoint_url: ${s3.endpoint}`, `bucket_name: ${BUCKET}`, 'addressing_style: path', 'simultaneous_reads: 5', '',
  ].join('\n'));
});

after(async () => {
  await bucket?.close();
  b2?.remove();
  await Promise.all([s3?.stop(), pg?.stop()]);
});

async function keys(): Promise<string[]> {
  const out: string[] = [];
  for await (const page of bucket.list()) out.push(...page.map((o) => o.key));
  return out.sort();
}

async function restoreHash(repo: TestRepo, uid: string): Promise<string> {
  const out = path.join(repo.dir, `r-${uid}`);
  await repo.ok(['restore', uid, `file://${out}`]);
  const h = sha256File(out);
  fs.rmSync(out);
  return h;
}

test('--copy from PostgreSQL + S3 into a file backend (the repository\'s own hash function: checksums recomputed)', async (t) => {
  const repo = makeTestRepo('[DataBackend]\nfsync = false');
  t.after(() => repo.cleanup());
  await repo.ok(['initdb']);
  const before = await keys();
  await repo.ok(['import-backy2', '--copy', b2.cfg]);
  for (const v of R1) assert.equal(await restoreHash(repo, v.uid), v.expected_sha256);
  assert.equal((await repo.ok(['-m', 'ls'])).stdout, fs.readFileSync(path.join(FIXTURES, 'R1/ls-m.txt'), 'utf8'));
  assert.deepEqual(await keys(), before, 'backy2\'s bucket unchanged');
});

test('in place on the same bucket: restore, scrub, export; rm + cleanup and cleanup --full delete exactly the unused blobs', async (t) => {
  const repo = makeTestRepo(`${s3.config({ bucket_name: BUCKET, max_retries: 2 })}\n[DEFAULTS]\nencryption_key = ${exp.key_hex}\nhash_function = sha512`);
  t.after(() => repo.cleanup());
  await repo.ok(['initdb']);
  const r = await repo.ok(['import-backy2', b2.cfg]);
  assert.match(r.stderr, /importing backy2 repository postgresql:\/\/postgres@127\.0\.0\.1:\d+\/\w+ \(schema 30349b678801\) in place/);
  for (const v of R1) {
    assert.equal(await restoreHash(repo, v.uid), v.expected_sha256);
    await repo.ok(['scrub', v.uid]);
    assert.equal((await repo.ok(['export', v.uid, '-'])).stdout, fs.readFileSync(path.join(FIXTURES, v.export_csv), 'utf8'));
  }
  const blobKeys = (await keys()).filter((k) => !k.startsWith('meta/'));
  assert.equal(blobKeys.length, 6, blobKeys.join(' '));
  await repo.ok(['cleanup', '--full', '--dangerous-force']);
  assert.deepEqual((await keys()).filter((k) => !k.startsWith('meta/')), blobKeys, 'cleanup --full keeps every blob a version uses');
  await repo.ok(['rm', '-f', R1[1].uid]);
  await repo.ok(['cleanup', '--dangerous-force']);
  assert.deepEqual((await keys()).filter((k) => !k.startsWith('meta/')), blobKeys.filter((k) => !['f2a4587b85QP8mGoJ6QYZzabSPToYBwP', '8f4f61f89cmPbqUcpHUNshoVzeauoPVH'].includes(k)));
  assert.equal(await restoreHash(repo, R1[0].uid), R1[0].expected_sha256);
});

test('metadata objects are listed page by page on S3 (more than one ListObjectsV2 page)', async () => {
  const prefix = 'paging/';
  const store = s3.store(prefix);
  try {
    const sm = new StorageMeta(store, undefined);
    const uids = Array.from({ length: 1030 }, (_, i) => `v-${String(i).padStart(5, '0')}`);
    const gate = new Array(16).fill(0);
    for (let i = 0; i < uids.length; i += gate.length) {
      await Promise.all(uids.slice(i, i + gate.length).map((u) => store.put(`${VERSIONS_PREFIX}${u}`, Buffer.from('x'))));
    }
    const pages: string[][] = [];
    for await (const page of sm.versionUids()) pages.push(page);
    assert.ok(pages.length >= 2, `${pages.length} pages`);
    assert.deepEqual(pages.flat().sort(), uids);
  } finally {
    await store.close();
  }
});
