import * as path from 'node:path';
import { Worker } from 'node:worker_threads';
import type { WorkerInit, WorkerReply, WorkerRequest } from './worker';
import { adoptEarlyWorker, stopEarlyWorkers } from './early-workers';
import { log } from '../util/log';
import { transferable } from './transfer';

type Pending = { resolve: (r: WorkerReply) => void; reject: (e: Error) => void; worker: Slot };
type Slot = { worker: Worker; inflight: number };
type Job = { msg: WorkerRequest; transfer: ArrayBuffer[]; resolve: (r: WorkerReply) => void; reject: (e: Error) => void };

// Distributive Omit, so each request variant keeps its own fields.
type WithoutId<T> = T extends unknown ? Omit<T, 'id'> : never;

/**
 * A fixed set of worker threads running codec/worker.ts. Each worker gets at most two jobs at a time (one
 * running, one queued in its port) so message latency hides behind work without piling buffers up.
 * Workers are unref'd while idle so an idle pool never keeps the process alive.
 */
export class WorkerPool {
  private slots: Slot[] = [];
  private queue: Job[] = [];
  private pending = new Map<number, Pending>();
  private nextId = 1;
  private closed = false;

  constructor(private readonly init: WorkerInit, readonly size: number) {
    let adopted = 0;
    for (let i = 0; i < size; i++) {
      const early = adoptEarlyWorker(init);
      if (early) adopted++;
      this.slots.push(this.spawn(early));
    }
    stopEarlyWorkers();
    log.debug(`codec: ${size} workers, ${adopted} of them started early`);
  }

  /** `early`: a worker started at the beginning of the command (early-workers.ts), to use instead of a new one. */
  private spawn(early?: Worker): Slot {
    const worker = early ?? new Worker(path.join(__dirname, 'worker.js'), { workerData: this.init });
    const slot: Slot = { worker, inflight: 0 };
    worker.unref();
    worker.on('message', (r: WorkerReply) => {
      const p = this.pending.get(r.id);
      if (!p) return;
      this.pending.delete(r.id);
      this.finish(slot);
      p.resolve(r);
    });
    const fail = (err: Error) => {
      for (const [id, p] of this.pending) {
        if (p.worker === slot) {
          this.pending.delete(id);
          p.reject(err);
        }
      }
      slot.inflight = 0;
      if (!this.closed) {
        const i = this.slots.indexOf(slot);
        if (i >= 0) this.slots[i] = this.spawn();
        this.dispatch();
      }
    };
    worker.on('error', (e) => fail(new Error(`codec worker failed: ${e.message}`)));
    worker.on('exit', (code) => { if (!this.closed) fail(new Error(`codec worker exited with code ${code}`)); });
    return slot;
  }

  private finish(slot: Slot): void {
    slot.inflight--;
    if (slot.inflight === 0) slot.worker.unref();
    this.dispatch();
  }

  private dispatch(): void {
    while (this.queue.length) {
      let best: Slot | undefined;
      for (const s of this.slots) if (s.inflight < 2 && (!best || s.inflight < best.inflight)) best = s;
      if (!best) return;
      const job = this.queue.shift()!;
      if (best.inflight === 0) best.worker.ref();
      best.inflight++;
      this.pending.set(job.msg.id, { resolve: job.resolve, reject: job.reject, worker: best });
      best.worker.postMessage(job.msg, transferable(job.transfer));
    }
  }

  run(msg: WithoutId<WorkerRequest>, transfer: ArrayBuffer[]): Promise<WorkerReply> {
    if (this.closed) return Promise.reject(new Error('worker pool is closed'));
    return new Promise((resolve, reject) => {
      const full = { ...msg, id: this.nextId++ } as WorkerRequest;
      this.queue.push({ msg: full, transfer, resolve, reject });
      this.dispatch();
    });
  }

  async close(): Promise<void> {
    this.closed = true;
    for (const j of this.queue) j.reject(new Error('worker pool is closed'));
    this.queue = [];
    // An idle worker is unref'd: terminating it keeps nothing alive, so the process could end (with exit code
    // 0) before close() returns. Ref'd, the caller gets to exit with its own code.
    await Promise.all(this.slots.map((s) => {
      s.worker.ref();
      return s.worker.terminate();
    }));
  }
}
