import * as path from 'node:path';
import { Worker } from 'node:worker_threads';
import type { DeferredInit, InitMessage, WorkerInit } from './worker';

/**
 * Codec workers started at the very beginning of a command that will need them, before it has loaded its
 * modules and read its configuration. A worker takes about 0.1 s of CPU to boot (mostly Node's own); started
 * when the repository opens, that was 0.1 s of every backup and restore spent waiting. WorkerPool adopts
 * them, sending the settings as the first message.
 */
const early: { worker: Worker; alive: boolean }[] = [];

export function startEarlyWorkers(count: number): void {
  for (let i = 0; i < count; i++) {
    const worker = new Worker(path.join(__dirname, 'worker.js'), { workerData: { deferred: true } satisfies DeferredInit });
    const entry = { worker, alive: true };
    // Unreferenced until adopted: a command that never needs them (it failed first) is not kept alive.
    worker.unref();
    // A worker that fails before it is adopted is skipped; the pool starts a fresh one instead.
    worker.on('error', () => (entry.alive = false));
    worker.on('exit', () => (entry.alive = false));
    early.push(entry);
  }
}

/** An early worker, given its settings, if one is still running; undefined otherwise. */
export function adoptEarlyWorker(init: WorkerInit): Worker | undefined {
  for (;;) {
    const e = early.shift();
    if (!e) return undefined;
    if (!e.alive) continue;
    e.worker.removeAllListeners();
    e.worker.postMessage({ op: 'init', init } satisfies InitMessage);
    return e.worker;
  }
}

/** Stops the early workers no pool adopted (the configuration asked for fewer). */
export function stopEarlyWorkers(): void {
  for (const e of early.splice(0)) void e.worker.terminate();
}
