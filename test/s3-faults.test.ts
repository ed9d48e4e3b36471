/**
 * The CLI on S3 through a fault-injecting proxy: with a share of requests failing (resets, lost replies,
 * truncated bodies, 500, 503, timeouts) every command still completes and restores byte-identical data;
 * with every request failing commands stop with one clear line (exit 6), and no valid version ever
 * points at an object that is not stored.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { makeTestRepo, RunResult, TestRepo, writeImage, restoredHash } from './helpers/cli';
import { sha256File } from './helpers/images';
import { startS3Server, S3Server } from './helpers/s3-server';
import { ALL_FAULTS, FaultProxy, startFaultProxy } from './helpers/fault-proxy';

const KiB = 1024;
const MiB = 1024 * KiB;
const BS = 64 * KiB;

let s3: S3Server;
let proxy: FaultProxy;
before(async () => {
  s3 = await startS3Server();
  proxy = await startFaultProxy({ target: s3.endpoint, delayMs: 1500 });
});
after(async () => {
  await proxy?.close();
  await s3?.stop();
});

function resetProxy(): void {
  proxy.rate = 0;
  proxy.kinds = ALL_FAULTS;
  proxy.eligible = () => true;
  proxy.script = [];
}

function faultyRepo(t: { after(fn: () => void): void }, extra: Record<string, string | number>): TestRepo {
  // read_timeout 1 s: the proxy's 1.5 s delays become client timeouts.
  const repo = makeTestRepo(s3.config({ endpoint_url: proxy.endpoint, read_timeout: 1, connect_timeout: 2, ...extra }), { blockSize: BS });
  t.after(() => repo.cleanup());
  t.after(resetProxy);
  return repo;
}

function machineRows(r: RunResult): Record<string, string>[] {
  const [head, ...rows] = r.stdout.trim().split('\n');
  const fields = head.split('|');
  return rows.filter(Boolean).map((l) => Object.fromEntries(l.split('|').map((v, i) => [fields[i], v])));
}


/** Every valid version reads back completely from storage (scrub reads every blob, never a cache). */
async function everyValidVersionIsStored(repo: TestRepo): Promise<number> {
  const valid = machineRows(await repo.ok(['-m', 'ls'])).filter((r) => r.valid === '1');
  for (const v of valid) await repo.ok(['scrub', v.uid]);
  return valid.length;
}

function faults(): number {
  return ALL_FAULTS.reduce((s, k) => s + proxy.stats[k], 0);
}

describe('S3 through a faulty network', () => {
  test('15 % faults of every kind: backup, differential, restore, scrub, cleanup all complete, data identical', async (t) => {
    const repo = faultyRepo(t, { prefix: 'flaky', max_retries: 8 });
    await repo.ok(['initdb']);
    const img = path.join(repo.dir, 'disk.img');
    writeImage(img, 12 * MiB + 4321, 'mixed', 21);
    const hash1 = sha256File(img);
    const faultsBefore = faults();
    proxy.rate = 0.15;

    const uid1 = (await repo.ok(['backup', `file://${img}`, 'vm'])).stdout.trim();
    assert.equal(await restoredHash(repo, uid1), hash1);
    const fd = fs.openSync(img, 'r+');
    fs.writeSync(fd, Buffer.alloc(3 * BS, 0x5c), 0, 3 * BS, 40 * BS + 3);
    fs.closeSync(fd);
    const hash2 = sha256File(img);
    const uid2 = (await repo.ok(['backup', '-f', uid1, `file://${img}`, 'vm'])).stdout.trim();
    assert.equal(await restoredHash(repo, uid2), hash2);
    await repo.ok(['scrub', uid1]);
    await repo.ok(['rm', '-f', uid1]);
    await repo.ok(['cleanup', '--dangerous-force']);
    await repo.ok(['cleanup', '--full']);

    const injected = faults() - faultsBefore;
    const kinds = ALL_FAULTS.filter((k) => proxy.stats[k] > 0);
    t.diagnostic(`${injected} faults injected in ${proxy.stats.requests} requests: ${JSON.stringify(proxy.stats)}`);
    assert.ok(injected >= 20, `faults were injected (${injected})`);
    assert.ok(kinds.length >= 4, `most kinds of fault occurred (${kinds})`);

    // With the network healthy again: nothing the faulty runs did is unknown to the database, and the
    // surviving version is whole.
    proxy.rate = 0;
    const full = JSON.parse((await repo.ok(['--json', 'cleanup', '--full'])).stdout) as { orphansDeleted: number };
    assert.equal(full.orphansDeleted, 0);
    assert.equal(await restoredHash(repo, uid2), hash2);
    assert.equal(await everyValidVersionIsStored(repo), 1);
  });

  test('every PUT failing: backup exits 6 with one clear line, the version stays invalid, -c completes it', async (t) => {
    const repo = faultyRepo(t, { prefix: 'down', max_retries: 2 });
    await repo.ok(['initdb']);
    const good = path.join(repo.dir, 'good.img');
    writeImage(good, 2 * MiB, 'random', 31);
    const goodUid = (await repo.ok(['backup', `file://${good}`, 'good'])).stdout.trim();

    const img = path.join(repo.dir, 'disk.img');
    writeImage(img, 4 * MiB + 77, 'mixed', 32);
    const hash = sha256File(img);
    proxy.eligible = (req) => req.method === 'PUT';
    proxy.kinds = ['503', '500', 'reset', 'lost-reply'];
    proxy.rate = 1;
    const r = await repo.run(['backup', `file://${img}`, 'vm']);
    assert.equal(r.code, 6, r.stderr);
    const last = r.stderr.trim().split('\n').pop()!;
    assert.match(last, /^ERROR: cannot store blob [0-9a-f]{2}\/[0-9a-f]{2}\/[0-9a-f]{32} in s3:\/\/backy\/down\/ at http:\/\/127\.0\.0\.1:\d+: .+ \(gave up after 3 attempts\)$/);
    assert.doesNotMatch(r.stderr, /\n\s+at /, 'no stack trace');
    assert.equal(r.stdout, '');

    proxy.rate = 0;
    const rows = machineRows(await repo.ok(['-m', 'ls']));
    const failed = rows.find((row) => row.name === 'vm');
    assert.ok(failed, 'the interrupted version is listed');
    assert.equal(failed.valid, '0');
    assert.equal(rows.find((row) => row.uid === goodUid)?.valid, '1');
    assert.equal(await everyValidVersionIsStored(repo), 1);
    const scrubFailed = await repo.run(['scrub', failed.uid]);
    assert.notEqual(scrubFailed.code, 0, 'the invalid version really is incomplete');

    // Storage is back: continue the same version.
    assert.equal((await repo.ok(['backup', '-c', failed.uid, `file://${img}`, 'vm'])).stdout.trim(), failed.uid);
    assert.equal(machineRows(await repo.ok(['-m', 'ls', 'vm']))[0].valid, '1');
    assert.equal(await restoredHash(repo, failed.uid), hash);
    assert.equal(await everyValidVersionIsStored(repo), 2);
  });

  test('every request failing: backup and restore stop with one clear line, exit 6', async (t) => {
    const repo = faultyRepo(t, { prefix: 'dark', max_retries: 1 });
    await repo.ok(['initdb']);
    const img = path.join(repo.dir, 'disk.img');
    writeImage(img, MiB, 'random', 41);
    const uid = (await repo.ok(['backup', `file://${img}`, 'vm'])).stdout.trim();

    proxy.kinds = ['503', '500', 'reset'];
    proxy.rate = 1;
    const b = await repo.run(['backup', `file://${img}`, 'vm2']);
    assert.equal(b.code, 6, b.stderr);
    assert.match(b.stderr.trim(), /^ERROR: cannot access s3:\/\/backy\/dark\/ at http:\/\/127\.0\.0\.1:\d+: .+ \(gave up after 2 attempts\)$/);

    // The command-start check passes, every GET fails: each block is reported, restore exits 6.
    proxy.eligible = (req) => req.method === 'GET';
    const out = path.join(repo.dir, 'out.img');
    const r = await repo.run(['restore', uid, `file://${out}`]);
    assert.equal(r.code, 6, r.stderr);
    assert.match(r.stderr, /offset 0: cannot read blob [0-9a-f/]+ from s3:\/\/backy\/dark\/ .*\(gave up after 2 attempts\)/);
    assert.match(r.stderr.trim().split('\n').pop()!, /^ERROR: 16 blocks could not be restored \(first at offset 0\)$/);
    assert.doesNotMatch(r.stderr, /\n\s+at /);

    proxy.rate = 0;
    assert.equal(machineRows(await repo.ok(['-m', 'ls'])).filter((row) => row.valid === '1').length, 1, 'the failed backup left no valid version');
    assert.equal(await restoredHash(repo, uid), sha256File(img));
  });
});
