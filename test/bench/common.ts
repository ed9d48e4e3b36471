import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { spawn } from 'node:child_process';
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

/** Drops the kernel page cache (root only; ignored elsewhere). */
export function dropCaches(): void {
  try {
    fs.writeFileSync('/proc/sys/vm/drop_caches', '1');
  } catch {
    /* not root */
  }
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
