/**
 * The MetaStore contract of issue 11 on both engines: versions imported with their maps and blobs in foreign
 * (backy2) formats, dedup of new backups against them, their cleanup, the generation counters the triggers
 * keep for the metadata copies in storage, and the migration of a schema-1 database.
 */
import { after, before, describe, test } from 'node:test';
import * as assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { createHash, randomUUID } from 'node:crypto';
import Database from 'better-sqlite3';
import { HOLE, PENDING } from '../src/meta/block-map';
import { createMetaStore } from '../src/meta/open';
import { SCHEMA_V1, SCHEMA_VERSION } from '../src/meta/schema';
import { BlobFormat, BlobState, IMPORT_HOLE, IMPORT_PENDING, ImportBlob, ImportVersion, MetaStore, newBlobRef } from '../src/meta/types';
import { entriesOf } from '../src/meta/version-record';
import { DatabaseError } from '../src/util/errors';
import { startPostgres, TestPostgres } from './helpers/postgres';

const BS = 4096;
const sum = (x: string) => createHash('sha512').update(x).digest();
let serial = 0;
/** A valid-looking backy2 blob uid (md5 prefix of a base57 suffix). */
function b2uid(): string {
  const alphabet = '23456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz';
  let s = '';
  let n = ++serial * 7919 + Date.now();
  for (let i = 0; i < 22; i++) { s += alphabet[n % 57]; n = Math.floor(n / 57) + i * 31; }
  return createHash('md5').update(s).digest('hex').slice(0, 10) + s;
}

function foreign(content: string, over: Partial<ImportBlob> = {}): ImportBlob {
  return { uid: b2uid(), checksum: sum(content), size: BS, format: BlobFormat.Backy2Plain, keyInfo: null, storedSize: BS, bad: false, ...over };
}

function version(blocks: number, over: Partial<ImportVersion> = {}): ImportVersion {
  return { uid: randomUUID(), name: 'vm', snapshotName: 's', date: Date.now(), size: blocks * BS, blockSize: BS, expire: null,
    baseUid: null, tags: [], valid: true, complete: true, protected: false, ...over };
}

/** importVersion with every blob passed as a new one (an index map over `blobs`), returning their ids. */
async function importAll(store: MetaStore, v: ImportVersion, blobs: ImportBlob[], map: Int32Array, opts?: { blockDates?: Buffer; synced?: boolean }) {
  const r = await store.importVersion(v, entriesOf(map), blobs, opts);
  return { ...r, blobIds: r.newIds };
}

async function mapOf(store: MetaStore, id: number): Promise<number[]> {
  return [...(await store.readMapChunk(id, 0))];
}

let pg: TestPostgres;
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'backy-meta-foreign-'));
before(async () => { pg = await startPostgres(); });
after(async () => {
  await pg?.stop();
  fs.rmSync(tmp, { recursive: true, force: true });
});

const engines = [
  { name: 'sqlite', fresh: async () => `sqlite:///${path.join(tmp, `${randomUUID()}.sqlite`)}` },
  { name: 'postgresql', fresh: () => pg.createDatabase() },
];

for (const engine of engines) {
  describe(`foreign blobs and storage metadata on ${engine.name}`, () => {
    const opened: MetaStore[] = [];
    after(async () => { for (const s of opened) await s.close().catch(() => undefined); });
    async function fresh(): Promise<MetaStore> {
      const store = createMetaStore(await engine.fresh());
      opened.push(store);
      assert.equal(await store.initdb(), true);
      return store;
    }

    test('importVersion: maps, holes, duplicate-content blobs, shared blobs found by uid, block dates', async () => {
      const store = await fresh();
      const a1 = foreign('a');
      const a2 = foreign('a'); // the same content in a second blob, as backy2's racing writers left it
      const key = Buffer.alloc(56, 7);
      const b = foreign('b', { format: BlobFormat.Backy2Aes, keyInfo: key, storedSize: 0 });
      const v1 = version(5, { tags: ['x', 'y'], protected: true, expire: 5000 });
      const r1 = await importAll(store, v1, [a1, a2, b], Int32Array.from([0, IMPORT_HOLE, 1, 2, IMPORT_PENDING]), { blockDates: Buffer.from([1, 2, 3]) });
      assert.equal(new Set(r1.blobIds).size, 3);
      assert.deepEqual(await mapOf(store, r1.version.id), [r1.blobIds[0], HOLE, r1.blobIds[1], r1.blobIds[2], PENDING]);
      const got = await store.getVersion(v1.uid);
      assert.deepEqual([got!.valid, got!.complete, got!.protected, got!.expire, got!.tags], [true, true, true, 5000, ['x', 'y']]);
      assert.deepEqual(await store.getBlockDates(r1.version.id), Buffer.from([1, 2, 3]));
      const refs = await store.getBlobs(r1.blobIds);
      assert.equal(refs.get(r1.blobIds[2])!.format, BlobFormat.Backy2Aes);
      assert.deepEqual(refs.get(r1.blobIds[2])!.keyInfo, key);
      assert.equal(refs.get(r1.blobIds[0])!.keyInfo, null);

      // A second version naming the same uids (a later backy2 version) shares the blobs; a bad one stays bad.
      const c = foreign('c', { bad: true });
      const r2 = await importAll(store, version(3), [{ ...a2 }, { ...b }, c], Int32Array.from([0, 1, 2]));
      assert.deepEqual(r2.blobIds.slice(0, 2), [r1.blobIds[1], r1.blobIds[2]]);
      assert.equal((await store.getBlobs([r2.blobIds[2]])).get(r2.blobIds[2])!.state, BlobState.Bad);
      // The same uid with other content is refused, and nothing of that version remains.
      const clash = version(1);
      await assert.rejects(importAll(store, clash, [{ ...a1, checksum: sum('other') }], Int32Array.from([0])), DatabaseError);
      assert.equal(await store.getVersion(clash.uid), undefined);
      assert.equal(await store.getBlockDates(r2.version.id), undefined);
      await assert.rejects(importAll(store, version(2), [a1], Int32Array.from([0])), DatabaseError, 'map length must match the size');
    });

    test('importVersion by known ids and new references; blob packs recorded, looked up, and found unused', async () => {
      const store = await fresh();
      const a = foreign('pa', { metaPack: 'p'.repeat(32), metaIndex: 3 });
      const r1 = await store.importVersion(version(2), Float64Array.from([newBlobRef(0), HOLE]), [a]);
      const [idA] = r1.newIds;
      const got = (await store.getBlobs([idA])).get(idA)!;
      assert.deepEqual([got.metaPack, got.metaIndex], ['p'.repeat(32), 3]);
      const b = foreign('pb');
      const r2 = await store.importVersion(version(3), Float64Array.from([idA, newBlobRef(0), PENDING]), [b]);
      const idB = r2.newIds[0];
      assert.deepEqual(await mapOf(store, r2.version.id), [idA, idB, PENDING]);
      assert.equal((await store.getBlobs([idB])).get(idB)!.metaPack, null);
      await store.setBlobPacks('q'.repeat(32), [idB, idA]);
      const both = await store.getBlobs([idA, idB]);
      assert.deepEqual([both.get(idB)!.metaPack, both.get(idB)!.metaIndex, both.get(idA)!.metaIndex], ['q'.repeat(32), 0, 1]);
      assert.deepEqual(await store.packsOf([idA, idB]), ['q'.repeat(32)]);
      assert.deepEqual(await store.unusedPacks(['p'.repeat(32), 'q'.repeat(32)]), ['p'.repeat(32)]);
      await store.removeVersion(r1.version.id);
      await store.removeVersion(r2.version.id);
      await store.markForDeletion(0, Date.now());
      const del = await store.blobsToDelete(10);
      await store.forgetBlobs(del.map((d) => d.id));
      assert.deepEqual(await store.unusedPacks(['q'.repeat(32)]), ['q'.repeat(32)]);
    });

    test('backups deduplicate against live foreign blobs, never take over a bad one', async () => {
      const store = await fresh();
      const live = foreign('live');
      const bad = foreign('bad', { bad: true });
      const imp = await importAll(store, version(2), [live, bad], Int32Array.from([0, 1]));
      const v = await store.createVersion({ uid: randomUUID(), name: 'vm', snapshotName: '', date: Date.now(), size: 3 * BS, blockSize: BS, expire: null, baseUid: null, tags: [] });
      const r = await store.recordBlocks(v.id, 'sess', [
        { index: 0, checksum: sum('live'), size: BS },
        { index: 1, checksum: sum('bad'), size: BS },
        { index: 2, checksum: sum('live'), size: BS },
      ]);
      assert.deepEqual(r.map((x) => [x.blobId === imp.blobIds[0], x.upload]), [[true, false], [false, true], [true, false]]);
      assert.notEqual(r[1].blobId, imp.blobIds[1]);
      assert.match(r[1].uid, /^[0-9a-f]{32}$/, 'the new upload is a backy blob');
      const refs = await store.getBlobs([r[1].blobId, imp.blobIds[1]]);
      assert.equal(refs.get(r[1].blobId)!.format, BlobFormat.Backy);
      assert.equal(refs.get(imp.blobIds[1])!.state, BlobState.Bad, 'the foreign blob was not taken over');
    });

    test('cleanup frees foreign blobs only when no version references them, and reports their format', async () => {
      const store = await fresh();
      const shared = foreign('shared');
      const own = foreign('own', { format: BlobFormat.Backy2Aes, keyInfo: Buffer.alloc(56) });
      const keep = await importAll(store, version(1), [shared], Int32Array.from([0]));
      const gone = await importAll(store, version(2), [{ ...shared }, own], Int32Array.from([0, 1]));
      await store.removeVersion(gone.version.id);
      assert.deepEqual(await store.markForDeletion(0, Date.now()), { marked: 1, waiting: 0, referenced: 1 });
      assert.deepEqual(await store.blobsToDelete(10), [{ id: gone.blobIds[1], uid: own.uid, format: BlobFormat.Backy2Aes }]);
      assert.equal(keep.blobIds[0], gone.blobIds[0]);
    });

    test('metadata generations: changes mark a complete version stale, removals are remembered', async () => {
      const store = await fresh();
      const imp = await importAll(store, version(1, { tags: ['t'] }), [foreign('m')], Int32Array.from([0]), { synced: true });
      assert.deepEqual(await store.staleStorageMeta(10), [], 'synced on import');
      const uid = imp.version.uid;
      const stale = async () => (await store.staleStorageMeta(10)).map((s) => s.uid);
      await store.addTags(imp.version.id, ['u']);
      let s = await store.staleStorageMeta(10);
      assert.deepEqual(s.map((x) => x.uid), [uid]);
      assert.ok(s[0].metaGen > imp.metaGen);
      await store.markStorageMetaSynced(uid, s[0].metaGen);
      assert.deepEqual(await stale(), []);
      await store.markStorageMetaSynced(uid, s[0].metaGen - 1); // an older writer finishing late changes nothing
      assert.deepEqual(await stale(), []);
      for (const change of [
        () => store.removeTags(imp.version.id, ['t']),
        () => store.updateVersion(imp.version.id, { expire: 77 }),
        () => store.updateVersion(imp.version.id, { protected: true }),
        () => store.updateVersion(imp.version.id, { valid: false }),
      ]) {
        await change();
        s = await store.staleStorageMeta(10);
        assert.deepEqual(s.map((x) => x.uid), [uid]);
        await store.markStorageMetaSynced(uid, s[0].metaGen);
      }
      await store.updateVersion(imp.version.id, { valid: false }); // no change: no new generation
      assert.deepEqual(await stale(), []);
      // Running backups are never listed; they become stale when complete.
      const v = await store.createVersion({ uid: randomUUID(), name: 'vm', snapshotName: '', date: Date.now(), size: BS, blockSize: BS, expire: null, baseUid: null, tags: ['a'] });
      assert.deepEqual(await stale(), []);
      await store.updateVersion(v.id, { complete: true, valid: true });
      assert.deepEqual(await stale(), [v.uid]);
      await store.removeVersion(v.id);
      await store.updateVersion(imp.version.id, { protected: false });
      await store.removeVersion(imp.version.id);
      assert.deepEqual(await stale(), []);
      assert.deepEqual((await store.removedStorageMeta(10)).sort(), [uid, v.uid].sort());
      await store.forgetRemovedStorageMeta([uid]);
      assert.deepEqual(await store.removedStorageMeta(10), [v.uid]);
      assert.equal(await store.isEmpty(), false, 'blobs remain until cleanup');
    });
  });
}

describe('migration of a schema-1 database', () => {
  const old = [
    `INSERT INTO settings (key, value) VALUES ('schema_version', '1')`,
    `INSERT INTO versions (uid, name, date, size, block_size, valid, complete) VALUES ('old-1', 'vm', 1, 4096, 4096, 1, 1)`,
    `INSERT INTO tags (version_id, name) VALUES (1, 'keep')`,
  ];
  async function check(url: string): Promise<void> {
    const store = createMetaStore(url);
    try {
      await store.open();
      assert.equal(await store.getSetting('schema_version'), String(SCHEMA_VERSION));
      assert.deepEqual((await store.staleStorageMeta(10)).map((s) => s.uid), ['old-1']);
      assert.deepEqual((await store.getVersion('old-1'))!.tags, ['keep']);
      const blob = (await store.getBlobs([1])).get(1)!;
      assert.equal(blob.format, BlobFormat.Backy);
      assert.equal(blob.keyInfo, null);
      // The triggers work on the migrated schema too.
      await store.markStorageMetaSynced('old-1', (await store.staleStorageMeta(10))[0].metaGen);
      await store.addTags(1, ['new']);
      assert.deepEqual((await store.staleStorageMeta(10)).map((s) => s.uid), ['old-1']);
    } finally {
      await store.close();
    }
  }

  test('sqlite: adds the columns, keeps the data, makes every complete version stale once', async () => {
    const file = path.join(tmp, 'old.sqlite');
    const db = new Database(file);
    for (const s of SCHEMA_V1) db.exec(s.replace(/\{autoid\}/g, 'INTEGER PRIMARY KEY AUTOINCREMENT').replace(/\{blob\}/g, 'BLOB'));
    for (const s of old) db.exec(s);
    db.prepare(`INSERT INTO blobs (uid, checksum, size, state, created) VALUES (?, ?, 4096, 1, 1)`).run('a'.repeat(32), sum('x'));
    db.close();
    await check(`sqlite:///${file}`);
  });

  test('postgresql: the same', async () => {
    const url = await pg.createDatabase();
    const name = url.split('/').pop()!;
    for (const s of SCHEMA_V1) await pg.query(s.replace(/\{autoid\}/g, 'BIGSERIAL PRIMARY KEY').replace(/\{blob\}/g, 'BYTEA'), [], name);
    for (const s of old) await pg.query(s, [], name);
    await pg.query(`INSERT INTO blobs (uid, checksum, size, state, created) VALUES ($1, $2, 4096, 1, 1)`, ['a'.repeat(32), sum('x')], name);
    await check(url);
  });
});
