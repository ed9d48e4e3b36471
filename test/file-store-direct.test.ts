import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { FileStore } from '../src/storage/file';
import { allocAligned, allocShared, directView } from '../src/codec/transfer';

/** Pages of `file` in the page cache (util-linux fincore): a blob written with O_DIRECT has none. */
function residentPages(file: string): number {
  return Number(execFileSync('fincore', ['--bytes', '--noheadings', '--output', 'PAGES', file]).toString().trim());
}

function filled(size: number, aligned: boolean): Buffer {
  const b = aligned ? allocAligned(size) : Buffer.from(new ArrayBuffer(size + 3), 3, size);
  randomBytes(size).copy(b);
  return b;
}

test('file store: blobs from aligned buffers are written with O_DIRECT (no page cache), exact in size and bytes', async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'backy-direct-'));
  try {
    const store = new FileStore(dir);
    for (const size of [1, 4095, 4096, 4097, 4 * 1024 * 1024 + 36]) {
      const key = `blobs/aa/direct-${size}`;
      const data = filled(size, true);
      assert.ok(directView(data), 'allocAligned gives a buffer direct I/O can use');
      // The bytes past the blob in its last aligned block must not reach the file.
      const tail = directView(data)!;
      tail.fill(0xee, size);
      await store.put(key, data);
      const file = path.join(dir, key);
      assert.equal(fs.statSync(file).size, size);
      assert.equal(residentPages(file), 0, `${size} bytes: written around the page cache`);
      assert.ok((await store.get(key)).equals(data), `${size} bytes read back`);
    }
    // A buffer that is not aligned goes through the page cache, as before.
    const plain = filled(100_000, false);
    assert.equal(directView(plain), undefined);
    await store.put('blobs/aa/buffered', plain);
    assert.ok(residentPages(path.join(dir, 'blobs/aa/buffered')) > 0);
    assert.ok((await store.get('blobs/aa/buffered')).equals(plain));
    assert.deepEqual(fs.readdirSync(path.join(dir, 'blobs/aa')).filter((n) => n.startsWith('.tmp')), []);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('file store: a filesystem without O_DIRECT (ramfs) gets the blob through the page cache instead', async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'backy-ramfs-'));
  try {
    try {
      execFileSync('mount', ['-t', 'ramfs', '-o', 'mode=0700', 'ramfs', dir], { stdio: 'pipe' });
    } catch (e) {
      t.skip(`cannot mount ramfs (needs root): ${(e as Error).message.split('\n')[0]}`);
      return;
    }
    try {
      // ramfs refuses O_DIRECT: shown here, so the test proves the fallback is taken.
      const probe = path.join(dir, 'probe');
      assert.throws(() => fs.openSync(probe, fs.constants.O_WRONLY | fs.constants.O_CREAT | fs.constants.O_DIRECT), /EINVAL/);
      const store = new FileStore(dir);
      for (const size of [4097, 1_000_000]) {
        const data = filled(size, true);
        await store.put(`blobs/bb/r-${size}`, data);
        assert.equal(fs.statSync(path.join(dir, `blobs/bb/r-${size}`)).size, size);
        assert.ok((await store.get(`blobs/bb/r-${size}`)).equals(data));
        assert.ok((await store.getInto(`blobs/bb/r-${size}`, allocShared(size))).equals(data), `${size} bytes read into a shared buffer`);
      }
      assert.deepEqual(fs.readdirSync(path.join(dir, 'blobs/bb')).filter((n) => n.startsWith('.tmp')), []);
    } finally {
      execFileSync('umount', [dir]);
    }
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('file store: blobs are read with O_DIRECT into shared buffers (around the page cache), exact in size and bytes', async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'backy-direct-read-'));
  try {
    const store = new FileStore(dir);
    for (const size of [1, 4095, 4096, 4097, 65536, 4 * 1024 * 1024 + 36]) {
      const key = `blobs/cc/read-${size}`;
      const data = filled(size, true);
      await store.put(key, data);
      const file = path.join(dir, key);
      assert.equal(residentPages(file), 0, 'written around the page cache');
      const into = allocShared(size);
      const got = await store.getInto(key, into);
      assert.ok(got.equals(data), `${size} bytes read back`);
      assert.equal(got.buffer, into.buffer, 'into the memory it was given');
      assert.equal(residentPages(file), 0, `${size} bytes: read around the page cache`);
    }
    // The control: the same read into a plain (unaligned) buffer goes through the page cache, which the
    // measure above sees.
    const data = filled(100_000, true);
    await store.put('blobs/cc/plain', data);
    assert.ok((await store.getInto('blobs/cc/plain', Buffer.alloc(100_000))).equals(data));
    assert.ok(residentPages(path.join(dir, 'blobs/cc/plain')) > 0);
    // A blob larger than the buffer it is read into (a damaged or foreign blob) is read whole, through the page
    // cache.
    const big = filled(1_000_000, true);
    await store.put('blobs/cc/big', big);
    assert.ok((await store.getInto('blobs/cc/big', allocShared(100_000))).equals(big));
    // Given a view inside a larger shared buffer, the read stays inside the view, even for a blob that does
    // not fit it: the memory around it may be someone else's.
    const mem = allocShared(1024 * 1024).fill(0xab);
    const view = mem.subarray(8192, 8192 + 100_000);
    const over = filled(150_000, true);
    await store.put('blobs/cc/over', over);
    assert.ok((await store.getInto('blobs/cc/over', view)).equals(over));
    assert.ok(mem.subarray(0, 8192).every((x) => x === 0xab) && mem.subarray(8192 + 100_000).every((x) => x === 0xab), 'nothing written outside the view');
    const fits = filled(60_000, true);
    await store.put('blobs/cc/fits', fits);
    assert.ok((await store.getInto('blobs/cc/fits', view)).equals(fits));
    assert.equal(residentPages(path.join(dir, 'blobs/cc/fits')), 0, 'a blob that fits the view is still read around the page cache');
    assert.ok(mem.subarray(8192 + 100_000).every((x) => x === 0xab), 'nothing written past the view');
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
