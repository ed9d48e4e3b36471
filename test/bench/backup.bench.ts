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

type Run = { seconds: number; rss: number; code: number; stderr: string; stdout: string };

/** One round: every tool on the image, in turn, from scratch (fresh repositories). */
async function round(img: string, work: string): Promise<{ runs: Map<string, Run>; stored: Map<string, number>; same: boolean }> {
  fs.rmSync(work, { recursive: true, force: true });
  fs.mkdirSync(work, { recursive: true });
  const cfg = path.join(work, 'backy.cfg');
  fs.writeFileSync(cfg, `[DEFAULTS]\nencryption_key = ${randomBytes(32).toString('hex')}\nlogfile = ${work}/backy.log\n` +
    `[MetaBackend]\nengine = sqlite:///${work}/backy.sqlite\n[DataBackend]\npath = ${work}/data\n`);
  // restic's restore checks each blob's MAC and recomputes its SHA-256 (hardware-accelerated here), and does
  // not fsync. backy's sha512 has no such help: rows with --no-sync, with read_verification = tag, and with a
  // sha256 repository show where the time goes.
  const cfgTag = path.join(work, 'backy-tag.cfg');
  fs.writeFileSync(cfgTag, `${fs.readFileSync(cfg, 'utf8')}\n[DEFAULTS]\nread_verification = tag\n`);
  const backy = (c: string, ...args: string[]) => measure(process.execPath, [BACKY, '-c', c, ...args]);
  const runs = new Map<string, Run>();
  const stored = new Map<string, number>();
  const add = (what: string, m: Run) => {
    if (m.code !== 0) throw new Error(`${what} failed: ${m.stderr}`);
    runs.set(what, m);
    return m;
  };
  add('sha512sum (reference)', await measure('sha512sum', [img]));
  await backy(cfg, 'initdb');
  add('backy backup', await backy(cfg, '-m', 'backup', `file://${img}`, 'bench'));
  stored.set('backy backup', dirBytes(path.join(work, 'data')));
  const uid = (await measure(process.execPath, [BACKY, '-c', cfg, '-m', '-s', 'ls', '-f', 'uid'])).stdout.trim();
  add('backy backup -f (unchanged)', await backy(cfg, '-m', 'backup', '-f', uid, `file://${img}`, 'bench'));
  stored.set('backy backup -f (unchanged)', dirBytes(path.join(work, 'data')));
  const out = path.join(work, 'restored.img');
  add('backy restore', await backy(cfg, 'restore', uid, `file://${out}`));
  const same = execFileSync('cmp', [img, out]).length === 0;
  fs.rmSync(out);
  add('backy restore --no-sync', await backy(cfg, 'restore', '--no-sync', uid, `file://${out}`));
  fs.rmSync(out);
  add('backy restore --no-sync, read_verification = tag', await backy(cfgTag, 'restore', '--no-sync', uid, `file://${out}`));
  fs.rmSync(out);
  const cfg256 = path.join(work, 'backy-sha256.cfg');
  fs.writeFileSync(cfg256, `[DEFAULTS]\nencryption_key = ${randomBytes(32).toString('hex')}\nhash_function = sha256\n` +
    `[MetaBackend]\nengine = sqlite:///${work}/backy256.sqlite\n[DataBackend]\npath = ${work}/data256\n`);
  await backy(cfg256, 'initdb');
  add('backy backup, hash_function = sha256', await backy(cfg256, '-m', 'backup', `file://${img}`, 'bench'));
  const uid256 = (await measure(process.execPath, [BACKY, '-c', cfg256, '-m', '-s', 'ls', '-f', 'uid'])).stdout.trim();
  add('backy restore --no-sync, hash_function = sha256', await backy(cfg256, 'restore', '--no-sync', uid256, `file://${out}`));
  fs.rmSync(out);

  const repo = path.join(work, 'restic');
  const pw = path.join(work, 'restic.pw');
  fs.writeFileSync(pw, 'bench-password');
  const env = { RESTIC_REPOSITORY: repo, RESTIC_PASSWORD_FILE: pw, RESTIC_CACHE_DIR: path.join(work, 'restic-cache') };
  await measure('restic', ['init', '-q'], { env });
  add('restic backup', await measure('restic', ['backup', '-q', img], { env }));
  stored.set('restic backup', dirBytes(repo));
  add('restic restore', await measure('restic', ['restore', 'latest', '--target', path.join(work, 'restic-out')], { env }));
  fs.rmSync(work, { recursive: true, force: true });
  return { runs, stored, same };
}

const ROUNDS = Number(process.env.BENCH_BACKUP_ROUNDS ?? 3);

async function benchImage(label: string, img: string): Promise<void> {
  const size = fs.statSync(img).size;
  const work = path.join(BENCH_DIR, `work-${label.replace(/\W+/g, '-')}`);
  execFileSync('cat', [img], { stdio: ['ignore', 'ignore', 'inherit'] }); // page cache warm for everyone
  // Several rounds, each running every tool in turn; each row keeps its best time (and its highest RSS):
  // the machine is shared, and turns spread the noise over all tools alike.
  const best = new Map<string, Run>();
  let stored = new Map<string, number>();
  let same = true;
  for (let i = 0; i < ROUNDS; i++) {
    const r = await round(img, work);
    same &&= r.same;
    stored = r.stored;
    for (const [k, m] of r.runs) {
      const b = best.get(k);
      best.set(k, b ? { ...(m.seconds < b.seconds ? m : b), rss: Math.max(m.rss, b.rss) } : m);
    }
  }
  const rows = [...best.entries()].map(([k, m]) => [k, `${m.seconds.toFixed(2)} s`, mbps(size, m.seconds), mib(m.rss), stored.has(k) ? mib(stored.get(k)!) : '']);
  table(`${label}: ${mib(size)} image, best of ${ROUNDS} rounds`, ['run', 'time', 'throughput', 'peak RSS', 'stored'], rows);
  const t = (k: string) => best.get(k)!.seconds;
  const r = (a: string, b: string) => (t(b) / t(a)).toFixed(2);
  console.log(`\nrestore byte-identical: ${same}; backy restores end with fsync unless --no-sync (restic's never do);`);
  console.log('both tools recompute the checksum of every block they restore: backy sha512 (in software here), restic SHA-256 (SHA-NI)');
  console.log(`backup vs sha512sum: ${r('backy backup', 'sha512sum (reference)')}x (target ≥ 2), restore vs sha512sum: ${r('backy restore', 'sha512sum (reference)')}x (target ≥ 1.5)`);
  console.log(`backup vs restic: ${r('backy backup', 'restic backup')}x, restore vs restic: ${r('backy restore', 'restic restore')}x (targets ≥ 2); ` +
    `restore --no-sync vs restic: ${r('backy restore --no-sync', 'restic restore')}x, with tag verification ${r('backy restore --no-sync, read_verification = tag', 'restic restore')}x, ` +
    `with sha256 ${r('backy restore --no-sync, hash_function = sha256', 'restic restore')}x; sha256 backup vs restic ${r('backy backup, hash_function = sha256', 'restic backup')}x`);
  console.log(`unchanged -f backup: ${r('backy backup -f (unchanged)', 'sha512sum (reference)')}x sha512sum`);
}

export async function run(): Promise<void> {
  const mixed = mixedImage();
  await benchImage('mixed 2 GiB', mixed);
  await benchImage('ext4 512 MiB', ext4Image());
}
