/**
 * The MetaStore contract, run against both engines with the same test bodies: SQLite (a temp file) and
 * PostgreSQL (a throwaway server from test/helpers/postgres.ts, one fresh database per test).
 */
import { after, before, describe, test } from 'node:test';
import * as assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { createHash, randomUUID } from 'node:crypto';
import { spawnSync } from 'node:child_process';
import { Worker } from 'node:worker_threads';
import { HOLE, MAP_CHUNK, PENDING, blockCount, chunkCount, decodeChunk as decodeChunkOf } from '../src/meta/block-map';
import { createMetaStore } from '../src/meta/open';
import { chunkDigest } from '../src/meta/map-summary';
import { computeUsage, VersionUsage } from '../src/engine/lifecycle/usage';
import { SCHEMA_VERSION } from '../src/meta/schema';
import Database from 'better-sqlite3';
import { BlobState, BlockEntry, LockInfo, MetaStore, NewVersion, ProtectedError, VersionRow } from '../src/meta/types';
import { DatabaseError } from '../src/util/errors';
import { processStart } from '../src/util/process-info';
import { startPostgres, TestPostgres } from './helpers/postgres';
import { undoSchema3 } from './helpers/schema-downgrade';

const BS = 4096;

function sum(x: string | number): Buffer {
  return createHash('sha512').update(String(x)).digest();
}

function data(index: number, content: string | number, size = BS): BlockEntry {
  return { index, checksum: sum(content), size };
}

function newVersion(size: number, over: Partial<NewVersion> = {}): NewVersion {
  return { uid: randomUUID(), name: 'vm1', snapshotName: '', date: Date.now(), size, blockSize: BS, expire: null, baseUid: null, tags: [], ...over };
}

function holder(session: string, pid = process.pid, host = os.hostname()): LockInfo {
  return { session, host, pid, pidStart: processStart(pid), what: `work of ${session}` };
}

/** A pid that certainly belongs to no running process. */
function deadPid(): number {
  return spawnSync('true').pid!;
}

async function fullMap(store: MetaStore, v: VersionRow): Promise<number[]> {
  const out: number[] = [];
  const blocks = blockCount(v.size, v.blockSize);
  for (let c = 0; c < chunkCount(blocks); c++) out.push(...(await store.readMapChunk(v.id, c)));
  return out;
}

/**
 * Two threads with a connection each: per round, one tries to hold version `v<round>`, the other to remove it,
 * released from a barrier at the same moment (a real race on either engine: SQLite's driver is synchronous,
 * so two stores of one thread could never overlap). Returns what happened to each attempt.
 */
async function raceHoldsAndRemovals(url: string, rounds: number): Promise<{ hold: string; removal: string }[]> {
  const barrier = new Int32Array(new SharedArrayBuffer(4 * (rounds + 1)));
  const code = `
    const { parentPort, workerData } = require('node:worker_threads');
    const { createMetaStore } = require(workerData.open);
    (async () => {
      const store = createMetaStore(workerData.url);
      await store.open();
      const out = [];
      for (let round = 0; round < workerData.rounds; round++) {
        const info = { session: workerData.role + '-' + round, host: require('node:os').hostname(), pid: process.pid, pidStart: '', what: workerData.role };
        Atomics.add(workerData.barrier, round, 1);
        while (Atomics.load(workerData.barrier, round) < 2) Atomics.wait(workerData.barrier, round, 1, 5);
        const uid = 'v' + round;
        const holder = workerData.role === 'hold'
          ? await store.tryLock('hold:' + uid + ':' + info.session, info, ['remove:' + uid])
          : await store.tryLock('remove:' + uid, info, ['hold:' + uid + ':*']);
        out.push(holder ? 'refused by ' + holder.what : 'taken');
      }
      // Closing releases this side's locks: only once the other side is done too.
      Atomics.add(workerData.barrier, workerData.rounds, 1);
      while (Atomics.load(workerData.barrier, workerData.rounds) < 2) await new Promise((r) => setTimeout(r, 5));
      await store.close();
      parentPort.postMessage(out);
    })().catch((e) => parentPort.postMessage({ error: e.message }));`;
  const run = (role: string) => new Promise<string[]>((resolve, reject) => {
    const w = new Worker(code, { eval: true, workerData: { url, rounds, role, barrier, open: path.resolve(__dirname, '../src/meta/open.js') } });
    w.once('message', (m) => (Array.isArray(m) ? resolve(m) : reject(new Error(m.error))));
    w.once('error', reject);
  });
  const [holds, removals] = await Promise.all([run('hold'), run('removal')]);
  return holds.map((hold, k) => ({ hold, removal: removals[k] }));
}

interface Engine {
  name: string;
  /** A URL of a fresh, empty database. */
  fresh(): Promise<string>;
}

let pg: TestPostgres | undefined;
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'backy-meta-'));

before(async () => {
  pg = await startPostgres();
});
after(async () => {
  await pg?.stop();
  fs.rmSync(tmp, { recursive: true, force: true });
});

const engines: Engine[] = [
  { name: 'sqlite', fresh: async () => `sqlite:///${path.join(tmp, `${randomUUID()}.sqlite`)}` },
  { name: 'postgresql', fresh: () => pg!.createDatabase() },
];

for (const engine of engines) {
  describe(`MetaStore on ${engine.name}`, () => {
    const opened: MetaStore[] = [];
    after(async () => {
      for (const s of opened) await s.close().catch(() => undefined);
    });

    /** An initialized store on a fresh database (and `more` other stores on the same database). */
    async function fresh(): Promise<{ url: string; store: MetaStore; another: () => Promise<MetaStore> }> {
      const url = await engine.fresh();
      const store = createMetaStore(url);
      opened.push(store);
      assert.equal(await store.initdb(), true);
      return {
        url, store,
        async another() {
          const s = createMetaStore(url);
          opened.push(s);
          await s.open();
          return s;
        },
      };
    }

    test('initdb creates the schema once; open refuses an uninitialized database', async () => {
      const url = await engine.fresh();
      const blank = createMetaStore(url);
      opened.push(blank);
      if (engine.name === 'postgresql') {
        await assert.rejects(blank.open(), (e: unknown) => e instanceof DatabaseError && /not initialized.*initdb/.test((e as Error).message));
      }
      // Two processes starting at once: exactly one creates the schema.
      const a = createMetaStore(url);
      const b = createMetaStore(url);
      opened.push(a, b);
      const created = await Promise.all([a.initdb(), b.initdb()]);
      assert.deepEqual(created.sort(), [false, true]);
      assert.equal(await a.initdb(), false);
      await a.setSettingIfAbsent('hash_function', 'sha512');
      assert.equal(await b.initdb(), false, 'nothing changes the second time');
      assert.equal(await b.getSetting('hash_function'), 'sha512');
      await blank.open();
      assert.equal(await blank.getSetting('schema_version'), String(SCHEMA_VERSION));
      assert.equal(await blank.setSettingIfAbsent('hash_function', 'sha256'), 'sha512');
      assert.equal(await blank.getSetting('nothing'), undefined);
    });

    test('createVersion without base: all pending, chunked', async () => {
      const { store } = await fresh();
      const size = (2 * MAP_CHUNK + 10) * BS - 100; // last block short
      const v = await store.createVersion(newVersion(size, { tags: ['b', 'a', 'a'], expire: 123 }));
      assert.equal(v.valid, false);
      assert.equal(v.complete, false);
      assert.deepEqual(v.tags, ['a', 'b']);
      assert.equal(v.expire, 123);
      assert.equal((await store.readMapChunk(v.id, 0)).length, MAP_CHUNK);
      assert.equal((await store.readMapChunk(v.id, 2)).length, 10);
      assert.ok((await fullMap(store, v)).every((e) => e === PENDING));
      await assert.rejects(store.readMapChunk(v.id, 3), DatabaseError);
      const got = await store.getVersion(v.uid);
      assert.deepEqual(got, v);
      assert.equal(await store.getVersion('nope'), undefined);
    });

    test('createVersion with base: copied map, pending indices, grown and shrunk sizes', async () => {
      const { store } = await fresh();
      const n = MAP_CHUNK + 6;
      const base = await store.createVersion(newVersion(n * BS));
      const entries: BlockEntry[] = [];
      for (let i = 0; i < n; i++) entries.push(i % 3 === 0 ? { index: i, zero: true } : data(i, i));
      const r = await store.recordBlocks(base.id, 's1', entries);
      await store.markUploaded(r.map((x) => ({ id: x.blobId, storedSize: 100 })));
      await store.updateVersion(base.id, { valid: true, complete: true });
      const baseMap = await fullMap(store, base);

      const same = await store.createVersion(newVersion(n * BS, { baseUid: base.uid }), { versionId: base.id, pending: [1, 5, MAP_CHUNK + 2, 999999] });
      const m = await fullMap(store, same);
      assert.equal(same.baseUid, base.uid);
      assert.equal(m.length, n);
      for (let i = 0; i < n; i++) assert.equal(m[i], [1, 5, MAP_CHUNK + 2].includes(i) ? PENDING : baseMap[i], `block ${i}`);

      const grown = await store.createVersion(newVersion((n + 1100) * BS), { versionId: base.id, pending: [] });
      const g = await fullMap(store, grown);
      assert.equal(g.length, n + 1100);
      for (let i = 0; i < n; i++) assert.equal(g[i], baseMap[i]);
      for (let i = n; i < n + 1100; i++) assert.equal(g[i], PENDING);

      const shrunk = await store.createVersion(newVersion(7 * BS), { versionId: base.id, pending: [2] });
      assert.deepEqual(await fullMap(store, shrunk), baseMap.slice(0, 7).map((e, i) => (i === 2 ? PENDING : e)));

      await store.removeVersion(base.id);
      await assert.rejects(store.createVersion(newVersion(n * BS), { versionId: base.id, pending: [] }), /removed/);
    });

    test('recordBlocks: holes, dedup within and across batches, sessions, bad blobs', async () => {
      const { store } = await fresh();
      const v = await store.createVersion(newVersion(20 * BS));
      // New blocks, one checksum twice in the batch, a hole.
      const r1 = await store.recordBlocks(v.id, 's1', [data(0, 'a'), data(1, 'b'), data(2, 'a'), { index: 3, zero: true }]);
      assert.deepEqual(r1.map((r) => [r.index, r.upload]), [[0, true], [1, true], [2, false]]);
      assert.equal(r1[0].blobId, r1[2].blobId);
      assert.notEqual(r1[0].blobId, r1[1].blobId);
      assert.equal(r1[0].uid, r1[2].uid);
      assert.match(r1[0].uid, /^[0-9a-f]{32}$/);
      // Same session, upload not finished: reuse without uploading again.
      const r2 = await store.recordBlocks(v.id, 's1', [data(4, 'a')]);
      assert.deepEqual([r2[0].blobId, r2[0].upload], [r1[0].blobId, false]);
      // Another session while s1's upload is in flight: it must store it too (s1 may die).
      const v2 = await store.createVersion(newVersion(20 * BS));
      const r3 = await store.recordBlocks(v2.id, 's2', [data(0, 'b')]);
      assert.deepEqual([r3[0].blobId, r3[0].upload], [r1[1].blobId, true]);
      // Uploaded: everybody reuses it.
      await store.markUploaded([{ id: r1[0].blobId, storedSize: 50 }, { id: r1[1].blobId, storedSize: 60 }]);
      const r4 = await store.recordBlocks(v2.id, 's2', [data(1, 'a'), data(2, 'b')]);
      assert.deepEqual(r4.map((r) => [r.blobId, r.upload]), [[r1[0].blobId, false], [r1[1].blobId, false]]);
      // Bad: the next backup stores it again under the same blob.
      await store.markBad([r1[0].blobId]);
      const r5 = await store.recordBlocks(v2.id, 's3', [data(3, 'a')]);
      assert.deepEqual([r5[0].blobId, r5[0].upload], [r1[0].blobId, true]);
      const blobs = await store.getBlobs([r1[0].blobId, r1[1].blobId, 99999]);
      assert.equal(blobs.size, 2);
      assert.equal(blobs.get(r1[0].blobId)!.state, BlobState.Uploading);
      assert.equal(blobs.get(r1[1].blobId)!.state, BlobState.Live);
      assert.ok(blobs.get(r1[1].blobId)!.checksum.equals(sum('b')));
      assert.equal(blobs.get(r1[1].blobId)!.size, BS);
      const m = await fullMap(store, v);
      assert.deepEqual(m.slice(0, 6), [r1[0].blobId, r1[1].blobId, r1[0].blobId, HOLE, r1[0].blobId, PENDING]);
      const stats = await store.repositoryStats();
      assert.deepEqual(stats, { versions: 2, blobs: 2, storedBytes: 110, plainBytes: 2 * BS });
      await assert.rejects(store.recordBlocks(987654, 's1', [data(0, 'x')]), /removed/);
      assert.deepEqual(await store.recordBlocks(v.id, 's1', []), []);
    });

    test('recordBlocks: large batches over several chunks keep every entry', async () => {
      const { store, another } = await fresh();
      const blocks = 3 * MAP_CHUNK;
      const v = await store.createVersion(newVersion(blocks * BS));
      const all: BlockEntry[] = [];
      const distinct = new Set<number>();
      for (let i = 0; i < blocks; i++) {
        if (i % 5) distinct.add(i % 701);
        all.push(i % 5 === 0 ? { index: i, zero: true } : data(i, i % 701));
      }
      for (let i = 0; i < all.length; i += 512) await store.recordBlocks(v.id, 's1', all.slice(i, i + 512));
      const reader = await another();
      const m = await fullMap(reader, v);
      const byContent = new Map<number, number>();
      for (let i = 0; i < blocks; i++) {
        if (i % 5 === 0) { assert.equal(m[i], HOLE); continue; }
        assert.ok(m[i] > 0);
        const known = byContent.get(i % 701);
        if (known !== undefined) assert.equal(m[i], known, `block ${i} deduplicated`);
        byContent.set(i % 701, m[i]);
      }
      assert.equal((await reader.repositoryStats()).blobs, distinct.size);
      assert.equal(new Set(m.filter((e) => e > 0)).size, distinct.size);
    });

    test('two backups reserving the same new checksums at once share one blob per checksum', async () => {
      const { store, another } = await fresh();
      const other = await another();
      const va = await store.createVersion(newVersion(400 * BS));
      const vb = await other.createVersion(newVersion(400 * BS));
      const entries = (offset: number) => Array.from({ length: 400 }, (_, i) => data(i, `shared-${(i + offset) % 400}`));
      for (let round = 0; round < 4; round++) {
        const lo = round * 100;
        await Promise.all([
          store.recordBlocks(va.id, 'sa', entries(0).slice(lo, lo + 100)),
          other.recordBlocks(vb.id, 'sb', entries(37).slice(lo, lo + 100)),
        ]);
      }
      const ma = await fullMap(store, va);
      const mb = await fullMap(store, vb);
      for (let i = 0; i < 400; i++) assert.equal(mb[i], ma[(i + 37) % 400], `block ${i} of b uses a's blob`);
      assert.equal((await store.repositoryStats()).blobs, 400);
    });

    test('markBad invalidates the versions using the blob', async () => {
      const { store } = await fresh();
      const a = await store.createVersion(newVersion(4 * BS));
      const b = await store.createVersion(newVersion(4 * BS));
      const c = await store.createVersion(newVersion(4 * BS));
      const ra = await store.recordBlocks(a.id, 's', [data(0, 'x'), data(1, 'y')]);
      await store.recordBlocks(b.id, 's', [data(2, 'y')]);
      await store.recordBlocks(c.id, 's', [data(0, 'z')]);
      await store.markUploaded(ra.map((r) => ({ id: r.blobId, storedSize: 1 })));
      for (const v of [a, b, c]) await store.updateVersion(v.id, { valid: true, complete: true });
      const uids = await store.markBad([ra[1].blobId]);
      assert.deepEqual(uids.sort(), [a.uid, b.uid].sort());
      assert.equal((await store.getVersion(a.uid))!.valid, false);
      assert.equal((await store.getVersion(b.uid))!.valid, false);
      assert.equal((await store.getVersion(c.uid))!.valid, true);
      assert.equal((await store.getVersion(a.uid))!.complete, true);
      assert.equal((await store.getBlobs([ra[1].blobId])).get(ra[1].blobId)!.state, BlobState.Bad);
      assert.deepEqual(await store.markBad([]), []);
    });

    test('versions: update, tags, remove', async () => {
      const { store } = await fresh();
      const v = await store.createVersion(newVersion(BS, { tags: ['x'] }));
      await store.updateVersion(v.id, { protected: true, expire: 5 });
      await store.addTags(v.id, ['y', 'z', 'y']);
      await store.removeTags(v.id, ['x', 'nope']);
      let got = (await store.getVersion(v.uid))!;
      assert.deepEqual([got.protected, got.expire, got.tags], [true, 5, ['y', 'z']]);
      await store.updateVersion(v.id, { protected: false, expire: null });
      await store.updateVersion(v.id, {});
      got = (await store.getVersion(v.uid))!;
      assert.deepEqual([got.protected, got.expire], [false, null]);
      await store.removeVersion(v.id);
      assert.equal(await store.getVersion(v.uid), undefined);
      assert.equal((await store.listVersions()).length, 0);
    });

    test('removal refuses a protected version in its own transaction; updates of a removed version say so', async () => {
      const { store, another } = await fresh();
      const other = await another();
      const v = await store.createVersion(newVersion(BS));
      // Another process protects the version after this one has read it unprotected.
      assert.equal((await store.getVersion(v.uid))!.protected, false);
      assert.equal(await other.updateVersion(v.id, { protected: true }), true);
      await assert.rejects(store.removeVersion(v.id), (e: Error) => e instanceof ProtectedError && /is protected/.test(e.message));
      assert.ok(await store.getVersion(v.uid));
      assert.equal(await other.updateVersion(v.id, { protected: false }), true);
      assert.equal(await store.removeVersion(v.id), true);
      assert.equal(await other.updateVersion(v.id, { protected: true }), false);
      assert.equal(await other.updateVersion(v.id, {}), false);
      assert.equal(await store.removeVersion(v.id), false);
    });

    test('removeVersions: several at once, each checked in the transaction; removed blobs start their grace period', async () => {
      const { store, another } = await fresh();
      const other = await another();
      const keep = await store.createVersion(newVersion(4 * BS));
      const done = await store.createVersion(newVersion(4 * BS)); // complete: removed through its summary
      const running = await store.createVersion(newVersion(4 * BS)); // incomplete: no summary, every chunk read
      const prot = await store.createVersion(newVersion(4 * BS));
      const gone = await store.createVersion(newVersion(4 * BS));
      const rk = await store.recordBlocks(keep.id, 's', [data(0, 'shared')]);
      const rd = await store.recordBlocks(done.id, 's', [data(0, 'shared'), data(1, 'done-1'), data(2, 'done-2')]);
      const rr = await store.recordBlocks(running.id, 's', [data(0, 'running-1'), data(3, 'done-1')]);
      const rp = await store.recordBlocks(prot.id, 's', [data(0, 'prot-1')]);
      await store.markUploaded([...rk, ...rd, ...rr, ...rp].map((r) => ({ id: r.blobId, storedSize: 10 })));
      await store.updateVersion(done.id, { complete: true, valid: true });
      // Read unprotected, then protected by another process; one removed by another process.
      assert.equal((await store.getVersion(prot.uid))!.protected, false);
      assert.equal(await other.updateVersion(prot.id, { protected: true }), true);
      assert.equal(await other.removeVersion(gone.id), true);

      const t0 = Date.now();
      const results = await store.removeVersions([prot.id, done.id, gone.id, 987654, running.id]);
      assert.deepEqual(results, [
        { id: prot.id, uid: prot.uid, result: 'protected' },
        { id: done.id, uid: done.uid, result: 'removed' },
        { id: gone.id, uid: null, result: 'missing' },
        { id: 987654, uid: null, result: 'missing' },
        { id: running.id, uid: running.uid, result: 'removed' },
      ]);
      assert.deepEqual((await store.listVersions()).map((v) => v.uid).sort(), [keep.uid, prot.uid].sort());
      assert.equal((await store.getVersion(prot.uid))!.protected, true);
      await assert.rejects(store.readMapChunk(done.id, 0), /missing/);
      // The blobs only the removed versions used were stamped by the removal: once the grace period has passed
      // since then, cleanup marks them at once (unstamped, it would only stamp them now).
      const grace = 3600e3;
      const mark = await store.markForDeletion(grace, t0 + grace + 60e3);
      assert.deepEqual(mark, { marked: 3, waiting: 0, referenced: 2 });
      assert.deepEqual((await store.blobsToDelete(10)).map((b) => b.id).sort((a, b) => a - b),
        [rd[1].blobId, rd[2].blobId, rr[0].blobId].sort((a, b) => a - b));
      assert.deepEqual(await store.removeVersions([]), []);
    });

    test('a removal stamps only the blobs the next version no longer uses; the removal of that one stamps the rest', async () => {
      const { url, store } = await fresh();
      const unrefSince = async (ids: number[]): Promise<(number | null)[]> => {
        const sql = `SELECT id, unref_since FROM blobs ORDER BY id`;
        const rows = engine.name === 'sqlite'
          ? (() => { const db = new Database(url.slice('sqlite:///'.length), { readonly: true }); try { return db.prepare(sql).all() as { id: number; unref_since: number | null }[]; } finally { db.close(); } })()
          : await pg!.query<{ id: number; unref_since: string | null }>(sql, [], url.split('/').pop());
        const by = new Map(rows.map((r) => [Number(r.id), r.unref_since === null ? null : Number(r.unref_since)]));
        return ids.map((id) => by.get(id)!);
      };
      const v1 = await store.createVersion(newVersion(4 * BS));
      const r1 = await store.recordBlocks(v1.id, 's', [data(0, 'a'), data(1, 'b'), data(2, 'c'), data(3, 'a')]);
      await store.updateVersion(v1.id, { complete: true, valid: true });
      // The next day's version: block 2 changed, the rest shared (its summary is a delta against v1).
      const v2 = await store.createVersion(newVersion(4 * BS, { baseUid: v1.uid }), { versionId: v1.id, pending: [2] });
      const r2 = await store.recordBlocks(v2.id, 's', [data(2, 'c2')]);
      await store.updateVersion(v2.id, { complete: true, valid: true });
      const [a, b, c, c2] = [r1[0].blobId, r1[1].blobId, r1[2].blobId, r2[0].blobId];
      const t0 = Date.now();
      assert.deepEqual((await store.removeVersions([v1.id])).map((r) => r.result), ['removed']);
      const [sa, sb, sc, sc2] = await unrefSince([a, b, c, c2]);
      assert.deepEqual([sa, sb, sc2], [null, null, null], 'what v2 still uses is not stamped');
      assert.ok(sc !== null && sc >= t0, 'the blob only v1 used is stamped');
      const t1 = Date.now();
      assert.equal(await store.removeVersion(v2.id), true);
      for (const s of await unrefSince([a, b, c2])) assert.ok(s !== null && s >= t1, 'the last removal stamps every blob it used');
      assert.deepEqual(await store.markForDeletion(3600e3, t1 + 1000), { marked: 0, waiting: 4, referenced: 0 });
    });

    test('tryLocks and unlockAll: several locks in one step, each decided as tryLock decides it', async () => {
      const { another } = await fresh();
      const a = await another();
      const b = await another();
      const A = holder('session-a');
      const B = holder('session-b');
      assert.equal(await b.tryLock('hold:v1:session-b', B, ['remove:v1']), undefined);
      assert.equal(await b.tryLock('version:v3', B), undefined);
      const got = await a.tryLocks([
        { name: 'remove:v1', info: A, conflicts: ['hold:v1:*'] },
        { name: 'remove:v2', info: A, conflicts: ['hold:v2:*'] },
        { name: 'version:v2', info: A },
        { name: 'version:v3', info: A },
        { name: 'other', info: A, conflicts: ['version:v2'] }, // own locks, also those of this very step, never conflict
      ]);
      assert.deepEqual(got, [B, undefined, undefined, B, undefined]);
      // What was refused was not taken; what was taken conflicts for others.
      assert.equal(await b.tryLock('remove:v1', B), undefined);
      await b.unlock('remove:v1', B.session);
      assert.deepEqual(await b.tryLock('hold:v2:session-b', B, ['remove:v2']), A);
      assert.deepEqual(await b.tryLock('version:v2', B), A);
      assert.deepEqual(await b.tryLock('x', B, ['other']), A);
      await a.unlockAll(['remove:v2', 'version:v2', 'not-held'], A.session);
      assert.equal(await b.tryLock('hold:v2:session-b', B, ['remove:v2']), undefined);
      assert.equal(await b.tryLock('version:v2', B), undefined);
      assert.deepEqual(await b.tryLock('x', B, ['other']), A, 'locks not named stay');
      assert.deepEqual(await a.tryLocks([]), []);
    });

    test('a hold and a removal of one version, started at the same moment: exactly one of them wins', async () => {
      const { url, store } = await fresh();
      await store.close(); // the two racing connections are the workers'
      const rounds = 60;
      const outcome = await raceHoldsAndRemovals(url, rounds);
      const wins = { hold: 0, removal: 0 };
      for (let round = 0; round < rounds; round++) {
        const { hold, removal } = outcome[round];
        assert.ok((hold === 'taken') !== (removal === 'taken'), `round ${round}: hold ${hold}, removal ${removal}`);
        if (hold === 'taken') wins.hold++;
        else wins.removal++;
      }
      // Both orders happened: the attempts really overlapped.
      assert.ok(wins.hold > 0 && wins.removal > 0, `holds won ${wins.hold} times, removals ${wins.removal} times`);
    });

    test('cleanup with grace: removal stamps, blobs wait, then are deleted; referenced blobs are never marked', async () => {
      const { store } = await fresh();
      const keep = await store.createVersion(newVersion(4 * BS));
      const gone = await store.createVersion(newVersion(4 * BS));
      const rk = await store.recordBlocks(keep.id, 's', [data(0, 'shared'), data(1, 'kept')]);
      const rg = await store.recordBlocks(gone.id, 's', [data(0, 'shared'), data(1, 'only-gone'), data(2, 'only-gone-2')]);
      await store.markUploaded([...rk, ...rg].map((r) => ({ id: r.blobId, storedSize: 10 })));
      const grace = 3600e3;
      let mark = await store.markForDeletion(grace, Date.now());
      assert.deepEqual(mark, { marked: 0, waiting: 0, referenced: 4 });
      await store.removeVersion(gone.id);
      const t0 = Date.now();
      mark = await store.markForDeletion(grace, t0);
      assert.deepEqual(mark, { marked: 0, waiting: 2, referenced: 2 });
      assert.deepEqual(await store.blobsToDelete(10), []);
      mark = await store.markForDeletion(grace, t0 + grace + 1000);
      assert.deepEqual(mark, { marked: 2, waiting: 0, referenced: 2 });
      const del = await store.blobsToDelete(10);
      assert.deepEqual(del.map((d) => d.id).sort((a, b) => a - b), [rg[1].blobId, rg[2].blobId].sort((a, b) => a - b));
      assert.deepEqual(del.map((d) => d.uid).sort(), [rg[1].uid, rg[2].uid].sort());
      assert.equal((await store.blobsToDelete(1)).length, 1);
      // A blob being deleted does not count, nor can it be reused: the same content gets a new blob.
      assert.equal((await store.repositoryStats()).blobs, 2);
      const again = await store.createVersion(newVersion(4 * BS));
      const ra = await store.recordBlocks(again.id, 's', [data(0, 'only-gone')]);
      assert.notEqual(ra[0].blobId, rg[1].blobId);
      assert.equal(ra[0].upload, true);
      const known = await store.knownBlobUids([rg[1].uid, rk[1].uid, 'f'.repeat(32)]);
      assert.deepEqual([...known].sort(), [rg[1].uid, rk[1].uid].sort());
      await store.forgetBlobs(del.map((d) => d.id));
      assert.deepEqual(await store.blobsToDelete(10), []);
      assert.deepEqual([...(await store.knownBlobUids([rg[1].uid, rg[2].uid]))], []);
      // The shared blob stayed: the kept version is intact.
      const kept = await store.getBlobs([rk[0].blobId, rk[1].blobId]);
      assert.equal(kept.size, 2);
    });

    test('cleanup with grace stamps unreferenced blobs it finds, a new reference clears the stamp', async () => {
      const { store } = await fresh();
      const v = await store.createVersion(newVersion(4 * BS));
      const r = await store.recordBlocks(v.id, 's', [data(0, 'p')]);
      await store.markUploaded([{ id: r[0].blobId, storedSize: 1 }]);
      await store.recordBlocks(v.id, 's', [{ index: 0, zero: true }]); // the block was overwritten: blob unreferenced
      const grace = 1000;
      assert.deepEqual(await store.markForDeletion(grace, 100), { marked: 0, waiting: 1, referenced: 0 });
      assert.deepEqual(await store.markForDeletion(grace, 600), { marked: 0, waiting: 1, referenced: 0 });
      await store.recordBlocks(v.id, 's', [data(1, 'p')]);
      assert.deepEqual(await store.markForDeletion(grace, 700), { marked: 0, waiting: 0, referenced: 1 });
      await store.recordBlocks(v.id, 's', [{ index: 1, zero: true }]);
      assert.deepEqual(await store.markForDeletion(grace, 800), { marked: 0, waiting: 1, referenced: 0 });
      assert.deepEqual(await store.markForDeletion(grace, 1700), { marked: 0, waiting: 1, referenced: 0 }, 'the stamp restarted at 800');
      assert.deepEqual(await store.markForDeletion(grace, 1800), { marked: 1, waiting: 0, referenced: 0 });
    });

    test('cleanup without grace deletes at once, but never a referenced or reserved blob', async () => {
      const { store } = await fresh();
      const v = await store.createVersion(newVersion(4 * BS));
      const gone = await store.createVersion(newVersion(4 * BS));
      const r = await store.recordBlocks(v.id, 's', [data(0, 'in-use')]); // reserved, upload still running
      const g = await store.recordBlocks(gone.id, 's', [data(0, 'dropped')]);
      await store.removeVersion(gone.id);
      assert.deepEqual(await store.markForDeletion(0, Date.now()), { marked: 1, waiting: 0, referenced: 1 });
      assert.deepEqual((await store.blobsToDelete(10)).map((b) => b.id), [g[0].blobId]);
      assert.equal((await store.getBlobs([r[0].blobId])).get(r[0].blobId)!.state, BlobState.Uploading);
    });

    test('cleanup racing with backups never marks a referenced blob', async () => {
      const { store, another } = await fresh();
      const backup = await another();
      const cleaner = await another();
      // Ballast: map chunks that make every cleanup scan take a while, so backups run while it looks.
      await store.createVersion(newVersion(1000 * MAP_CHUNK * BS));
      const scratch = await backup.createVersion(newVersion(32 * BS));
      let stop = false;
      let cleanups = 0;
      const loop = (async () => {
        while (!stop) {
          await cleaner.markForDeletion(0, Date.now());
          const del = await cleaner.blobsToDelete(1000);
          await cleaner.forgetBlobs(del.map((d) => d.id));
          cleanups++;
          await new Promise((r) => setTimeout(r, 5));
        }
      })();
      const kept: VersionRow[] = [];
      try {
        for (let round = 0; round < 30; round++) {
          // Fresh garbage: stored, then dropped from the scratch map (no blob row changes after the upload).
          const entries = Array.from({ length: 32 }, (_, i) => data(i, `g${round}-${i}`));
          const res = await backup.recordBlocks(scratch.id, 'scratch', entries);
          await backup.markUploaded(res.filter((x) => x.upload).map((x) => ({ id: x.blobId, storedSize: 1 })));
          await backup.recordBlocks(scratch.id, 'scratch', entries.map((e) => ({ index: e.index, zero: true })));
          // A backup deduplicates against the garbage, a few blocks at a time, while cleanup runs.
          const v = await backup.createVersion(newVersion(32 * BS));
          for (let i = 0; i < 32; i += 4) {
            const got = await backup.recordBlocks(v.id, `s${round}`, entries.slice(i, i + 4));
            await backup.markUploaded(got.filter((x) => x.upload).map((x) => ({ id: x.blobId, storedSize: 1 })));
          }
          kept.push(v);
        }
      } finally {
        stop = true;
        await loop;
      }
      assert.ok(cleanups > 0);
      for (const v of kept) {
        const m = await fullMap(store, v);
        const blobs = await store.getBlobs(m);
        for (const id of m) {
          const b = blobs.get(id);
          assert.ok(b, `blob ${id} of version ${v.uid} still exists`);
          assert.equal(b.state, BlobState.Live, `blob ${id} of version ${v.uid} is live`);
        }
      }
    });

    test('a differential version created while its base is removed keeps its blobs', async () => {
      const { store, another } = await fresh();
      const remover = await another();
      let created = 0;
      let refused = 0;
      for (let round = 0; round < 8; round++) {
        const base = await store.createVersion(newVersion(2 * MAP_CHUNK * BS));
        const r = await store.recordBlocks(base.id, 'b', Array.from({ length: 2 * MAP_CHUNK }, (_, i) => data(i, `r${round}-${i % 300}`)));
        await store.markUploaded(r.filter((x) => x.upload).map((x) => ({ id: x.blobId, storedSize: 1 })));
        const [diff] = await Promise.allSettled([
          store.createVersion(newVersion(2 * MAP_CHUNK * BS), { versionId: base.id, pending: [0] }),
          remover.removeVersion(base.id),
        ]);
        await remover.markForDeletion(0, Date.now());
        if (diff.status === 'rejected') {
          assert.match(String(diff.reason), /removed/);
          refused++;
          continue;
        }
        created++;
        const m = await fullMap(store, diff.value);
        const blobs = await store.getBlobs(m.filter((e) => e > 0));
        assert.equal(blobs.size, 300);
        for (const b of blobs.values()) assert.equal(b.state, BlobState.Live);
      }
      assert.equal(created + refused, 8);
    });

    test('blobUidPages, stats', async () => {
      const { store } = await fresh();
      const v = await store.createVersion(newVersion(10 * BS));
      const r = await store.recordBlocks(v.id, 's', Array.from({ length: 5 }, (_, i) => data(i, i)));
      const pages: { id: number; uid: string; state: BlobState }[][] = [];
      for await (const p of store.blobUidPages(2)) pages.push(p);
      assert.deepEqual(pages.map((p) => p.length), [2, 2, 1]);
      assert.deepEqual(pages.flat().map((b) => b.uid), r.map((x) => x.uid));
      assert.ok(pages.flat().every((b) => b.state === BlobState.Uploading));

      const row = (uid: string, date: number) => ({
        date, versionUid: uid, versionName: 'vm', versionSizeBytes: 2 ** 40, versionSizeBlocks: 262144, bytesRead: 1, blocksRead: 2,
        bytesWritten: 3, blocksWritten: 4, bytesDedup: 5, blocksDedup: 6, bytesSparse: 7, blocksSparse: 8, durationSeconds: 1.5,
      });
      await store.addStats(row('u1', 1000));
      await store.addStats(row('u2', 2000));
      await store.addStats(row('u1', 3000));
      assert.deepEqual(await store.listStats(), [row('u1', 1000), row('u2', 2000), row('u1', 3000)]);
      assert.deepEqual(await store.listStats('u1'), [row('u1', 1000), row('u1', 3000)]);
      assert.deepEqual(await store.listStats(undefined, 2), [row('u2', 2000), row('u1', 3000)]);
      assert.deepEqual(await store.listStats('u1', 1), [row('u1', 3000)]);
    });

    test('locks: conflicts, prefixes, reentrance, unlock, stale holders', async () => {
      const { another } = await fresh();
      const a = await another();
      const b = await another();
      const A = holder('session-a');
      const B = holder('session-b');
      assert.equal(await a.tryLock('version:1', A), undefined);
      assert.equal(await a.tryLock('version:1', A), undefined, 'the same session may take it again');
      assert.equal(await a.tryLock('backup:session-a', A, ['cleanup-full']), undefined);
      const h = await b.tryLock('version:1', B);
      assert.deepEqual(h, A);
      // Prefix and exact conflicts.
      assert.deepEqual(await b.tryLock('cleanup-full', B, ['backup:*']), A);
      assert.deepEqual(await b.tryLock('other', B, ['version:1']), A);
      assert.equal(await b.tryLock('other', B, ['version:2', 'backup:x*', 'cleanup']), undefined);
      assert.deepEqual(await a.tryLock('cleanup', A, ['other']), B);
      // A refused attempt leaves nothing behind.
      await b.unlock('other', B.session);
      assert.equal(await a.tryLock('cleanup-full', A, ['backup:*']), undefined, 'own locks never conflict');
      await a.unlock('cleanup-full', A.session);
      assert.equal(await b.tryLock('cleanup-full', B), undefined);
      await b.unlock('cleanup-full', B.session);
      // Unlock by the wrong session does nothing.
      await b.unlock('version:1', B.session);
      assert.deepEqual(await b.tryLock('version:1', B), A);
      await a.unlock('version:1', A.session);
      assert.equal(await b.tryLock('version:1', B), undefined);
      await b.unlock('version:1', B.session);

      await a.unlock('backup:session-a', A.session);

      // The holder dies without unlocking: its lock is stale and taken over, also through a prefix.
      const c = await another();
      const C = holder('session-c', deadPid());
      assert.equal(await c.tryLock('backup:session-c', C), undefined);
      assert.equal(await c.tryLock('version:9', C), undefined);
      await c.close();
      assert.equal(await b.tryLock('cleanup-full', B, ['backup:*']), undefined);
      assert.equal(await b.tryLock('version:9', B), undefined);
      // ... while a live backup lock still conflicts.
      await b.unlock('cleanup-full', B.session);
      assert.equal(await a.tryLock('backup:session-a', A), undefined);
      assert.deepEqual(await b.tryLock('cleanup-full', B, ['backup:*']), A);
    });

    test('listVersions of 10,000 versions is quick and complete', async () => {
      const { store, another } = await fresh();
      const writers = [store, await another(), await another(), await another()];
      const t0 = Date.now();
      await Promise.all(writers.map(async (w, k) => {
        for (let i = k; i < 10_000; i += writers.length) {
          await w.createVersion(newVersion(4 * 1024 ** 3, { blockSize: 4 * 1024 ** 2, name: `vm${i % 50}`, date: 1_700_000_000_000 + i, tags: i % 10 ? [] : ['weekly', 'b'] }));
        }
      }));
      const created = Date.now() - t0;
      const t1 = process.hrtime.bigint();
      const list = await store.listVersions();
      const ms = Number(process.hrtime.bigint() - t1) / 1e6;
      assert.equal(list.length, 10_000);
      assert.deepEqual(list.map((v) => v.date), [...list.map((v) => v.date)].sort((x, y) => x - y));
      assert.deepEqual(list[0].tags, ['b', 'weekly']);
      assert.deepEqual(list[1].tags, []);
      assert.equal(list[5].size, 4 * 1024 ** 3);
      assert.ok(ms < 1000, `listVersions took ${ms.toFixed(0)} ms`);
      console.log(`# ${engine.name}: created 10,000 versions in ${created} ms, listed in ${ms.toFixed(0)} ms`);
    });

    /** Runs SQL directly on the store's database (to look behind the interface). */
    async function sql(url: string, statement: string): Promise<Record<string, unknown>[]> {
      if (engine.name === 'postgresql') return pg!.query(statement, [], url.split('/').pop());
      const db = new Database(url.slice('sqlite:///'.length));
      try {
        const st = db.prepare(statement);
        return st.reader ? (st.all() as Record<string, unknown>[]) : (st.run(), []);
      } finally {
        db.close();
      }
    }

    /** du by definition, from every entry of every map (what computeUsage must agree with). */
    async function bruteDu(url: string, store: MetaStore): Promise<Map<string, Omit<VersionUsage, 'version'>>> {
      const blobs = new Map((await sql(url, 'SELECT id, size, stored_size FROM blobs WHERE state <> 3')).map((r) => [Number(r.id), [Number(r.size), Number(r.stored_size)]]));
      const own = new Map<string, Map<number, number>>();
      const total = new Map<number, number>();
      const out = new Map<string, Omit<VersionUsage, 'version'>>();
      for (const v of await store.listVersions()) {
        const m = await fullMap(store, v);
        const counts = new Map<number, number>();
        const row = { real: 0, null: 0, dedupOwn: 0, dedupOthers: 0, individual: 0, estSpace: 0, estSpaceFreed: 0, storedFreed: 0, estStored: 0 };
        m.forEach((e, i) => {
          const len = Math.min(v.blockSize, v.size - i * v.blockSize);
          if (e === HOLE) row.null += len;
          else if (e > 0) { counts.set(e, (counts.get(e) ?? 0) + 1); total.set(e, (total.get(e) ?? 0) + 1); row.real += blobs.get(e)![0]; }
        });
        own.set(v.uid, counts);
        out.set(v.uid, row);
      }
      for (const [uid, counts] of own) {
        const row = out.get(uid)!;
        let exclusiveUses = 0;
        for (const [id, c] of counts) {
          const [size, stored] = blobs.get(id)!;
          row.estSpace += (size * c) / total.get(id)!;
          row.estStored += (stored * c) / total.get(id)!;
          if (c !== total.get(id)) continue;
          if (c === 1) row.individual += size;
          else row.dedupOwn += size * (c - 1);
          row.estSpaceFreed += size;
          row.storedFreed += stored;
          exclusiveUses += size * c;
        }
        row.dedupOthers = row.real - exclusiveUses;
      }
      return out;
    }

    test('du from mapUsage (chunks of roots, deltas of the rest) agrees with a count over every map', async () => {
      const { url, store } = await fresh();
      const n = 3 * MAP_CHUNK + 7;
      const size = n * BS - 100;
      let seq = 0;
      /** A complete version: `base` copied with `changes` (index -> content, null = hole), or all of `fill`. */
      async function version(name: string, opts: { base?: VersionRow; changes?: Map<number, string | null>; fill?: (i: number) => string | null; size?: number; complete?: boolean }): Promise<VersionRow> {
        const vsize = opts.size ?? size;
        const blocks = blockCount(vsize, BS);
        const changes = opts.changes ?? new Map(Array.from({ length: blocks }, (_, i) => [i, opts.fill!(i)] as [number, string | null]));
        const v = await store.createVersion(newVersion(vsize, { name, baseUid: opts.base?.uid ?? null }), opts.base ? { versionId: opts.base.id, pending: changes.keys() } : undefined);
        const entries: BlockEntry[] = [...changes].map(([i, c]) => (c === null ? { index: i, zero: true } : data(i, c, i === blocks - 1 ? vsize - (blocks - 1) * BS : BS)));
        const r = await store.recordBlocks(v.id, `s${++seq}`, entries);
        await store.markUploaded([...new Set(r.filter((x) => x.upload).map((x) => x.blobId))].map((id) => ({ id, storedSize: 1000 + (id % 97) })));
        if (opts.complete !== false) await store.updateVersion(v.id, { complete: true, valid: true });
        return (await store.getVersion(v.uid))!;
      }
      const change = (pairs: [number, string | null][]) => new Map(pairs);
      const v1 = await version('vm1', { fill: (i) => (i < MAP_CHUNK ? null : i < 2 * MAP_CHUNK ? `r${i % 3}` : `a${i}`) });
      const v2 = await version('vm1', { base: v1, changes: change([[5, 'x'], [MAP_CHUNK + 1, null], [2 * MAP_CHUNK, 'r1'], [n - 1, 'tail2'], [2 * MAP_CHUNK + 3, 'x']]) });
      const v3 = await version('vm1', { base: v2, changes: change([[6, 'y'], [2 * MAP_CHUNK + 4, 'only-v3'], [2 * MAP_CHUNK + 5, 'only-v3']]) });
      // A full backup (no -f) of almost the same data: its delta is against v3, the newest of its name.
      const v4 = await version('vm1', { fill: (i) => (i === 7 ? 'z' : i < MAP_CHUNK ? (i === 5 ? 'x' : i === 6 ? 'y' : null) : i === MAP_CHUNK + 1 ? null
        : i < 2 * MAP_CHUNK ? `r${i % 3}` : i === 2 * MAP_CHUNK ? 'r1' : i === 2 * MAP_CHUNK + 3 ? 'x' : i === 2 * MAP_CHUNK + 4 || i === 2 * MAP_CHUNK + 5 ? 'only-v3' : i === n - 1 ? 'tail2' : `a${i}`) });
      const v5 = await version('vm2', { fill: (i) => (i % 2 ? `a${i}` : null) }); // another name: a root
      const v6 = await version('vm1', { base: v1, size: size + 3 * BS, changes: change([[n - 1, 'g1'], [n, 'g2'], [n + 1, 'g3'], [n + 2, null]]) }); // grown: a root
      const v7 = await version('vm1', { base: v3, changes: change([[0, 'running']]), complete: false }); // running: a root
      const v8 = await version('vm1', { base: v4, changes: new Map(Array.from({ length: n }, (_, i) => [i, `new${i}`] as [number, string])) }); // all changed: a root

      async function agree(label: string): Promise<void> {
        const { rows } = computeUsage(await store.listVersions(), await store.mapUsage());
        const expected = await bruteDu(url, store);
        assert.equal(rows.length, expected.size, label);
        for (const r of rows) {
          const e = expected.get(r.version.uid)!;
          const got = { ...r } as Partial<VersionUsage>;
          delete got.version;
          for (const k of ['estSpace', 'estStored'] as const) {
            assert.ok(Math.abs(got[k]! - e[k]) <= 1, `${label}: ${k} of ${r.version.uid}: ${got[k]} vs ${e[k]}`);
            got[k] = e[k];
          }
          assert.deepEqual(got, e, `${label}: ${r.version.uid}`);
        }
      }
      const deltas = async () => {
        const u = await store.mapUsage();
        return [v1, v2, v3, v4, v5, v6, v7, v8].map((v) => u.summaries.get(v.id)?.delta?.base ?? null);
      };
      assert.deepEqual(await deltas(), [null, v1.id, v2.id, v3.id, null, null, null, null]);
      await agree('all versions');
      // The middle of a chain goes: v3 becomes a root, v4 still builds on v3.
      await store.removeVersion(v2.id);
      await agree('v2 removed');
      await store.removeVersion(v1.id);
      await agree('v1 removed');
      // Summaries recomputed on first use (after an upgrade) get their deltas again.
      await sql(url, 'DELETE FROM map_summaries');
      assert.deepEqual((await deltas()).filter((_, k) => k >= 2), [null, v3.id, null, null, null, null]);
      await agree('summaries recomputed');
    });

    test('mapUsage: versions as counts of distinct chunks, kept for complete versions, blob sizes; schema 1 migrates', async () => {
      const { url, store } = await fresh();
      const n = 3 * MAP_CHUNK + 7;
      // v1: chunk 0 all holes, chunk 1 the same 4 blocks over and over, chunks 2 and 3 distinct blocks.
      const v1 = await store.createVersion(newVersion(n * BS - 100));
      const entries: BlockEntry[] = [];
      for (let i = 0; i < n; i++) entries.push(i < MAP_CHUNK ? { index: i, zero: true } : i < 2 * MAP_CHUNK ? data(i, `r${i % 4}`) : data(i, `u${i}`, i === n - 1 ? BS - 100 : BS));
      const r1 = await store.recordBlocks(v1.id, 's1', entries);
      await store.markUploaded([...new Set(r1.map((r) => r.blobId))].map((id) => ({ id, storedSize: 100 + id })));
      await store.updateVersion(v1.id, { complete: true, valid: true });
      // v2: a copy of v1 with one block of chunk 2 changed; v3: running, a hole and a pending rest.
      const v2 = await store.createVersion(newVersion(n * BS - 100), { versionId: v1.id, pending: [2 * MAP_CHUNK + 5] });
      const r2 = await store.recordBlocks(v2.id, 's2', [data(2 * MAP_CHUNK + 5, 'changed')]);
      await store.markUploaded([{ id: r2[0].blobId, storedSize: 7 }]);
      await store.updateVersion(v2.id, { complete: true, valid: true });
      const v3 = await store.createVersion(newVersion(10 * BS));
      await store.recordBlocks(v3.id, 's3', [{ index: 0, zero: true }, data(1, 'r1')]);

      /** The summary and contents (read for roots: versions without a usable delta) agree with every chunk. */
      async function check(usage: Awaited<ReturnType<MetaStore['mapUsage']>>, v: VersionRow): Promise<void> {
        const s = usage.summaries.get(v.id)!;
        assert.ok(s, `summary of ${v.uid}`);
        if (s.delta && usage.summaries.has(s.delta.base)) return;
        const fromChunks = new Map<string, number>();
        for (let c = 0; c < chunkCount(blockCount(v.size, v.blockSize)); c++) {
          const k = JSON.stringify([...(await store.readMapChunk(v.id, c))]);
          fromChunks.set(k, (fromChunks.get(k) ?? 0) + 1);
        }
        const fromSummary = new Map<string, number>();
        for (const ch of s.chunks) {
          const raw = usage.contents.get(ch.digest)!;
          assert.equal(chunkDigest(raw), ch.digest);
          const k = JSON.stringify([...(await store.readMapChunk(v.id, ch.chunk))]);
          assert.equal(k, JSON.stringify([...decodeChunkOf(raw)]), 'the first chunk named has that content');
          fromSummary.set(k, ch.count);
        }
        assert.deepEqual(fromSummary, fromChunks);
        const lastChunk = chunkCount(blockCount(v.size, v.blockSize)) - 1;
        assert.equal(JSON.stringify([...decodeChunkOf(usage.contents.get(s.last)!)]), JSON.stringify([...(await store.readMapChunk(v.id, lastChunk))]));
      }
      const usage = await store.mapUsage();
      assert.deepEqual([...usage.summaries.keys()].sort(), [v1.id, v2.id, v3.id].sort());
      for (const v of [v1, v2, v3]) await check(usage, v);
      const s1 = usage.summaries.get(v1.id)!;
      const s2 = usage.summaries.get(v2.id)!;
      assert.equal(s1.chunks.length, 4);
      assert.deepEqual(s2.chunks.map((c) => c.digest).filter((d) => !s1.chunks.some((x) => x.digest === d)).length, 1, 'v2 shares 3 of its 4 chunks with v1');
      // v2 is v1 with one block changed: its delta, and its chunks are not read.
      const replaced = r1.find((r) => r.index === 2 * MAP_CHUNK + 5)!.blobId;
      assert.deepEqual(s2.delta, { base: v1.id, ids: [r2[0].blobId, replaced], counts: [1, -1] });
      assert.equal(s1.delta, undefined);
      assert.equal(usage.contents.size, 4 + 1, 'v1: 4, v3 (running, no delta): its one chunk');
      const sizes = new Map([...usage.blobs.ids].map((id, k) => [id, [usage.blobs.sizes[k], usage.blobs.stored[k]]]));
      assert.equal(sizes.size, 4 + (n - 2 * MAP_CHUNK) + 1);
      assert.deepEqual(sizes.get(r2[0].blobId), [BS, 7]);
      assert.deepEqual(sizes.get(r1[r1.length - 1].blobId), [BS - 100, 100 + r1[r1.length - 1].blobId]);

      // Complete versions have their summary stored; the running one not.
      const stored = async () => (await sql(url, 'SELECT version_id FROM map_summaries ORDER BY version_id')).map((r) => Number(r.version_id));
      assert.deepEqual(await stored(), [v1.id, v2.id]);
      // Lost summaries (a database migrated from schema 1) are computed on first use, then kept.
      await sql(url, 'DELETE FROM map_summaries');
      const again = await store.mapUsage();
      for (const v of [v1, v2, v3]) await check(again, v);
      assert.deepEqual(await stored(), [v1.id, v2.id]);
      // The running version completes: its summary follows its final map.
      await store.recordBlocks(v3.id, 's3', Array.from({ length: 8 }, (_, k) => data(k + 2, `r${k % 4}`)));
      await store.updateVersion(v3.id, { complete: true, valid: true });
      await check(await store.mapUsage(), (await store.getVersion(v3.uid))!);
      assert.deepEqual(await stored(), [v1.id, v2.id, v3.id]);
      // Removing v1 (read through its summary: 4 of its chunks) stamps every blob it used that v2 (its successor,
      // a delta against it) no longer uses, and removes its summary; v2's chunks are still found (through v2).
      const inV2 = new Set(await fullMap(store, v2));
      await store.removeVersion(v1.id);
      const stamped = new Set((await sql(url, 'SELECT id FROM blobs WHERE unref_since IS NOT NULL')).map((r) => Number(r.id)));
      assert.deepEqual([...stamped].sort((a, b) => a - b), [...new Set(r1.map((r) => r.blobId))].filter((id) => !inV2.has(id)).sort((a, b) => a - b),
        'the blobs of v1 that v2 does not use are stamped, no others');
      assert.ok(stamped.has(replaced));
      const after = await store.mapUsage();
      assert.deepEqual(await stored(), [v2.id, v3.id]);
      await check(after, v2);

      // A database of schema 1 (no map_summaries, nor what schemas 3 and 4 added) is migrated on open.
      await sql(url, 'DROP TABLE map_summaries');
      await sql(url, 'DROP INDEX IF EXISTS blobs_sizes');
      for (const s of undoSchema3(engine.name === 'sqlite' ? 'sqlite' : 'postgresql')) await sql(url, s);
      await sql(url, `UPDATE settings SET value = '1' WHERE key = 'schema_version'`);
      const reopened = createMetaStore(url);
      opened.push(reopened);
      await reopened.open();
      assert.equal(await reopened.getSetting('schema_version'), String(SCHEMA_VERSION));
      await check(await reopened.mapUsage(), v2);
      assert.deepEqual(await stored(), [v2.id, v3.id]);
    });
  });
}

describe('PostgreSQL specifics', () => {
  test('a 1 TiB version is 256 chunk rows, and a differential copy of it is quick', async () => {
    const url = await pg!.createDatabase();
    const store = createMetaStore(url);
    try {
      await store.initdb();
      const size = 2 ** 40;
      const base = await store.createVersion(newVersion(size, { blockSize: 4 * 1024 ** 2 }));
      const rows = await pg!.query<{ n: number }>(`SELECT count(*)::int AS n FROM block_maps WHERE version_id = $1`, [base.id], url.split('/').pop());
      assert.equal(rows[0].n, 256);
      const t0 = Date.now();
      const diff = await store.createVersion(newVersion(size, { blockSize: 4 * 1024 ** 2 }), { versionId: base.id, pending: Array.from({ length: 300 }, (_, i) => i * 800) });
      assert.ok(Date.now() - t0 < 2000);
      assert.equal((await store.readMapChunk(diff.id, 255)).length, 1024);
    } finally {
      await store.close();
    }
  });

  test('lock of a holder on another host is released when its connection closes', async () => {
    const url = await pg!.createDatabase();
    const a = createMetaStore(url);
    const b = createMetaStore(url);
    try {
      await a.initdb();
      await b.open();
      const far = holder('far', 4242, 'another-host.example');
      assert.equal(await a.tryLock('version:x', far), undefined);
      assert.deepEqual(await b.tryLock('version:x', holder('near')), far);
      await a.close();
      assert.equal(await b.tryLock('version:x', holder('near')), undefined);
    } finally {
      await a.close();
      await b.close();
    }
  });

  test('connection problems are one clear line without the password', async () => {
    const refused = createMetaStore(`postgresql://postgres:topsecret@127.0.0.1:1/nope`);
    await assert.rejects(refused.open(), (e: unknown) => e instanceof DatabaseError && /connection refused/.test((e as Error).message) && !/topsecret/.test((e as Error).message));
    assert.ok(!refused.description.includes('topsecret'));
    await refused.close();

    const missing = createMetaStore(pg!.url('no_such_db'));
    await assert.rejects(missing.open(), (e: unknown) => e instanceof DatabaseError && /database "no_such_db" does not exist/.test((e as Error).message));
    await missing.close();

    await pg!.query(`CREATE ROLE backy_pw LOGIN PASSWORD 'right-password'`);
    const wrong = createMetaStore(`postgresql://backy_pw:wrong-password@127.0.0.1:${pg!.port}/postgres`);
    await assert.rejects(wrong.open(), (e: unknown) => e instanceof DatabaseError && /refused the password of user "backy_pw"/.test((e as Error).message) && !/wrong-password/.test((e as Error).message));
    await wrong.close();
  });

  test('a terminated connection fails the operation clearly; locks held by it are released', async () => {
    const url = await pg!.createDatabase();
    const db = url.split('/').pop()!;
    const a = createMetaStore(url);
    const b = createMetaStore(url);
    try {
      await a.initdb();
      await b.open();
      const v = await a.createVersion(newVersion(8 * BS));
      assert.equal(await a.tryLock(`version:${v.uid}`, holder('sa')), undefined);
      assert.deepEqual((await b.tryLock(`version:${v.uid}`, holder('sb')))?.session, 'sa');
      assert.ok((await pg!.terminateConnections(db)) >= 2);
      await new Promise((r) => setTimeout(r, 200));
      await assert.rejects(a.recordBlocks(v.id, 'sa', [data(0, 'q')]), (e: unknown) => e instanceof DatabaseError && /lost the connection to PostgreSQL/.test((e as Error).message));
      await a.unlock(`version:${v.uid}`, 'sa'); // nothing to release: no second error
      assert.equal(await b.tryLock(`version:${v.uid}`, holder('sb')), undefined, 'the lock died with its connection');
    } finally {
      await a.close();
      await b.close();
    }
  });
});
