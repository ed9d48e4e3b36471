import { ChildProcess, spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { readdir, readFile, writeFile } from 'node:fs/promises';
import * as path from 'node:path';
import { BACKY, TestRepo } from './cli';

/**
 * Running `backy mount` in a child process and looking at the result from outside: the test process never
 * reads the mount synchronously (it would deadlock if it served the mount itself, and a hung mount must
 * not hang the test), so every read goes through child processes (sha256sum, dd) or async fs calls.
 */

export interface Ran {
  code: number;
  signal: NodeJS.Signals | null;
  stdout: Buffer;
  stderr: string;
}

/** Runs a command in a child process, collecting its output. */
export function run(cmd: string, args: string[], opts: { cwd?: string; timeoutMs?: number } = {}): Promise<Ran> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { cwd: opts.cwd, stdio: ['ignore', 'pipe', 'pipe'] });
    const out: Buffer[] = [];
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => out.push(d));
    child.stderr.on('data', (d) => (stderr += d));
    const timer = setTimeout(() => child.kill('SIGKILL'), opts.timeoutMs ?? 120_000);
    child.on('error', reject);
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      resolve({ code: code ?? 128, signal, stdout: Buffer.concat(out), stderr });
    });
  });
}

/** sha256 of a whole file, computed by `sha256sum` in a child process. */
export async function sha256sum(file: string): Promise<string> {
  const r = await run('sha256sum', [file]);
  if (r.code !== 0) throw new Error(`sha256sum ${file}: ${r.stderr.trim()}`);
  return r.stdout.toString().split(' ')[0];
}

export interface RangeRead {
  code: number;
  hash: string;
  bytes: number;
  stderr: string;
}

/** Reads [offset, offset+length) of a file with `dd` in a child process; hashes what came out of its stdout. */
export function ddRange(file: string, offset: number, length: number, opts: { bs?: number; direct?: boolean; onProgress?: (bytes: number, c: ChildProcess) => void } = {}): Promise<RangeRead> {
  return new Promise((resolve, reject) => {
    const flags = ['skip_bytes', 'count_bytes', ...(opts.direct ? ['direct'] : [])].join(',');
    const child = spawn('dd', [`if=${file}`, `bs=${opts.bs ?? 65536}`, `iflag=${flags}`, `skip=${offset}`, `count=${length}`, 'status=none'], { stdio: ['ignore', 'pipe', 'pipe'] });
    const h = createHash('sha256');
    let bytes = 0;
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => {
      h.update(d);
      bytes += d.length;
      opts.onProgress?.(bytes, child);
    });
    child.stderr.on('data', (d) => (stderr += d));
    child.on('error', reject);
    child.on('close', (code, signal) => resolve({ code: code ?? (signal ? 128 : -1), hash: h.digest('hex'), bytes, stderr }));
  });
}

export function sha256(data: Buffer): string {
  return createHash('sha256').update(data).digest('hex');
}

export interface MountEntry {
  source: string;
  target: string;
  type: string;
  options: string;
}

function unescapeMount(s: string): string {
  return s.replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8)));
}

export async function mounts(): Promise<MountEntry[]> {
  const text = await readFile('/proc/mounts', 'utf8');
  return text.split('\n').filter(Boolean).map((l) => {
    const [source, target, type, options] = l.split(' ');
    return { source: unescapeMount(source), target: unescapeMount(target), type, options };
  });
}

function within(p: string, dir: string): boolean {
  const rel = path.relative(dir, p);
  return rel === '' || (!rel.startsWith('..') && !path.isAbsolute(rel));
}

/** Mounts at or below `dir`. */
export async function mountsUnder(dir: string): Promise<MountEntry[]> {
  return (await mounts()).filter((m) => within(m.target, dir));
}

/** Loop devices whose backing file is at or below `dir`. */
export async function loopsUnder(dir: string): Promise<string[]> {
  const out: string[] = [];
  for (const d of (await readdir('/sys/block')).filter((x) => x.startsWith('loop'))) {
    const f = (await readFile(`/sys/block/${d}/loop/backing_file`, 'utf8').catch(() => '')).trim().replace(/ \(deleted\)$/, '');
    if (f && within(f, dir)) out.push(`/dev/${d}`);
  }
  return out;
}

export { alive } from './cli';

export const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** `p`'s value, or undefined once `ms` have passed (the timer does not outlive the race). */
export async function withTimeout<T>(p: Promise<T>, ms: number): Promise<T | undefined> {
  let timer: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([p, new Promise<undefined>((r) => (timer = setTimeout(() => r(undefined), ms)))]);
  } finally {
    clearTimeout(timer);
  }
}

/** Polls `check` until it returns a truthy value or the time is up (then returns the last value). */
export async function waitFor<T>(check: () => Promise<T> | T, timeoutMs = 10_000, stepMs = 100): Promise<T> {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const v = await check();
    if (v || Date.now() > end) return v;
    await sleep(stepMs);
  }
}

export interface MountProcess {
  dir: string;
  child: ChildProcess;
  pid: number;
  /** stderr so far */
  log(): string;
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  /** Sends `signal` and waits for the process to exit; returns its exit code. */
  stop(signal?: NodeJS.Signals, timeoutMs?: number): Promise<number | null>;
}

/** Starts `backy mount ARGS` for the repository and waits until it serves (or fails with its stderr). */
export async function startMount(repo: TestRepo, args: string[], dir: string, timeoutMs = 30_000): Promise<MountProcess> {
  const child = spawn(process.execPath, [BACKY, '-c', repo.cfg, 'mount', ...args], { cwd: repo.dir, stdio: ['ignore', 'pipe', 'pipe'] });
  let stderr = '';
  child.stdout.on('data', () => undefined);
  child.stderr.on('data', (d) => (stderr += d));
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => child.on('exit', (code, signal) => resolve({ code, signal })));
  const ready = await Promise.race([
    waitFor(() => stderr.includes('serving until interrupted'), timeoutMs, 20).then((ok) => (ok ? 'ready' : 'timeout')),
    exited.then(() => 'exited'),
  ]);
  if (ready !== 'ready') {
    child.kill('SIGKILL');
    await exited;
    throw new Error(`backy mount ${args.join(' ')} did not start (${ready}): ${stderr}`);
  }
  return {
    dir, child, pid: child.pid!, exited,
    log: () => stderr,
    async stop(signal = 'SIGINT', ms = 30_000) {
      if (child.exitCode === null && child.signalCode === null) child.kill(signal);
      const r = await withTimeout(exited, ms);
      if (!r) throw new Error(`backy mount did not exit within ${ms} ms after ${signal}: ${stderr}`);
      return r.code;
    },
  };
}

/**
 * Leaves nothing behind whatever a test did: kills the mount process, unmounts what is mounted under `dir`
 * (aborting a hung FUSE connection if needed) and detaches loop devices backed from it.
 */
export async function forceCleanup(dir: string, child?: ChildProcess): Promise<void> {
  if (child && child.exitCode === null && child.signalCode === null) {
    const gone = new Promise((r) => child.once('exit', r));
    child.kill('SIGKILL');
    await gone;
  }
  const nested = (await mountsUnder(dir)).filter((m) => m.target !== dir).reverse();
  for (const m of nested) await run('umount', ['-l', m.target]);
  for (const loop of await loopsUnder(dir)) await run('losetup', ['-d', loop]);
  const top = (await mountsUnder(dir)).find((m) => m.target === dir);
  if (top) {
    const conn = await fuseConnection(dir);
    const r = await run('fusermount', ['-uz', dir], { timeoutMs: 10_000 });
    if (r.code !== 0 && conn !== undefined) {
      await abortFuseConnection(conn);
      await run('fusermount', ['-uz', dir], { timeoutMs: 10_000 });
    }
  }
}

/** The FUSE connection number of the mount at `dir`: the minor of its device (mountinfo's major:minor). */
async function fuseConnection(dir: string): Promise<number | undefined> {
  const text = await readFile('/proc/self/mountinfo', 'utf8');
  for (const line of text.split('\n')) {
    const f = line.split(' ');
    if (f.length > 4 && unescapeMount(f[4]) === dir) return Number(f[2].split(':')[1]);
  }
  return undefined;
}

/** Aborts one hung FUSE connection (the documented way to free a mount whose server hangs). */
async function abortFuseConnection(n: number): Promise<void> {
  await run('mount', ['-t', 'fusectl', 'none', '/sys/fs/fuse/connections']);
  await writeFile(`/sys/fs/fuse/connections/${n}/abort`, '1').catch(() => undefined);
}
