import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { gcm, gcmImplementation, GCM_TAG_BYTES } from '../src/codec/aes-gcm';
import { decodeBlob, encodeBlob } from '../src/codec/blob-format';

type Impl = 'native' | 'node';

function seal(use: Impl, key: Buffer, nonce: Buffer, aad: Buffer, data: Buffer): { ct: Buffer; tag: Buffer } {
  const ct = Buffer.alloc(data.length);
  const tag = Buffer.alloc(GCM_TAG_BYTES);
  const c = gcm(key, nonce, aad, false, use);
  c.update(data, ct);
  assert.equal(c.finish(tag), true);
  return { ct, tag };
}

function open(use: Impl, key: Buffer, nonce: Buffer, aad: Buffer, ct: Buffer, tag: Buffer): Buffer | undefined {
  const out = Buffer.alloc(ct.length);
  const d = gcm(key, nonce, aad, true, use);
  d.update(ct, out);
  return d.finish(tag) ? out : undefined;
}

test('aes-gcm: the native module is built and used (npm install builds it; without it every block costs twice the CPU)', () => {
  assert.equal(gcmImplementation, 'native');
});

test('aes-gcm: native and Node produce the same ciphertext and tag, and each opens what the other sealed', () => {
  const key = randomBytes(32);
  for (const size of [0, 1, 15, 16, 4095, 256 * 1024 + 3, 4 * 1024 * 1024 + 36]) {
    const nonce = randomBytes(12);
    const aad = randomBytes(84);
    const data = randomBytes(size);
    const a = seal('native', key, nonce, aad, data);
    const b = seal('node', key, nonce, aad, data);
    assert.ok(a.ct.equals(b.ct), `ciphertext of ${size} bytes`);
    assert.ok(a.tag.equals(b.tag), `tag of ${size} bytes`);
    if (size > 0) assert.ok(!a.ct.equals(data));
    assert.ok(open('node', key, nonce, aad, a.ct, a.tag)?.equals(data), `node opens native, ${size} bytes`);
    assert.ok(open('native', key, nonce, aad, b.ct, b.tag)?.equals(data), `native opens node, ${size} bytes`);
  }
});

test('aes-gcm: a flipped bit in ciphertext, tag, additional data or nonce, or another key, fails authentication in both', () => {
  const key = randomBytes(32);
  const nonce = randomBytes(12);
  const aad = randomBytes(84);
  const data = randomBytes(100_000);
  const { ct, tag } = seal('native', key, nonce, aad, data);
  const flip = (b: Buffer, at: number) => {
    const c = Buffer.from(b);
    c[at] ^= 1;
    return c;
  };
  for (const use of ['native', 'node'] as const) {
    assert.ok(open(use, key, nonce, aad, ct, tag));
    assert.equal(open(use, key, nonce, aad, flip(ct, 77_777), tag), undefined, `${use}: ciphertext`);
    assert.equal(open(use, key, nonce, aad, ct, flip(tag, 15)), undefined, `${use}: tag`);
    assert.equal(open(use, key, nonce, flip(aad, 83), ct, tag), undefined, `${use}: additional data`);
    assert.equal(open(use, key, flip(nonce, 0), aad, ct, tag), undefined, `${use}: nonce`);
    assert.equal(open(use, randomBytes(32), nonce, aad, ct, tag), undefined, `${use}: key`);
  }
});

test('aes-gcm: in place, and in pieces, give the same result as one call', () => {
  const key = randomBytes(32);
  const nonce = randomBytes(12);
  const aad = Buffer.alloc(0);
  const data = randomBytes(1_000_003);
  const whole = seal('native', key, nonce, aad, data);
  const buf = Buffer.from(data);
  const c = gcm(key, nonce, aad, false, 'native');
  for (let i = 0; i < buf.length; i += 65_537) c.update(buf.subarray(i, Math.min(buf.length, i + 65_537)), buf.subarray(i));
  const tag = Buffer.alloc(GCM_TAG_BYTES);
  c.finish(tag);
  assert.ok(buf.equals(whole.ct));
  assert.ok(tag.equals(whole.tag));
});

test('aes-gcm: bad arguments are errors, not crashes', () => {
  const n = randomBytes(12);
  const z = Buffer.alloc(0);
  assert.throws(() => gcm(randomBytes(16), n, z, false, 'native'), RangeError);
  assert.throws(() => gcm(randomBytes(32), randomBytes(8), z, false, 'native'), RangeError);
  assert.throws(() => gcm('key' as unknown as Buffer, n, z, false, 'native'), TypeError);
  const c = gcm(randomBytes(32), n, z, false, 'native');
  assert.throws(() => c.update(Buffer.alloc(10), Buffer.alloc(9)), RangeError);
  assert.throws(() => c.finish(Buffer.alloc(8)), RangeError);
});

test('aes-gcm: blobs written with the native module decode with Node\'s cipher and the other way round', () => {
  const opts = { key: randomBytes(32), compression: 'zstd' as const, compressionLevel: 1, hashFunction: 'sha256' };
  const data = Buffer.concat([randomBytes(300_000), Buffer.alloc(300_000, 7)]);
  const sum = createHash('sha256').update(data).digest();
  const blob = encodeBlob(data, sum, opts);
  // The same blob through a process that uses Node's cipher (BACKY_NATIVE=0), both directions.
  const script = `
    const { encodeBlob, decodeBlob } = require(${JSON.stringify(require.resolve('../src/codec/blob-format'))});
    const { gcmImplementation } = require(${JSON.stringify(require.resolve('../src/codec/aes-gcm'))});
    const [blob, data, sum, key] = JSON.parse(require('fs').readFileSync(0, 'utf8')).map((h) => Buffer.from(h, 'hex'));
    const opts = { key, compression: 'zstd', compressionLevel: 1, hashFunction: 'sha256' };
    const back = decodeBlob(blob, sum, data.length, opts);
    process.stdout.write(JSON.stringify({ impl: gcmImplementation, same: back.equals(data), blob: encodeBlob(data, sum, opts).toString('hex') }));`;
  const r = JSON.parse(execFileSync(process.execPath, ['-e', script], {
    env: { ...process.env, BACKY_NATIVE: '0' },
    input: JSON.stringify([blob, data, sum, opts.key].map((b) => b.toString('hex'))),
    maxBuffer: 64 * 1024 * 1024,
  }).toString()) as { impl: string; same: boolean; blob: string };
  assert.equal(r.impl, 'node');
  assert.equal(r.same, true);
  assert.ok(decodeBlob(Buffer.from(r.blob, 'hex'), sum, data.length, opts).equals(data));
  // Uncompressed (random data), with and without the checksum recomputed, into a caller's buffer.
  const rnd = randomBytes(1_000_000);
  const rsum = createHash('sha256').update(rnd).digest();
  const rblob = encodeBlob(rnd, rsum, opts);
  const into = Buffer.alloc(rnd.length);
  assert.ok(decodeBlob(rblob, rsum, rnd.length, opts, into, true).equals(rnd));
  assert.ok(decodeBlob(rblob, rsum, rnd.length, opts, undefined, false).equals(rnd));
  rblob[rblob.length - 1] ^= 1;
  assert.throws(() => decodeBlob(rblob, rsum, rnd.length, opts, into, true), /authentication failed/);
});
