/**
 * Issue 11's targets: `import-backy2` (in place) of a backy2 repository of 1,000 versions of a 100 GiB image
 * (synthetic metadata, blobs shared between versions: 25,600 blocks a version, 25.6 million block rows) under
 * 30 s, and `db-rebuild` of those 1,000 versions from their metadata objects on the file backend under 30 s.
 * The backy2 database is made once and kept in BENCH_DIR (several GB). Sizes can be lowered for a quick look:
 * BACKY_BENCH_IMPORT_VERSIONS, BACKY_BENCH_IMPORT_BLOCKS.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { randomBytes } from 'node:crypto';
import { BACKY } from '../helpers/cli';
import { BENCH_DIR, machineLine, measure, mib, table, verdict } from './common';
import { syntheticBacky2 } from './backy2-synthetic';

const VERSIONS = Number(process.env.BACKY_BENCH_IMPORT_VERSIONS ?? 1000);
const BLOCKS = Number(process.env.BACKY_BENCH_IMPORT_BLOCKS ?? 25_600); // 100 GiB of 4 MiB blocks
const CHANGED = 256; // blocks changed from one daily version to the next (1 %)
const TARGET_S = 30;
const B2_KEY = 'df605ae86c713b405c360bbb7867c42a0a13da01c38a179fea771b50fcf3514c';

export async function run(): Promise<void> {
  console.log(machineLine());
  const t0 = Date.now();
  const sqlite = syntheticBacky2(path.join(BENCH_DIR, 'backy2'), { versions: VERSIONS, blocks: BLOCKS, changed: CHANGED, keyHex: B2_KEY });
  console.log(`backy2 database: ${sqlite} (${mib(fs.statSync(sqlite).size)}; ${((Date.now() - t0) / 1000).toFixed(0)} s to make or find)`);

  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'backy-bench-import-'));
  try {
    const data = path.join(dir, 'data'); // backy2's data directory (no blob needed) and so backy's
    fs.mkdirSync(path.join(dir, 'lock'));
    fs.writeFileSync(path.join(dir, 'b2.cfg'), [
      '[DEFAULTS]', `lock_dir: ${dir}/lock`, 'block_size: 4194304', 'hash_function: sha512', `encryption_key: ${B2_KEY}`, 'encryption_version: 1',
      '[MetaBackend]', `engine: sqlite:///${sqlite}`, '[DataBackend]', 'type: backy2.data_backends.file', `path: ${data}`, '',
    ].join('\n'));
    // backy's own key differs from backy2's: every data key is re-wrapped (the dearer case).
    const cfg = path.join(dir, 'backy.cfg');
    fs.writeFileSync(cfg, [
      '[DEFAULTS]', `logfile = ${dir}/backy.log`, `encryption_key = ${randomBytes(32).toString('hex')}`, 'hash_function = sha512',
      '[MetaBackend]', `engine = sqlite:///${dir}/backy.sqlite`, '[DataBackend]', `path = ${data}`, '',
    ].join('\n'));
    const backy = (args: string[]) => measure(process.execPath, [BACKY, '-c', cfg, ...args]);
    const init = await backy(['initdb']);
    if (init.code !== 0) throw new Error(`initdb: ${init.stderr}`);

    const imp = await backy(['-m', 'import-backy2', path.join(dir, 'b2.cfg')]);
    if (imp.code !== 0) throw new Error(`import-backy2 exited ${imp.code}: ${imp.stderr.slice(-2000)}`);
    const imported = imp.stdout.split('\n').filter((l) => l.includes('|imported')).length;
    if (imported !== VERSIONS) throw new Error(`${imported} versions imported, expected ${VERSIONS}`);
    const metaBytes = fs.readdirSync(path.join(data, 'meta/versions')).reduce((s, f) => s + fs.statSync(path.join(data, 'meta/versions', f)).size, 0);

    for (const f of fs.readdirSync(dir)) if (f.startsWith('backy.sqlite')) fs.rmSync(path.join(dir, f));
    const rebuild = await backy(['--json', 'db-rebuild']);
    if (rebuild.code !== 0) throw new Error(`db-rebuild exited ${rebuild.code}: ${rebuild.stderr.slice(-2000)}`);
    const r = JSON.parse(rebuild.stdout) as { versions: number; blobs: number };
    if (r.versions !== VERSIONS) throw new Error(`db-rebuild brought back ${r.versions} versions, expected ${VERSIONS}`);

    const what = `${VERSIONS} versions × ${BLOCKS} blocks (${((BLOCKS * 4) / 1024).toFixed(0)} GiB each)`;
    table(`backy2 import and db-rebuild: ${what}, file backend`, ['operation', 'seconds', 'peak RSS', 'target (s)'], [
      ['import-backy2 (in place, data keys re-wrapped)', imp.seconds.toFixed(1), mib(imp.rss), `${TARGET_S} ${verdict(imp.seconds, { atMost: TARGET_S })}`],
      [`db-rebuild (${r.blobs} blobs, ${mib(metaBytes)} of metadata objects)`, rebuild.seconds.toFixed(1), mib(rebuild.rss), `${TARGET_S} ${verdict(rebuild.seconds, { atMost: TARGET_S })}`],
    ]);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}
