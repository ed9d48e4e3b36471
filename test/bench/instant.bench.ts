/**
 * Instant restore on the 2 GiB mixed image: the first 4 KiB read served by `restore --live` (from the
 * command's start), a whole live restore against a plain one, a delta restore of a target differing in 5 %
 * of its blocks against a full restore, fixate of an overlay with 5 % of the blocks written against a full
 * differential backup of the same image, and random 4 KiB write IOPS on a writable export (QD1, QD32) against
 * `nbdkit file` with the cow filter. `npm run bench -- instant`; BENCH_INSTANT_ROUNDS sets the rounds (best of),
 * BENCH_INSTANT_SECONDS the fio run time.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { ChildProcess, execFileSync, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { BACKY } from '../helpers/cli';
import { startBackyNbd } from '../helpers/backy-nbd';
import { SeededRandom } from '../helpers/images';
import { run as runTool } from '../helpers/nbd-tools';
import { freePort, waitPort } from '../helpers/net';
import { NbdClient } from '../../nbd/client';
import { BENCH_DIR, dropCaches, measure, mixedImage, table, verdict } from './common';

const ROUNDS = Number(process.env.BENCH_INSTANT_ROUNDS ?? 2);
const FIO_SECONDS = Number(process.env.BENCH_INSTANT_SECONDS ?? 8);
const BS = 4 * 1024 * 1024;

/** IOPS of fio random 4 KiB writes over one NBD connection at the given queue depth. */
async function fioWrites(uri: string, depth: number): Promise<number> {
  const r = await runTool('fio', ['--name=randw', '--ioengine=nbd', `--uri=${uri}`, '--rw=randwrite', '--bs=4k', `--iodepth=${depth}`,
    `--runtime=${FIO_SECONDS}`, '--time_based', '--randrepeat=1', '--output-format=json'], { timeoutMs: (FIO_SECONDS + 60) * 1000 });
  if (r.code !== 0) throw new Error(`fio failed: ${r.stderr}`);
  const json = JSON.parse(r.stdout.slice(r.stdout.indexOf('{'))) as { jobs: { write: { iops: number } }[] };
  return json.jobs[0].write.iops;
}

/** Copies `from` to `to` and makes the copy durable (it stands for a disk that was there before). */
function copySynced(from: string, to: string): void {
  fs.copyFileSync(from, to);
  const fd = fs.openSync(to, 'r+');
  fs.fsyncSync(fd);
  fs.closeSync(fd);
}

function stopChild(c: ChildProcess): Promise<void> {
  return new Promise((resolve) => {
    if (c.exitCode !== null || c.signalCode !== null) return resolve();
    c.once('exit', () => resolve());
    c.kill('SIGTERM');
  });
}

/**
 * `restore --live --exit-when-done` from its start: seconds until a client got its first 4 KiB (read as
 * soon as the server says it serves), and seconds until the command exited (everything restored).
 */
async function liveRestore(cfg: string, uid: string, out: string, readAt: number): Promise<{ firstRead: number; total: number }> {
  fs.rmSync(out, { force: true });
  fs.rmSync(`${out}.backy-live`, { force: true });
  const t0 = process.hrtime.bigint();
  const secs = () => Number(process.hrtime.bigint() - t0) / 1e9;
  const child = spawn(process.execPath, [BACKY, '-c', cfg, '--json', 'restore', '--live', '--exit-when-done', '-p', '0', uid, `file://${out}`], { stdio: ['ignore', 'pipe', 'pipe'] });
  let err = '';
  child.stderr!.on('data', (d) => (err += d));
  const exited = new Promise<number>((resolve) => child.on('exit', (c) => resolve(c ?? 1)));
  const port = await new Promise<number>((resolve, reject) => {
    let buf = '';
    child.stdout!.on('data', (d) => {
      buf += d;
      const m = /"event":"serving","address":"nbd:\/\/127\.0\.0\.1:(\d+)"/.exec(buf);
      if (m) resolve(Number(m[1]));
    });
    void exited.then((c) => reject(new Error(`restore --live exited ${c} before serving: ${err}`)));
  });
  const c = await NbdClient.connect({ host: '127.0.0.1', port }, { exportName: uid });
  const got = await c.read(readAt, 4096);
  const firstRead = secs();
  if (got.length !== 4096) throw new Error('short read');
  await c.close();
  const code = await exited;
  if (code !== 0) throw new Error(`restore --live exited ${code}: ${err}`);
  return { firstRead, total: secs() };
}

export async function run(): Promise<void> {
  const img = mixedImage();
  const size = fs.statSync(img).size;
  const blocks = Math.ceil(size / BS);
  const work = path.join(BENCH_DIR, 'work-instant');
  fs.rmSync(work, { recursive: true, force: true });
  fs.mkdirSync(work, { recursive: true });
  const cfg = path.join(work, 'backy.cfg');
  fs.writeFileSync(cfg, `[DEFAULTS]\nencryption_key = ${randomBytes(32).toString('hex')}\nlogfile = ${work}/backy.log\noverlay_dir = ${work}/overlays\n` +
    `[MetaBackend]\nengine = sqlite:///${work}/backy.sqlite\n[DataBackend]\npath = ${work}/data\n`);
  const backy = (...args: string[]) => measure(process.execPath, [BACKY, '-c', cfg, ...args]);
  const ok = async (what: string, p: Promise<{ code: number; stderr: string; stdout: string; seconds: number }>) => {
    const r = await p;
    if (r.code !== 0) throw new Error(`${what} failed: ${r.stderr}`);
    return r;
  };
  await backy('initdb');
  const uid = (await ok('backup', backy('backup', `file://${img}`, 'bench'))).stdout.trim();

  // 5 % of the blocks (fixed seed), each overwritten whole with fresh random data.
  const rnd = new SeededRandom('instant-5pct');
  const changed = new Set<number>();
  while (changed.size < Math.round(blocks * 0.05)) changed.add(rnd.int(blocks));
  const changedImg = path.join(work, 'changed.img');
  fs.copyFileSync(img, changedImg);
  {
    const fd = fs.openSync(changedImg, 'r+');
    for (const i of changed) fs.writeSync(fd, rnd.bytes(Math.min(BS, size - i * BS)), 0, undefined, i * BS);
    fs.closeSync(fd);
  }
  const out = path.join(work, 'out.img');
  // A data block in the middle of the image for the first read.
  const readAt = Math.floor(blocks / 2) * BS + 8192;

  const best = { plain: Infinity, live: Infinity, firstRead: Infinity, full: Infinity, delta: Infinity, diffBackup: Infinity, fixate: Infinity, diffBackupCold: Infinity, fixateCold: Infinity };
  let deltaWrites = '';
  for (let round = 0; round < ROUNDS; round++) {
    // Plain restore and live restore (no client but the one first read), each onto a new file.
    fs.rmSync(out, { force: true });
    best.plain = Math.min(best.plain, (await ok('restore', backy('restore', uid, `file://${out}`))).seconds);
    const live = await liveRestore(cfg, uid, out, readAt);
    best.live = Math.min(best.live, live.total);
    best.firstRead = Math.min(best.firstRead, live.firstRead);

    // Delta restore: the target holds the changed image (on disk, as yesterday's disk would be: synced first,
    // so neither restore pays for the copy's writeback); a full restore rewrites the same file.
    copySynced(changedImg, out);
    const d = await ok('restore --delta', backy('--json', 'restore', '--delta', uid, `file://${out}`));
    best.delta = Math.min(best.delta, d.seconds);
    const ds = JSON.parse(d.stdout) as Record<string, number>;
    deltaWrites = `${ds.blocksCompared} compared, ${ds.blocksWritten + ds.blocksRepeated + ds.blocksZeroed} written`;
    copySynced(changedImg, out);
    best.full = Math.min(best.full, (await ok('restore -f', backy('restore', '-f', uid, `file://${out}`))).seconds);

    // fixate of an overlay holding the same 5 % (written over NBD beforehand) vs a differential backup of
    // the changed image.
    const srv = await startBackyNbd(cfg, ['-w', `${uid}:fx${round}`], { verbose: false });
    try {
      const c = await NbdClient.connect({ host: '127.0.0.1', port: srv.port }, { exportName: `fx${round}` });
      const data = fs.openSync(changedImg, 'r');
      const buf = Buffer.alloc(BS);
      for (const i of changed) {
        const len = Math.min(BS, size - i * BS);
        fs.readSync(data, buf, 0, len, i * BS);
        await c.write(i * BS, buf.subarray(0, len));
      }
      fs.closeSync(data);
      await c.flush();
      await c.close();
    } finally {
      await srv.stop();
    }
    // Warm: the overlay and the image are in the page cache. Cold: both read from disk (the usual case for a
    // backup of a VM's disk), the page cache dropped before each command.
    execFileSync('sync');
    best.fixate = Math.min(best.fixate, (await ok('fixate', backy('fixate', `fx${round}`))).seconds);
    best.diffBackup = Math.min(best.diffBackup, (await ok('backup -f', backy('backup', '-f', uid, `file://${changedImg}`, 'bench'))).seconds);
    dropCaches();
    best.fixateCold = Math.min(best.fixateCold, (await ok('fixate', backy('fixate', `fx${round}`))).seconds);
    dropCaches();
    best.diffBackupCold = Math.min(best.diffBackupCold, (await ok('backup -f', backy('backup', '-f', uid, `file://${changedImg}`, 'bench'))).seconds);
    await ok('overlay rm', backy('overlay', 'rm', `fx${round}`));
  }

  // Random 4 KiB writes: a writable export against nbdkit file + cow over the raw image.
  const kitPort = await freePort();
  const kit = spawn('nbdkit', ['-f', '-i', '127.0.0.1', '-p', String(kitPort), '--filter=cow', 'file', img], { stdio: 'ignore' });
  const kitUri = `nbd://127.0.0.1:${kitPort}/`;
  const iops = { kit1: 0, kit32: 0, ours1: 0, ours32: 0 };
  try {
    await waitPort(kitPort);
    for (let round = 0; round < ROUNDS; round++) {
      const srv = await startBackyNbd(cfg, ['-w', `${uid}:iops${round}`], { verbose: false });
      try {
        iops.kit1 = Math.max(iops.kit1, await fioWrites(kitUri, 1));
        iops.ours1 = Math.max(iops.ours1, await fioWrites(srv.uri(`iops${round}`), 1));
        iops.kit32 = Math.max(iops.kit32, await fioWrites(kitUri, 32));
        iops.ours32 = Math.max(iops.ours32, await fioWrites(srv.uri(`iops${round}`), 32));
      } finally {
        await srv.stop();
      }
      await ok('overlay rm', backy('overlay', 'rm', `iops${round}`));
    }
  } finally {
    await stopChild(kit);
  }

  const r2 = (x: number) => x.toFixed(2);
  table(`Instant restore: 2 GiB mixed image (${blocks} blocks of 4 MiB), best of ${ROUNDS}`, ['measure', 'backy', 'reference', 'ratio', 'target'], [
    ['restore --live: first 4 KiB read served (s)', r2(best.firstRead), '', '', verdict(best.firstRead, { atMost: 1 })],
    ['restore --live, whole (s) vs restore', r2(best.live), r2(best.plain), `${r2(best.live / best.plain)}x`, verdict(best.live / best.plain, { atMost: 1.2 })],
    [`restore --delta, 5 % different (${deltaWrites}) vs restore -f (s)`, r2(best.delta), r2(best.full), `${r2(best.full / best.delta)}x faster`, verdict(best.full / best.delta, { atLeast: 3 })],
    ['fixate of 5 % written vs backup -f of the same image, page cache warm (s)', r2(best.fixate), r2(best.diffBackup), `${r2(best.diffBackup / best.fixate)}x faster`, verdict(best.diffBackup / best.fixate, { atLeast: 5 })],
    ['  same, page cache dropped before each (s)', r2(best.fixateCold), r2(best.diffBackupCold), `${r2(best.diffBackupCold / best.fixateCold)}x faster`, verdict(best.diffBackupCold / best.fixateCold, { atLeast: 5 })],
    ['writable export, fio randwrite 4 KiB QD1 (IOPS) vs nbdkit file --filter=cow', iops.ours1.toFixed(0), iops.kit1.toFixed(0), `${r2(iops.ours1 / iops.kit1)}x`, verdict(iops.ours1 / iops.kit1, { atLeast: 0.5 })],
    ['writable export, fio randwrite 4 KiB QD32 (IOPS) vs nbdkit file --filter=cow', iops.ours32.toFixed(0), iops.kit32.toFixed(0), `${r2(iops.ours32 / iops.kit32)}x`, verdict(iops.ours32 / iops.kit32, { atLeast: 0.5 })],
  ]);
  fs.rmSync(work, { recursive: true, force: true });
}
