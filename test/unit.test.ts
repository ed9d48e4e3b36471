import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { configFromText } from '../src/config/config';
import { parseSize } from '../src/config/size';
import { parseIni } from '../src/config/ini';
import { Packr } from 'msgpackr';
import { compress } from 'zstd-napi';
import { decodeChunk, encodeChunk, HOLE, PENDING } from '../src/meta/block-map';
import { checksum, decodeBlob, encodeBlob, encodedCapacity, isZero } from '../src/codec/blob-format';
import { availableHashes, createHasher } from '../src/codec/hashes';
import { parseHints, hintedBlocks } from '../src/engine/hints';
import { Coalescer } from '../src/util/coalescer';
import { newVersionChunks, cleanupDecision } from '../src/meta/logic';
import { parseExpire } from '../src/util/dates';
import { ConfigError } from '../src/util/errors';

const KEY = 'a'.repeat(64);

test('ini: sections, both separators, comments, continuation lines', () => {
  const ini = parseIni('[DEFAULTS]\nblock_size: 4096\n# c\nlogfile = /x ; comment\n[io_rbd]\nnew_image_features:\n    A\n    B\n', 't');
  assert.equal(ini.get('defaults')!.get('block_size'), '4096');
  assert.equal(ini.get('defaults')!.get('logfile'), '/x');
  assert.equal(ini.get('io_rbd')!.get('new_image_features'), 'A\nB');
  assert.throws(() => parseIni('key = value\n', 't'), /no \[section\]/);
});

test('config: built-in defaults apply, a file only needs what differs', () => {
  const c = configFromText(`[DEFAULTS]\nencryption_key = ${KEY}\n`);
  assert.equal(c.blockSize, 4194304);
  assert.equal(c.hashFunction, 'sha512');
  assert.equal(c.disallowRmWhenYoungerThanDays, 6);
  assert.equal(c.compression, 'zstd');
  assert.equal(c.cacheSize, 1024 ** 3);
  assert.equal(c.metaEngine, 'sqlite:////var/lib/backy/backy.sqlite');
  assert.equal(c.data.type, 'file');
});

test('config: invalid values name the key and what is allowed', () => {
  const bad: [string, RegExp][] = [
    ['[DEFAULTS]\nblock_size = abc', /\[DEFAULTS\] block_size = "abc".*integer/],
    ['[DEFAULTS]\nhash_function = md5', /hash_function.*allowed: sha512/],
    ['[DEFAULTS]\ncompression = lz4', /compression.*allowed: zstd, none/],
    ['[DEFAULTS]\ncache_size = lots', /cache_size/],
    ['[MetaBackend]\nengine = mysql://x', /engine.*sqlite/],
    ['[DataBackend]\ntype = ftp', /type.*allowed: file, s3/],
  ];
  for (const [text, re] of bad) {
    assert.throws(() => configFromText(`[DEFAULTS]\nencryption_key = ${KEY}\n${text}`), (e: unknown) => e instanceof ConfigError && re.test((e as Error).message), text);
  }
  assert.throws(() => configFromText('[DEFAULTS]\n'), /no encryption_key/);
  assert.throws(() => configFromText('[DEFAULTS]\nencryption_key = abcd'), /64 hexadecimal/);
  assert.equal(configFromText('[DEFAULTS]\nencryption = none').encryptionKey, undefined);
});

test('config: a known key in the wrong one of the three sections is named in a warning (it has no effect there)', () => {
  const base = `[DEFAULTS]\nencryption_key = ${KEY}\n`;
  const c = configFromText(`${base}[DataBackend]\ncache_size = 256M\nworkers = 3\nsome_backy2_key = 1\n[MetaBackend]\nfsync = false\n`);
  assert.equal(c.cacheSize, 1024 ** 3, 'ignored: the default stays');
  assert.deepEqual(c.warnings, [
    '[MetaBackend] fsync has no effect there (ignored): backy reads it in [DataBackend]',
    '[DataBackend] cache_size has no effect there (ignored): backy reads it in [DEFAULTS]',
    '[DataBackend] workers has no effect there (ignored): backy reads it in [DEFAULTS]',
  ]);
  // Keys read in either place, keys backy does not know, and keys in their own section: no warning.
  assert.deepEqual(configFromText(`${base}simultaneous_reads = 4\ncache_size = 256M\n`).warnings, []);
  assert.deepEqual(configFromText(`${base}[DataBackend]\nsimultaneous_reads = 4\nfsync = false\n`).warnings, []);
  assert.deepEqual(configFromText(`${base}[NBD]\ncache_size = 1\n`).warnings, []);
});

test('sizes with suffixes', () => {
  assert.equal(parseSize('1G'), 1024 ** 3);
  assert.equal(parseSize('512M'), 512 * 1024 ** 2);
  assert.equal(parseSize('64k'), 65536);
  assert.equal(parseSize('123'), 123);
  assert.equal(parseSize('x'), undefined);
});

test('block map chunks round-trip (holes, pending, ids up and down, large ids)', () => {
  const e = new Float64Array([HOLE, PENDING, 1, 2, 3, 3, 100000, 5, HOLE, 2 ** 40, 7, PENDING]);
  assert.deepEqual([...decodeChunk(encodeChunk(e))], [...e]);
  const seq = new Float64Array(1024).map((_, i) => 1000 + i);
  assert.ok(encodeChunk(seq).length < 1100, 'consecutive ids take about a byte each');
});

test('block map chunks are exactly the bytes msgpackr writes for their codes (every integer width, array lengths up to 32 bits)', () => {
  const packr = new Packr({ useRecords: false });
  const codesOf = (e: Float64Array) => {
    let prev = 0;
    return [...e].map((x) => {
      if (x === HOLE) return 0;
      if (x === PENDING) return 1;
      const d = x - prev;
      prev = x;
      return 2 + (d >= 0 ? 2 * d : -2 * d - 1);
    });
  };
  const edges = [HOLE, PENDING, 1, 2, 31, 32, 63, 64, 127, 128, 255, 256, 65535, 65536, 2 ** 31 - 1, 2 ** 31, 2 ** 32 - 1, 2 ** 32, 2 ** 40, 2 ** 53 - 1, 1.5];
  let seed = 7;
  const rnd = (k: number) => (seed = (seed * 1103515245 + 12345) % 2147483648) % k;
  for (const n of [0, 1, 15, 16, 17, 1024, 65535, 65536, 70000]) {
    for (let t = 0; t < (n > 2000 ? 3 : 50); t++) {
      const e = new Float64Array(n).map(() => (t % 3 === 0 ? edges[rnd(edges.length)] : t % 3 === 1 ? rnd(2 ** 31) : rnd(300)));
      assert.deepEqual(encodeChunk(e), packr.pack(codesOf(e)), `${n} entries, case ${t}`);
    }
  }
});

test('new version chunks: copied from base, pending marks, grown and shrunk', () => {
  const base = new Float64Array(1500).map((_, i) => i + 1);
  const raw = [encodeChunk(base.subarray(0, 1024)), encodeChunk(base.subarray(1024))];
  const chunks = new Map(newVersionChunks(1600, { blocks: 1500, chunk: (c) => raw[c] }, [5, 1400]));
  const c0 = decodeChunk(chunks.get(0)!);
  const c1 = decodeChunk(chunks.get(1)!);
  assert.equal(c0[5], PENDING);
  assert.equal(c0[6], 7);
  assert.equal(c1.length, 1600 - 1024);
  assert.equal(c1[1400 - 1024], PENDING);
  assert.equal(c1[1499 - 1024], 1500);
  assert.equal(c1[1500 - 1024], PENDING);
  const shrunk = new Map(newVersionChunks(10, { blocks: 1500, chunk: (c) => raw[c] }, []));
  assert.deepEqual([...decodeChunk(shrunk.get(0)!)], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
  assert.equal(shrunk.size, 1);
});

test('blake3 checksums: reference vectors, in pieces as whole; a blake3 blob decodes and verifies (one pass)', () => {
  assert.ok(availableHashes().includes('blake3'), 'the blake3 module loads');
  assert.equal(checksum('blake3', Buffer.alloc(0)).toString('hex'), 'af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262');
  assert.equal(checksum('blake3', Buffer.from('abc')).toString('hex'), '6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85');
  const data = randomBytes(3 * 1024 * 1024 + 17);
  const h = createHasher('blake3');
  for (let i = 0; i < data.length; i += 65536) h.update(data.subarray(i, i + 65536));
  assert.ok(h.digest().equals(checksum('blake3', data)));
  const opts = { key: randomBytes(32), compression: 'zstd' as const, compressionLevel: 1, hashFunction: 'blake3' };
  const sum = checksum('blake3', data);
  assert.ok(decodeBlob(encodeBlob(data, sum, opts), sum, data.length, opts).equals(data));
  const other = checksum('blake3', Buffer.from('x'));
  assert.throws(() => decodeBlob(encodeBlob(data, other, opts), other, data.length, opts), /checksum mismatch/);
  assert.throws(() => configFromText('[DEFAULTS]\nhash_function = blake4\nencryption = none'), /allowed: .*blake3/);
  assert.equal(configFromText('[DEFAULTS]\nhash_function = BLAKE3\nencryption = none').hashFunction, 'blake3');
});

test('blob format: round trip, wrong key, flipped bit, swapped checksum', () => {
  const key = randomBytes(32);
  const opts = { key, compression: 'zstd' as const, compressionLevel: 1, hashFunction: 'sha512' };
  for (const data of [randomBytes(100000), Buffer.alloc(70000, 7), Buffer.from('x'), Buffer.alloc(0)]) {
    const sum = checksum('sha512', data);
    const blob = encodeBlob(data, sum, opts);
    assert.ok(decodeBlob(blob, sum, data.length, opts).equals(data));
  }
  const data = Buffer.alloc(65536, 1);
  const sum = checksum('sha512', data);
  const blob = encodeBlob(data, sum, opts);
  assert.ok(blob.length < 1000, 'compressible data is compressed');
  assert.throws(() => decodeBlob(blob, sum, data.length, { ...opts, key: randomBytes(32) }), /authentication failed/);
  const flipped = Buffer.from(blob);
  flipped[30] ^= 1;
  assert.throws(() => decodeBlob(flipped, sum, data.length, opts), /authentication failed/);
  assert.throws(() => decodeBlob(blob, checksum('sha512', Buffer.from('other')), data.length, opts), /authentication failed/);
  const plain = encodeBlob(data, sum, { ...opts, key: undefined });
  const p2 = Buffer.from(plain);
  p2[p2.length - 1] ^= 1;
  assert.throws(() => decodeBlob(p2, sum, data.length, { ...opts, key: undefined }), /checksum mismatch|decompression/);
});

test('blob format: a block is stored compressed exactly when zstd makes it smaller than 95 %, written into the caller\'s buffer', () => {
  // `zeros` zero bytes, then random ones: the first 16 KiB sample compresses well (so the whole block is tried),
  // and the whole block compresses to about its random part.
  const L = 400_000;
  const tail = randomBytes(L);
  const block = (zeros: number) => Buffer.concat([Buffer.alloc(zeros), tail.subarray(zeros)]);
  const reference = (zeros: number) => compress(block(zeros), { compressionLevel: 1 }).length;
  // The zero run at which zstd's output first gets below 95 % of the block.
  let lo = 16384;
  let hi = 60000;
  assert.ok(reference(lo) >= L * 0.95 && reference(hi) < L * 0.95, 'the search brackets the 95 % line');
  while (hi - lo > 1) {
    const mid = (lo + hi) >> 1;
    if (reference(mid) < L * 0.95) hi = mid;
    else lo = mid;
  }
  const cases: number[] = [];
  for (let z = lo - 40; z <= hi + 40; z++) cases.push(z);
  const both = { compressed: 0, plain: 0 };
  for (const key of [randomBytes(32), undefined]) {
    const opts = { key, compression: 'zstd' as const, compressionLevel: 1, hashFunction: 'blake3' };
    for (const z of cases) {
      const data = block(z);
      const sum = checksum('blake3', data);
      const out = Buffer.alloc(encodedCapacity(L) + 100, 0xee);
      const blob = encodeBlob(data, sum, opts, out);
      assert.equal(blob.buffer, out.buffer, 'written into the buffer given');
      assert.equal(blob.byteOffset, out.byteOffset);
      const compressed = (blob.readUInt32LE(4) & 1) === 1;
      assert.equal(compressed, reference(z) < L * 0.95, `zeros ${z}: zstd gives ${reference(z)} of ${L}`);
      if (compressed) both.compressed++;
      else both.plain++;
      assert.ok(decodeBlob(blob, sum, L, opts).equals(data), `zeros ${z} round trip`);
      assert.ok(out.subarray(encodedCapacity(L)).every((b) => b === 0xee), 'nothing written past the capacity');
      // Without a buffer: the same payload size.
      assert.equal(encodeBlob(data, sum, opts).length, blob.length);
    }
  }
  assert.ok(both.compressed > 0 && both.plain > 0, `both sides of the line were tested: ${JSON.stringify(both)}`);
});

test('zero detection', () => {
  assert.equal(isZero(Buffer.alloc(4 << 20)), true);
  const b = Buffer.alloc(4 << 20);
  b[b.length - 1] = 1;
  assert.equal(isZero(b), false);
  assert.equal(isZero(Buffer.alloc(0)), true);
});

test('rbd diff hints', () => {
  const h = parseHints('[{"offset":0,"length":4194304,"exists":"true"},{"offset":10485760,"length":1,"exists":"false"},{"offset":8388608,"length":0,"exists":true}]', 'x');
  assert.equal(h.length, 3);
  assert.equal(h[1].exists, false);
  assert.deepEqual([...hintedBlocks(h, 4194304, 10)].sort(), [0, 2]);
  assert.throws(() => parseHints('{', 'x'), /cannot parse hints/);
  assert.throws(() => parseHints('[{"offset":-1,"length":3}]', 'x'), /entry 0/);
});

test('coalescer batches concurrent pushes and keeps order', async () => {
  const sizes: number[] = [];
  const c = new Coalescer<number, number>(async (items) => {
    sizes.push(items.length);
    await new Promise((r) => setTimeout(r, 5));
    return items.map((i) => i * 2);
  });
  const results = await Promise.all(Array.from({ length: 100 }, (_, i) => c.push(i)));
  assert.deepEqual(results, Array.from({ length: 100 }, (_, i) => i * 2));
  assert.ok(sizes.length < 10, `batched: ${sizes}`);
});

test('cleanup decisions', () => {
  assert.equal(cleanupDecision(true, null, 3600e3, 0), 'keep');
  assert.equal(cleanupDecision(true, 5, 3600e3, 0), 'clear');
  assert.equal(cleanupDecision(false, null, 3600e3, 10), 'stamp');
  assert.equal(cleanupDecision(false, 10, 3600e3, 20), 'wait');
  assert.equal(cleanupDecision(false, 10, 3600e3, 10 + 3600e3), 'delete');
  assert.equal(cleanupDecision(false, null, 0, 10), 'delete');
});

test('expiry dates', () => {
  assert.equal(parseExpire('2030-01-02'), Date.UTC(2030, 0, 2));
  assert.equal(parseExpire('2030-01-02 03:04:05'), Date.UTC(2030, 0, 2, 3, 4, 5));
  assert.throws(() => parseExpire('2030-02-30'), /invalid expiry/);
  assert.throws(() => parseExpire('tomorrow'), /invalid expiry/);
});

test('read_verification = tag: encrypted blobs verified by the GCM tag alone, which still binds the checksum', () => {
  const key = randomBytes(32);
  const opts = { key, compression: 'none' as const, compressionLevel: 1, hashFunction: 'sha512' };
  const data = randomBytes(50000);
  const sum = checksum('sha512', data);
  const blob = encodeBlob(data, sum, opts);
  assert.ok(decodeBlob(blob, sum, data.length, opts, undefined, false).equals(data));
  const other = checksum('sha512', Buffer.from('x'));
  assert.throws(() => decodeBlob(blob, other, data.length, opts, undefined, false), /authentication failed/);
  const flipped = Buffer.from(blob);
  flipped[100] ^= 4;
  assert.throws(() => decodeBlob(flipped, sum, data.length, opts, undefined, false), /authentication failed/);
  // Unencrypted blobs have no tag: the checksum is always recomputed.
  const plain = encodeBlob(data, sum, { ...opts, key: undefined });
  const bad = Buffer.from(plain);
  bad[100] ^= 4;
  assert.throws(() => decodeBlob(bad, sum, data.length, { ...opts, key: undefined }, undefined, false), /checksum mismatch/);
  assert.equal(configFromText(`[DEFAULTS]\nencryption_key = ${KEY}\nread_verification = tag`).readVerification, 'tag');
  assert.throws(() => configFromText(`[DEFAULTS]\nencryption_key = ${KEY}\nread_verification = maybe`), /read_verification.*allowed: checksum, tag/);
});
