import type { BlobFetcher } from '../device/blob-fetcher';
import type { VersionDevice } from '../device/version-device';
import type { Target } from '../io/types';
import type { BlobRef } from '../meta/types';
import { allocAligned, reusable } from '../codec/transfer';
import { errorLine } from '../util/errors';
import { JobRunner } from '../util/job-runner';
import { planBlock, planRestore, PlanStep } from './restore-plan';

/**
 * Ways to vary a restore without another copy loop:
 * - live restore: `isDone` / `onDone` keep a (persistent) done-map, `copier.now(i)` copies a block a client
 *   asks for ahead of the background order, `copier.claim(i)` hands a block over to a client that writes it;
 * - delta restore: `unchanged` reads the target's block and compares checksums; true skips the write.
 */
export interface CopyHooks {
  /** The block is already in the target (restored before a restart, or written by a client). */
  isDone?(index: number): boolean;
  /** The block is now in the target (written, zeroed, or found unchanged). */
  onDone?(index: number): void;
  /**
   * Whether the target already holds what the block needs (`ref` undefined: zeroes). Asked before anything is
   * fetched; true means nothing is written for the block.
   */
  unchanged?(index: number, ref: BlobRef | undefined, length: number): Promise<boolean>;
}

export interface CopyStats {
  /** data blocks fetched from storage and written */
  blocksWritten: number;
  /** data blocks copied from an earlier copy of the same blob in the target */
  blocksRepeated: number;
  /** hole blocks the target had to zero (none when it reads as zeroes already) */
  blocksZeroed: number;
  /** blocks the `unchanged` hook found in the target already */
  blocksUnchanged: number;
  bytesWritten: number;
}

export interface CopyError {
  offset: number;
  message: string;
}

const TODO = 0;
const BUSY = 1;
const DONE = 2;

/**
 * Copies a version (a device) into a target: the background pass follows the plan in block order with many
 * blocks in flight; a repeated blob is copied from its first copy in the target instead of being fetched and
 * decrypted again; holes cost nothing on a target that reads as zeroes and one zeroing request per run
 * otherwise. A block that cannot be read is an entry in `errors` (the rest is still restored); a target that
 * fails ends the copy with that error.
 */
export class BlockCopier {
  readonly errors: CopyError[] = [];
  readonly stats: CopyStats = { blocksWritten: 0, blocksRepeated: 0, blocksZeroed: 0, blocksUnchanged: 0, bytesWritten: 0 };
  private readonly state: Uint8Array;
  /** Jobs in flight by block: their own block, and for a repeat also the block it copies from. */
  private readonly busy = new Map<number, Set<Promise<void>>>();
  /** blob id → the block holding its first copy in the target (settles false when that copy failed) */
  private readonly firstCopy = new Map<number, { index: number; done: Promise<boolean> }>();
  private readonly firstCopyAt = new Map<number, number>();
  private readonly pool: Buffer[] = [];
  private readonly jobs: JobRunner;
  private readonly bs: number;

  constructor(
    private readonly dev: VersionDevice,
    private readonly fetcher: BlobFetcher,
    private readonly target: Target,
    private readonly opts: {
      /** blocks in flight in the background pass */
      inFlight: number;
      hooks?: CopyHooks;
      /** bytes restored (for a progress bar) */
      onProgress?: (bytes: number) => void;
      /** remember at most this many first copies (memory bound) */
      maxRemembered?: number;
    },
  ) {
    this.bs = dev.blockSize;
    this.state = new Uint8Array(dev.blocks);
    if (opts.hooks?.isDone) for (let i = 0; i < dev.blocks; i++) if (opts.hooks.isDone(i)) this.state[i] = DONE;
    this.jobs = new JobRunner(Math.max(1, opts.inFlight));
  }

  /** The target failed: the copy stopped with this error. */
  get failure(): unknown {
    return this.jobs.failed ? this.jobs.failure : undefined;
  }

  isDone(index: number): boolean {
    return this.state[index] === DONE;
  }

  /** Copies every block not done yet, in plan order; resolves when all are done (or the target failed). */
  async run(signal?: AbortSignal): Promise<void> {
    try {
      for await (const step of planRestore(this.dev)) {
        if (signal?.aborted) this.jobs.fail(signal.reason ?? new Error('restore aborted'));
        if (this.jobs.failed) break;
        // Only blocks still to do, looked at once a slot is free: a client may have got there first (a run of
        // holes is then split around the blocks it took).
        const queue = [step];
        while (queue.length && !this.jobs.failed) {
          await this.jobs.acquire();
          while (this.urgent > 0 && !this.jobs.failed) await new Promise<void>((r) => this.urgentDone.push(r));
          const parts = this.jobs.failed ? [] : [...this.split(queue.shift()!)];
          if (!parts.length) {
            this.jobs.release();
            continue;
          }
          this.begin(parts[0], (work) => this.jobs.start(() => work));
          queue.unshift(...parts.slice(1));
        }
      }
    } catch (e) {
      this.jobs.fail(e);
    }
    await this.jobs.drain();
    await Promise.all([...this.busy.values()].flatMap((s) => [...s]).map((p) => p.catch(() => undefined)));
    if (this.jobs.failed) throw this.jobs.failure;
    this.errors.sort((a, b) => a.offset - b.offset);
  }

  /**
   * Copies block `index` now, ahead of the background pass (a client is waiting for it). Resolves true once
   * it is in the target, false when its blob could not be read (recorded in `errors`; a later call tries
   * again); rejects when the target fails.
   */
  async now(index: number): Promise<boolean> {
    // While a client waits, the background pass starts nothing new: storage reads (and their bandwidth
    // limit, which serves in order) go to what the client asked for.
    this.urgent++;
    try {
      return await this.nowInner(index);
    } finally {
      if (--this.urgent === 0) for (const wake of this.urgentDone.splice(0)) wake();
    }
  }

  private urgent = 0;
  private urgentDone: (() => void)[] = [];

  private async nowInner(index: number): Promise<boolean> {
    let tries = 0;
    for (;;) {
      if (this.state[index] === DONE) return true;
      const inFlight = this.busy.get(index);
      if (this.state[index] === BUSY && inFlight) {
        await Promise.all(inFlight);
        continue;
      }
      if (tries++ > 0) return false;
      const step = await planBlock(this.dev, index);
      if (this.state[index] !== TODO) continue; // taken while the map was read
      let started: Promise<void> | undefined;
      this.begin(step, (work) => (started = work));
      await started;
    }
  }

  /**
   * Hands block `index` over to a client that writes it: waits for copies in flight that write it or read it
   * (as the first copy of a repeated blob), then marks it done, so the background pass never overwrites the
   * client's data, and later repeats fetch their blob instead of copying the client's.
   */
  async claim(index: number): Promise<void> {
    for (;;) {
      const inFlight = this.busy.get(index);
      if (!inFlight?.size) break;
      await Promise.all([...inFlight].map((p) => p.catch(() => undefined)));
    }
    this.forgetFirstCopy(index);
    this.markDone(index, 1);
  }

  // ---- internals ----------------------------------------------------------------------------------------

  /** The parts of a step whose blocks are still to do. */
  private *split(step: PlanStep): Generator<PlanStep> {
    if (step.kind !== 'hole') {
      if (this.state[step.index] === TODO) yield step;
      return;
    }
    let start = -1;
    for (let i = step.index; i <= step.index + step.count; i++) {
      const free = i < step.index + step.count && this.state[i] === TODO;
      if (free && start < 0) start = i;
      if (!free && start >= 0) {
        yield { kind: 'hole', index: start, count: i - start };
        start = -1;
      }
    }
  }

  private blockLength(index: number, count = 1): number {
    return Math.min(this.bs * count, this.dev.size - index * this.bs);
  }

  private markDone(index: number, count: number): void {
    for (let i = index; i < index + count; i++) {
      if (this.state[i] === DONE) continue;
      this.state[i] = DONE;
      this.opts.hooks?.onDone?.(i);
    }
  }

  /** Marks the step's blocks busy and starts its work through `launch`. */
  private begin(step: PlanStep, launch: (work: Promise<void>) => void): void {
    const count = step.kind === 'hole' ? step.count : 1;
    this.state.fill(BUSY, step.index, step.index + count);
    const blocks = Array.from({ length: count }, (_, k) => step.index + k);
    /** resolves true when the blocks are in the target, false when a blob could not be read */
    let work: Promise<boolean>;
    let source: number | undefined;
    if (step.kind === 'data') {
      const earlier = this.firstCopy.get(step.ref.id);
      if (earlier) source = earlier.index;
      work = earlier ? this.copyRepeat(step.index, earlier, step.ref) : this.copyFirst(step.index, step.ref);
    } else if (step.kind === 'hole') {
      work = this.zeroRun(step.index, step.count);
    } else {
      // Nothing to fetch, ever: reported once, zeroed so no old data remains, and done.
      this.errors.push({ offset: step.index * this.bs, message: step.message });
      work = this.zeroRun(step.index, 1);
    }
    const tracked = work.then(
      (ok) => {
        if (ok) this.markDone(step.index, count);
        else this.state.fill(TODO, step.index, step.index + count);
      },
      (e) => {
        this.state.fill(TODO, step.index, step.index + count);
        throw e;
      },
    ).finally(() => {
      for (const b of source === undefined ? blocks : [...blocks, source]) {
        const s = this.busy.get(b);
        s?.delete(tracked);
        if (s && !s.size) this.busy.delete(b);
      }
      this.opts.onProgress?.(this.blockLength(step.index, count));
    });
    for (const b of source === undefined ? blocks : [...blocks, source]) {
      let s = this.busy.get(b);
      if (!s) this.busy.set(b, (s = new Set()));
      s.add(tracked);
    }
    launch(tracked);
  }

  private buffer(): Buffer {
    // Aligned: a target opened around the page cache (O_DIRECT) writes the block from where it was decoded.
    return this.pool.pop() ?? allocAligned(this.bs);
  }

  private recycle(b: Buffer): void {
    if (b.length >= this.bs && this.pool.length < 64) this.pool.push(b);
  }

  private async copyFirst(index: number, ref: BlobRef): Promise<boolean> {
    const offset = index * this.bs;
    const len = this.blockLength(index);
    let settle: (ok: boolean) => void = () => undefined;
    if (this.firstCopy.size < (this.opts.maxRemembered ?? 1 << 20)) {
      this.firstCopy.set(ref.id, { index, done: new Promise<boolean>((r) => (settle = r)) });
      this.firstCopyAt.set(index, ref.id);
    }
    try {
      if (await this.opts.hooks?.unchanged?.(index, ref, len)) {
        this.stats.blocksUnchanged++;
        settle(true);
        return true;
      }
    } catch (e) {
      settle(false);
      throw e;
    }
    let loaded: { data: Buffer; spareOut?: Buffer };
    try {
      loaded = await this.fetcher.loadInto(ref, this.buffer());
    } catch (e) {
      this.errors.push({ offset, message: errorLine(e) });
      settle(false);
      return false;
    }
    try {
      await this.target.write(loaded.data, offset);
      this.stats.blocksWritten++;
      this.stats.bytesWritten += len;
      settle(true);
      return true;
    } catch (e) {
      settle(false);
      throw e;
    } finally {
      this.recycle(loaded.spareOut ?? reusable(loaded.data));
    }
  }

  private async copyRepeat(index: number, earlier: { index: number; done: Promise<boolean> }, ref: BlobRef): Promise<boolean> {
    const offset = index * this.bs;
    const len = this.blockLength(index);
    if (await this.opts.hooks?.unchanged?.(index, ref, len)) {
      this.stats.blocksUnchanged++;
      return true;
    }
    if (!(await earlier.done)) {
      this.errors.push({ offset, message: `same data as offset ${earlier.index * this.bs}, which could not be restored` });
      return false;
    }
    const buf = this.buffer();
    try {
      await this.target.read(buf.subarray(0, len), earlier.index * this.bs);
      await this.target.write(buf.subarray(0, len), offset);
      this.stats.blocksRepeated++;
      this.stats.bytesWritten += len;
      return true;
    } finally {
      this.recycle(buf);
    }
  }

  private async zeroRun(index: number, count: number): Promise<boolean> {
    if (this.target.zeroed && !this.opts.hooks?.unchanged) return true;
    // Zero the run in pieces that differ from the target (all of it unless a delta hook says otherwise).
    let start = -1;
    for (let i = index; i <= index + count; i++) {
      let todo = false;
      if (i < index + count) {
        if (this.opts.hooks?.unchanged) {
          todo = !(await this.opts.hooks.unchanged(i, undefined, this.blockLength(i)));
          if (!todo) this.stats.blocksUnchanged++;
        } else todo = !this.target.zeroed;
      }
      if (todo && start < 0) start = i;
      if (!todo && start >= 0) {
        await this.target.zero(start * this.bs, this.blockLength(start, i - start));
        this.stats.blocksZeroed += i - start;
        start = -1;
      }
    }
    return true;
  }

  /** A first copy that failed (or was handed to a client) is no source for later repeats. */
  private forgetFirstCopy(index: number): void {
    const blob = this.firstCopyAt.get(index);
    if (blob === undefined) return;
    if (this.firstCopy.get(blob)?.index === index) this.firstCopy.delete(blob);
    this.firstCopyAt.delete(index);
  }
}
