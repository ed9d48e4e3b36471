import { Semaphore } from './semaphore';

/**
 * Runs async jobs with at most `limit` at a time (backup, restore and scrub keep many blocks in flight). The
 * caller takes a slot with `acquire` (waiting while all are busy), then `start`s a job in it; the slot is
 * freed when the job settles. The first failure is kept and `failed` tells the caller to stop adding work.
 */
export class JobRunner {
  private readonly slots: Semaphore;
  private active = 0;
  private idle: (() => void) | undefined;
  failed = false;
  failure: unknown;

  constructor(limit: number) {
    this.slots = new Semaphore(limit);
  }

  acquire(): Promise<void> {
    return this.slots.acquire();
  }

  /** Gives back a slot taken with `acquire` when no job is started in it after all. */
  release(): void {
    this.slots.release();
  }

  /** Starts `work` in the slot taken before; `done` runs when it has settled, whatever the outcome. */
  start(work: () => Promise<void>, done?: () => void): void {
    this.active++;
    work()
      .catch((e: unknown) => this.fail(e))
      .finally(() => {
        this.active--;
        this.slots.release();
        done?.();
        if (this.active === 0) this.idle?.();
      });
  }

  fail(e: unknown): void {
    if (this.failed) return;
    this.failed = true;
    this.failure = e;
  }

  /** Resolves once no job is running. */
  async drain(): Promise<void> {
    while (this.active > 0) await new Promise<void>((r) => (this.idle = r));
  }
}
