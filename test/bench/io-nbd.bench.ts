/**
 * Issue 13 on the 2 GiB mixed image: full backup over NBD from qemu-nbd vs from the same image as file://
 * (target ≥ 0.8x), a differential driven by a QEMU dirty bitmap with 5 % of the blocks dirty vs `-f` without
 * the bitmap (≥ 10x), restore into qemu-nbd serving a fresh qcow2 vs restore to a file (≥ 0.7x).
 * `npm run bench -- io-nbd`; BENCH_IO_NBD_ROUNDS sets the rounds (best of each is kept).
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { randomBytes } from 'node:crypto';
import { BACKY } from '../helpers/cli';
import { qemuNbd, Server, sh } from '../helpers/qemu-nbd';
import { SeededRandom } from '../helpers/images';
import { BENCH_DIR, mbps, measure, Measured, mixedImage, table, verdict } from './common';

const ROUNDS = Number(process.env.BENCH_IO_NBD_ROUNDS ?? 3);
const BS = 4 * 1024 * 1024;

function repoConfig(work: string): string {
  fs.rmSync(work, { recursive: true, force: true });
  fs.mkdirSync(work, { recursive: true });
  const cfg = path.join(work, 'backy.cfg');
  fs.writeFileSync(cfg, `[DEFAULTS]\nencryption_key = ${randomBytes(32).toString('hex')}\nlogfile = ${work}/backy.log\n` +
    `[MetaBackend]\nengine = sqlite:///${work}/backy.sqlite\n[DataBackend]\npath = ${work}/data\n`);
  return cfg;
}

async function backy(cfg: string, ...args: string[]): Promise<Measured> {
  const m = await measure(process.execPath, [BACKY, '-c', cfg, ...args]);
  if (m.code !== 0) throw new Error(`backy ${args.join(' ')} failed: ${m.stderr}`);
  return m;
}

const uidOf = (m: Measured) => m.stdout.trim().split('\n').pop()!;

export async function run(): Promise<void> {
  const img = mixedImage();
  const size = fs.statSync(img).size;
  const blocks = Math.ceil(size / BS);
  const dir = path.join(BENCH_DIR, 'work-io-nbd');
  fs.mkdirSync(dir, { recursive: true });
  const best = new Map<string, Measured>();
  const keep = (k: string, m: Measured) => {
    const b = best.get(k);
    if (!b || m.seconds < b.seconds) best.set(k, m);
  };
  const servers: Server[] = [];
  const serve = async (...a: Parameters<typeof qemuNbd>) => {
    const s = await qemuNbd(...a);
    servers.push(s);
    return s;
  };

  // The qcow2 copy of the image (holes unallocated) with a bitmap started after the base backup, and 5 % of
  // its blocks rewritten afterwards: the bitmap marks them.
  const qcow = path.join(dir, 'mixed.qcow2');
  await sh('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', img, qcow], 600_000);
  const dirty = new Set<number>();
  const rnd = new SeededRandom('io-nbd-dirty');
  while (dirty.size < Math.round(blocks * 0.05)) dirty.add(rnd.int(blocks));

  try {
    for (let round = 0; round < ROUNDS; round++) {
      execSync(img);
      // 1. Full backup: file:// vs nbd+unix:// from qemu-nbd serving the same raw image.
      let cfg = repoConfig(path.join(dir, 'repo-file'));
      await backy(cfg, 'initdb');
      keep('backup file://', await backy(cfg, '-m', 'backup', `file://${img}`, 'bench'));
      cfg = repoConfig(path.join(dir, 'repo-nbd'));
      await backy(cfg, 'initdb');
      const raw = await serve(img, { format: 'raw', extra: ['-r'], socket: path.join(dir, 'raw.sock') });
      keep('backup nbd+unix:// (qemu-nbd, raw)', await backy(cfg, '-m', 'backup', raw.uri, 'bench'));
      await raw.stop();

      // 2. Differential with 5 % dirty: --bitmap vs -f without it (both over NBD from the qcow2).
      cfg = repoConfig(path.join(dir, 'repo-diff'));
      await backy(cfg, 'initdb');
      const work = path.join(dir, 'diff.qcow2');
      fs.copyFileSync(qcow, work);
      let s = await serve(work, { extra: ['-r'], socket: path.join(dir, 'diff.sock') });
      const base = uidOf(await backy(cfg, '-m', 'backup', s.uri, 'bench'));
      await s.stop();
      await sh('qemu-img', ['bitmap', '--add', work, 'bench']);
      const writes = [...dirty].flatMap((b) => ['-c', `write -P ${(b % 254) + 1} ${b * BS} ${Math.min(BS, size - b * BS)}`]);
      await sh('qemu-io', ['-f', 'qcow2', ...writes, work], 600_000);
      s = await serve(work, { extra: ['-r', '-B', 'bench'], socket: path.join(dir, 'diff.sock') });
      keep('backup -f --bitmap (5 % dirty)', await backy(cfg, '-m', 'backup', '-f', base, '--bitmap', 'bench', s.uri, 'bench'));
      keep('backup -f, no bitmap (same image)', await backy(cfg, '-m', 'backup', '-f', base, s.uri, 'bench'));
      await s.stop();

      // 3. Restore of the full backup: to a file vs into qemu-nbd serving a fresh qcow2 (both flushed at the end).
      cfg = path.join(dir, 'repo-file', 'backy.cfg');
      const uid = (await backy(cfg, '-m', '-s', 'ls', '-f', 'uid')).stdout.trim().split('\n')[0];
      const out = path.join(dir, 'restored.img');
      fs.rmSync(out, { force: true });
      keep('restore to file://', await backy(cfg, 'restore', uid, `file://${out}`));
      fs.rmSync(out);
      const fresh = path.join(dir, 'restored.qcow2');
      fs.rmSync(fresh, { force: true });
      await sh('qemu-img', ['create', '-f', 'qcow2', fresh, String(size)]);
      const t = await serve(fresh, { socket: path.join(dir, 'restore.sock') });
      keep('restore into qemu-nbd (fresh qcow2)', await backy(cfg, 'restore', uid, t.uri));
      await t.stop();
      if (round === ROUNDS - 1) await sh('qemu-img', ['compare', '-f', 'raw', '-F', 'qcow2', img, fresh], 600_000);
      fs.rmSync(fresh);
    }
  } finally {
    for (const s of servers) await s.stop('SIGKILL');
    fs.rmSync(dir, { recursive: true, force: true }); // several GiB of repositories and qcow2 copies
  }
  const sec = (k: string) => best.get(k)!.seconds;
  table(`NBD sources and targets: ${(size / 1024 ** 3).toFixed(0)} GiB mixed image, best of ${ROUNDS} rounds`, ['run', 'time', 'throughput'],
    [...best.entries()].map(([k, m]) => [k, `${m.seconds.toFixed(2)} s`, mbps(size, m.seconds)]));
  const full = sec('backup file://') / sec('backup nbd+unix:// (qemu-nbd, raw)');
  const diff = sec('backup -f, no bitmap (same image)') / sec('backup -f --bitmap (5 % dirty)');
  const restore = sec('restore to file://') / sec('restore into qemu-nbd (fresh qcow2)');
  console.log(`\nfull backup over NBD vs file://: ${full.toFixed(2)}x (${verdict(full, { atLeast: 0.8 })})`);
  console.log(`bitmap differential (5 % dirty) vs -f without bitmap: ${diff.toFixed(1)}x (${verdict(diff, { atLeast: 10 })})`);
  console.log(`restore into qemu-nbd + qcow2 vs to a file: ${restore.toFixed(2)}x (${verdict(restore, { atLeast: 0.7 })})`);
}

/** Reads the image once so every run starts with it in the page cache. */
function execSync(file: string): void {
  const fd = fs.openSync(file, 'r');
  const buf = Buffer.allocUnsafe(8 << 20);
  try {
    while (fs.readSync(fd, buf, 0, buf.length, null) > 0);
  } finally {
    fs.closeSync(fd);
  }
}
