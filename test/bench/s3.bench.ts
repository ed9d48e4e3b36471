import * as fs from 'node:fs';
import * as http from 'node:http';
import type { AddressInfo } from 'node:net';
import * as path from 'node:path';
import { randomBytes } from 'node:crypto';
import { BACKY, makeTestRepo, TestRepo } from '../helpers/cli';
import { sha256File } from '../helpers/images';
import { startS3Server, S3Server } from '../helpers/s3-server';
import { blobKey } from '../../src/storage/types';
import { dropCaches, mbps, measure, Measured, mib, mixedImage, table, verdict } from './common';

const REPEAT = Number(process.env.BACKY_BENCH_REPEAT ?? 2);

/** USER_HZ: /proc reports CPU time in these ticks (100 on every Linux architecture backy runs on). */
const CLOCK_TICKS = 100;

/** CPU seconds (user + system) a process has used so far, from /proc. */
function cpuSeconds(pid: number): number {
  try {
    const fields = fs.readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1].split(' ');
    return (Number(fields[11]) + Number(fields[12])) / CLOCK_TICKS;
  } catch {
    return 0;
  }
}

interface Row {
  backend: string;
  op: string;
  seconds: number;
  rss: number;
  cpu: number;
  serverCpu?: number;
  /** backup's own summary: "<size> stored in <n> new blobs" */
  stored?: string;
}

/** Runs backy under a second /usr/bin/time for its CPU seconds; the outer one (measure) still reports the
 * peak RSS of the whole process tree, which is backy's. */
async function timed(repo: TestRepo, args: string[], server?: S3Server): Promise<Measured & { cpu: number; serverCpu?: number }> {
  dropCaches();
  const cpu0 = server ? cpuSeconds(server.pid) : 0;
  const m = await measure('/usr/bin/time', ['-f', '__CPU__ %U %S', process.execPath, BACKY, '-c', repo.cfg, ...args]);
  if (m.code !== 0) throw new Error(`backy ${args.join(' ')} exited ${m.code}: ${m.stderr.slice(-2000)}`);
  const c = /__CPU__ ([\d.]+) ([\d.]+)/.exec(m.stderr);
  return { ...m, cpu: c ? Number(c[1]) + Number(c[2]) : 0, serverCpu: server ? cpuSeconds(server.pid) - cpu0 : undefined };
}

/** Backup then restore of `image` into a fresh repository; the restore is checked by hash. */
async function cycle(label: string, extra: string, image: string, hash: string, server?: S3Server): Promise<Row[]> {
  const repo = makeTestRepo(extra);
  try {
    const init = await measure(process.execPath, [BACKY, '-c', repo.cfg, 'initdb']);
    if (init.code !== 0) throw new Error(init.stderr);
    const b = await timed(repo, ['backup', `file://${image}`, 'bench'], server);
    const uid = b.stdout.trim();
    const out = path.join(repo.dir, 'restored.img');
    const r = await timed(repo, ['restore', uid, `file://${out}`], server);
    if (sha256File(out) !== hash) throw new Error(`${label}: restored image differs`);
    return [
      { backend: label, op: 'backup', seconds: b.seconds, rss: b.rss, cpu: b.cpu, serverCpu: b.serverCpu, stored: /\S+ \S+ stored in \d+ new blobs/.exec(b.stderr)?.[0] },
      { backend: label, op: 'restore', seconds: r.seconds, rss: r.rss, cpu: r.cpu, serverCpu: r.serverCpu },
    ];
  } finally {
    repo.cleanup();
  }
}

/**
 * What s3rver itself manages: plain PUTs and GETs of 4 MiB objects through backy's S3 client, no codec,
 * no database. If backy's S3 backup is close to this, the server is the limit, not backy.
 */
async function serverCeiling(server: S3Server, parallel: number, count: number): Promise<{ put: number; get: number; cpuPut: number; cpuGet: number }> {
  const store = server.store('ceiling', { simultaneous_removals: 4 });
  const blob = randomBytes(4 * 1024 * 1024);
  const keys = Array.from({ length: count }, () => blobKey(randomBytes(16).toString('hex')));
  const run = async (fn: (k: string) => Promise<unknown>): Promise<[number, number]> => {
    const cpu0 = cpuSeconds(server.pid);
    const t0 = process.hrtime.bigint();
    let next = 0;
    await Promise.all(Array.from({ length: parallel }, async () => {
      while (next < keys.length) await fn(keys[next++]);
    }));
    return [Number(process.hrtime.bigint() - t0) / 1e9, cpuSeconds(server.pid) - cpu0];
  };
  try {
    const [put, cpuPut] = await run((k) => store.put(k, blob));
    const [get, cpuGet] = await run((k) => store.get(k));
    await store.delete(keys);
    return { put, get, cpuPut, cpuGet };
  } finally {
    await store.close();
  }
}

/**
 * An endpoint that answers every request with an empty 200 and throws PUT bodies away: a backup against it
 * costs backy everything the S3 protocol costs (signing, HTTP, the SDK) and the server nothing. Only for
 * telling backy's overhead from s3rver's; it holds no data, so there is no restore to measure.
 */
async function startNullEndpoint(): Promise<{ endpoint: string; close(): Promise<void> }> {
  const server = http.createServer((req, res) => {
    req.resume();
    req.on('end', () => {
      res.writeHead(200, { etag: '"0"', 'content-length': 0 });
      res.end();
    });
  });
  server.keepAliveTimeout = 60_000;
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', () => resolve()));
  return {
    endpoint: `http://127.0.0.1:${(server.address() as AddressInfo).port}`,
    close: () => new Promise<void>((resolve) => {
      server.closeAllConnections();
      server.close(() => resolve());
    }),
  };
}

async function nullBackup(image: string): Promise<Row> {
  const nul = await startNullEndpoint();
  const repo = makeTestRepo(['[DataBackend]', 'type = s3', `endpoint_url = ${nul.endpoint}`, 'bucket_name = null',
    'aws_access_key_id = x', 'aws_secret_access_key = y', 'simultaneous_writes = 8'].join('\n'));
  try {
    const init = await measure(process.execPath, [BACKY, '-c', repo.cfg, 'initdb']);
    if (init.code !== 0) throw new Error(init.stderr);
    const cpu0 = process.cpuUsage();
    const b = await timed(repo, ['backup', `file://${image}`, 'bench']);
    const c = process.cpuUsage(cpu0);
    return { backend: 'null endpoint, writes 8', op: 'backup', seconds: b.seconds, rss: b.rss, cpu: b.cpu, serverCpu: (c.user + c.system) / 1e6 };
  } finally {
    repo.cleanup();
    await nul.close();
  }
}

export async function run(): Promise<void> {
  const image = mixedImage();
  const size = fs.statSync(image).size;
  const hash = sha256File(image);
  const server = await startS3Server();
  try {
    const rows: Row[] = [];
    // The file backend with and without fsync: s3rver never fsyncs, so "fsync = false" is the like-for-like
    // comparison; "fsync = true" is what a file repository does by default.
    const configs: [string, string, S3Server?][] = [
      ['file, fsync', '[DataBackend]\nsimultaneous_writes = 8'],
      ['file, no fsync', '[DataBackend]\nsimultaneous_writes = 8\nfsync = false'],
      ['s3rver, writes 1', server.config({ simultaneous_writes: 1 }), server],
      ['s3rver, writes 8', server.config({ simultaneous_writes: 8 }), server],
    ];
    // Best of REPEAT runs, each in a fresh repository: the machine is shared, and one slow run says more
    // about the neighbours than about backy.
    for (const [label, extra, srv] of configs) {
      let best: Row[] | undefined;
      for (let i = 0; i < REPEAT; i++) {
        const got = await cycle(label, extra, image, hash, srv);
        best = best ? best.map((b, k) => (got[k].seconds < b.seconds ? got[k] : b)) : got;
      }
      rows.push(...best!);
    }
    let bestNull: Row | undefined;
    for (let i = 0; i < REPEAT; i++) {
      const got = await nullBackup(image);
      if (!bestNull || got.seconds < bestNull.seconds) bestNull = got;
    }
    rows.push(bestNull!);
    table(`backup and restore of the ${mib(size)} mixed image, best of ${REPEAT}: file backend vs S3 (s3rver on 127.0.0.1, same machine)`,
      ['backend', 'op', 'seconds', 'throughput', 'peak RSS', 'backy CPU s', 'server CPU s'],
      rows.map((r) => [r.backend, r.op, r.seconds.toFixed(1), mbps(size, r.seconds), mib(r.rss), r.cpu.toFixed(1),
        r.serverCpu === undefined ? '-' : r.serverCpu.toFixed(1)]));
    console.log(`\nEach backup: ${rows.find((r) => r.stored)?.stored ?? '?'} (the rest is deduplicated or sparse).`);
    const base = (op: string) => rows.find((r) => r.backend === 'file, no fsync' && r.op === op)!.seconds;
    for (const r of rows.filter((x) => !x.backend.startsWith('file'))) {
      const times = r.seconds / base(r.op);
      console.log(`${r.backend} ${r.op}: ${times.toFixed(2)}x the time of the file backend without fsync` +
        (r.backend.startsWith('s3rver') ? ` (issue 5: ${verdict(times, { atMost: 2 })}); peak RSS ${mib(r.rss)} (${verdict(r.rss / 1024 ** 2, { atMost: 300 })} MiB)` : ''));
    }

    const n = 128;
    const ceilingRows: (string | number)[][] = [];
    for (const p of [1, 8]) {
      const c = await serverCeiling(server, p, n);
      const bytes = n * 4 * 1024 * 1024;
      ceilingRows.push([p, mbps(bytes, c.put), c.cpuPut.toFixed(1), mbps(bytes, c.get), c.cpuGet.toFixed(1)]);
    }
    table(`s3rver alone: ${n} plain PUTs then GETs of 4 MiB objects (${mib(n * 4 * 1024 * 1024)})`,
      ['parallel', 'PUT', 's3rver CPU s (PUT)', 'GET', 's3rver CPU s (GET)'], ceilingRows);
  } finally {
    await server.stop();
  }
}
