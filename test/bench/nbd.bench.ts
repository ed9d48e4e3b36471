/**
 * The NBD server against nbdkit, side by side on the 2 GiB mixed image: `nbdcopy … null:` with a cold and a
 * warm block cache, fio random 4 KiB reads at queue depth 1 and 32 (warm), peak RSS of the server, and the
 * first read of a 1 TiB sparse version. `npm run bench -- nbd`; BENCH_NBD_SECONDS sets the fio run time,
 * BENCH_NBD_ROUNDS the number of rounds.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { ChildProcess, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { BACKY } from '../helpers/cli';
import { makeSparseVersion, peakRss, sharedMemoryBytes, startBackyNbd } from '../helpers/backy-nbd';
import { run as runTool } from '../helpers/nbd-tools';
import { NbdClient } from '../../nbd/client';
import { BENCH_DIR, dropCaches, loadAverage, measure, mib, mixedImage, sparseCopy, table, verdict } from './common';
import { freePort, waitPort } from '../helpers/net';

const FIO_SECONDS = Number(process.env.BENCH_NBD_SECONDS ?? 5);
const ROUNDS = Number(process.env.BENCH_NBD_ROUNDS ?? 3);
const CACHE = '3G';



/** Seconds for `nbdcopy URI null:` (default parallelism). */
async function nbdcopy(uri: string): Promise<number> {
  const t0 = process.hrtime.bigint();
  const r = await runTool('nbdcopy', [uri, 'null:'], { timeoutMs: 600_000 });
  if (r.code !== 0) throw new Error(`nbdcopy ${uri} failed: ${r.stderr}`);
  return Number(process.hrtime.bigint() - t0) / 1e9;
}

/** IOPS of fio random 4 KiB reads over one NBD connection at the given queue depth. */
async function fioRandom(uri: string, depth: number): Promise<number> {
  const r = await runTool('fio', ['--name=rand', '--ioengine=nbd', `--uri=${uri}`, '--rw=randread', '--bs=4k', `--iodepth=${depth}`,
    `--runtime=${FIO_SECONDS}`, '--time_based', '--randrepeat=1', '--output-format=json'], { timeoutMs: (FIO_SECONDS + 60) * 1000 });
  if (r.code !== 0) throw new Error(`fio failed: ${r.stderr}`);
  const json = JSON.parse(r.stdout.slice(r.stdout.indexOf('{'))) as { jobs: { read: { iops: number } }[] };
  return json.jobs[0].read.iops;
}

/** User + system CPU seconds a process has used so far. */
function cpuSeconds(pid: number): number {
  const f = fs.readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1].split(' ');
  return (Number(f[11]) + Number(f[12])) / 100; // utime, stime (fields 14, 15) in clock ticks of 1/100 s
}

function stopChild(c: ChildProcess): Promise<void> {
  return new Promise((resolve) => {
    if (c.exitCode !== null || c.signalCode !== null) return resolve();
    c.once('exit', () => resolve());
    c.kill('SIGTERM');
  });
}

export async function run(): Promise<void> {
  const img = mixedImage();
  const size = fs.statSync(img).size;
  const work = path.join(BENCH_DIR, 'work-nbd');
  fs.rmSync(work, { recursive: true, force: true });
  fs.mkdirSync(work, { recursive: true });
  const cfg = path.join(work, 'backy.cfg');
  fs.writeFileSync(cfg, `[DEFAULTS]\nencryption_key = ${randomBytes(32).toString('hex')}\nlogfile = ${work}/backy.log\ncache_size = ${CACHE}\n` +
    `[MetaBackend]\nengine = sqlite:///${work}/backy.sqlite\n[DataBackend]\npath = ${work}/data\nfsync = false\n`);
  const backy = (...args: string[]) => measure(process.execPath, [BACKY, '-c', cfg, ...args]);
  const init = await backy('-v', 'initdb');
  const hash = /hash_function = (\S+)/.exec(init.stderr)?.[1] ?? 'sha512';
  const b = await backy('backup', `file://${img}`, 'bench');
  if (b.code !== 0) throw new Error(`backup failed: ${b.stderr}`);
  const uid = b.stdout.trim();
  const gbps = (s: number) => `${(size / 1e6 / s).toFixed(0)} MB/s`;

  // The reference: nbdkit's file plugin serving a sparse copy of the image (the zero blocks are holes, so it
  // reports and skips the same ranges backy does). Both servers are measured in turns, in several rounds,
  // keeping each one's best figure: the machine may be shared, and turns spread the noise. "Cold" is the page
  // cache dropped for both, and for backy a freshly started server (empty block cache); "warm" is the page
  // cache (nbdkit) or backy's block cache holding the data (the same servers afterwards).
  const sparse = sparseCopy(img);
  const kitPort = await freePort();
  const kit = spawn('nbdkit', ['-f', '-r', '-i', '127.0.0.1', '-p', String(kitPort), 'file', sparse], { stdio: 'ignore' });
  const kitUri = `nbd://127.0.0.1:${kitPort}/`;
  const best = { kitCold: Infinity, kitSeq: Infinity, cold: Infinity, coldTag: Infinity, warm: Infinity, kitQd1: 0, kitQd32: 0, qd1: 0, qd32: 0, rss: 0, coldCpu: Infinity };
  // The same repository read with read_verification = tag (GCM tag only, no checksum recomputed).
  const cfgTag = path.join(work, 'backy-tag.cfg');
  fs.writeFileSync(cfgTag, `${fs.readFileSync(cfg, 'utf8')}\n[DEFAULTS]\nread_verification = tag\n`);
  const loads: string[] = [];
  try {
    await waitPort(kitPort);
    for (let round = 0; round < ROUNDS; round++) {
      loads.push(loadAverage());
      dropCaches();
      best.kitCold = Math.min(best.kitCold, await nbdcopy(kitUri));
      const srv = await startBackyNbd(cfg, [], { verbose: false });
      try {
        dropCaches();
        const cpu0 = cpuSeconds(srv.pid);
        best.cold = Math.min(best.cold, await nbdcopy(srv.uri(uid)));
        best.coldCpu = Math.min(best.coldCpu, cpuSeconds(srv.pid) - cpu0);
        for (let k = 0; k < 2; k++) {
          best.kitSeq = Math.min(best.kitSeq, await nbdcopy(kitUri));
          best.warm = Math.min(best.warm, await nbdcopy(srv.uri(uid)));
        }
        const tagSrv = await startBackyNbd(cfgTag, [], { verbose: false });
        try {
          dropCaches();
          best.coldTag = Math.min(best.coldTag, await nbdcopy(tagSrv.uri(uid)));
        } finally {
          await tagSrv.stop();
        }
        await nbdcopy(kitUri); // the page cache warm again for nbdkit's random reads
        best.kitQd1 = Math.max(best.kitQd1, await fioRandom(kitUri, 1));
        best.qd1 = Math.max(best.qd1, await fioRandom(srv.uri(uid), 1));
        best.kitQd32 = Math.max(best.kitQd32, await fioRandom(kitUri, 32));
        best.qd32 = Math.max(best.qd32, await fioRandom(srv.uri(uid), 32));
        // The cache's blocks live in shared memory, which RSS does not count: both together.
        best.rss = Math.max(best.rss, peakRss(srv.pid) + sharedMemoryBytes(srv.pid));
      } finally {
        const code = await srv.stop();
        if (code !== 0) throw new Error(`backy nbd exited ${code}: ${srv.stderr()}`);
      }
    }
  } finally {
    await stopChild(kit);
  }
  const { kitCold, kitSeq, cold, coldTag, warm, kitQd1, kitQd32, qd1, qd32, rss, coldCpu } = best;

  // First read of a 1 TiB sparse version: open + read of a data block, and of a hole far away.
  const tib = 1024 ** 4;
  const blk = randomBytes(4 * 1024 * 1024);
  const bigUid = await makeSparseVersion(cfg, 'sparse-1T', tib, new Map([[100_000, blk]]));
  const srv = await startBackyNbd(cfg, [], { verbose: false });
  let firstRead = 0;
  let holeRead = 0;
  try {
    const t0 = process.hrtime.bigint();
    const c = await NbdClient.connect({ host: '127.0.0.1', port: srv.port }, { exportName: bigUid });
    const got = await c.read(100_000 * 4 * 1024 * 1024 + 4096, 4096);
    firstRead = Number(process.hrtime.bigint() - t0) / 1e6;
    if (!got.equals(blk.subarray(4096, 8192))) throw new Error('1 TiB version: wrong data');
    const t1 = process.hrtime.bigint();
    await c.read(tib - 8192, 8192);
    holeRead = Number(process.hrtime.bigint() - t1) / 1e6;
    await c.close();
  } finally {
    await srv.stop();
  }

  const ratio = { warm: kitSeq / warm, cold: kitCold / cold, qd1: qd1 / kitQd1, qd32: qd32 / kitQd32 };
  const both = (v: number, issue3: number, issue14: number) => `issue 3 ${verdict(v, { atLeast: issue3 })}; issue 14 ${verdict(v, { atLeast: issue14 })}`;
  table(`NBD: 2 GiB mixed image, 127.0.0.1; nbdkit file serves a sparse copy (same holes); new repository defaults (hash_function = ${hash})`,
    ['run', 'nbdkit file', 'backy nbd', 'ratio', 'targets'], [
      ['nbdcopy null: warm', gbps(kitSeq), gbps(warm), `${ratio.warm.toFixed(2)}x`, both(ratio.warm, 0.6, 0.8)],
      ['nbdcopy null: cold (page cache dropped; backy: fresh server, decrypt + recompute checksum)', gbps(kitCold), gbps(cold), `${ratio.cold.toFixed(2)}x`, both(ratio.cold, 0.3, 0.5)],
      ['  same, read_verification = tag', gbps(kitCold), gbps(coldTag), `${(kitCold / coldTag).toFixed(2)}x`, ''],
      ['fio randread 4 KiB QD1 (IOPS, warm)', kitQd1.toFixed(0), qd1.toFixed(0), `${ratio.qd1.toFixed(2)}x`, both(ratio.qd1, 0.5, 0.6)],
      ['fio randread 4 KiB QD32 (IOPS, warm)', kitQd32.toFixed(0), qd32.toFixed(0), `${ratio.qd32.toFixed(2)}x`, both(ratio.qd32, 0.5, 0.7)],
    ]);
  console.log(`\nbest of ${ROUNDS} rounds each (load average at each round's start: ${loads.join(', ')}); backup of the image: ${b.seconds.toFixed(1)} s`);
  console.log(`cold copy: the server used ${coldCpu.toFixed(2)} CPU-seconds (read, decrypt, verify each unique block once)`);
  console.log(`backy nbd peak RSS + block cache in shared memory ${mib(rss)} with cache_size ${CACHE} (issue 3: ${verdict(rss / 1024 ** 2, { atMost: 3 * 1024 + 150 })} MiB)`);
  console.log(`1 TiB sparse version: connect + first 4 KiB read ${firstRead.toFixed(0)} ms, a hole at the end ${holeRead.toFixed(1)} ms`);
  fs.rmSync(work, { recursive: true, force: true });
}
