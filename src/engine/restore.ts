import { openTarget } from '../io/file';
import { BlockSlot, VersionDevice, zeroes } from '../device/version-device';
import { allocBlock } from '../codec/codec';
import { formatBytes } from '../config/size';
import { StorageError, errorLine } from '../util/errors';
import { log } from '../util/log';
import { Progress } from '../util/progress';
import { JobRunner } from '../util/job-runner';
import { BlockCache } from '../device/block-cache';
import { Repository } from './repository';

export interface RestoreOptions {
  uid: string;
  target: string;
  sparse: boolean;
  force: boolean;
  /** false: do not flush the target to disk at the end */
  sync?: boolean;
  quiet?: boolean;
}

export interface RestoreResult {
  bytes: number;
  errors: { offset: number; message: string }[];
  seconds: number;
}

/**
 * Copies a version to a target through the same read path as the NBD server (VersionDevice over the
 * cache), many blocks in flight, each verified. A block that cannot be read is reported with its offset and
 * skipped; the rest is still restored, and the caller exits 6.
 */
export async function restore(repo: Repository, opts: RestoreOptions): Promise<RestoreResult> {
  void repo.codec; // start the worker threads now: they boot while the target is prepared
  const v = await repo.version(opts.uid);
  if (!v.complete) log.warn(`version ${v.uid} is incomplete: blocks never backed up will be reported as errors`);
  else if (!v.valid) log.warn(`version ${v.uid} is marked invalid: some blocks may fail verification`);
  const target = await openTarget(opts.target, v.size, opts.force, opts.sparse, opts.sync ?? true);
  // No block cache: restore reads each blob once (repeats are copied from their first copy, below).
  const fetcher = repo.fetcher(new BlockCache(0));
  const dev = new VersionDevice(repo.meta, v, fetcher);
  // Block buffers are reused: decoded into (or read back into), written out, used again.
  const pool: Buffer[] = [];
  const recycle = (b: Buffer) => {
    if (b.length >= v.blockSize && pool.length < 64) pool.push(b);
  };
  if (opts.sparse && !target.zeroed) log.warn('sparse restore onto a block device: holes are written as zeroes so no old data remains');
  const progress = new Progress(`restore ${v.uid.slice(0, 8)}`, v.size, { quiet: opts.quiet });
  const errors: RestoreResult['errors'] = [];
  // A job that throws means the target failed: no point going on (a bad block is an entry in `errors`).
  const jobs = new JobRunner(Math.max(2, repo.cfg.data.simultaneousReads));
  const started = Date.now();
  // A block whose blob was already restored elsewhere is copied from there (a page-cache read) instead of
  // being fetched, decrypted and verified again. Bounded: the first MAX_REMEMBERED blobs are remembered.
  const firstCopy = new Map<number, { offset: number; done: Promise<boolean> }>();
  const MAX_REMEMBERED = 1 << 20;
  const run = async (len: number, work: () => Promise<void>) => {
    await jobs.acquire();
    jobs.start(work, () => progress.add(len));
  };
  try {
    for (let i = 0; i < dev.blocks && !jobs.failed; i++) {
      const offset = i * v.blockSize;
      const len = dev.blockLength(i);
      let slot: BlockSlot;
      try {
        slot = await dev.slot(i);
      } catch (e) {
        errors.push({ offset, message: errorLine(e) });
        progress.add(len);
        continue;
      }
      if (slot.kind !== 'data') {
        if (slot.kind === 'pending') errors.push({ offset, message: `block at offset ${offset} was never backed up (incomplete version)` });
        await run(len, async () => {
          if (!target.holesDone) await target.write(zeroes(len), offset);
        });
        continue;
      }
      const id = slot.ref.id;
      const earlier = firstCopy.get(id);
      if (earlier) {
        await run(len, async () => {
          if (!(await earlier.done)) {
            errors.push({ offset, message: `same data as offset ${earlier.offset}, which could not be restored` });
            return;
          }
          const buf = pool.pop() ?? allocBlock(v.blockSize);
          try {
            await target.read(buf.subarray(0, len), earlier.offset);
            await target.write(buf.subarray(0, len), offset);
          } finally {
            recycle(buf);
          }
        });
        continue;
      }
      let settle: (ok: boolean) => void = () => undefined;
      if (firstCopy.size < MAX_REMEMBERED) firstCopy.set(id, { offset, done: new Promise<boolean>((r) => (settle = r)) });
      const ref = slot.ref;
      await run(len, async () => {
        let loaded: { data: Buffer; spareOut?: Buffer };
        try {
          loaded = await fetcher.loadInto(ref, pool.pop() ?? allocBlock(v.blockSize));
        } catch (e) {
          errors.push({ offset, message: errorLine(e) });
          settle(false);
          return;
        }
        try {
          await target.write(loaded.data, offset);
          settle(true);
        } catch (e) {
          settle(false);
          throw e;
        } finally {
          recycle(loaded.spareOut ?? Buffer.from(loaded.data.buffer));
        }
      });
    }
    await jobs.drain();
  } finally {
    progress.finish();
    await target.close().catch((e) => jobs.fail(e));
  }
  if (jobs.failed) throw jobs.failure;
  const seconds = (Date.now() - started) / 1000;
  errors.sort((a, b) => a.offset - b.offset);
  for (const e of errors) log.error(`offset ${e.offset}: ${e.message}`);
  log.info(`restored version ${v.uid} to ${opts.target}: ${formatBytes(v.size)} in ${seconds.toFixed(1)} s ` +
    `(${formatBytes(v.size / Math.max(seconds, 0.001))}/s)${errors.length ? `, ${errors.length} blocks could not be restored` : ''}`);
  return { bytes: v.size, errors, seconds };
}

export function restoreFailure(r: RestoreResult): StorageError {
  return new StorageError(`${r.errors.length} blocks could not be restored (first at offset ${r.errors[0].offset})`);
}
