import * as fs from 'node:fs';
import * as path from 'node:path';
import { spawn, spawnSync } from 'node:child_process';
import { LockedError } from '../util/errors';
import { log } from '../util/log';

/**
 * backy2's locks: flock(2) on `<lock_dir>/backy_<name>.lock` (`backy` for exclusive work such as cleanup
 * --full and rekey, a version uid while it is backed up or removed), and its habit of refusing to run next
 * to another process named `process_name`. Node has no flock, so util-linux's flock(1) takes them: the same
 * kind of lock, so a backy2 process and backy see each other's.
 */
const HELD = 75;

/** Refuses (LockedError) when a backy2 process runs or holds any of its locks. */
export function refuseIfBacky2Busy(lockDir: string, processName: string): void {
  const procs = backy2Processes(processName);
  if (procs.length) throw new LockedError(`a backy2 process is running (pid ${procs.join(', ')}): stop backy2 before importing its repository`);
  if (!lockDir || !fs.existsSync(lockDir)) return;
  for (const name of fs.readdirSync(lockDir).sort()) {
    if (!/^backy_.+\.lock$/.test(name)) continue;
    const r = spawnSync('flock', ['-n', '-s', '-E', String(HELD), path.join(lockDir, name), 'true']);
    if (r.error) throw new LockedError(`cannot check backy2's lock ${name}: ${r.error.message}`);
    if (r.status === HELD) {
      const what = name === 'backy_backy.lock' ? 'its global lock' : `the lock of ${name.slice(6, -5)}`;
      throw new LockedError(`backy2 holds ${what} (${path.join(lockDir, name)}): wait until it is done before importing its repository`);
    }
  }
}

/**
 * Holds backy2's global lock (every backy2 command checks it at start and refuses) until `release`. The lock
 * belongs to a flock(1) child that lives as long as its stdin is open, so it goes away with this process
 * whatever happens. Without a lock directory there is nothing to hold.
 */
export async function holdBacky2GlobalLock(lockDir: string): Promise<{ release(): Promise<void> }> {
  const none = { release: async () => undefined };
  if (!lockDir || !fs.existsSync(lockDir)) return none;
  const file = path.join(lockDir, 'backy_backy.lock');
  const child = spawn('flock', ['-n', '-E', String(HELD), file, '-c', 'echo locked; exec cat'], { stdio: ['pipe', 'pipe', 'ignore'] });
  const exited = new Promise<number>((resolve) => child.once('exit', (code) => resolve(code ?? -1)));
  const got = await new Promise<boolean>((resolve) => {
    child.once('error', () => resolve(false));
    child.stdout!.once('data', () => resolve(true));
    void exited.then(() => resolve(false));
  });
  if (!got) {
    child.kill();
    const code = await exited;
    if (code === HELD) throw new LockedError(`backy2 holds its global lock (${file}): wait until it is done before importing its repository`);
    log.warn(`could not take backy2's global lock ${file}; backy2 commands are not kept out during the import`);
    return none;
  }
  child.stdout!.resume();
  return {
    async release() {
      child.stdin!.end();
      await exited;
      fs.rmSync(file, { force: true }); // as backy2 does when it unlocks
    },
  };
}

/** Pids of processes whose name (or process title) is backy2's `process_name`. */
function backy2Processes(processName: string): number[] {
  const out: number[] = [];
  let entries: string[];
  try {
    entries = fs.readdirSync('/proc');
  } catch {
    return out;
  }
  for (const e of entries) {
    if (!/^\d+$/.test(e) || Number(e) === process.pid) continue;
    try {
      const comm = fs.readFileSync(`/proc/${e}/comm`, 'utf8').trim();
      const title = fs.readFileSync(`/proc/${e}/cmdline`, 'utf8').split('\0')[0];
      if (comm.split(/\s/)[0] === processName || title.split(/\s/)[0] === processName) out.push(Number(e));
    } catch {
      /* gone meanwhile */
    }
  }
  return out;
}
