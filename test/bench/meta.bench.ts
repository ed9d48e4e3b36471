/**
 * Metadata cost on both engines (issue 6): a differential backup of a 1 TiB sparse image (262,144 blocks of
 * 4 MiB, a few hundred of them changed, given as rbd-diff hints) and `ls` of 10,000 versions.
 *
 * "Outside reading data" is the differential backup's time minus the data path alone: a full backup, into a
 * fresh repository on the same engine, of an image holding just the changed blocks (same bytes to read,
 * hash, compress, encrypt and store, a one-chunk map). What remains is the 1 TiB version's metadata: the
 * copied map, the sanity check against the base, recording, and the final check of every map chunk. The
 * same differential backup with nothing changed (empty hints) shows that metadata cost directly.
 * Targets: differential backup under 10 s, ls under 1 s, on either engine.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { execFileSync, spawn } from 'node:child_process';
import { randomBytes, randomUUID } from 'node:crypto';
import { createMetaStore } from '../../src/meta/open';
import type { BlockEntry, MetaStore } from '../../src/meta/types';
import { BACKY, runBacky } from '../helpers/cli';
import { SeededRandom } from '../helpers/images';
import { startPostgres, TestPostgres } from '../helpers/postgres';
import { BENCH_DIR, measure, table, verdict } from './common';

const BS = 4 * 1024 * 1024;
const SIZE = 2 ** 40;
const BLOCKS = SIZE / BS;
const CHANGED = Number(process.env.BACKY_BENCH_CHANGED ?? 300);
const VERSIONS = 10_000;
const REPEAT = Number(process.env.BACKY_BENCH_REPEAT ?? 3);

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
}

interface Sparse {
  image: string;
  hints: string;
  /** the changed blocks alone, back to back */
  dataOnly: string;
  changed: number[];
}

/** The 1 TiB sparse image with CHANGED random blocks, its hints, and the data-only image (kept between runs). */
function sparseImage(): Sparse {
  fs.mkdirSync(BENCH_DIR, { recursive: true });
  const image = path.join(BENCH_DIR, `sparse-1t-${CHANGED}.img`);
  const hints = path.join(BENCH_DIR, `sparse-1t-${CHANGED}.hints.json`);
  const dataOnly = path.join(BENCH_DIR, `sparse-1t-${CHANGED}.changed.img`);
  const rnd = new SeededRandom(`meta-bench-${CHANGED}`);
  const set = new Set<number>();
  while (set.size < CHANGED) set.add(rnd.int(BLOCKS));
  const changed = [...set].sort((a, b) => a - b);
  if (fs.existsSync(image) && fs.existsSync(hints) && fs.existsSync(dataOnly) && fs.statSync(image).size === SIZE) return { image, hints, dataOnly, changed };
  fs.rmSync(image, { force: true });
  execFileSync('truncate', ['-s', '1T', image]);
  const fd = fs.openSync(image, 'r+');
  const fo = fs.openSync(dataOnly, 'w');
  try {
    changed.forEach((b, k) => {
      const buf = rnd.bytes(BS);
      fs.writeSync(fd, buf, 0, BS, b * BS);
      fs.writeSync(fo, buf, 0, BS, k * BS);
    });
  } finally {
    fs.closeSync(fd);
    fs.closeSync(fo);
  }
  fs.writeFileSync(hints, JSON.stringify(changed.map((b) => ({ offset: b * BS, length: BS, exists: 'true' }))));
  return { image, hints, dataOnly, changed };
}

interface BenchRepo {
  dir: string;
  cfg: string;
  engine: string;
  run(args: string[]): ReturnType<typeof measure>;
}

async function makeRepo(engine: () => Promise<string>, label: string): Promise<BenchRepo> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), `backy-meta-bench-${label}-`));
  let url = await engine();
  if (url.startsWith('sqlite')) url = `sqlite:///${dir}/backy.sqlite`;
  const cfg = path.join(dir, 'backy.cfg');
  fs.writeFileSync(cfg, [
    '[DEFAULTS]', `logfile = ${dir}/backy.log`, `encryption_key = ${randomBytes(32).toString('hex')}`, `block_size = ${BS}`,
    '[MetaBackend]', `engine = ${url}`, '[DataBackend]', `path = ${dir}/data`, '',
  ].join('\n'));
  const r = await runBacky(['-c', cfg, 'initdb']);
  if (r.code !== 0) throw new Error(`initdb failed: ${r.stderr}`);
  return { dir, cfg, engine: url, run: (args) => measure(process.execPath, [BACKY, '-c', cfg, ...args], { cwd: dir }) };
}

/** The base: the image before its blocks changed, i.e. 262,144 holes, recorded through the MetaStore API. */
async function sparseBase(store: MetaStore): Promise<{ uid: string; seconds: number }> {
  const t0 = process.hrtime.bigint();
  const v = await store.createVersion({ uid: randomUUID(), name: 'big', snapshotName: '', date: Date.now() - 86400e3, size: SIZE, blockSize: BS, expire: null, baseUid: null, tags: [] });
  for (let i = 0; i < BLOCKS; i += 4096) {
    const entries: BlockEntry[] = [];
    for (let k = i; k < Math.min(BLOCKS, i + 4096); k++) entries.push({ index: k, zero: true });
    await store.recordBlocks(v.id, 'bench-base', entries);
  }
  await store.updateVersion(v.id, { valid: true, complete: true });
  return { uid: v.uid, seconds: Number(process.hrtime.bigint() - t0) / 1e9 };
}

async function manyVersions(engineUrl: string, n: number): Promise<number> {
  const stores = Array.from({ length: engineUrl.startsWith('sqlite') ? 1 : 4 }, () => createMetaStore(engineUrl));
  const t0 = Date.now();
  try {
    for (const s of stores) await s.open();
    await Promise.all(stores.map(async (s, k) => {
      for (let i = k; i < n; i += stores.length) {
        await s.createVersion({ uid: randomUUID(), name: `vm${i % 100}`, snapshotName: '', date: 1_700_000_000_000 + i * 1000, size: 10 * 1024 ** 3, blockSize: BS, expire: null, baseUid: null, tags: i % 7 ? [] : ['weekly'] });
      }
    }));
  } finally {
    for (const s of stores) await s.close();
  }
  return (Date.now() - t0) / 1000;
}

/**
 * `backy ls` timed with its output going to a file, as `backy ls > file` would: the CLI exits right after
 * writing, and a pipe read by a slower process could lose the end of a long table.
 */
async function lsToFile(repo: BenchRepo): Promise<{ seconds: number; code: number; stdout: string; stderr: string }> {
  const out = path.join(repo.dir, 'ls.out');
  const fd = fs.openSync(out, 'w');
  try {
    const t0 = process.hrtime.bigint();
    const child = spawn(process.execPath, [BACKY, '-c', repo.cfg, 'ls'], { cwd: repo.dir, stdio: ['ignore', fd, 'pipe'] });
    let stderr = '';
    child.stderr!.on('data', (d) => (stderr += d));
    const code = await new Promise<number>((resolve) => child.on('close', (c) => resolve(c ?? -1)));
    return { seconds: Number(process.hrtime.bigint() - t0) / 1e9, code, stdout: fs.readFileSync(out, 'utf8'), stderr };
  } finally {
    fs.closeSync(fd);
  }
}

export async function run(): Promise<void> {
  const sparse = sparseImage();
  const noHints = path.join(BENCH_DIR, 'no-change.hints.json');
  fs.writeFileSync(noHints, '[]');
  let pg: TestPostgres | undefined;
  const rows: (string | number)[][] = [];
  const dirs: string[] = [];
  try {
    pg = await startPostgres({ fsync: true });
    const engines: [string, () => Promise<string>][] = [
      ['sqlite', async () => 'sqlite'],
      ['postgresql', () => pg!.createDatabase()],
    ];
    for (const [label, engine] of engines) {
      // Wall clock on a shared 2-CPU machine is noisy: each figure is the median of REPEAT fresh runs.
      const runs: { data: number; base: number; diff: number; none: number; rss: number }[] = [];
      for (let rep = 0; rep < REPEAT; rep++) {
        // Data path alone: the changed blocks as a small image, into a fresh repository.
        const dataRepo = await makeRepo(engine, label);
        dirs.push(dataRepo.dir);
        const data = await dataRepo.run(['backup', `file://${sparse.dataOnly}`, 'changed']);
        if (data.code !== 0) throw new Error(`${label}: data-only backup failed: ${data.stderr}`);

        const repo = await makeRepo(engine, label);
        dirs.push(repo.dir);
        const store = createMetaStore(repo.engine);
        let base: { uid: string; seconds: number };
        try {
          await store.open();
          base = await sparseBase(store);
        } finally {
          await store.close();
        }
        const diff = await repo.run(['backup', '-f', base.uid, '-r', sparse.hints, `file://${sparse.image}`, 'big']);
        if (diff.code !== 0) throw new Error(`${label}: differential backup failed: ${diff.stderr}`);
        const uid = diff.stdout.trim();
        const list = await repo.run(['--json', 'ls']);
        const v = (JSON.parse(list.stdout) as { uid: string; valid: boolean }[]).find((x) => x.uid === uid);
        if (!v?.valid) throw new Error(`${label}: the differential version is not valid`);
        // The same 1 TiB image again, nothing changed since the version just made (empty hints, that version as
        // the base): its metadata alone, plus starting node. (Against the all-holes base the sanity check would
        // rightly fail whenever one of its samples hits a changed block.)
        const none = await repo.run(['backup', '-f', uid, '-r', noHints, `file://${sparse.image}`, 'big']);
        if (none.code !== 0) throw new Error(`${label}: unchanged differential backup failed: ${none.stderr}`);
        runs.push({ data: data.seconds, base: base.seconds, diff: diff.seconds, none: none.seconds, rss: diff.rss });
        fs.rmSync(dataRepo.dir, { recursive: true, force: true });
        fs.rmSync(repo.dir, { recursive: true, force: true });
      }
      const med = (f: (r: typeof runs[0]) => number) => median(runs.map(f));

      const lsRepo = await makeRepo(engine, label);
      dirs.push(lsRepo.dir);
      const insert = await manyVersions(lsRepo.engine, VERSIONS);
      await lsToFile(lsRepo); // warm the page cache and the server
      const lsTimes: number[] = [];
      for (let rep = 0; rep < REPEAT; rep++) {
        const ls = await lsToFile(lsRepo);
        const lines = ls.stdout.split('\n').filter((l) => /^\| \d{4}-/.test(l)).length;
        if (ls.code !== 0 || lines !== VERSIONS) throw new Error(`${label}: ls printed ${lines} versions (exit ${ls.code}): ${ls.stderr}`);
        lsTimes.push(ls.seconds);
      }
      const diff = med((r) => r.diff);
      const ls = median(lsTimes);
      rows.push([
        label, med((r) => r.base).toFixed(2), diff.toFixed(2), med((r) => r.data).toFixed(2), med((r) => r.diff - r.data).toFixed(2),
        med((r) => r.none).toFixed(2), `${(med((r) => r.rss) / 1024 ** 2).toFixed(0)} MiB`, insert.toFixed(1), ls.toFixed(2),
        `diff ${verdict(diff, { atMost: 10 })}; ls ${verdict(ls, { atMost: 1 })}`,
      ]);
    }
  } finally {
    await pg?.stop();
    for (const d of dirs) fs.rmSync(d, { recursive: true, force: true });
  }
  table(`metadata: 1 TiB sparse version, ${CHANGED} changed 4 MiB blocks (-f BASE -r HINTS); ls of ${VERSIONS.toLocaleString('en')} versions`,
    ['engine', 'base: 262,144 holes via API (s)', 'diff backup (s)', 'data path alone (s)', 'outside reading data (s)', 'diff, nothing changed (s)', 'diff peak RSS',
      `insert ${VERSIONS} versions via API (s)`, 'ls (s)', 'targets (issue 6)'], rows);
  console.log(`\n(medians of ${REPEAT} runs; ${os.cpus().length} CPUs; PostgreSQL 15 on 127.0.0.1 with fsync on; times are wall clock of the CLI process, node start included)`);
}

if (require.main === module) run().catch((e) => { console.error(e); process.exit(1); });
