import * as fs from 'node:fs';
import * as path from 'node:path';
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { BACKY } from '../helpers/cli';
import { BENCH_DIR, mbps, measure, mib, mixedImage, table } from './common';
import { SeededRandom } from '../helpers/images';

/** A 512 MiB ext4 image made with mke2fs -d from a few hundred text and binary files (fixed seed). */
function ext4Image(): string {
  const file = path.join(BENCH_DIR, 'ext4-512M.img');
  if (fs.existsSync(file)) return file;
  const src = path.join(BENCH_DIR, 'ext4-src');
  fs.rmSync(src, { recursive: true, force: true });
  const rnd = new SeededRandom('ext4');
  const words = ['backup', 'block', 'device', 'version', 'restore', 'cluster', 'volume', 'snapshot', 'kernel', 'page', 'cache', 'queue'];
  for (let d = 0; d < 10; d++) {
    const dir = path.join(src, `dir${d}`);
    fs.mkdirSync(dir, { recursive: true });
    for (let f = 0; f < 30; f++) {
      const size = 1000 + rnd.int(1_500_000);
      if (f % 3 === 0) {
        fs.writeFileSync(path.join(dir, `file${f}.bin`), rnd.bytes(size));
      } else {
        const parts: string[] = [];
        let n = 0;
        while (n < size) {
          const w = words[rnd.int(words.length)];
          parts.push(w);
          n += w.length + 1;
        }
        fs.writeFileSync(path.join(dir, `file${f}.txt`), parts.join(' '));
      }
    }
  }
  execFileSync('mke2fs', ['-q', '-F', '-t', 'ext4', '-d', src, file, '512M']);
  fs.rmSync(src, { recursive: true, force: true });
  return file;
}

function dirBytes(dir: string): number {
  let total = 0;
  const walk = (d: string) => {
    for (const e of fs.readdirSync(d, { withFileTypes: true })) {
      const p = path.join(d, e.name);
      if (e.isDirectory()) walk(p);
      else if (e.isFile()) total += fs.statSync(p).size;
    }
  };
  walk(dir);
  return total;
}

async function benchImage(label: string, img: string): Promise<void> {
  const size = fs.statSync(img).size;
  const work = path.join(BENCH_DIR, `work-${label}`);
  fs.rmSync(work, { recursive: true, force: true });
  fs.mkdirSync(work, { recursive: true });
  const cfg = path.join(work, 'backy.cfg');
  fs.writeFileSync(cfg, `[DEFAULTS]\nencryption_key = ${randomBytes(32).toString('hex')}\nlogfile = ${work}/backy.log\n` +
    `[MetaBackend]\nengine = sqlite:///${work}/backy.sqlite\n[DataBackend]\npath = ${work}/data\n`);
  const backy = (...args: string[]) => measure(process.execPath, [BACKY, '-c', cfg, ...args]);
  execFileSync('cat', [img], { stdio: ['ignore', 'ignore', 'inherit'] }); // page cache warm for everyone
  const rows: (string | number)[][] = [];
  const row = (what: string, m: { seconds: number; rss: number; code: number; stderr: string }, stored = '') => {
    if (m.code !== 0) throw new Error(`${what} failed: ${m.stderr}`);
    rows.push([what, `${m.seconds.toFixed(2)} s`, mbps(size, m.seconds), mib(m.rss), stored]);
    return m;
  };
  const sha = row('sha512sum (reference)', await measure('sha512sum', [img]));

  await backy('initdb');
  const first = row('backy backup', await backy('-m', 'backup', `file://${img}`, 'bench'), mib(dirBytes(path.join(work, 'data'))));
  const uid = (await measure(process.execPath, [BACKY, '-c', cfg, '-m', '-s', 'ls', '-f', 'uid'])).stdout.trim();
  const diff = row('backy backup -f (unchanged)', await backy('-m', 'backup', '-f', uid, `file://${img}`, 'bench'), mib(dirBytes(path.join(work, 'data'))));
  const out = path.join(work, 'restored.img');
  const rest = row('backy restore', await backy('restore', uid, `file://${out}`));
  const same = execFileSync('cmp', [img, out]).length === 0;
  fs.rmSync(out);
  row('backy restore --no-sync', await backy('restore', '--no-sync', uid, `file://${out}`));
  fs.rmSync(out);
  // restic's restore checks each blob's MAC, does not recompute its hash and does not fsync: the like-for-like
  // setting of backy is read_verification = tag with --no-sync.
  const cfgTag = path.join(work, 'backy-tag.cfg');
  fs.writeFileSync(cfgTag, `${fs.readFileSync(cfg, 'utf8')}\n[DEFAULTS]\nread_verification = tag\n`);
  const like = row('backy restore --no-sync, read_verification = tag', await measure(process.execPath, [BACKY, '-c', cfgTag, 'restore', '--no-sync', uid, `file://${out}`]));
  fs.rmSync(out);

  const repo = path.join(work, 'restic');
  const pw = path.join(work, 'restic.pw');
  fs.writeFileSync(pw, 'bench-password');
  const env = { RESTIC_REPOSITORY: repo, RESTIC_PASSWORD_FILE: pw, RESTIC_CACHE_DIR: path.join(work, 'restic-cache') };
  await measure('restic', ['init', '-q'], { env });
  const rb = row('restic backup', await measure('restic', ['backup', '-q', img], { env }), mib(dirBytes(repo)));
  const rr = row('restic restore', await measure('restic', ['restore', 'latest', '--target', path.join(work, 'restic-out')], { env }));
  fs.rmSync(path.join(work, 'restic-out'), { recursive: true, force: true });

  table(`${label}: ${mib(size)} image`, ['run', 'time', 'throughput', 'peak RSS', 'stored'], rows);
  const r = (a: { seconds: number }, b: { seconds: number }) => (b.seconds / a.seconds).toFixed(2);
  console.log(`\nrestore byte-identical: ${same}; backy restores end with fsync (restic's do not)`);
  console.log(`backup vs sha512sum: ${r(first, sha)}x (target ≥ 2), restore vs sha512sum: ${r(rest, sha)}x (target ≥ 1.5)`);
  console.log(`backup vs restic: ${r(first, rb)}x, restore vs restic: ${r(rest, rr)}x (like for like: ${r(like, rr)}x) (targets ≥ 2); unchanged -f backup: ${r(diff, sha)}x sha512sum`);
  fs.rmSync(work, { recursive: true, force: true });
}

export async function run(): Promise<void> {
  const mixed = mixedImage();
  await benchImage('mixed 2 GiB', mixed);
  await benchImage('ext4 512 MiB', ext4Image());
}
