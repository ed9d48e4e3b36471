import type { Backy2Config } from '../backy2/config';
import type { Backy2Database } from '../backy2/database';
import { Backy2Layout, checkBlob } from '../backy2/layout';
import { Codec } from '../codec/codec';
import { makeKeyInfo } from '../codec/backy2-blob';
import { WorkerPool } from '../codec/pool';
import { blockCount, chunkCount, HOLE, MAP_CHUNK, PENDING } from '../meta/block-map';
import { readChunkWithBlobs } from '../meta/map-reader';
import { BlobFormat, BlobState, BlockEntry, IMPORT_HOLE, ResolvedBlock, VersionRow } from '../meta/types';
import { storageKey } from '../storage/blob-keys';
import { createBlobStore } from '../storage/open';
import { blobKey, BlobStore } from '../storage/types';
import { Coalescer } from '../util/coalescer';
import { BlobCorruptError, BlobNotFoundError, errorLine } from '../util/errors';
import { JobRunner } from '../util/job-runner';
import { log } from '../util/log';
import type { Progress } from '../util/progress';
import { sessionId } from '../util/process-info';
import { LOCKS, Repository } from './repository';

/**
 * `import-backy2 --copy`: every block of a backy2 version re-encoded into backy's format and stored in this
 * repository's storage (which may be anywhere), like a backup whose source is backy2's repository: blocks are
 * recorded (and deduplicated) as they come, so an interrupted copy continues where it stopped when run again.
 * backy2's blobs are only read. A blob that is missing or damaged in backy2's storage leaves its block
 * unreadable (the version is imported invalid; scrub reports it).
 */
export class Backy2Copier {
  private store: BlobStore | undefined;
  private codec: Codec | undefined;

  constructor(private readonly repo: Repository, private readonly b2: Backy2Config) {}

  /** backy2's storage and a decoder holding backy2's key (its data keys are unwrapped with it). */
  private source(): { store: BlobStore; codec: Codec } {
    if (!this.store || !this.codec) {
      this.store = createBlobStore(this.b2.dataConfig);
      const init = { keyHex: this.b2.encryptionKey?.toString('hex'), compression: 'none' as const, compressionLevel: 1, hashFunction: this.b2.hashFunction };
      this.codec = new Codec(new WorkerPool(init, this.repo.cfg.workers), { key: this.b2.encryptionKey, compression: 'none', compressionLevel: 1, hashFunction: this.b2.hashFunction });
    }
    return { store: this.store, codec: this.codec };
  }

  async close(): Promise<void> {
    await this.codec?.close().catch(() => undefined);
    await this.store?.close().catch(() => undefined);
  }

  /** Copies the version's blocks not yet stored here; returns whether the version is valid. */
  async copy(db: Backy2Database, layout: Backy2Layout, opts: { progress: Progress }): Promise<boolean> {
    const repo = this.repo;
    const v = layout.version;
    const bs = v.blockSize;
    let version = await repo.meta.getVersion(v.uid);
    if (!version) {
      version = await repo.meta.createVersion({
        uid: v.uid, name: v.name, snapshotName: v.snapshotName, date: v.date, size: v.size, blockSize: bs, expire: v.expire,
        baseUid: null, tags: v.tags,
      });
    }
    await repo.lock(LOCKS.version(v.uid), `import of ${v.uid}`);
    const todo = await unstored(repo, version);
    const usable = todo.filter((i) => layout.map[i] >= 0 || layout.map[i] === IMPORT_HOLE);
    const lenOf = (i: number) => Math.min(bs, v.size - i * bs);
    opts.progress.add(v.size - usable.reduce((s, i) => s + lenOf(i), 0));
    if (todo.length < blockCount(v.size, bs)) log.info(`continuing the copy of version ${v.uid}: ${usable.length} blocks to go`);

    const firstBlock = new Map<number, number>();
    for (const i of usable) if (layout.map[i] >= 0 && !firstBlock.has(layout.map[i])) firstBlock.set(layout.map[i], i);
    const details = await db.blobDetails(v.uid, [...firstBlock.values()]);
    const { store: source, codec: decoder } = usable.some((i) => layout.map[i] >= 0) ? this.source() : { store: undefined, codec: undefined };
    const session = sessionId();
    const recorder = new Coalescer<BlockEntry, ResolvedBlock | undefined>(async (entries) => {
      const resolved = await repo.meta.recordBlocks(version!.id, session, entries);
      const byIndex = new Map(resolved.map((r) => [r.index, r]));
      return entries.map((e) => (e.zero ? undefined : byIndex.get(e.index)));
    });
    const sameHash = this.b2.hashFunction === repo.cfg.hashFunction;
    let unreadable = 0;
    const jobs = new JobRunner(Math.max(2, Math.min(repo.cfg.data.simultaneousReads, repo.cfg.workers * 2 + 2)));
    const copyBlock = async (i: number): Promise<void> => {
      const k = layout.map[i];
      if (k === IMPORT_HOLE) {
        await recorder.push({ index: i, zero: true });
        return;
      }
      const uid = layout.uids[k];
      const b = checkBlob(uid, details.get(uid), this.b2.hashFunction);
      if (typeof b === 'string') {
        log.error(`version ${v.uid}, block ${i}: ${b}`);
        unreadable++;
        return;
      }
      let resolved: ResolvedBlock | undefined;
      if (sameHash) {
        // Known checksum: a block already stored here (a shared blob, or an earlier run) is not read again.
        resolved = await recorder.push({ index: i, checksum: b.checksum, size: b.size });
        if (!resolved!.upload) return;
      }
      let data: Buffer;
      try {
        const raw = await source!.get(storageKey(uid, b.format, this.b2.data.type));
        // The decoder's own key (kek 0) is backy2's.
        const keyInfo = b.format === BlobFormat.Backy2Aes ? makeKeyInfo(0, b.envkey!, b.nonce) : null;
        const r = await decoder!.decodeReusing(raw, b.checksum, b.size, undefined, true, { format: b.format, keyInfo });
        if (r.error !== undefined) throw new BlobCorruptError(storageKey(uid, b.format, this.b2.data.type), r.error);
        data = r.data!;
      } catch (e) {
        if (!(e instanceof BlobNotFoundError) && !(e instanceof BlobCorruptError)) throw e;
        log.error(`version ${v.uid}, block ${i}: ${errorLine(e)}`);
        unreadable++;
        return;
      }
      let sum = b.checksum;
      if (!sameHash) {
        const s = await repo.codec.scan(data, data.length);
        data = s.buf;
        sum = s.sum!;
        resolved = await recorder.push({ index: i, checksum: sum, size: b.size });
        if (!resolved!.upload) return;
      }
      const enc = await repo.codec.encode(data, b.size, sum);
      await repo.store.put(blobKey(resolved!.uid), enc.blob);
      await repo.meta.markUploaded([{ id: resolved!.blobId, storedSize: enc.blob.length }]);
    };
    try {
      for (const i of usable) {
        await jobs.acquire();
        if (jobs.failed) {
          jobs.release();
          break;
        }
        jobs.start(() => copyBlock(i), () => opts.progress.add(lenOf(i)));
      }
    } finally {
      await jobs.drain();
    }
    if (jobs.failed) throw jobs.failure;
    const left = await unstored(repo, version);
    const valid = v.valid && layout.version.complete && !layout.problems.length && !layout.bad.some(Boolean) && !unreadable && left.length === 0;
    await repo.meta.updateVersion(version.id, { complete: true, valid, protected: v.protected });
    await repo.unlock(LOCKS.version(v.uid));
    return valid;
  }
}

/** Blocks of a version not safely stored yet: never recorded, or recorded with a blob not in storage. */
async function unstored(repo: Repository, v: VersionRow): Promise<number[]> {
  const out: number[] = [];
  for (let c = 0; c < chunkCount(blockCount(v.size, v.blockSize)); c++) {
    const { entries, refs } = await readChunkWithBlobs(repo.meta, v, c);
    entries.forEach((e, k) => {
      if (e === PENDING || (e !== HOLE && refs.get(e)?.state !== BlobState.Live)) out.push(c * MAP_CHUNK + k);
    });
  }
  return out;
}
