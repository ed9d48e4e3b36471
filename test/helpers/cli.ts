import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { randomBytes } from 'node:crypto';
import { spawn } from 'node:child_process';
import Database from 'better-sqlite3';
import { decodeChunk } from '../../src/meta/block-map';
import { blobKey } from '../../src/storage/types';

/** Absolute path of the compiled CLI entry point. */
export const BACKY = path.resolve(__dirname, '../../src/cli/main.js');

export interface RunResult {
  code: number;
  stdout: string;
  stderr: string;
}

/** Runs `backy ARGS` in a child process (never blocking this process's event loop). */
export function runBacky(args: string[], opts: { cwd?: string; env?: NodeJS.ProcessEnv; input?: string; timeoutMs?: number } = {}): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [BACKY, ...args], { cwd: opts.cwd, env: { ...process.env, ...opts.env }, stdio: ['pipe', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d) => (stdout += d));
    child.stderr.on('data', (d) => (stderr += d));
    const timer = setTimeout(() => child.kill('SIGKILL'), opts.timeoutMs ?? 300_000);
    child.on('error', reject);
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      resolve({ code: code ?? (signal ? 128 : -1), stdout, stderr });
    });
    child.stdin.end(opts.input ?? '');
  });
}

/** A scratch repository: a temp dir with backy.cfg (SQLite + data dir + fresh key) and `run` bound to it. */
export interface TestRepo {
  dir: string;
  cfg: string;
  key: string;
  run(args: string[], opts?: Parameters<typeof runBacky>[1]): Promise<RunResult>;
  /** Runs and fails with the output when the exit code differs from `code`. */
  ok(args: string[], code?: number): Promise<RunResult>;
  cleanup(): void;
}

export function makeTestRepo(extraConfig = '', opts: { blockSize?: number } = {}): TestRepo {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'backy-test-'));
  const key = randomBytes(32).toString('hex');
  const cfg = path.join(dir, 'backy.cfg');
  fs.writeFileSync(cfg, [
    '[DEFAULTS]',
    `logfile = ${dir}/backy.log`,
    `encryption_key = ${key}`,
    `block_size = ${opts.blockSize ?? 4194304}`,
    '[MetaBackend]',
    `engine = sqlite:///${dir}/backy.sqlite`,
    '[DataBackend]',
    `path = ${dir}/data`,
    extraConfig,
  ].join('\n'));
  const run = (args: string[], o?: Parameters<typeof runBacky>[1]) => runBacky(['-c', cfg, ...args], { cwd: dir, ...o });
  return {
    dir, cfg, key, run,
    async ok(args, code = 0) {
      const r = await run(args);
      if (r.code !== code) throw new Error(`backy ${args.join(' ')} exited ${r.code}, expected ${code}\nstdout: ${r.stdout}\nstderr: ${r.stderr}`);
      return r;
    },
    cleanup() {
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
}

/** Writes a file of `size` bytes: pseudo-random with zero and repeated regions when `pattern` is 'mixed'. */
export function writeImage(file: string, size: number, pattern: 'random' | 'zero' | 'mixed' = 'random', seed = 1): void {
  const fd = fs.openSync(file, 'w');
  try {
    let off = 0;
    let x = seed >>> 0 || 1;
    const chunk = 1 << 20;
    while (off < size) {
      const n = Math.min(chunk, size - off);
      const region = Math.floor(off / chunk);
      let buf: Buffer;
      if (pattern === 'zero' || (pattern === 'mixed' && region % 3 === 1)) buf = Buffer.alloc(n);
      else {
        buf = randomBytes(n);
        if (pattern === 'mixed' && region % 3 === 2) buf.fill((x = (x * 1103515245 + 12345) >>> 0) & 0xff);
      }
      fs.writeSync(fd, buf, 0, n, off);
      off += n;
    }
  } finally {
    fs.closeSync(fd);
  }
}

/** sha256 of a version restored to a scratch file in the repository's directory (the file is removed). */
export async function restoredHash(repo: TestRepo, uid: string): Promise<string> {
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  const { sha256File } = require('./images') as typeof import('./images');
  const out = path.join(repo.dir, `restore-${uid}`);
  await repo.ok(['restore', '-f', uid, `file://${out}`]);
  const h = sha256File(out);
  fs.rmSync(out);
  return h;
}

/** The blob file holding block `index` (in map chunk 0) of version `uid` of a SQLite test repository. */
export function blobFileOf(repo: TestRepo, uid: string, index: number): string {
  const db = new Database(path.join(repo.dir, 'backy.sqlite'), { readonly: true });
  try {
    const v = db.prepare('SELECT id FROM versions WHERE uid = ?').get(uid) as { id: number };
    const chunk = db.prepare('SELECT data FROM block_maps WHERE version_id = ? AND chunk = 0').get(v.id) as { data: Buffer };
    const id = decodeChunk(chunk.data)[index];
    const b = db.prepare('SELECT uid FROM blobs WHERE id = ?').get(id) as { uid: string };
    return path.join(repo.dir, 'data', blobKey(b.uid));
  } finally {
    db.close();
  }
}

/** Whether a process with this pid exists. */
export function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}
