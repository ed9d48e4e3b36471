import { randomUUID } from 'node:crypto';
import { allocBlock } from '../codec/codec';
import { allocAligned, reusable } from '../codec/transfer';
import { encodedCapacity } from '../codec/blob-format';
import { openSource } from '../io/registry';
import type { ChangeSupplier, Source, TlsFiles } from '../io/types';
import { ZeroBlocks } from '../io/zero-blocks';
import { blockCount, chunkCount, HOLE, MAP_CHUNK, PENDING } from '../meta/block-map';
import { BlobState, BlockEntry, ResolvedBlock, StatsRow, VersionRow } from '../meta/types';
import { blobKey } from '../storage/types';
import { BackyError, ExitCode, IoError, NotFoundError, SanityError } from '../util/errors';
import { Coalescer } from '../util/coalescer';
import { Semaphore } from '../util/semaphore';
import { log } from '../util/log';
import { sessionId } from '../util/process-info';
import { Progress } from '../util/progress';
import { JobRunner } from '../util/job-runner';
import { randomSample } from '../util/random';
import { readChunkWithBlobs } from '../meta/map-reader';
import { formatBytes } from '../config/size';
import { bitmapChanges, Hint, hintChanges, hintedBlocks } from './hints';
import { LOCKS, Repository } from './repository';
import { autoTags, tagsForLog } from './lifecycle/auto-tags';
import { now } from '../util/clock';

export interface BackupOptions {
  source: string;
  name: string;
  snapshotName: string;
  tags: string[];
  expire: number | null;
  /** -f: differential against this version */
  baseUid?: string;
  /** -r: only these ranges changed since the base */
  hints?: Hint[];
  /** --bitmap: the source's dirty bitmap says what changed since the base */
  bitmap?: string;
  /** any other supplier of changed ranges (instead of hints or bitmap) */
  changes?: ChangeSupplier;
  /** credentials for nbds:// sources */
  tls?: TlsFiles;
  /** -c: continue this interrupted version */
  continueUid?: string;
  quiet?: boolean;
  /** Reads from this source instead of opening `source` as a URL (which then only names it in messages). */
  openSource?: () => Promise<Source>;
  /**
   * The changed ranges are exact by construction (an overlay's own map of what was written): no sample of
   * unchanged blocks is compared with the base, so nothing but the changed blocks is read.
   */
  exactChanges?: boolean;
}

export interface BackupResult {
  uid: string;
  stats: StatsRow;
}

/** How many unhinted blocks a differential backup with hints compares with its base. */
const SANITY_SAMPLES = 10;

/**
 * Reads the source block by block and stores what is new. Per block: read → (worker) zero test and checksum
 * → record in the map (one transaction for many blocks, dedup lookup included) → (worker) compress and
 * encrypt new blocks → store. A bounded number of blocks is in flight, so memory does not depend on the
 * image size. The version becomes valid only when every block is recorded and every blob it needs is
 * stored; until then it is invalid and can be continued with -c.
 */
export async function backup(repo: Repository, opts: BackupOptions): Promise<BackupResult> {
  const started = Date.now();
  const session = sessionId();
  void repo.codec; // start the worker threads now: they boot while the version is prepared
  await repo.lock(LOCKS.backup(session), `backup of ${opts.name}`, [LOCKS.fullCleanup]);
  if (opts.hints && opts.bitmap) throw new BackyError('hints (-r) and --bitmap exclude each other: give one of them');
  if (opts.bitmap && !opts.baseUid && !opts.continueUid) throw new BackyError('--bitmap needs a base version (-f): the bitmap says what changed since then');
  const source = opts.openSource ? await opts.openSource() : await openSource(opts.source, { bitmap: opts.continueUid ? undefined : opts.bitmap, tls: opts.tls });
  // Block buffers are reused from the sanity check to the last block: fresh memory costs page faults (about
  // 15 ms per 4 MiB block on a busy VM), more than reading the block.
  const buffers: Buffer[] = [];
  try {
    const { version, todo } = await prepareVersion(repo, source, opts, buffers);
    log.info(`backup of ${source.url} (${formatBytes(source.size)}) into version ${version.uid}` +
      (opts.continueUid ? ' (continued)' : opts.baseUid ? ` (base ${opts.baseUid})` : ''));
    // Ctrl-C / SIGTERM: stop reading, let blocks in flight finish, release locks, and say how to continue.
    // A second signal exits at once (the version stays continuable either way).
    const stop = { reason: '' };
    const onSignal = (sig: NodeJS.Signals) => {
      if (stop.reason) process.exit(ExitCode.OTHER);
      stop.reason = `interrupted by ${sig}: version ${version.uid} is incomplete; continue it with ` +
        `"backy backup -c ${version.uid} ${opts.source} ${opts.name}"`;
    };
    process.on('SIGINT', onSignal);
    process.on('SIGTERM', onSignal);
    let stats: Counters;
    try {
      stats = await copyBlocks(repo, source, version, todo, session, opts.quiet, stop, buffers);
    } finally {
      process.off('SIGINT', onSignal);
      process.off('SIGTERM', onSignal);
    }
    const valid = await finalize(repo, version);
    const row: StatsRow = {
      date: started, versionUid: version.uid, versionName: version.name, versionSizeBytes: version.size,
      versionSizeBlocks: blockCount(version.size, version.blockSize), ...stats,
      durationSeconds: (Date.now() - started) / 1000,
    };
    await repo.meta.addStats(row);
    const secs = Math.max(0.001, row.durationSeconds);
    log.info(`version ${version.uid} ${valid ? 'complete and valid' : 'complete but INVALID (bad blobs; run scrub)'}: ` +
      `${formatBytes(row.bytesRead)} read, ${formatBytes(row.bytesWritten)} stored in ${row.blocksWritten} new blobs, ` +
      `${row.blocksDedup} blocks deduplicated, ${row.blocksSparse} sparse, ${secs.toFixed(1)} s, ` +
      `${formatBytes(version.size / secs)}/s`);
    log.info(`New ${valid ? '' : 'invalid '}version: ${version.uid} (Tags: [${tagsForLog(version.tags)}])`);
    return { uid: version.uid, stats: row };
  } finally {
    await source.close().catch(() => undefined);
  }
}

async function prepareVersion(repo: Repository, source: Source, opts: BackupOptions, buffers: Buffer[]): Promise<{ version: VersionRow; todo: number[] }> {
  const meta = repo.meta;
  if (opts.continueUid) {
    const v = await repo.version(opts.continueUid);
    if (v.complete) throw new BackyError(`version ${v.uid} is complete; only an interrupted backup can be continued`);
    if (v.name !== opts.name) throw new BackyError(`version ${v.uid} is a backup of "${v.name}", not "${opts.name}"`);
    if (v.size !== source.size) throw new IoError(`source ${source.url} has ${source.size} bytes, version ${v.uid} was started with ${v.size}`);
    await repo.lock(LOCKS.version(v.uid), `backup of ${v.uid}`);
    return { version: v, todo: await unfinishedBlocks(repo, v) };
  }

  let base: VersionRow | undefined;
  let blockSize = repo.cfg.blockSize;
  if (opts.baseUid) {
    base = await meta.getVersion(opts.baseUid);
    if (!base) throw new NotFoundError(`base version ${opts.baseUid} does not exist`);
    if (!base.valid) throw new BackyError(`base version ${base.uid} is not valid; back up without -f, or scrub it first`);
    blockSize = base.blockSize;
  }
  const blocks = blockCount(source.size, blockSize);
  let pending: number[] | undefined;
  const changes = opts.changes ?? (opts.hints ? hintChanges(opts.hints) : opts.bitmap ? bitmapChanges(opts.bitmap) : undefined);
  if (base && changes) {
    const baseBlocks = blockCount(base.size, base.blockSize);
    const hinted = hintedBlocks(await changes.ranges(source), blockSize, blocks);
    for (let i = baseBlocks; i < blocks; i++) hinted.add(i);
    // The last block of the base may be shorter than a full block: if the image grew, it changed too.
    if (base.size !== source.size && baseBlocks > 0) hinted.add(baseBlocks - 1);
    if (!opts.exactChanges) await sanityCheck(repo, source, base, hinted, blocks, changes.describe, buffers);
    pending = [...hinted].filter((i) => i < blocks).sort((a, b) => a - b);
    log.info(`${changes.describe}: ${pending.length} of ${blocks} blocks changed since base ${base.uid}`);
  } else if (opts.hints) {
    throw new BackyError('hints (-r) need a base version (-f)');
  }

  const uid = randomUUID();
  const date = now();
  // No -t: backy2's automatic tags (b_daily, b_weekly, b_monthly).
  const tags = opts.tags.length ? opts.tags : autoTags(await meta.listVersions(), opts.name, date);
  const version = await meta.createVersion({
    uid, name: opts.name, snapshotName: opts.snapshotName, date, size: source.size, blockSize,
    expire: opts.expire, baseUid: base?.uid ?? null, tags,
  }, base && pending ? { versionId: base.id, pending } : undefined);
  await repo.lock(LOCKS.version(uid), `backup of ${uid}`);
  const todo = pending ?? Array.from({ length: blocks }, (_, i) => i);
  return { version, todo };
}

/**
 * Blocks of a version not safely stored: never recorded (pending), or recorded with a blob that is not in
 * storage yet (not live). Used to continue an interrupted backup and to check a finished one.
 */
async function unstoredBlocks(repo: Repository, v: VersionRow): Promise<{ pending: number[]; notLive: number[] }> {
  const out = { pending: [] as number[], notLive: [] as number[] };
  for (let c = 0; c < chunkCount(blockCount(v.size, v.blockSize)); c++) {
    const { entries, refs } = await readChunkWithBlobs(repo.meta, v, c);
    entries.forEach((e, k) => {
      if (e === PENDING) out.pending.push(c * MAP_CHUNK + k);
      else if (e !== HOLE && refs.get(e)?.state !== BlobState.Live) out.notLive.push(c * MAP_CHUNK + k);
    });
  }
  return out;
}

/** Blocks of an interrupted version that are not yet safely stored. */
async function unfinishedBlocks(repo: Repository, v: VersionRow): Promise<number[]> {
  const { pending, notLive } = await unstoredBlocks(repo, v);
  const todo = [...pending, ...notLive].sort((a, b) => a - b);
  log.info(`continuing version ${v.uid}: ${todo.length} of ${blockCount(v.size, v.blockSize)} blocks still to back up`);
  return todo;
}

/** Compares unhinted blocks of the source with the base: if any differs, the hints are wrong (exit 5). */
async function sanityCheck(repo: Repository, source: Source, base: VersionRow, hinted: Set<number>, blocks: number, what: string, buffers: Buffer[]): Promise<void> {
  const baseBlocks = blockCount(base.size, base.blockSize);
  const candidates: number[] = [];
  for (let i = 0; i < Math.min(blocks, baseBlocks); i++) if (!hinted.has(i)) candidates.push(i);
  const sample = randomSample(candidates, SANITY_SAMPLES);
  const dev = repo.device(base);
  const holes = source.extents ? new ZeroBlocks(source as Source & Required<Pick<Source, 'extents'>>, base.blockSize) : undefined;
  const reads = new Semaphore(Math.max(1, source.parallelReads));
  // All samples at once (a network source answers them in parallel); the first that differs stops the backup.
  await Promise.all(sample.map(async (i) => {
    const len = Math.min(base.blockSize, source.size - i * base.blockSize);
    let zero: boolean;
    let sum: Buffer | undefined;
    if (holes && (await holes.isZero(i))) {
      zero = true; // the source says it reads as zeroes: nothing to read
    } else {
      const buf = buffers.pop() ?? allocBlock(base.blockSize);
      await reads.use(() => source.read(buf, i * base.blockSize, len));
      const scan = await repo.codec.scan(buf, len);
      buffers.push(scan.buf);
      zero = scan.zero;
      sum = scan.sum;
    }
    const slot = await dev.slot(i);
    const same = zero ? slot.kind === 'hole' : slot.kind === 'data' && slot.ref.checksum.equals(sum!);
    if (!same) {
      throw new SanityError(`differential backup stopped: block at offset ${i * base.blockSize} differs from base ${base.uid} although ${what} ${what === 'the hints' ? 'say' : 'says'} it did not change`);
    }
  }));
  log.info(`sanity check: ${sample.length} unchanged blocks match base ${base.uid}`);
}

type Counters = Omit<StatsRow, 'date' | 'versionUid' | 'versionName' | 'versionSizeBytes' | 'versionSizeBlocks' | 'durationSeconds'>;

async function copyBlocks(repo: Repository, source: Source, version: VersionRow, todo: number[], session: string, quiet: boolean | undefined, stop: { reason: string }, free: Buffer[]): Promise<Counters> {
  const c: Counters = { bytesRead: 0, blocksRead: 0, bytesWritten: 0, blocksWritten: 0, bytesDedup: 0, blocksDedup: 0, bytesSparse: 0, blocksSparse: 0 };
  const bs = version.blockSize;
  const lenOf = (i: number) => Math.min(bs, version.size - i * bs);
  const total = todo.reduce((s, i) => s + lenOf(i), 0);
  const progress = new Progress(`backup ${version.uid.slice(0, 8)}`, total, { quiet });
  const codec = repo.codec;
  const recorder = new Coalescer<BlockEntry, ResolvedBlock | undefined>(async (entries) => {
    const resolved = await repo.meta.recordBlocks(version.id, session, entries);
    const byIndex = new Map(resolved.map((r) => [r.index, r]));
    return entries.map((e) => (e.zero ? undefined : byIndex.get(e.index)));
  });
  const uploaded = new Coalescer<{ id: number; storedSize: number }, void>(async (items) => {
    await repo.meta.markUploaded(items);
    return items.map(() => undefined);
  });

  // Memory bound: at most `inflight` blocks between read and store, each holding one block-sized buffer
  // or its encoded blob.
  const inflight = Math.max(4, Math.min(64, Math.floor((64 * 1024 * 1024) / bs), repo.cfg.workers * 4 + repo.cfg.data.simultaneousWrites));
  const jobs = new JobRunner(inflight);
  // Block buffers and encoded-blob buffers travel to the workers and back and are reused: no per-block
  // allocation, so memory stays at `inflight` blocks however long the image.
  const freeOut: Buffer[] = [];
  // A source that knows its holes (NBD base:allocation): blocks that are all hole are recorded without reading.
  const holes = source.extents ? new ZeroBlocks(source as Source & Required<Pick<Source, 'extents'>>, bs) : undefined;
  // A network source answers faster with several reads in flight; a local file reads best in order, one at a
  // time, ahead of the workers.
  const reads = source.parallelReads > 1 ? new Semaphore(source.parallelReads) : undefined;
  const recordHole = async (index: number, len: number) => {
    await recorder.push({ index, zero: true });
    c.blocksSparse++;
    c.bytesSparse += len;
  };

  // A block holds its block buffer from its read until it is encoded (or found zero or known); after that it
  // holds only its blob while it is stored, and stores may queue deeper. So block buffers are bounded apart, by
  // what the reads and the workers can use at once. Why it matters: memory a process touches for the first
  // time is dear on some VMs (on the benchmark's, 16 µs a page, 4 ms per MiB), and each block buffer more is
  // 4 MiB of it. On a 512 MiB ext4 image, 5 block buffers instead of 16 took the backup from 1.24-1.40 s to
  // 1.07-1.17 s (page faults 37,000 -> 24,000).
  const preparing = new Semaphore(Math.max(source.parallelReads, repo.cfg.workers * 2) + 1);
  let blockBuffers = 0;
  const newBlockBuffer = () => {
    blockBuffers++;
    return allocBlock(bs);
  };
  const hold = async (): Promise<() => void> => {
    await preparing.acquire();
    let held = true;
    return () => {
      if (held) preparing.release();
      held = false;
    };
  };

  const processBlock = async (index: number, buf: Buffer, len: number, freed: () => void): Promise<void> => {
    const scan = await codec.scan(buf, len);
    buf = scan.buf;
    if (scan.zero) {
      free.push(buf);
      freed();
      await recorder.push({ index, zero: true });
      c.blocksSparse++;
      c.bytesSparse += len;
      return;
    }
    const r = (await recorder.push({ index, checksum: scan.sum!, size: len }))!;
    if (!r.upload) {
      free.push(buf);
      freed();
      c.blocksDedup++;
      c.bytesDedup += len;
      return;
    }
    // Aligned: file storage writes blobs with O_DIRECT from them, sparing the page cache.
    const enc = await codec.encode(buf, len, scan.sum!, freeOut.pop() ?? allocAligned(encodedCapacity(bs)));
    free.push(enc.buf);
    freed();
    // Read before the buffer goes back to the pool: once another block takes it to a worker it is detached.
    const storedSize = enc.blob.length;
    try {
      await repo.store.put(blobKey(r.uid), enc.blob);
    } finally {
      freeOut.push(reusable(enc.blob));
    }
    await uploaded.push({ id: r.blobId, storedSize });
    c.blocksWritten++;
    c.bytesWritten += storedSize;
  };

  try {
    for (const index of todo) {
      await jobs.acquire();
      if (stop.reason) jobs.fail(new BackyError(stop.reason));
      if (jobs.failed) {
        jobs.release();
        break;
      }
      const len = lenOf(index);
      let hole = false;
      try {
        hole = !!holes && (await holes.isZero(index));
      } catch (e) {
        jobs.release();
        throw e;
      }
      if (hole) {
        jobs.start(() => recordHole(index, len), () => progress.add(len));
        continue;
      }
      const freed = await hold();
      const buf = free.pop() ?? newBlockBuffer();
      if (reads) {
        jobs.start(async () => {
          try {
            await reads.use(() => source.read(buf, index * bs, len));
            c.bytesRead += len;
            c.blocksRead++;
            await processBlock(index, buf, len, freed);
          } finally {
            freed();
          }
        }, () => progress.add(len));
        continue;
      }
      try {
        await source.read(buf, index * bs, len);
      } catch (e) {
        freed();
        jobs.release();
        throw e;
      }
      c.bytesRead += len;
      c.blocksRead++;
      jobs.start(() => processBlock(index, buf, len, freed).finally(freed), () => progress.add(len));
    }
  } catch (e) {
    jobs.fail(e);
  } finally {
    await jobs.drain();
    progress.finish();
  }
  log.debug(`backup: ${blockBuffers} block buffers (reads waited for one ${preparing.waits} times), ${freeOut.length} blob buffers`);
  if (stop.reason) jobs.fail(new BackyError(stop.reason));
  if (jobs.failed) throw jobs.failure;
  return c;
}

/** Marks the version complete; valid only if no block is missing and every blob it uses is stored. */
async function finalize(repo: Repository, v: VersionRow): Promise<boolean> {
  const { pending, notLive } = await unstoredBlocks(repo, v);
  if (pending.length) throw new BackyError(`internal error: ${pending.length} blocks of version ${v.uid} were not recorded; continue it with -c ${v.uid}`);
  const valid = notLive.length === 0;
  await repo.meta.updateVersion(v.id, { complete: true, valid });
  return valid;
}
