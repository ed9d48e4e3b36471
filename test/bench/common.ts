import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { execFileSync, spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { makeMixedImage } from '../helpers/images';

/** Where benchmarks keep their images between runs (regenerated when missing). */
export const BENCH_DIR = process.env.BACKY_BENCH_DIR ?? path.join(os.tmpdir(), 'backy-bench');

/** The 2 GiB mixed image (fixed seed), created once. */
export function mixedImage(size = 2 * 1024 ** 3): string {
  fs.mkdirSync(BENCH_DIR, { recursive: true });
  const file = path.join(BENCH_DIR, `mixed-${size}.img`);
  if (!fs.existsSync(file) || fs.statSync(file).size !== size) makeMixedImage(file, size);
  return file;
}

/** What a deduplicating backup of an image must store: its distinct blocks that are not all zeroes. */
export interface UniqueBlocks {
  blockSize: number;
  blocks: number;
  zeroBlocks: number;
  uniqueBlocks: number;
  uniqueBytes: number;
}

/**
 * Counts the distinct non-zero blocks of an image (sha256 of each block), once per image and block size:
 * the result is kept beside the image. Stored bytes are checked against it.
 */
export function uniqueBlocks(img: string, blockSize = 4 * 1024 * 1024): UniqueBlocks {
  const st = fs.statSync(img);
  const cache = `${img}.unique-${blockSize}.json`;
  try {
    const c = JSON.parse(fs.readFileSync(cache, 'utf8')) as UniqueBlocks & { size: number; mtimeMs: number };
    if (c.size === st.size && c.mtimeMs === st.mtimeMs) return c;
  } catch {
    // not counted yet
  }
  const seen = new Set<string>();
  const zero = Buffer.alloc(blockSize);
  const buf = Buffer.allocUnsafe(blockSize);
  const fd = fs.openSync(img, 'r');
  let blocks = 0;
  let zeroBlocks = 0;
  let uniqueBytes = 0;
  try {
    for (let off = 0; off < st.size; off += blockSize) {
      const n = fs.readSync(fd, buf, 0, Math.min(blockSize, st.size - off), off);
      const b = buf.subarray(0, n);
      blocks++;
      if (b.equals(zero.subarray(0, n))) {
        zeroBlocks++;
        continue;
      }
      const h = createHash('sha256').update(b).digest('hex');
      if (seen.has(h)) continue;
      seen.add(h);
      uniqueBytes += n;
    }
  } finally {
    fs.closeSync(fd);
  }
  const r: UniqueBlocks = { blockSize, blocks, zeroBlocks, uniqueBlocks: seen.size, uniqueBytes };
  fs.writeFileSync(cache, JSON.stringify({ ...r, size: st.size, mtimeMs: st.mtimeMs }));
  return r;
}

/**
 * A sparse copy of an image (`cp --sparse=always`: its zero blocks are holes), made once: what a reference
 * server serves, so it reports and skips the same holes as backy.
 */
export function sparseCopy(img: string): string {
  const out = `${img}.sparse`;
  if (fs.existsSync(out) && fs.statSync(out).size === fs.statSync(img).size) return out;
  execFileSync('cp', ['--sparse=always', img, `${out}.tmp`]);
  fs.renameSync(`${out}.tmp`, out);
  return out;
}

/** Bytes a file really occupies on disk (holes excluded). */
export function allocatedBytes(file: string): number {
  return fs.statSync(file).blocks * 512;
}

export const median = (xs: number[]): number => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];

/** Load average over the last minute: printed next to figures (a loaded machine makes every figure lower). */
export function loadAverage(): string {
  return fs.readFileSync('/proc/loadavg', 'utf8').split(' ')[0];
}

export interface Measured {
  seconds: number;
  /** peak RSS in bytes of the command (GNU time) */
  rss: number;
  code: number;
  stdout: string;
  stderr: string;
}

/** Runs a command under /usr/bin/time -f to get wall time and peak RSS. */
export function measure(cmd: string, args: string[], opts: { cwd?: string; env?: NodeJS.ProcessEnv } = {}): Promise<Measured> {
  return new Promise((resolve, reject) => {
    const start = process.hrtime.bigint();
    const child = spawn('/usr/bin/time', ['-f', '__RSS__ %M', cmd, ...args], { cwd: opts.cwd, env: { ...process.env, ...opts.env } });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d) => (stdout += d));
    child.stderr.on('data', (d) => (stderr += d));
    child.on('error', reject);
    child.on('close', (code) => {
      const seconds = Number(process.hrtime.bigint() - start) / 1e9;
      const m = /__RSS__ (\d+)/.exec(stderr);
      resolve({ seconds, rss: m ? Number(m[1]) * 1024 : 0, code: code ?? -1, stdout, stderr: stderr.replace(/__RSS__ \d+\n?/, '') });
    });
  });
}

export function mbps(bytes: number, seconds: number): string {
  return `${(bytes / 1e6 / seconds).toFixed(0)} MB/s`;
}

export function mib(bytes: number): string {
  return `${(bytes / 1024 ** 2).toFixed(0)} MiB`;
}

/**
 * Writes dirty pages out (so one run's writeback is not billed to the next) and drops the kernel page cache. A "cold" figure measured with the page cache still warm would be a lie, so a
 * failure (not root, a read-only /proc) stops the benchmark instead of being ignored.
 */
export function dropCaches(): void {
  try {
    execFileSync('sync');
    fs.writeFileSync('/proc/sys/vm/drop_caches', '3');
  } catch (e) {
    throw new Error(`cannot drop the page cache (${(e as Error).message}): cold figures would measure the page cache; run the benchmark as root`);
  }
}

/**
 * A target next to its figure: "met" or "MISSED". `atLeast` for ratios and rates (higher is better),
 * `atMost` for times and sizes (lower is better). Every target of every issue is printed through this, so a
 * missed one can be found with grep.
 */
export function verdict(value: number, target: { atLeast?: number; atMost?: number }): string {
  const ok = (target.atLeast === undefined || value >= target.atLeast) && (target.atMost === undefined || value <= target.atMost);
  const want = [target.atLeast !== undefined ? `≥ ${target.atLeast}` : '', target.atMost !== undefined ? `≤ ${target.atMost}` : ''].filter(Boolean).join(', ');
  return `${want}: ${ok ? 'met' : 'MISSED'}`;
}

/** The CPU model and core count, printed at the top of every benchmark run: figures only mean something with them. */
export function machineLine(): string {
  const cpus = os.cpus();
  return `CPU: ${cpus[0]?.model.trim() ?? 'unknown'}, ${cpus.length} cores; ${(os.totalmem() / 1024 ** 3).toFixed(0)} GiB RAM; Node ${process.version}`;
}

/** Prints a table of results. */
export function table(title: string, header: string[], rows: (string | number)[][]): void {
  const cells = [header, ...rows.map((r) => r.map(String))];
  const w = header.map((_, k) => Math.max(...cells.map((c) => (c[k] ?? '').length)));
  console.log(`\n## ${title}\n`);
  cells.forEach((c, i) => {
    console.log(`| ${c.map((v, k) => v.padEnd(w[k])).join(' | ')} |`);
    if (i === 0) console.log(`|${w.map((x) => '-'.repeat(x + 2)).join('|')}|`);
  });
}
