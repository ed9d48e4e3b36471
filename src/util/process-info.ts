import * as fs from 'node:fs';
import * as os from 'node:os';
import { randomUUID } from 'node:crypto';
import type { LockInfo } from '../meta/types';

/** Start time of a process in clock ticks since boot (field 22 of /proc/PID/stat), or '' when unknown. */
export function processStart(pid: number): string {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    // The command name (field 2) may contain spaces and parentheses: split after its closing parenthesis.
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return fields[19] ?? '';
  } catch {
    return '';
  }
}

/** Whether the holder of a lock is still running. Holders on other hosts are assumed alive. */
export function holderAlive(h: Pick<LockInfo, 'host' | 'pid' | 'pidStart'>): boolean {
  if (h.host !== os.hostname()) return true;
  try {
    process.kill(h.pid, 0);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ESRCH') return false;
  }
  const start = processStart(h.pid);
  return !h.pidStart || !start || start === h.pidStart;
}

const session = randomUUID();

export function lockInfo(what: string): LockInfo {
  return { session, host: os.hostname(), pid: process.pid, pidStart: processStart(process.pid), what };
}

export function sessionId(): string {
  return session;
}
