/**
 * Lifecycle commands on a big repository (issue 10): `du` and `enforce` on 10,000 versions of 1 TiB, on both
 * engines. Targets: each under 2 s.
 *
 * The repository is synthetic metadata written through the MetaStore API: 100 names x 100 daily versions of
 * a 1 TiB image (262,144 blocks of 4 MiB, 256 map chunks per version) with 8 GiB of data in its first 2,048
 * blocks; each day 20 of those blocks change (a differential version of the day before), the rest is holes.
 * So versions are sparse and mostly shared, as a fleet of VMs backed up daily is.
 *
 * Measured, each the median of REPEAT runs of the CLI (node start included, output to a file):
 * - `du` of every version (backy2's columns per version and the repository totals),
 * - `enforce --dry-run latest7,days30,weeks8,months12`: the plan for all 10,000 versions, printed,
 * - `enforce latest7,days99` once, one day later than the last backups: the daily run that removes the one
 *   version per name that fell out of its window (100 removals of 1 TiB versions),
 * and, without a target, `du` right after an upgrade from schema 1 (no stored map summaries: every chunk of
 * every version is read once, then the summaries are kept).
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { spawn } from 'node:child_process';
import { createHash, randomBytes, randomUUID } from 'node:crypto';
import Database from 'better-sqlite3';
import { createMetaStore } from '../../src/meta/open';
import type { BlockEntry, MetaStore } from '../../src/meta/types';
import { BACKY, runBacky } from '../helpers/cli';
import { SeededRandom } from '../helpers/images';
import { startPostgres, TestPostgres } from '../helpers/postgres';
import { table, verdict } from './common';

const BS = 4 * 1024 * 1024;
const SIZE = 2 ** 40;
const BLOCKS = SIZE / BS;
const NAMES = Number(process.env.BACKY_BENCH_NAMES ?? 100);
const DAYS = Number(process.env.BACKY_BENCH_DAYS ?? 100);
const DATA_BLOCKS = 2048;
const CHANGED = 20;
const REPEAT = Number(process.env.BACKY_BENCH_REPEAT ?? 3);
const DAY = 86400e3;
const START = Date.UTC(2020, 0, 1, 1);
/** One day after the last backups, 02:00. */
const NOW = START + DAYS * DAY + 3600e3;
const DRY_RULES = 'latest7,days30,weeks8,months12';
const DAILY_RULES = 'latest7,days99';

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
}

function checksum(text: string): Buffer {
  return createHash('sha512').update(text).digest();
}

interface BenchRepo {
  dir: string;
  cfg: string;
  engine: string;
}

async function makeRepo(url: string, label: string): Promise<BenchRepo> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), `backy-lifecycle-bench-${label}-`));
  const engine = url === 'sqlite' ? `sqlite:///${dir}/backy.sqlite` : url;
  const cfg = path.join(dir, 'backy.cfg');
  fs.writeFileSync(cfg, [
    '[DEFAULTS]', `logfile = ${dir}/backy.log`, `encryption_key = ${randomBytes(32).toString('hex')}`, `block_size = ${BS}`,
    '[MetaBackend]', `engine = ${engine}`, '[DataBackend]', `path = ${dir}/data`, '',
  ].join('\n'));
  const r = await runBacky(['-c', cfg, 'initdb']);
  if (r.code !== 0) throw new Error(`initdb failed: ${r.stderr}`);
  return { dir, cfg, engine };
}

async function record(store: MetaStore, versionId: number, session: string, entries: BlockEntry[]): Promise<void> {
  for (let i = 0; i < entries.length; i += 4096) {
    const resolved = await store.recordBlocks(versionId, session, entries.slice(i, i + 4096));
    const fresh = resolved.filter((r) => r.upload).map((r) => ({ id: r.blobId, storedSize: Math.round(BS * 0.6) }));
    if (fresh.length) await store.markUploaded(fresh);
  }
}

/**
 * Writes the repository: a template 1 TiB version of holes, then per name a first version (a copy of the
 * template with its 2,048 data blocks) and DAYS - 1 differential versions. Returns seconds.
 */
export async function populate(engine: string): Promise<number> {
  const t0 = Date.now();
  const stores = Array.from({ length: engine.startsWith('sqlite') ? 1 : 4 }, () => createMetaStore(engine));
  try {
    for (const s of stores) await s.open();
    const tpl = await stores[0].createVersion({ uid: 'template', name: 'template', snapshotName: '', date: START - DAY, size: SIZE, blockSize: BS, expire: null, baseUid: null, tags: [] });
    const holes: BlockEntry[] = [];
    for (let i = 0; i < BLOCKS; i++) holes.push({ index: i, zero: true });
    await record(stores[0], tpl.id, 'template', holes);
    await stores[0].updateVersion(tpl.id, { complete: true, valid: true });
    await Promise.all(stores.map(async (store, k) => {
      for (let n = k; n < NAMES; n += stores.length) {
        const name = `vm${String(n).padStart(3, '0')}`;
        const rnd = new SeededRandom(`lifecycle-${name}`);
        let base = tpl;
        for (let d = 0; d < DAYS; d++) {
          const pending = d === 0 ? Array.from({ length: DATA_BLOCKS }, (_, i) => i) : [...new Set(Array.from({ length: CHANGED }, () => rnd.int(DATA_BLOCKS)))];
          const v = await store.createVersion({
            uid: randomUUID(), name, snapshotName: '', date: START + d * DAY + n * 1000, size: SIZE, blockSize: BS, expire: null,
            baseUid: base.uid, tags: ['daily'],
          }, { versionId: base.id, pending });
          await record(store, v.id, name, pending.map((i) => ({ index: i, checksum: checksum(`${name}/${d}/${i}`), size: BS })));
          await store.updateVersion(v.id, { complete: true, valid: true });
          base = v;
        }
      }
    }));
    await stores[0].removeVersion(tpl.id);
  } finally {
    for (const s of stores) await s.close();
  }
  return (Date.now() - t0) / 1000;
}

/** `backy ARGS > file` with "now" fixed: wall time, exit code, peak RSS (from /proc of the child, sampled). */
async function timed(repo: BenchRepo, args: string[]): Promise<{ seconds: number; code: number; stdout: string; stderr: string }> {
  const out = path.join(repo.dir, 'out');
  const fd = fs.openSync(out, 'w');
  try {
    const t0 = process.hrtime.bigint();
    const child = spawn(process.execPath, [BACKY, '-c', repo.cfg, ...args], {
      cwd: repo.dir, stdio: ['ignore', fd, 'pipe'], env: { ...process.env, BACKY_TEST_NOW: String(NOW) },
    });
    let stderr = '';
    child.stderr!.on('data', (d) => (stderr += d));
    const code = await new Promise<number>((resolve) => child.on('close', (c) => resolve(c ?? -1)));
    const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
    if (code !== 0) throw new Error(`backy ${args.join(' ')} exited ${code}: ${stderr}`);
    return { seconds, code, stdout: fs.readFileSync(out, 'utf8'), stderr };
  } finally {
    fs.closeSync(fd);
  }
}

async function dropSummaries(repo: BenchRepo, pg: TestPostgres | undefined): Promise<void> {
  if (repo.engine.startsWith('sqlite')) {
    const db = new Database(repo.engine.slice('sqlite:///'.length));
    db.exec('DELETE FROM map_summaries');
    db.close();
  } else {
    await pg!.query('DELETE FROM map_summaries', [], repo.engine.split('/').pop());
  }
}

export async function run(): Promise<void> {
  let pg: TestPostgres | undefined;
  const rows: (string | number)[][] = [];
  const dirs: string[] = [];
  try {
    pg = await startPostgres({ fsync: true });
    const engines: [string, () => Promise<string>][] = [
      ['sqlite', async () => 'sqlite'],
      ['postgresql', () => pg!.createDatabase()],
    ];
    for (const [label, url] of engines) {
      const repo = await makeRepo(await url(), label);
      dirs.push(repo.dir);
      const build = await populate(repo.engine);
      // The versions were made through the MetaStore API, so the first command writes every version's metadata
      // object to storage (what each backup's own close does in real use): timed apart, never in a median.
      const firstSync = await timed(repo, ['-m', 'ls']);

      const duTimes: number[] = [];
      let duRows = 0;
      for (let rep = 0; rep < REPEAT; rep++) {
        const du = await timed(repo, ['-m', 'du']);
        duRows = du.stdout.trim().split('\n').length - 1;
        duTimes.push(du.seconds);
      }
      if (duRows !== NAMES * DAYS) throw new Error(`${label}: du printed ${duRows} versions`);
      const totals = JSON.parse((await timed(repo, ['--json', 'du', '--totals'])).stdout);

      const dryTimes: number[] = [];
      let planned = { remove: 0, keep: 0 };
      for (let rep = 0; rep < REPEAT; rep++) {
        const dry = await timed(repo, ['-m', 'enforce', '--dry-run', DRY_RULES]);
        const actions = dry.stdout.trim().split('\n').slice(1).map((l) => l.split('|')[3]);
        planned = { remove: actions.filter((a) => a === 'remove').length, keep: actions.filter((a) => a === 'keep').length };
        dryTimes.push(dry.seconds);
      }

      const daily = await timed(repo, ['-m', 'enforce', DAILY_RULES]);
      const removed = daily.stdout.trim().split('\n').slice(1).filter((l) => l.split('|')[3] === 'removed').length;
      if (removed !== NAMES) throw new Error(`${label}: the daily enforce removed ${removed} versions, expected ${NAMES}`);

      await dropSummaries(repo, pg);
      const upgrade = await timed(repo, ['-m', 'du']);
      const after = await timed(repo, ['-m', 'du']);

      const du = median(duTimes);
      const dry = median(dryTimes);
      rows.push([
        label, build.toFixed(0), `${(totals['logical bytes'] / 1024 ** 4).toFixed(1)} TiB in ${totals.blobs.toLocaleString('en')} blobs (dedup ${totals['dedup ratio']})`,
        firstSync.seconds.toFixed(1),
        `${du.toFixed(2)} (${duTimes.map((t) => t.toFixed(2)).join(', ')})`, verdict(du, { atMost: 2 }),
        `${dry.toFixed(2)} (${planned.remove} remove, ${planned.keep} keep; runs ${dryTimes.map((t) => t.toFixed(2)).join(', ')})`, verdict(dry, { atMost: 2 }),
        daily.seconds.toFixed(2), verdict(daily.seconds, { atMost: 2 }),
        `${upgrade.seconds.toFixed(1)} / ${after.seconds.toFixed(2)}`,
      ]);
      fs.rmSync(repo.dir, { recursive: true, force: true });
    }
  } finally {
    await pg?.stop();
    for (const d of dirs) fs.rmSync(d, { recursive: true, force: true });
  }
  table(`lifecycle: ${NAMES * DAYS} versions of 1 TiB (${NAMES} names x ${DAYS} daily versions, ${DATA_BLOCKS} data blocks each, ${CHANGED} changed per day)`,
    ['engine', 'build via API (s)', 'repository', 'first command: metadata objects of every version written (s)', 'du (s): median (runs)', 'target', `enforce --dry-run ${DRY_RULES} (s)`, 'target',
      `enforce ${DAILY_RULES}: ${NAMES} removals (s)`, 'target', 'du without stored summaries, then again (s)'], rows);
  console.log(`\n(du and dry run: medians of ${REPEAT} runs; wall clock of the CLI process, node start included, output to a file; PostgreSQL 15 on 127.0.0.1 with fsync on)`);
}

if (require.main === module) run().catch((e) => { console.error(e); process.exit(1); });
