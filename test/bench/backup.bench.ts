import * as fs from 'node:fs';
import * as path from 'node:path';
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { BACKY } from '../helpers/cli';
import { BENCH_DIR, loadAverage, mbps, measure, mib, mixedImage, table, uniqueBlocks, verdict } from './common';
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

/** Hash functions compared for new repositories (each gets its own repository and backup row). */
const HASHES = ['sha512', 'sha256', 'blake3'];

/** Whether this build accepts `hash_function = NAME` (blake3 needs its native module). */
async function hashSupported(work: string, name: string): Promise<boolean> {
  const cfg = repoConfig(path.join(work, `probe-${name}`), `hash_function = ${name}`);
  const r = await measure(process.execPath, [BACKY, '-c', cfg, 'initdb']);
  fs.rmSync(path.dirname(cfg), { recursive: true, force: true });
  return r.code === 0;
}

/** A fresh repository directory with its backy.cfg (`extra` goes into [DEFAULTS]); returns the config path. */
function repoConfig(dir: string, extra = ''): string {
  fs.rmSync(dir, { recursive: true, force: true });
  fs.mkdirSync(dir, { recursive: true });
  const cfg = path.join(dir, 'backy.cfg');
  fs.writeFileSync(cfg, `[DEFAULTS]\nencryption_key = ${randomBytes(32).toString('hex')}\nlogfile = ${dir}/backy.log\n${extra}\n` +
    `[MetaBackend]\nengine = sqlite:///${dir}/backy.sqlite\n[DataBackend]\npath = ${dir}/data\n`);
  return cfg;
}

/** `sh -c SCRIPT` with $1 = image, $2 = output, timed like the other commands. */
const shell = (script: string, img: string, out: string) => measure('sh', ['-c', script, 'sh', img, out]);

/** The physical references a restore is compared with, written to the same filesystem as backy's. */
const REFERENCES = {
  // restore -s: a sparse copy made durable
  sparse: 'cp --sparse=always "$1" "$2" && sync "$2"',
  // the default restore: all space allocated, data written over it, zero blocks skipped, made durable
  full: 'fallocate -l "$(stat -c %s "$1")" "$2" && dd if="$1" of="$2" bs=4M conv=sparse,notrunc,fsync status=none',
};

/**
 * One round: every tool on the image, in turn, from scratch (fresh repositories). Restores and their
 * references alternate, each writing a new file after the previous output was removed and flushed.
 */
async function round(img: string, work: string, hashes: string[]): Promise<{ runs: Map<string, Run>; stored: Map<string, number>; written: Map<string, number>; same: boolean; defaultHash: string }> {
  fs.rmSync(work, { recursive: true, force: true });
  fs.mkdirSync(work, { recursive: true });
  const runs = new Map<string, Run>();
  const stored = new Map<string, number>();
  const written = new Map<string, number>();
  const add = (what: string, m: Run) => {
    if (m.code !== 0) throw new Error(`${what} failed: ${m.stderr}`);
    runs.set(what, m);
    return m;
  };
  const backy = (c: string, ...args: string[]) => measure(process.execPath, [BACKY, '-c', c, ...args]);
  const out = path.join(work, 'restored.img');
  const fresh = () => {
    fs.rmSync(out, { force: true });
    execFileSync('sync');
  };
  /** A backup into a new repository; returns its version uid. */
  const backupInto = async (label: string, cfg: string): Promise<string> => {
    const r = add(label, await backy(cfg, '--json', 'backup', `file://${img}`, 'bench'));
    const j = JSON.parse(r.stdout) as { uid: string; blocksWritten: number };
    stored.set(label, dirBytes(path.join(path.dirname(cfg), 'data')));
    written.set(label, j.blocksWritten);
    return j.uid;
  };

  add('sha512sum (reference)', await measure('sha512sum', [img]));
  // A new repository on the defaults: init picks the hash function.
  const cfg = repoConfig(path.join(work, 'default'));
  const init = await backy(cfg, '-v', 'initdb');
  if (init.code !== 0) throw new Error(`initdb failed: ${init.stderr}`);
  const defaultHash = /hash_function = (\S+)/.exec(init.stderr)?.[1] ?? 'sha512';
  const uid = await backupInto('backy backup (new repository)', cfg);
  add('backy backup -f (unchanged)', await backy(cfg, '-m', 'backup', '-f', uid, `file://${img}`, 'bench'));
  stored.set('backy backup -f (unchanged)', dirBytes(path.join(work, 'default', 'data')));
  let same = true;
  // Restores of that version, each next to its physical reference.
  for (const [label, args, ref] of [
    ['backy restore', [], REFERENCES.full],
    ['backy restore -s', ['-s'], REFERENCES.sparse],
  ] as const) {
    fresh();
    add(label, await backy(cfg, 'restore', ...args, uid, `file://${out}`));
    if (label === 'backy restore') same &&= execFileSync('cmp', [img, out]).length === 0;
    fresh();
    add(`${label}: reference`, await shell(ref, img, out));
  }
  fresh();
  add('backy restore --no-sync', await backy(cfg, 'restore', '--no-sync', uid, `file://${out}`));
  fresh();

  // The same image into a repository of each hash function; restores show what the hash costs on reads.
  for (const h of hashes) {
    const c = repoConfig(path.join(work, h), `hash_function = ${h}`);
    const i = await backy(c, 'initdb');
    if (i.code !== 0) throw new Error(`initdb (${h}) failed: ${i.stderr}`);
    const u = await backupInto(`backy backup, hash_function = ${h}`, c);
    add(`backy restore --no-sync, hash_function = ${h}`, await backy(c, 'restore', '--no-sync', u, `file://${out}`));
    fresh();
    if (h === 'sha512') {
      add('backy restore, hash_function = sha512', await backy(c, 'restore', u, `file://${out}`));
      fresh();
    }
    fs.rmSync(path.join(work, h), { recursive: true, force: true });
  }

  // restic's restore checks each blob's MAC and recomputes its SHA-256, and does not fsync.
  const repo = path.join(work, 'restic');
  const pw = path.join(work, 'restic.pw');
  fs.writeFileSync(pw, 'bench-password');
  const env = { RESTIC_REPOSITORY: repo, RESTIC_PASSWORD_FILE: pw, RESTIC_CACHE_DIR: path.join(work, 'restic-cache') };
  await measure('restic', ['init', '-q'], { env });
  add('restic backup', await measure('restic', ['backup', '-q', img], { env }));
  stored.set('restic backup', dirBytes(repo));
  add('restic restore', await measure('restic', ['restore', 'latest', '--target', path.join(work, 'restic-out')], { env }));
  fs.rmSync(work, { recursive: true, force: true });
  return { runs, stored, written, same, defaultHash };
}

const ROUNDS = Number(process.env.BENCH_BACKUP_ROUNDS ?? 3);
const MiB = 1024 * 1024;

async function benchImage(label: string, img: string): Promise<void> {
  const size = fs.statSync(img).size;
  const unique = uniqueBlocks(img);
  const work = path.join(BENCH_DIR, `work-${label.replace(/\W+/g, '-')}`);
  const hashes: string[] = [];
  for (const h of HASHES) if (await hashSupported(work, h)) hashes.push(h);
  execFileSync('cat', [img], { stdio: ['ignore', 'ignore', 'inherit'] }); // page cache warm for everyone
  // Several rounds, each running every tool in turn; each row keeps its best time (and its highest RSS):
  // the machine is shared, and turns spread the noise over all tools alike.
  const best = new Map<string, Run>();
  let stored = new Map<string, number>();
  let written = new Map<string, number>();
  let same = true;
  let defaultHash = '';
  const loads: string[] = [];
  for (let i = 0; i < ROUNDS; i++) {
    loads.push(loadAverage());
    const r = await round(img, work, hashes);
    same &&= r.same;
    stored = r.stored;
    written = r.written;
    defaultHash = r.defaultHash;
    for (const [k, m] of r.runs) {
      const b = best.get(k);
      best.set(k, b ? { ...(m.seconds < b.seconds ? m : b), rss: Math.max(m.rss, b.rss) } : m);
    }
  }
  const rows = [...best.entries()].map(([k, m]) => [k, `${m.seconds.toFixed(2)} s`, mbps(size, m.seconds), mib(m.rss), stored.has(k) ? mib(stored.get(k)!) : '']);
  table(`${label}: ${mib(size)} image, best of ${ROUNDS} rounds (load average at each round's start: ${loads.join(', ')})`, ['run', 'time', 'throughput', 'peak RSS', 'stored'], rows);
  const t = (k: string) => best.get(k)!.seconds;
  /** how many times faster `a` is than `b` */
  const x = (a: string, b: string) => t(b) / t(a);
  const line = (what: string, v: number, target: Parameters<typeof verdict>[1]) => console.log(`- ${what}: ${v.toFixed(2)}x (${verdict(v, target)})`);
  const sha = 'sha512sum (reference)';
  console.log(`\nnew repositories get hash_function = ${defaultHash}; restore byte-identical: ${same}; backy restores end with fsync unless --no-sync (restic's never do)`);
  console.log(`image: ${unique.blocks} blocks of ${mib(unique.blockSize)}, ${unique.zeroBlocks} all zero, ${unique.uniqueBlocks} distinct others (${mib(unique.uniqueBytes)})\n`);
  console.log('issue 2 (backy on sha512, as backy2):');
  line('backup vs sha512sum', x('backy backup, hash_function = sha512', sha), { atLeast: 2 });
  line('restore vs sha512sum', x('backy restore, hash_function = sha512', sha), { atLeast: 1.5 });
  line('backup vs restic backup', x('backy backup, hash_function = sha512', 'restic backup'), { atLeast: 2 });
  line('restore vs restic restore', x('backy restore, hash_function = sha512', 'restic restore'), { atLeast: 2 });
  for (const k of [...written.keys()]) {
    const limit = Number(((unique.uniqueBytes + 64 * unique.uniqueBlocks + 65536) / MiB).toFixed(1));
    console.log(`- ${k}: blobs written ${written.get(k)} (${verdict(written.get(k)!, { atLeast: unique.uniqueBlocks, atMost: unique.uniqueBlocks })}); ` +
      `MiB stored ${(stored.get(k)! / MiB).toFixed(1)} (${verdict(stored.get(k)! / MiB, { atMost: limit })}: the distinct blocks plus 64 bytes each)`);
  }
  for (const k of [...best.keys()].filter((n) => n.startsWith('backy') && !n.endsWith(': reference'))) {
    console.log(`- MiB peak RSS of ${k}: ${(best.get(k)!.rss / MiB).toFixed(0)} (${verdict(best.get(k)!.rss / MiB, { atMost: 300 })})`);
  }
  console.log(`\nissue 14 (new repository: hash_function = ${defaultHash}):`);
  line('backup (sha512) vs sha512sum', x('backy backup, hash_function = sha512', sha), { atLeast: 2 });
  line(`backup (${defaultHash}, the new default) vs sha512sum`, x('backy backup (new repository)', sha), { atLeast: 3 });
  for (const h of hashes) console.log(`  backup with ${h}: ${x(`backy backup, hash_function = ${h}`, sha).toFixed(2)}x sha512sum; restore --no-sync ${x(`backy restore --no-sync, hash_function = ${h}`, sha).toFixed(2)}x`);
  line('restore -s vs cp --sparse=always + sync', x('backy restore -s', 'backy restore -s: reference'), { atLeast: 0.9 });
  line('restore vs fallocate + dd conv=sparse,notrunc,fsync', x('backy restore', 'backy restore: reference'), { atLeast: 0.9 });
  line('restore --no-sync vs sha512sum', x('backy restore --no-sync', sha), { atLeast: 2.5 });
  console.log(`- unchanged -f backup: ${x('backy backup -f (unchanged)', sha).toFixed(2)}x sha512sum (no target)`);
  console.log(`- backup vs restic ${x('backy backup (new repository)', 'restic backup').toFixed(2)}x, restore ${x('backy restore', 'restic restore').toFixed(2)}x, ` +
    `restore --no-sync ${x('backy restore --no-sync', 'restic restore').toFixed(2)}x (restic does not fsync)`);
}

export async function run(): Promise<void> {
  const mixed = mixedImage();
  await benchImage('mixed 2 GiB', mixed);
  await benchImage('ext4 512 MiB', ext4Image());
}
