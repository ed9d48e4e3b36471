/**
 * The parts of issue 11 on their own: backy2's CSV dialect against Python's csv module itself, backy2's blob
 * formats on the fixture's real blobs (and damaged or crafted ones), storage keys of foreign uids, block
 * dates, version records, sealed metadata objects, and backy2's global lock.
 */
import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { execFileSync, spawnSync } from 'node:child_process';
import { createCipheriv, createHash, randomBytes } from 'node:crypto';
import * as os from 'node:os';
import { compress } from 'zstd-napi';
import { csvRow, csvRows } from '../src/backy2/csv';
import { holdBacky2GlobalLock } from '../src/backy2/locks';
import { decodeBacky2Blob, makeKeyInfo, unwrapDataKey, wrapDataKey } from '../src/codec/backy2-blob';
import { openObject, sealObject } from '../src/codec/sealed-object';
import { decodeBlockDates, encodeBlockDates } from '../src/meta/block-dates';
import { BlobFormat } from '../src/meta/types';
import { decodePack, decodeVersionObject, encodePack, encodeVersionObject, PACK_HOLE, PACK_PENDING, VersionObject } from '../src/meta/storage-format';
import { isBacky2Uid, storageKey, uidOfKey } from '../src/storage/blob-keys';
import { InvalidBlobUidError } from '../src/storage/types';
import { expected, FIXTURES } from './helpers/backy2-fixture';

const exp = expected();
const master = Buffer.from(exp.key_hex, 'hex');
const sha512 = (b: Buffer) => createHash('sha512').update(b).digest();

test('CSV rows are written exactly as Python\'s csv module writes them, and read back', () => {
  const rows = [['plain', 'a,b', 'say "hi"', 'two\nlines', 'cr\rhere', '', ' spaced '], [''], ['x', ''], ['ünï', 'ok']];
  const py = execFileSync('python3', ['-c', 'import csv,json,sys\nw=csv.writer(sys.stdout,delimiter=",",quotechar=\'"\',quoting=csv.QUOTE_MINIMAL)\nfor r in json.load(sys.stdin): w.writerow(r)'],
    { input: JSON.stringify(rows) }).toString();
  assert.equal(rows.map(csvRow).join(''), py);
  assert.deepEqual([...csvRows(py)].filter((r) => !(r.length === 1 && r[0] === '')), rows.filter((r) => !(r.length === 1 && r[0] === '')));
});

test('backy2 v1 blobs of the fixture decode with the re-wrapped key; damage, another blob\'s nonce, another key fail', () => {
  const v = exp.repositories.R1.versions[0];
  const csv = fs.readFileSync(path.join(FIXTURES, v.export_csv), 'utf8');
  const row = [...csvRows(csv)].find((r) => r[0] === 'abbfb9dfc1URWZQwDp529bEznKhzJeJ3')!;
  const envkey = Buffer.from(row[8], 'hex');
  const nonce = Buffer.from(row[9], 'hex');
  const blob = fs.readFileSync(path.join(FIXTURES, 'R1/data/ab/bf/abbfb9dfc1URWZQwDp529bEznKhzJeJ3.blob'));
  const sum = Buffer.from(row[4], 'hex');
  // backy2's key as key 3 of a repository whose own key differs.
  const mine = randomBytes(32);
  const keys = (k: number) => (k === 3 ? master : k === 0 ? mine : undefined);
  const keyInfo = makeKeyInfo(3, envkey, nonce);
  const o = { format: BlobFormat.Backy2Aes, keyInfo, keys, hashFunction: 'sha512' };
  const data = decodeBacky2Blob(blob, sum, 4194304, o);
  assert.ok(sha512(data).equals(sum));
  // Without the nonce (databases before 2.13) the blob's own is used.
  assert.ok(sha512(decodeBacky2Blob(blob, sum, 4194304, { ...o, keyInfo: makeKeyInfo(3, envkey) }, undefined, false)).equals(sum));
  // Re-wrapped with the repository key (kek 0), as a dump import with the same key would keep it.
  assert.ok(sha512(decodeBacky2Blob(blob, sum, 4194304, { ...o, keyInfo: makeKeyInfo(0, wrapDataKey(mine, unwrapDataKey(master, envkey)), nonce) })).equals(sum));
  const broken = Buffer.from(blob);
  broken[5000] ^= 1;
  assert.throws(() => decodeBacky2Blob(broken, sum, 4194304, o), /authentication failed/);
  assert.throws(() => decodeBacky2Blob(blob, sum, 4194304, { ...o, keyInfo: makeKeyInfo(3, envkey, randomBytes(16)) }), /nonce differs/);
  assert.throws(() => decodeBacky2Blob(blob, sum, 4194304, { ...o, keyInfo: makeKeyInfo(0, envkey, nonce) }), /does not unwrap/);
  assert.throws(() => decodeBacky2Blob(blob, sum, 4194304, { ...o, keyInfo: makeKeyInfo(4, envkey, nonce) }), /key 4 of this blob is not known/);
  assert.throws(() => unwrapDataKey(randomBytes(32), envkey), /does not unwrap/);
  assert.throws(() => decodeBacky2Blob(blob, sha512(Buffer.from('other')), 4194304, o), /checksum mismatch/);
});

test('a crafted zstd frame larger than the block is refused before it is inflated', () => {
  const dataKey = randomBytes(32);
  const nonce = randomBytes(16);
  const frame = compress(Buffer.alloc(64 << 20), { compressionLevel: 1 }); // 64 MiB of zeroes in a few KiB
  const c = createCipheriv('aes-256-gcm', dataKey, nonce);
  const ct = Buffer.concat([c.update(frame), c.final()]);
  const blob = Buffer.concat([c.getAuthTag(), nonce, ct]);
  const key = randomBytes(32);
  const o = { format: BlobFormat.Backy2Aes, keyInfo: makeKeyInfo(0, wrapDataKey(key, dataKey), nonce), keys: () => key, hashFunction: 'sha512' };
  const rssBefore = process.memoryUsage().rss;
  assert.throws(() => decodeBacky2Blob(blob, Buffer.alloc(64), 4194304, o), /wrong size 67108864, expected 4194304/);
  assert.ok(process.memoryUsage().rss - rssBefore < 32 << 20, 'nothing the size of the frame was allocated');
});

test('backy2 v0 blobs: the checksum is always recomputed, even when the caller would rely on a tag', () => {
  const blob = fs.readFileSync(path.join(FIXTURES, 'R0/data/a6/7c/a67cec45b3GXSnp8ugiSuBg2jbmQuthM.blob'));
  const sum = sha512(blob);
  const o = { format: BlobFormat.Backy2Plain, keyInfo: null, keys: () => undefined, hashFunction: 'sha512' };
  assert.ok(decodeBacky2Blob(blob, sum, blob.length, o, undefined, false).equals(blob));
  const bad = Buffer.from(blob);
  bad[0] ^= 1;
  assert.throws(() => decodeBacky2Blob(bad, sum, blob.length, o, undefined, false), /checksum mismatch/);
  assert.throws(() => decodeBacky2Blob(blob.subarray(1), sum, blob.length, o), /wrong size/);
});

test('storage keys of backy2 uids per backend; uids that are not backy2\'s never become keys', () => {
  const uid = 'abbfb9dfc1URWZQwDp529bEznKhzJeJ3';
  assert.ok(isBacky2Uid(uid));
  assert.equal(isBacky2Uid('abbfb9dfc1URWZQwDp529bEznKhzJeJ4'), false, 'md5 prefix must match');
  assert.equal(storageKey(uid, BlobFormat.Backy2Aes, 'file'), 'ab/bf/abbfb9dfc1URWZQwDp529bEznKhzJeJ3.blob');
  assert.equal(storageKey(uid, BlobFormat.Backy2Plain, 's3'), uid);
  for (const evil of ['../../../../etc/passwd', 'ab/../../x', `${'a'.repeat(10)}/${'b'.repeat(21)}`, '']) {
    assert.throws(() => storageKey(evil, BlobFormat.Backy2Plain, 'file'), InvalidBlobUidError);
  }
  assert.throws(() => storageKey(uid, BlobFormat.Backy, 'file'), InvalidBlobUidError, 'a backy2 uid is no backy uid');
  assert.equal(uidOfKey('ab/bf/abbfb9dfc1URWZQwDp529bEznKhzJeJ3.blob'), uid);
  assert.equal(uidOfKey(uid), uid);
  assert.equal(uidOfKey('ab/bf/' + uid), undefined, 'backy2 uid in backy\'s layout');
  assert.equal(uidOfKey('meta/versions/ae79f3e4-e963-11f1-acee-02fc00000001'), undefined);
});

test('block dates: runs of seconds after the version\'s, blocks without rows, nothing stored when all share the version\'s second', () => {
  const t0 = Date.UTC(2026, 10, 26, 6, 36, 16, 345);
  const dates = Float64Array.from([t0 + 40, t0 + 500, NaN, t0 + 2000, t0 + 2300, t0 + 61_000]);
  const enc = encodeBlockDates(t0, dates)!;
  const back = decodeBlockDates(t0, 6, enc);
  const s = (x: number) => (Number.isNaN(x) ? 'none' : new Date(x).toISOString());
  assert.deepEqual([...back].map(s), ['2026-11-26T06:36:16.000Z', '2026-11-26T06:36:16.000Z', 'none', '2026-11-26T06:36:18.000Z', '2026-11-26T06:36:18.000Z', '2026-11-26T06:37:17.000Z']);
  assert.equal(encodeBlockDates(t0, Float64Array.from([t0, t0 + 600, NaN])), undefined);
  assert.deepEqual([...decodeBlockDates(t0, 2, undefined)], [t0 - 345, t0 - 345]);
});

test('blob packs and version objects round-trip; sealed objects refuse another key, another name, damage', () => {
  const blobs = [
    { uid: 'f'.repeat(32), checksum: sha512(Buffer.from('x')), size: 4096, format: BlobFormat.Backy, keyInfo: null },
    { uid: 'abbfb9dfc1URWZQwDp529bEznKhzJeJ3', checksum: sha512(Buffer.from('y')), size: 5, format: BlobFormat.Backy2Aes, keyInfo: randomBytes(57) },
    { uid: 'cb2d2e936a9xLbfQK5hqYvUtxP5qYKWo', checksum: sha512(Buffer.from('z')), size: 4096, format: BlobFormat.Backy2Plain, keyInfo: null },
  ];
  assert.deepEqual(decodePack(encodePack(blobs)), blobs);
  const o: VersionObject = {
    version: { uid: 'u-1', name: 'n', snapshotName: 's', date: 123, size: 4 * 4096 + 5, blockSize: 4096, expire: 9, baseUid: null, tags: ['b', 'a'], valid: true, complete: true, protected: false },
    packs: ['a'.repeat(32), 'b'.repeat(32)],
    packNo: Int32Array.from([0, PACK_HOLE, PACK_PENDING, 1, 0]),
    index: Int32Array.from([7, 0, 0, 2, 8]),
    blockDates: Buffer.from([1, 2]),
  };
  const back = decodeVersionObject(encodeVersionObject(o));
  assert.deepEqual(back, { ...o, version: { ...o.version, tags: ['a', 'b'] } });
  // 25,600 blocks of consecutive pack entries: about two bytes a block before compression.
  const n = 25_600;
  const big = encodeVersionObject({ ...o, version: { ...o.version, size: n * 4096 }, packNo: new Int32Array(n), index: Int32Array.from({ length: n }, (_, i) => i) });
  assert.ok(big.length < 3 * n, `${big.length} bytes`);
  const key = randomBytes(32);
  const payload = encodeVersionObject(o);
  const sealed = sealObject('meta/versions/u-1', payload, key);
  assert.ok(openObject('meta/versions/u-1', sealed, key).equals(payload));
  assert.throws(() => openObject('meta/versions/u-2', sealed, key), /authentication failed/);
  assert.throws(() => openObject('meta/versions/u-1', sealed, randomBytes(32)), /authentication failed/);
  const plain = sealObject('meta/versions/u-1', Buffer.from('payload'));
  assert.equal(openObject('meta/versions/u-1', plain).toString(), 'payload');
  const dented = Buffer.from(plain);
  dented[10] ^= 1;
  assert.throws(() => openObject('meta/versions/u-1', dented), /checksum mismatch/);
  assert.throws(() => openObject('meta/versions/u-1', plain, key), /not encrypted/);
});

test('backy2\'s global lock is held while the import holds it, released after', async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'backy2-lock-'));
  try {
    const probe = () => spawnSync('flock', ['-n', path.join(dir, 'backy_backy.lock'), 'true']).status;
    const held = await holdBacky2GlobalLock(dir);
    assert.equal(probe(), 1, 'held: backy2 (flock -n) would be refused');
    await assert.rejects(holdBacky2GlobalLock(dir), /backy2 holds its global lock/);
    await held.release();
    assert.equal(probe(), 0);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
