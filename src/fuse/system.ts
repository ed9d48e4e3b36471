import { execFile } from 'node:child_process';
import { readFile } from 'node:fs/promises';
import * as path from 'node:path';

/**
 * Running system tools (losetup, mount, fusermount) and reading the kernel's mount table. Always
 * asynchronous: while `mount` or `blkid` reads a partition, the kernel asks this very process for the
 * image's bytes, so the event loop must stay free.
 */
export interface RunResult {
  code: number;
  stdout: string;
  stderr: string;
}

export function run(cmd: string, args: string[], timeoutMs = 60_000): Promise<RunResult> {
  return new Promise((resolve) => {
    execFile(cmd, args, { timeout: timeoutMs, encoding: 'utf8' }, (err, stdout, stderr) => {
      const e = err as (NodeJS.ErrnoException & { code?: number | string }) | null;
      let code = 0;
      if (e) code = typeof e.code === 'number' ? e.code : 127;
      if (e && typeof e.code !== 'number') stderr = stderr || e.message;
      resolve({ code, stdout, stderr });
    });
  });
}

/** Runs the command; a failure becomes an Error with the command and the first line it printed. */
export async function runOk(cmd: string, args: string[], timeoutMs?: number): Promise<string> {
  const r = await run(cmd, args, timeoutMs);
  if (r.code !== 0) {
    const why = (r.stderr.trim() || r.stdout.trim()).split('\n')[0] || `exit code ${r.code}`;
    throw new Error(`${cmd} ${args.join(' ')}: ${why}`);
  }
  return r.stdout;
}

/** The type /proc/self/mountinfo shows for backy's FUSE mounts (fuse + subtype). */
export const FUSE_TYPE = 'fuse.backy';

export interface MountEntry {
  id: number;
  parentId: number;
  mountPoint: string;
  fsType: string;
  source: string;
}

/** mountinfo escapes space, tab, newline and backslash as octal. */
function unescapeOctal(s: string): string {
  return s.replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8)));
}

/** The mounts this process sees (/proc/self/mountinfo). */
export async function readMounts(): Promise<MountEntry[]> {
  const text = await readFile('/proc/self/mountinfo', 'utf8');
  const out: MountEntry[] = [];
  for (const line of text.split('\n')) {
    if (!line) continue;
    const [left, right] = line.split(' - ');
    const f = left.split(' ');
    const r = (right ?? '').split(' ');
    out.push({ id: Number(f[0]), parentId: Number(f[1]), mountPoint: unescapeOctal(f[4]), fsType: r[0] ?? '', source: unescapeOctal(r[1] ?? '') });
  }
  return out;
}

/** `p` is `dir` or inside it. */
export function isWithin(p: string, dir: string): boolean {
  const rel = path.relative(dir, p);
  return rel === '' || (!rel.startsWith('..') && !path.isAbsolute(rel));
}
