import * as fs from 'node:fs';
import { PersistentMap } from '../device/persistent-map';
import type { Target } from '../io/types';
import * as path from 'node:path';
import { fsyncDir, SharedSync } from '../util/fd-io';

/** What a live restore's progress map belongs to (checked by --continue). */
export interface LiveState {
  kind: 'live-restore';
  version: string;
  size: number;
  blockSize: number;
  /** the target URL as given */
  target: string;
  /** the target read as zeroes where nothing was written when the restore began (a new file) */
  zeroed: boolean;
}

/**
 * The crash-safe progress map of a live restore, one bit per version block: set once the block's content
 * in the target (the version's, or a client's write) is durable, so a continued restore never writes the
 * block again. The rule that makes it safe: a bit is written to the map file only after an fsync of the
 * target that began after the block's data was written. So a bit on disk always stands for durable data,
 * after kill -9 as after a power loss; a block whose bit is missing is restored again, which is only
 * allowed because
 * - blocks the background copy restored are recorded at checkpoints (every few seconds, and on every client
 *   FLUSH: fsync the target, then write and fsync the map); losing those since the last checkpoint costs
 *   only their copy again;
 * - a client write to a block whose bit is not on disk yet is acknowledged only after its bit was written
 *   (an fsync of the target, then the map page; see `persistNow`), so no acknowledged write of a client can
 *   be overwritten by a continued restore.
 */
export class LiveProgress {
  /** Blocks the background copy finished since the last checkpoint (their bits are not on disk yet). */
  private pending: number[] = [];
  private readonly targetSync: SharedSync;
  private readonly checkpoints: SharedSync;
  private done: number;

  private constructor(private readonly map: PersistentMap, readonly file: string, readonly state: LiveState, private readonly target: Target) {
    this.targetSync = new SharedSync(() => target.flush());
    this.checkpoints = new SharedSync(() => this.checkpointOnce());
    this.done = map.countNonZero();
  }

  private static identity(state: LiveState): { bits: 1; entries: number; owner: string } {
    return { bits: 1, entries: Math.ceil(state.size / state.blockSize), owner: JSON.stringify(state) };
  }

  /**
   * A new map: not fsynced here (the client waiting for its first read should not wait for that); the first
   * checkpoint, which every client FLUSH is, makes the file and its name durable before anything relies on
   * them after a power loss (after kill -9 the page cache has them anyway).
   */
  static async create(file: string, state: LiveState, target: Target): Promise<LiveProgress> {
    const p = new LiveProgress(await PersistentMap.create(file, LiveProgress.identity(state), { durable: false }), file, state, target);
    p.nameSynced = false;
    return p;
  }

  /** The map file's directory entry is durable. */
  private nameSynced = true;

  /** What the map at `file` belongs to, or undefined when there is none. */
  static async read(file: string): Promise<LiveState | undefined> {
    let owner: string;
    try {
      owner = (await PersistentMap.identity(file)).owner;
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
      throw e;
    }
    const state = JSON.parse(owner) as LiveState;
    if (state.kind !== 'live-restore') throw new Error(`${file} is not the progress map of a live restore`);
    return state;
  }

  static async open(file: string, state: LiveState, target: Target): Promise<LiveProgress> {
    return new LiveProgress(await PersistentMap.open(file, LiveProgress.identity(state)), file, state, target);
  }

  get blocks(): number {
    return this.map.entries;
  }

  /** Blocks whose content is durably in the target, as of the map on disk or about to be written. */
  get doneBlocks(): number {
    return this.done;
  }

  isPersisted(index: number): boolean {
    return this.map.get(index) === 1;
  }

  /** The background copy wrote block `index` (its bit follows at the next checkpoint). */
  restored(index: number): void {
    this.pending.push(index);
  }

  /** Writes the bits of `indices` (their data written before the call) once the target is synced. */
  async persistNow(indices: number[]): Promise<void> {
    await this.targetSync.sync();
    this.mark(indices);
    await this.map.writePages(this.map.takeDirty());
  }

  /** Makes every block restored and every client write so far durable, with their bits. */
  checkpoint(): Promise<void> {
    return this.checkpoints.sync();
  }

  private async checkpointOnce(): Promise<void> {
    const batch = this.pending;
    this.pending = [];
    try {
      await this.targetSync.sync();
    } catch (e) {
      this.pending.push(...batch);
      throw e;
    }
    this.mark(batch);
    await this.map.writePages(this.map.takeDirty());
    await this.map.sync();
    if (!this.nameSynced) {
      await fsyncDir(path.dirname(this.file));
      this.nameSynced = true;
    }
  }

  private mark(indices: number[]): void {
    for (const i of indices) {
      if (this.map.get(i) === 1) continue;
      this.map.set(i, i + 1, 1);
      this.done++;
    }
  }

  async close(): Promise<void> {
    await this.map.close();
  }

  /** Removes the map file (the restore is complete and durable). */
  async remove(): Promise<void> {
    await this.close();
    await fs.promises.rm(this.file, { force: true });
  }
}
