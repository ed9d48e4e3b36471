/**
 * One client cannot spoil the shared cache and storage for the others: NBD_CMD_CACHE is bounded and yields
 * to reads, a missing object is not fetched again for every request (GETs counted at a proxy in front of a
 * real S3 server), and neither failures nor misbehaving clients flood the log.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import * as C from '../nbd/constants';
import { NbdClient } from '../nbd/client';
import { blobFileOf, makeTestRepo, TestRepo } from './helpers/cli';
import { BackyNbd, startBackyNbd } from './helpers/backy-nbd';
import { FaultProxy, startFaultProxy } from './helpers/fault-proxy';
import { SeededRandom } from './helpers/images';
import { RawPeer, waitFor } from './helpers/nbd-tools';
import { S3Server, startS3Server } from './helpers/s3-server';

const MiB = 1024 * 1024;
const BS = 4 * MiB;
const PREFIX = 'fair/';

let s3: S3Server;
let proxy: FaultProxy;
let repo: TestRepo;
let server: BackyNbd;
const versions: Record<'big' | 'hot' | 'broken', { uid: string; size: number; data: Buffer }> = {} as never;

/** The S3 object key of block `index` of version `uid`. */
function objectKey(uid: string, index: number): string {
  return PREFIX + path.relative(path.join(repo.dir, 'data'), blobFileOf(repo, uid, index));
}

function getsOf(keys: string[]): number {
  return proxy.seen.filter((r) => r.method === 'GET' && keys.some((k) => r.url.includes(k))).length;
}

before(async () => {
  s3 = await startS3Server();
  proxy = await startFaultProxy({ target: s3.endpoint });
  repo = makeTestRepo(`[DEFAULTS]\ncache_size = 64M\n${s3.config({ endpoint_url: proxy.endpoint, prefix: PREFIX })}\n`);
  await repo.ok(['initdb']);
  const rnd = new SeededRandom('fairness');
  for (const [name, blocks] of [['big', 40], ['hot', 4], ['broken', 3]] as const) {
    const data = rnd.bytes(blocks * BS);
    const file = path.join(repo.dir, `${name}.img`);
    fs.writeFileSync(file, data);
    versions[name] = { uid: (await repo.ok(['backup', `file://${file}`, name])).stdout.trim(), size: data.length, data };
    fs.rmSync(file);
  }
  server = await startBackyNbd(repo.cfg);
});

after(async () => {
  if (server) assert.equal(await server.stop(), 0, server.stderr());
  repo?.cleanup();
  await proxy?.close();
  await s3?.stop();
});

describe('NBD fairness on shared storage', () => {
  test('NBD_CMD_CACHE over a whole version neither floods storage nor evicts what others read; a read goes first', async () => {
    const hot = versions.hot;
    const hotKeys = [0, 1, 2, 3].map((i) => objectKey(hot.uid, i));
    const bigKeys = Array.from({ length: 40 }, (_, i) => objectKey(versions.big.uid, i));
    // Another client reads the hot version: its 16 MiB are cached (64 MiB cache).
    const reader = await NbdClient.connect({ host: '127.0.0.1', port: server.port }, { exportName: hot.uid });
    assert.ok((await reader.read(0, hot.size)).equals(hot.data));
    assert.equal(getsOf(hotKeys), 4);

    // A client asks to cache all 160 MiB of the big version, 32 requests at once, again and again.
    const p = await RawPeer.connect(server.port);
    await p.greet();
    await p.go(versions.big.uid);
    const seenBefore = proxy.seen.length;
    for (let round = 0; round < 3; round++) {
      for (let i = 0; i < 32; i++) p.sendRequest(C.CMD_CACHE, (i % 8) * 5 * BS, 5 * BS, { cookie: BigInt(i) });
      for (let i = 0; i < 32; i++) assert.equal((await p.readSimpleReply()).error, 0, 'CACHE succeeds (it is a hint)');
    }
    const prefetched = getsOf(bigKeys);
    // The prefetch budget is a quarter of the cache: 16 MiB, 4 blocks (a read consumes none here).
    assert.ok(prefetched >= 1 && prefetched <= 4, `${prefetched} GETs for 96 CACHE requests over 160 MiB`);
    assert.ok(proxy.seen.length - seenBefore <= 4, 'nothing else was fetched');

    // A read of a block that is neither cached nor prefetched is served; the hot version is still cached.
    const big = await NbdClient.connect({ host: '127.0.0.1', port: server.port }, { exportName: versions.big.uid });
    assert.ok((await big.read(39 * BS, 4096)).equals(versions.big.data.subarray(39 * BS, 39 * BS + 4096)));
    assert.ok((await reader.read(0, hot.size)).equals(hot.data));
    assert.equal(getsOf(hotKeys), 4, 'the hot blocks were not evicted by the prefetches: no GET again');
    await big.close();
    await reader.close();
    p.destroy();
  });

  test('a missing object is fetched once per few seconds however often it is read, and logged once with a count', async () => {
    const v = versions.broken;
    const key = objectKey(v.uid, 1);
    const store = s3.store(PREFIX);
    try {
      await store.delete([key.slice(PREFIX.length)]);
    } finally {
      await store.close();
    }
    const c = await NbdClient.connect({ host: '127.0.0.1', port: server.port }, { exportName: v.uid });
    const before = getsOf([key]);
    const t0 = Date.now();
    let failures = 0;
    for (let i = 0; i < 300; i++) {
      await c.read(BS + (i % 64) * 4096, 4096).then(
        () => assert.fail('a block whose object is missing cannot be read'),
        (e: Error & { errno?: string }) => {
          assert.equal(e.errno, 'EIO');
          failures++;
        },
      );
    }
    const secs = (Date.now() - t0) / 1000;
    // Other blocks of the version are fine.
    assert.ok((await c.read(2 * BS, 4096)).equals(v.data.subarray(2 * BS, 2 * BS + 4096)));
    await c.close();
    const gets = getsOf([key]) - before;
    process.stdout.write(`# 300 reads of a missing object in ${secs.toFixed(1)} s: ${gets} GETs\n`);
    assert.equal(failures, 300);
    // Remembered for 5 s: one GET per 5 s of reading, not one per read.
    assert.ok(gets >= 1 && gets <= Math.ceil(secs / 5) + 1, `${gets} GETs for 300 reads in ${secs.toFixed(1)} s`);
    const lines = server.stderr().split('\n').filter((l) => l.includes(`version ${v.uid}: cannot read block at offset ${BS}`));
    assert.ok(lines.length >= 1 && lines.length <= Math.ceil(secs / 10) + 1, `${lines.length} log lines:\n${lines.join('\n')}`);
  });

  test('a client reconnecting in a loop with garbage does not flood the log', async () => {
    const before = server.stderr().length;
    for (let i = 0; i < 200; i++) {
      const p = await RawPeer.connect(server.port);
      await p.greet(0x7fff0000);
      await p.closedWithin(2000);
    }
    // A long export name is cut in the log.
    const q = await RawPeer.connect(server.port);
    await q.greet();
    q.sendOption(C.OPT_EXPORT_NAME, Buffer.from('x'.repeat(60_000)));
    assert.ok(await q.closedWithin(2000));
    assert.ok(await waitFor(() => /unknown export "x{64}…" \(60000 bytes\)/.test(server.stderr().slice(before)), 3000), server.stderr().slice(before));
    const lines = server.stderr().slice(before).split('\n').filter((l) => l.includes('unknown client flags'));
    assert.ok(lines.length >= 1 && lines.length <= 3, `${lines.length} lines for 200 bad clients:\n${lines.slice(0, 5).join('\n')}`);
    assert.ok(server.stderr().slice(before).split('\n').every((l) => l.length < 1000), 'no line carries the 60000-byte name');
  });
});
