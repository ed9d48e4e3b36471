/**
 * The whole CLI on the S3 data backend, against a real S3 server (s3rver in a child process): backup,
 * differential backup, restore (compared by hash), scrub, rm, cleanup, cleanup --full, shared buckets,
 * missing objects and the storage errors a user meets first (credentials, bucket, endpoint).
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { randomBytes } from 'node:crypto';
import { makeTestRepo, RunResult, TestRepo, writeImage, restoredHash } from './helpers/cli';
import { sha256File } from './helpers/images';
import { startS3Server, S3Server } from './helpers/s3-server';
import { blobKey } from '../src/storage/types';
import type { S3Store } from '../src/storage/s3';
import { freePort } from './helpers/net';

const KiB = 1024;
const MiB = 1024 * KiB;
const BS = 256 * KiB;

let s3: S3Server;
before(async () => { s3 = await startS3Server(); });
after(async () => { await s3?.stop(); });

function s3Repo(t: { after(fn: () => void): void }, extra: Record<string, string | number> = {}): TestRepo {
  const repo = makeTestRepo(s3.config({ max_retries: 2, ...extra }), { blockSize: BS });
  t.after(() => repo.cleanup());
  return repo;
}

async function keysOf(store: S3Store): Promise<string[]> {
  const keys: string[] = [];
  for await (const page of store.list()) keys.push(...page.map((o) => o.key));
  return keys.sort();
}

function machineRows(r: RunResult): Record<string, string>[] {
  const [head, ...rows] = r.stdout.trim().split('\n');
  const fields = head.split('|');
  return rows.filter(Boolean).map((l) => Object.fromEntries(l.split('|').map((v, i) => [fields[i], v])));
}

async function backupUid(repo: TestRepo, args: string[]): Promise<string> {
  const uid = (await repo.ok(['backup', ...args])).stdout.trim();
  assert.match(uid, /^[0-9a-f-]{36}$/);
  return uid;
}


function oneErrorLine(r: RunResult): string {
  const lines = r.stderr.trim().split('\n');
  assert.equal(lines.length, 1, `one line on stderr, got:\n${r.stderr}`);
  assert.match(lines[0], /^ERROR: /);
  return lines[0];
}


describe('S3 data backend through the CLI', () => {
  test('backup, differential backup, restore, scrub, rm, cleanup, cleanup --full', async (t) => {
    const repo = s3Repo(t, { prefix: 'cycle' });
    const direct = s3.store('cycle');
    t.after(() => direct.close());
    await repo.ok(['initdb']);
    const img = path.join(repo.dir, 'disk.img');
    writeImage(img, 5 * MiB + 1234, 'mixed', 7);
    const hash1 = sha256File(img);
    const uid1 = await backupUid(repo, [`file://${img}`, 'vm']);
    assert.ok((await keysOf(direct)).length > 0, 'blobs are in the bucket under the prefix');

    // Change two blocks and grow the image: the differential backup shares everything else with uid1.
    const fd = fs.openSync(img, 'r+');
    fs.writeSync(fd, randomBytes(1000), 0, 1000, 3 * BS + 17);
    fs.writeSync(fd, randomBytes(BS), 0, BS, 5 * MiB + 1234);
    fs.closeSync(fd);
    const hash2 = sha256File(img);
    const before2 = (await keysOf(direct)).length;
    const uid2 = await backupUid(repo, ['-f', uid1, `file://${img}`, 'vm']);
    const added = (await keysOf(direct)).length - before2;
    assert.ok(added >= 2 && added <= 4, `the differential backup stored only the changed blocks (${added} new objects)`);

    assert.equal(await restoredHash(repo, uid1), hash1);
    assert.equal(await restoredHash(repo, uid2), hash2);
    await repo.ok(['scrub', uid1]);
    await repo.ok(['scrub', uid2]);
    const rows = machineRows(await repo.ok(['-m', 'ls']));
    assert.deepEqual(rows.map((r) => [r.uid, r.valid]).sort(), [[uid1, '1'], [uid2, '1']].sort());

    // rm + cleanup: the blobs only uid1 used leave the bucket, uid2 stays whole.
    const beforeCleanup = await keysOf(direct);
    await repo.ok(['rm', '-f', uid1]);
    const c1 = JSON.parse((await repo.ok(['--json', 'cleanup', '--dangerous-force'])).stdout) as { deleted: number };
    assert.ok(c1.deleted >= 1, 'blobs of the removed version were deleted');
    const afterCleanup = await keysOf(direct);
    assert.equal(afterCleanup.length, beforeCleanup.length - c1.deleted);
    assert.ok(afterCleanup.every((k) => beforeCleanup.includes(k)));
    assert.equal(await restoredHash(repo, uid2), hash2);

    // cleanup --full: an unknown blob-shaped object goes, known blobs and foreign objects stay.
    const orphan = blobKey(randomBytes(16).toString('hex'));
    await direct.put(orphan, randomBytes(777));
    await direct.put('notes.txt', Buffer.from('not backy\'s'));
    const c2 = JSON.parse((await repo.ok(['--json', 'cleanup', '--full'])).stdout) as { orphansDeleted: number; orphanBytes: number };
    assert.deepEqual([c2.orphansDeleted, c2.orphanBytes], [1, 777]);
    assert.deepEqual(await keysOf(direct), afterCleanup);
    assert.equal((await direct.get('notes.txt')).toString(), 'not backy\'s');
    assert.equal(await restoredHash(repo, uid2), hash2);
    await repo.ok(['scrub', uid2]);
  });

  test('repositories with different prefixes share a bucket without touching each other', async (t) => {
    const a = s3Repo(t, { prefix: 'team-a/backups' });
    const root = s3Repo(t); // no prefix: the bucket root, which also lists team-a's keys
    const directA = s3.store('team-a/backups');
    const directRoot = s3.store('');
    t.after(() => directA.close());
    t.after(() => directRoot.close());
    const images: Record<string, { repo: TestRepo; hash: string; uid: string }> = {};
    for (const [name, repo, seed] of [['a', a, 11], ['root', root, 12]] as const) {
      await repo.ok(['initdb']);
      const img = path.join(repo.dir, 'disk.img');
      writeImage(img, 2 * MiB + 99, 'random', seed);
      images[name] = { repo, hash: sha256File(img), uid: await backupUid(repo, [`file://${img}`, name]) };
    }
    const keysA = await keysOf(directA);
    const keysRoot = await keysOf(directRoot);
    assert.ok(keysA.length >= 9 && keysRoot.length >= 9);
    assert.ok(!keysA.some((k) => keysRoot.includes(k)));
    for (const { repo } of Object.values(images)) {
      const r = JSON.parse((await repo.ok(['--json', 'cleanup', '--full'])).stdout) as { orphansDeleted: number };
      assert.equal(r.orphansDeleted, 0, 'the other repository\'s objects are not orphans');
    }
    assert.deepEqual(await keysOf(directA), keysA);
    assert.deepEqual(await keysOf(directRoot), keysRoot);
    for (const { repo, hash, uid } of Object.values(images)) assert.equal(await restoredHash(repo, uid), hash);
  });

  test('a missing object: restore exits 6 naming the offset, scrub exits 20 and invalidates', async (t) => {
    const repo = s3Repo(t, { prefix: 'missing' });
    const direct = s3.store('missing');
    t.after(() => direct.close());
    await repo.ok(['initdb']);
    const img = path.join(repo.dir, 'disk.img');
    writeImage(img, 3 * MiB, 'random', 3); // every block unique: one object = one block
    const uid = await backupUid(repo, [`file://${img}`, 'vm']);
    const keys = await keysOf(direct);
    const victim = keys[Math.floor(keys.length / 2)];
    await direct.delete([victim]);

    const out = path.join(repo.dir, 'out.img');
    const r = await repo.run(['restore', uid, `file://${out}`]);
    assert.equal(r.code, 6, r.stderr);
    // The offset reported is exactly the block that differs from the source.
    const src = fs.readFileSync(img);
    const got = fs.readFileSync(out);
    const bad: number[] = [];
    for (let off = 0; off < src.length; off += BS) if (!src.subarray(off, off + BS).equals(got.subarray(off, off + BS))) bad.push(off);
    assert.equal(bad.length, 1);
    assert.match(r.stderr, new RegExp(`offset ${bad[0]}: blob ${victim} is missing from storage`));
    assert.match(r.stderr.trim().split('\n').pop()!, new RegExp(`^ERROR: 1 blocks could not be restored \\(first at offset ${bad[0]}\\)$`));
    assert.doesNotMatch(r.stderr, /\n\s+at /, 'no stack trace');

    const s = await repo.run(['scrub', uid]);
    assert.equal(s.code, 20, s.stderr);
    assert.match(s.stderr, new RegExp(`offset ${bad[0]}: blob ${victim} is missing`));
    assert.equal(machineRows(await repo.ok(['-m', 'ls']))[0].valid, '0');
  });

  test('bad credentials, missing bucket, unreachable endpoint: one line, exit 6, no secret anywhere', async (t) => {
    const secret = 'Sup3r-Secret-Access-Key-Value';
    const port = await freePort();
    const cases: { name: string; extra: Record<string, string | number>; expect: RegExp }[] = [
      { name: 'credentials', extra: { aws_access_key_id: 'AKIAWRONGWRONGWRONG', aws_secret_access_key: secret },
        expect: /^ERROR: S3 access denied to bucket "backy" at http:\/\/127\.0\.0\.1:\d+: HTTP 403 (InvalidAccessKeyId|Forbidden) \(check aws_access_key_id/ },
      { name: 'bucket', extra: { bucket_name: 'no-such-bucket', aws_secret_access_key: secret },
        expect: /^ERROR: S3 bucket "no-such-bucket" does not exist at http:\/\/127\.0\.0\.1:\d+ \(create it, or correct bucket_name\)$/ },
      { name: 'endpoint', extra: { endpoint_url: `http://127.0.0.1:${port}`, aws_secret_access_key: secret, max_retries: 6 },
        expect: /^ERROR: cannot access s3:\/\/backy\/ at http:\/\/127\.0\.0\.1:\d+: connection refused \(gave up after 3 attempts\)$/ },
    ];
    for (const c of cases) {
      const repo = s3Repo(t, c.extra);
      await repo.ok(['initdb']);
      const started = Date.now();
      const r = await repo.run(['ls']);
      assert.equal(r.code, 6, `${c.name}: ${r.stderr}`);
      assert.match(oneErrorLine(r), c.expect);
      assert.ok(Date.now() - started < 15_000, `${c.name}: fails within seconds`);
      const logText = fs.readFileSync(path.join(repo.dir, 'backy.log'), 'utf8');
      for (const text of [r.stderr, r.stdout, logText]) {
        assert.ok(!text.includes(secret), `${c.name}: the secret leaked`);
        assert.ok(!text.includes('AKIAWRONG'), `${c.name}: the access key id is not needed in messages`);
      }
      // A backup attempt fails the same way, before reading anything.
      const b = await repo.run(['backup', `file://${repo.cfg}`, 'x']);
      assert.equal(b.code, 6);
      assert.match(oneErrorLine(b), c.expect);
    }
  });

  test('without keys in the configuration, the SDK\'s default credentials (environment) are used', async (t) => {
    const repo = s3Repo(t, { aws_access_key_id: '', aws_secret_access_key: '' });
    await repo.ok(['initdb']);
    // An empty HOME and no instance metadata: the environment is the only place credentials can come from.
    const env = { HOME: repo.dir, AWS_EC2_METADATA_DISABLED: 'true', AWS_ACCESS_KEY_ID: '', AWS_SECRET_ACCESS_KEY: '', AWS_PROFILE: '' };
    const none = await repo.run(['ls'], { env });
    assert.equal(none.code, 6, none.stderr);
    assert.match(oneErrorLine(none), /^ERROR: cannot access S3 bucket "backy" at http:\/\/127\.0\.0\.1:\d+: no credentials found \(set aws_access_key_id/);
    const img = path.join(repo.dir, 'disk.img');
    writeImage(img, MiB + 5, 'random', 5);
    const withEnv = { ...env, AWS_ACCESS_KEY_ID: 'S3RVER', AWS_SECRET_ACCESS_KEY: 'S3RVER' };
    const b = await repo.run(['backup', `file://${img}`, 'vm'], { env: withEnv });
    assert.equal(b.code, 0, b.stderr);
    const out = path.join(repo.dir, 'out.img');
    assert.equal((await repo.run(['restore', b.stdout.trim(), `file://${out}`], { env: withEnv })).code, 0);
    assert.equal(sha256File(out), sha256File(img));
  });

  test('configuration mistakes are configuration errors (exit 1)', async (t) => {
    for (const [extra, expect] of [
      [{ endpoint_url: 'ftp://127.0.0.1:21' }, /endpoint_url: the scheme must be http or https/],
      [{ endpoint_url: 'http://user:pw@127.0.0.1:9000' }, /put credentials in aws_access_key_id/],
      [{ aws_secret_access_key: '' }, /aws_access_key_id is set but aws_secret_access_key is not/],
    ] as const) {
      const repo = s3Repo(t, extra);
      await repo.ok(['initdb']);
      const r = await repo.run(['ls']);
      assert.equal(r.code, 1, r.stderr);
      assert.match(oneErrorLine(r), expect);
      assert.ok(!r.stderr.includes(':pw@'));
    }
  });
});
