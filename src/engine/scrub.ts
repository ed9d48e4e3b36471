import { openSource } from '../io/registry';
import type { Source } from '../io/types';
import { BlobState, VersionRow } from '../meta/types';
import { BlobCorruptError, BlobNotFoundError, errorLine } from '../util/errors';
import { log } from '../util/log';
import { Progress } from '../util/progress';
import { JobRunner } from '../util/job-runner';
import { randomSample } from '../util/random';
import { isZero } from '../codec/blob-format';
import { InvalidBlobUidError } from '../storage/types';
import { LOCKS, Repository } from './repository';

export interface ScrubOptions {
  uid: string;
  source?: string;
  /** 1..100: check this share of the blocks, chosen at random */
  percent: number;
  quiet?: boolean;
}

export interface ScrubResult {
  checked: number;
  badBlobs: number;
  sourceMismatches: number;
  invalidated: string[];
  ok: boolean;
}

/**
 * Reads every stored block of a version from storage (never from a cache), decrypts and verifies it; with a
 * source, also compares the source's blocks. Bad or missing blobs are marked bad, and every version using
 * them invalid. A full scrub that finds nothing makes a complete version valid again.
 */
export async function scrub(repo: Repository, opts: ScrubOptions): Promise<ScrubResult> {
  const v = (await repo.holdVersion(opts.uid, `scrub of ${opts.uid}`)).version;
  await repo.lock(LOCKS.version(v.uid), `scrub of ${v.uid}`);
  const fresh = (await repo.version(v.uid)) as VersionRow;
  const source = opts.source ? await openSource(opts.source) : undefined;
  try {
    if (source && source.size !== fresh.size) log.warn(`source has ${source.size} bytes, version ${fresh.size}: comparing the common part`);
    return await scrubBlocks(repo, fresh, source, opts);
  } finally {
    await source?.close();
  }
}

async function scrubBlocks(repo: Repository, v: VersionRow, source: Source | undefined, opts: ScrubOptions): Promise<ScrubResult> {
  const dev = repo.device(v);
  const fetcher = repo.fetcher();
  let indices = Array.from({ length: dev.blocks }, (_, i) => i);
  const full = opts.percent >= 100;
  if (!full) indices = randomSample(indices, Math.ceil((indices.length * opts.percent) / 100)).sort((a, b) => a - b);
  const bad = new Set<number>();
  const repaired: { id: number; storedSize: number }[] = [];
  let mismatches = 0;
  let pending = 0;
  let checked = 0;
  const progress = new Progress(`scrub ${v.uid.slice(0, 8)}`, indices.reduce((s, i) => s + dev.blockLength(i), 0), { quiet: opts.quiet });
  const jobs = new JobRunner(Math.max(2, repo.cfg.data.simultaneousReads));
  for (const i of indices) {
    await jobs.acquire();
    if (jobs.failed) {
      jobs.release();
      break;
    }
    const offset = i * v.blockSize;
    const len = dev.blockLength(i);
    jobs.start(async () => {
      const slot = await dev.slot(i);
      if (slot.kind === 'pending') {
        pending++;
        return;
      }
      let ok = true;
      let data: Buffer | undefined;
      if (slot.kind === 'data') {
        try {
          data = await fetcher.load(slot.ref, true); // scrub always recomputes the checksum
          if (slot.ref.state === BlobState.Bad) repaired.push({ id: slot.ref.id, storedSize: 0 });
        } catch (e) {
          if (e instanceof BlobNotFoundError && slot.ref.state === BlobState.Uploading) {
            // Reserved by a backup that has not stored it (yet, or ever: interrupted). Not damage.
            pending++;
            return;
          }
          if (e instanceof BlobNotFoundError || e instanceof BlobCorruptError || e instanceof InvalidBlobUidError) {
            bad.add(slot.ref.id);
            ok = false;
            log.error(`offset ${offset}: ${errorLine(e)}`);
          } else throw e;
        }
      }
      if (ok && source && offset + len <= source.size) {
        const buf = Buffer.allocUnsafe(len);
        await source.read(buf, offset, len);
        if (!(data ? buf.equals(data) : isZero(buf))) {
          mismatches++;
          log.error(`offset ${offset}: source and backup differ`);
        }
      }
      checked++;
    }, () => progress.add(len));
  }
  await jobs.drain();
  progress.finish();
  if (jobs.failed) throw jobs.failure;

  const invalidated = await repo.meta.markBad([...bad]);
  const ok = bad.size === 0 && mismatches === 0 && pending === 0;
  if (ok && full && v.complete) {
    if (repaired.length) await repo.meta.markUploaded(repaired);
    if (!v.valid) log.info(`version ${v.uid} verified completely: marked valid again`);
    await repo.meta.updateVersion(v.id, { valid: true });
  }
  if (pending) log.error(`${pending} blocks of version ${v.uid} were never backed up (incomplete version)`);
  for (const uid of invalidated) log.error(`version ${uid} uses a bad blob: marked invalid`);
  log.info(`scrub of ${v.uid}: ${checked} blocks checked` +
    `${full ? '' : ` (${opts.percent}% sample)`}, ${bad.size} bad blobs, ${mismatches} source mismatches: ${ok ? 'OK' : 'ERRORS'}`);
  return { checked, badBlobs: bad.size, sourceMismatches: mismatches, invalidated, ok };
}
