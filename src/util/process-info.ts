import * as fs from 'node:fs';
import * as os from 'node:os';
import { randomUUID } from 'node:crypto';
import type { LockInfo } from '../meta/types';

/** Fields 3 onwards of /proc/PID/stat (state first), or undefined when there is no such process. */
function statFields(pid: number): string[] | undefined {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    // The command name (field 2) may contain spaces and parentheses: split after its closing parenthesis.
    return stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  } catch {
    return undefined;
  }
}

/** Start time of a process in clock ticks since boot (field 22 of /proc/PID/stat), or '' when unknown. */
export function processStart(pid: number): string {
  return statFields(pid)?.[19] ?? '';
}

/**
 * Whether the holder of a lock is still running. Holders on other hosts are assumed alive. A zombie (a
 * process that has exited but whose parent has not collected it yet: state Z, or X while it goes) has
 * released everything it had, so it holds nothing.
 */
export function holderAlive(h: Pick<LockInfo, 'host' | 'pid' | 'pidStart'>): boolean {
  if (h.host !== os.hostname()) return true;
  try {
    process.kill(h.pid, 0);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ESRCH') return false;
  }
  const fields = statFields(h.pid);
  if (fields && (fields[0] === 'Z' || fields[0] === 'X')) return false;
  const start = fields?.[19] ?? '';
  return !h.pidStart || !start || start === h.pidStart;
}

const session = randomUUID();

export function lockInfo(what: string): LockInfo {
  return { session, host: os.hostname(), pid: process.pid, pidStart: processStart(process.pid), what };
}

export function sessionId(): string {
  return session;
}
