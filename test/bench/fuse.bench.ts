import * as fs from 'node:fs';
import { readFile, stat } from 'node:fs/promises';
import * as path from 'node:path';
import { ChildProcess, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { BACKY } from '../helpers/cli';
import { forceCleanup, run as runCmd, sha256, sleep, withTimeout } from '../helpers/fuse-mount';
import { assembleSparseVersion } from '../helpers/fuse-sparse';
import { BENCH_DIR, dropCaches, mbps, measure, median, mib, mixedImage, table, verdict } from './common';
import { sharedMemoryBytes } from '../helpers/backy-nbd';

/**
 * `backy mount` against `restic mount` on the 2 GiB mixed image: sequential `cat` with a cold cache and
 * with a warm one (backy's cache full, the kernel's page cache dropped so FUSE itself is measured), random
 * 4 KiB reads with fio for 10 s, peak RSS, and the time from starting `backy mount` on a 1 TiB sparse version
 * to its first byte. Readers are child processes; the mounts run in child processes too.
 */

const MiB = 1024 * 1024;
const CACHE_SIZE = 1024 * MiB;
const WARM_RUNS = 3;
const COLD_RUNS = 3;

interface Served {
  child: ChildProcess;
  dir: string;
  log(): string;
  stop(): Promise<void>;
}

/** Starts a mount command and waits until `ready` (a file inside the mount) exists. */
async function serve(cmd: string, args: string[], dir: string, ready: string, timeoutMs = 60_000): Promise<Served> {
  const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  child.stdout!.on('data', (d) => (out += d));
  child.stderr!.on('data', (d) => (out += d));
  const exited = new Promise<void>((r) => child.on('exit', () => r()));
  const end = Date.now() + timeoutMs;
  while (!(await stat(ready).then(() => true, () => false))) {
    if (child.exitCode !== null || Date.now() > end) {
      child.kill('SIGKILL');
      throw new Error(`${cmd} ${args.join(' ')} did not serve ${ready}: ${out}`);
    }
    await sleep(50);
  }
  return {
    child, dir, log: () => out,
    async stop() {
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGINT');
      await withTimeout(exited, 20_000);
      await forceCleanup(dir, child);
    },
  };
}

/** user+system CPU seconds of a process so far. */
async function cpuSeconds(pid: number): Promise<number> {
  const f = (await readFile(`/proc/${pid}/stat`, 'utf8')).split(') ')[1].split(' ');
  return (Number(f[11]) + Number(f[12])) / 100;
}

/** Peak RSS plus what the process keeps in shared memory (backy's block cache; RSS does not count it). */
async function peakRss(pid: number): Promise<number> {
  const m = /VmHWM:\s+(\d+) kB/.exec(await readFile(`/proc/${pid}/status`, 'utf8'));
  return (m ? Number(m[1]) * 1024 : 0) + sharedMemoryBytes(pid);
}

interface SeqResult {
  seconds: number;
  cpu: number;
}

async function catToNull(file: string, pid: number): Promise<SeqResult> {
  dropCaches();
  const cpu0 = await cpuSeconds(pid);
  const r = await measure('sh', ['-c', 'cat "$1" > /dev/null', 'sh', file]);
  if (r.code !== 0) throw new Error(`cat ${file}: ${r.stderr}`);
  return { seconds: r.seconds, cpu: (await cpuSeconds(pid)) - cpu0 };
}

async function fioRandom(file: string): Promise<number> {
  dropCaches();
  const r = await runCmd('fio', ['--name=rand', `--filename=${file}`, '--ioengine=psync', '--readonly', '--rw=randread', '--bs=4k',
    '--runtime=10', '--time_based', '--output-format=json'], { timeoutMs: 120_000 });
  if (r.code !== 0) throw new Error(`fio: ${r.stderr}`);
  const j = JSON.parse(r.stdout.toString().slice(r.stdout.indexOf('{'))) as { jobs: { read: { iops: number } }[] };
  return j.jobs[0].read.iops;
}

interface Side {
  cold: SeqResult[];
  warm: SeqResult[];
  iops: number;
  rss: number;
}

/**
 * Cold runs each get a freshly started mount (empty cache) after drop_caches; the last mount then serves
 * the warm runs, fio and the RSS reading.
 */
async function measureSide(start: () => Promise<Served>, file: string, between: () => Promise<void> = async () => undefined): Promise<Side> {
  const cold: SeqResult[] = [];
  for (let i = 0; ; i++) {
    const s = await start();
    try {
      cold.push(await catToNull(file, s.child.pid!));
      await between();
      if (i < COLD_RUNS - 1) continue;
      const warm: SeqResult[] = [];
      for (let k = 0; k < WARM_RUNS; k++) {
        warm.push(await catToNull(file, s.child.pid!));
        await between();
      }
      const iops = await fioRandom(file);
      return { cold, warm, iops, rss: await peakRss(s.child.pid!) };
    } finally {
      await s.stop();
    }
  }
}


async function backy(cfg: string, args: string[]): Promise<string> {
  const r = await runCmd(process.execPath, [BACKY, '-c', cfg, ...args], { timeoutMs: 600_000 });
  if (r.code !== 0) throw new Error(`backy ${args.join(' ')}: ${r.stderr}`);
  return r.stdout.toString().trim();
}

/** restic's repository of the mixed image, kept in BENCH_DIR between runs (its backup takes a while). */
async function resticRepo(image: string): Promise<{ repo: string; pass: string }> {
  const repo = path.join(BENCH_DIR, 'restic-mixed');
  const pass = path.join(BENCH_DIR, 'restic-password');
  if (!fs.existsSync(pass)) fs.writeFileSync(pass, randomBytes(16).toString('hex'));
  const base = ['-r', repo, '--password-file', pass];
  const snaps = await runCmd('restic', [...base, 'snapshots', '--json', '--path', image]);
  if (snaps.code === 0 && (JSON.parse(snaps.stdout.toString() || '[]') as unknown[]).length) return { repo, pass };
  fs.rmSync(repo, { recursive: true, force: true });
  const init = await runCmd('restic', [...base, 'init']);
  if (init.code !== 0) throw new Error(`restic init: ${init.stderr}`);
  const b = await runCmd('restic', [...base, 'backup', '--quiet', image], { timeoutMs: 1_800_000 });
  if (b.code !== 0) throw new Error(`restic backup: ${b.stderr}`);
  return { repo, pass };
}

async function timeToFirstByte(cfg: string, uid: string, dir: string, image: string, expect: string): Promise<number> {
  fs.mkdirSync(dir, { recursive: true });
  const start = process.hrtime.bigint();
  const mount = spawn(process.execPath, [BACKY, '-c', cfg, 'mount', uid, dir], { stdio: ['ignore', 'ignore', 'pipe'] });
  let err = '';
  mount.stderr!.on('data', (d) => (err += d));
  const exited = new Promise<void>((r) => mount.on('exit', () => r()));
  try {
    const r = await runCmd('sh', ['-c', 'while [ ! -e "$1" ]; do sleep 0.005; done; head -c 4096 "$1"', 'sh', image], { timeoutMs: 30_000 });
    const seconds = Number(process.hrtime.bigint() - start) / 1e9;
    if (r.code !== 0 || sha256(r.stdout) !== expect) throw new Error(`first 4 KiB of ${image} wrong or unreadable (${r.stderr}); mount: ${err}`);
    return seconds;
  } finally {
    mount.kill('SIGINT');
    await withTimeout(exited, 10_000);
    await forceCleanup(dir, mount);
  }
}

export async function run(): Promise<void> {
  const image = mixedImage();
  const size = fs.statSync(image).size;
  const work = fs.mkdtempSync(path.join(BENCH_DIR, 'fuse-'));
  const cfg = path.join(work, 'backy.cfg');
  fs.writeFileSync(cfg, [
    '[DEFAULTS]', `logfile = ${work}/backy.log`, `encryption_key = ${randomBytes(32).toString('hex')}`, `cache_size = ${CACHE_SIZE}`,
    '[MetaBackend]', `engine = sqlite:///${work}/backy.sqlite`,
    '[DataBackend]', `path = ${work}/data`, 'fsync = false',
  ].join('\n'));
  try {
    await backy(cfg, ['initdb']);
    const backupStats = JSON.parse(await backy(cfg, ['--json', 'backup', `file://${image}`, 'mixed'])) as { uid: string; blocksWritten: number };
    const uid = backupStats.uid;
    const { repo: resticDir, pass } = await resticRepo(image);

    // The ceiling of the FUSE path: a trivial fuse-native file served from memory, read (page cache dropped)
    // in turns with backy's runs.
    const refDir = path.join(work, 'reference-mnt');
    fs.mkdirSync(refDir);
    const refImg = path.join(refDir, 'image.img');
    const reference = await serve(process.execPath, [path.join(__dirname, 'fuse-reference.js'), image, refDir], refDir, refImg, 180_000);
    const refRuns: SeqResult[] = [];
    let bres: Side;
    try {
      const bdir = path.join(work, 'mnt');
      fs.mkdirSync(bdir);
      const bimg = path.join(bdir, 'mixed.img');
      bres = await measureSide(() => serve(process.execPath, [BACKY, '-c', cfg, 'mount', uid, bdir], bdir, bimg), bimg,
        async () => void refRuns.push(await catToNull(refImg, reference.child.pid!)));
    } finally {
      await reference.stop();
    }

    const rdir = path.join(work, 'restic-mnt');
    fs.mkdirSync(rdir);
    const rimg = path.join(rdir, 'snapshots', 'latest', image);
    const rres = await measureSide(() => serve('restic', ['-r', resticDir, '--password-file', pass, 'mount', rdir], rdir, rimg), rimg);

    // Time to first byte of a 1 TiB version that is nearly all holes.
    const seedFile = path.join(work, 'seed.raw');
    fs.writeFileSync(seedFile, randomBytes(16 * MiB));
    const seedUid = await backy(cfg, ['backup', `file://${seedFile}`, 'seed']);
    const tib = 2 ** 40;
    const blocks = tib / (4 * MiB);
    const sparseUid = await assembleSparseVersion(cfg, seedUid, tib, 'sparse-1T', [0, 1, blocks / 2, blocks - 1]);
    const first4k = sha256(fs.readFileSync(seedFile).subarray(0, 4096));
    const ttfb: number[] = [];
    for (let i = 0; i < 3; i++) ttfb.push(await timeToFirstByte(cfg, sparseUid, path.join(work, `sparse-${i}`), path.join(work, `sparse-${i}`, 'sparse-1T.img'), first4k));

    const coldB = median(bres.cold.map((c) => c.seconds));
    const coldR = median(rres.cold.map((c) => c.seconds));
    const warmB = median(bres.warm.map((w) => w.seconds));
    const warmR = median(rres.warm.map((w) => w.seconds));
    const ratio = (a: number, bb: number) => `${(a / bb).toFixed(2)}x`;
    const refB = median(refRuns.map((r) => r.seconds));
    const all = (xs: SeqResult[]) => xs.map((x) => mbps(size, x.seconds).replace(' MB/s', '')).join(', ');
    console.log(`\nimage ${mib(size)}, ${backupStats.blocksWritten} unique 4 MiB blocks (${mib(backupStats.blocksWritten * 4 * MiB)}), cache_size ${mib(CACHE_SIZE)}; ` +
      `medians of ${COLD_RUNS} cold runs (each a fresh mount) and ${WARM_RUNS} warm runs, drop_caches before each; load average ${fs.readFileSync('/proc/loadavg', 'utf8').split(' ')[0]}`);
    console.log(`all runs, MB/s: backy cold ${all(bres.cold)}, warm ${all(bres.warm)}; restic cold ${all(rres.cold)}, warm ${all(rres.warm)}`);
    console.log(`reference (trivial fuse-native file from memory, page cache dropped), MB/s: ${all(refRuns)}`);
    table('backy mount vs restic mount (issue 4)', ['measure', 'backy', 'restic', 'backy/restic', 'target'], [
      ['cat, cold', mbps(size, coldB), mbps(size, coldR), ratio(coldR, coldB), verdict(coldR / coldB, { atLeast: 1.5 })],
      ['cat, warm', mbps(size, warmB), mbps(size, warmR), ratio(warmR, warmB), verdict(warmR / warmB, { atLeast: 2 })],
      ['fio randread 4 KiB, 10 s', `${bres.iops.toFixed(0)} IOPS`, `${rres.iops.toFixed(0)} IOPS`, ratio(bres.iops, rres.iops), verdict(bres.iops / rres.iops, { atLeast: 10 })],
      ['peak RSS (VmHWM) + shared memory, MiB', mib(bres.rss), mib(rres.rss), '', verdict(bres.rss / MiB, { atMost: (CACHE_SIZE + 150 * MiB) / MiB })],
      ['CPU s of the server, cold cat', median(bres.cold.map((c) => c.cpu)).toFixed(1), median(rres.cold.map((c) => c.cpu)).toFixed(1), '', ''],
      ['CPU s of the server, warm cat', median(bres.warm.map((w) => w.cpu)).toFixed(1), median(rres.warm.map((w) => w.cpu)).toFixed(1), '', ''],
    ]);
    table('backy mount vs the FUSE ceiling (issue 14): a trivial fuse-native file served from memory', ['measure', 'backy', 'reference', 'backy/reference', 'target'], [
      ['cat, warm (backy cache full, page cache dropped)', mbps(size, warmB), mbps(size, refB), ratio(refB, warmB), verdict(refB / warmB, { atLeast: 0.8 })],
      ['cat, cold (fresh mount, page cache dropped)', mbps(size, coldB), mbps(size, refB), ratio(refB, coldB), verdict(refB / coldB, { atLeast: 0.5 })],
    ]);
    table('backy mount of a 1 TiB sparse version: start to first 4 KiB read', ['run', 'seconds', 'target'],
      ttfb.map((t, i) => [i + 1, t.toFixed(2), verdict(t, { atMost: 1 })]));
  } finally {
    fs.rmSync(work, { recursive: true, force: true });
  }
}
