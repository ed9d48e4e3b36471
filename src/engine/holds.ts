import type { LockInfo, MetaStore, VersionRow } from '../meta/types';
import { LockedError, NotFoundError } from '../util/errors';
import { lockInfo, sessionId } from '../util/process-info';

/**
 * Lock names of holds. A reader (restore, scrub, an NBD export, a mounted image) holds the version it reads
 * with a shared hold: one lock row per process and version, so any number of readers can hold a version at
 * once. `rm` takes the version's removal lock, which conflicts with every hold of it; taking a hold conflicts
 * with the removal lock. Both are taken atomically by the lock table, so either the reader comes first and
 * the removal is refused naming it, or the removal comes first and the reader finds the version gone. A
 * holder that dies holds nothing (the lock table checks its process or its PostgreSQL connection).
 */
export const HOLD_LOCKS = {
  hold: (uid: string, session = sessionId()) => `hold:${uid}:${session}`,
  anyHold: (uid: string) => `hold:${uid}:*`,
  removal: (uid: string) => `remove:${uid}`,
};

export interface VersionHold {
  /** The version as read after the hold was taken. */
  readonly version: VersionRow;
  /** Lets go of this hold (the version's lock goes when the process's last hold on it does). Idempotent. */
  release(): Promise<void>;
}

/** The holds one process has, counted per version: the lock row exists while the count is above zero. */
export class VersionHolds {
  private counts = new Map<string, number>();
  /** Taking and releasing the lock of one version run one after the other, never interleaved. */
  private queues = new Map<string, Promise<unknown>>();

  constructor(private readonly meta: MetaStore) {}

  private serial<T>(uid: string, fn: () => Promise<T>): Promise<T> {
    const prev = this.queues.get(uid) ?? Promise.resolve();
    const next = prev.then(fn, fn);
    const tail = next.catch(() => undefined);
    this.queues.set(uid, tail);
    void tail.then(() => {
      if (this.queues.get(uid) === tail) this.queues.delete(uid);
    });
    return next;
  }

  /**
   * Holds version `uid` for `what` ("restore of …"): throws LockedError while it is being removed and
   * NotFoundError when it does not exist (also when a removal finished just before).
   */
  async hold(uid: string, what: string): Promise<VersionHold> {
    await this.serial(uid, async () => {
      const n = this.counts.get(uid) ?? 0;
      if (n === 0) {
        const holder: LockInfo | undefined = await this.meta.tryLock(HOLD_LOCKS.hold(uid), lockInfo(what), [HOLD_LOCKS.removal(uid)]);
        if (holder) throw new LockedError(`cannot start ${what}: version ${uid} is being removed (pid ${holder.pid} on ${holder.host})`);
      }
      this.counts.set(uid, n + 1);
    });
    let released = false;
    const release = async (): Promise<void> => {
      if (released) return;
      released = true;
      await this.serial(uid, async () => {
        const n = (this.counts.get(uid) ?? 1) - 1;
        if (n > 0) {
          this.counts.set(uid, n);
          return;
        }
        this.counts.delete(uid);
        await this.meta.unlock(HOLD_LOCKS.hold(uid), sessionId());
      });
    };
    // Read after the hold: a removal that got its lock first has removed the row by now (or is refused
    // from now on), so a version seen here stays until the hold is released.
    let v: VersionRow | undefined;
    try {
      v = await this.meta.getVersion(uid);
    } catch (e) {
      await release();
      throw e;
    }
    if (!v) {
      await release();
      throw new NotFoundError(`version ${uid} does not exist`);
    }
    return { version: v, release };
  }

  /** Releases every hold (the command ends). */
  async releaseAll(): Promise<void> {
    const uids = [...this.counts.keys()];
    this.counts.clear();
    for (const uid of uids) await this.serial(uid, () => this.meta.unlock(HOLD_LOCKS.hold(uid), sessionId()));
  }
}
