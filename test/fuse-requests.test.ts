/**
 * FUSE requests are answered exactly once, and a read never writes into its buffer after its request has been
 * answered (libfuse frees the buffer then, in another thread): checked on the operations with a slow device
 * in this process, and end to end with a mount whose storage (S3 behind a delaying proxy) answers after the
 * read timeout.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { createOperations } from '../src/fuse/operations';
import { OpenImages } from '../src/fuse/open-images';
import { Errno } from '../src/fuse/native';
import type { Tree } from '../src/fuse/tree';
import type { VersionRow } from '../src/meta/types';
import { BlockDevice, DeviceError, Extent } from '../src/device/types';
import { makeTestRepo, TestRepo, writeImage } from './helpers/cli';
import { ddRange, forceCleanup, MountProcess, sha256, startMount } from './helpers/fuse-mount';
import { FaultProxy, startFaultProxy } from './helpers/fault-proxy';
import { S3Server, startS3Server } from './helpers/s3-server';

const KiB = 1024;
const MiB = 1024 * KiB;
const BLOCK = 64 * KiB;

/** A device whose reads of the blocks in `slow` take `delayMs`; every byte reads as 0xab. */
class SlowDevice implements BlockDevice {
  readonly size = 8 * BLOCK;
  lateReads = 0;
  constructor(private readonly slow: Set<number>, private readonly delayMs: number, private readonly fail = false) {}
  async read(offset: number, length: number): Promise<Buffer> {
    if (this.slow.has(Math.floor(offset / BLOCK))) {
      await new Promise((r) => setTimeout(r, this.delayMs));
      this.lateReads++;
    }
    if (this.fail) throw new DeviceError('simulated', 'EIO', offset);
    return Buffer.alloc(length, 0xab);
  }
  async extents(offset: number, length: number): Promise<Extent[]> {
    return [{ offset, length, zero: false }];
  }
}

const version = { uid: 'v', name: 'v', size: 8 * BLOCK, blockSize: BLOCK, date: 0 } as unknown as VersionRow;

function opsFor(device: BlockDevice, logs: string[]) {
  const tree: Tree = { resolve: async (p) => (p === '/v.img' ? { kind: 'image', version } : undefined) };
  const images = new OpenImages(() => device);
  return createOperations({ tree, images, uid: 0, gid: 0, logFailure: (_k, l) => logs.push(l), readTimeoutMs: 100, timeoutMs: 100 });
}

function open(ops: ReturnType<typeof opsFor>): Promise<number> {
  return new Promise((resolve, reject) => ops.open('/v.img', 0, (err, fd) => (err ? reject(new Error(`open: ${err}`)) : resolve(fd!))));
}

/** Calls read and records every answer; `buf` stands for libfuse's buffer. */
function read(ops: ReturnType<typeof opsFor>, fh: number, buf: Buffer, len: number, pos: number): { answers: Array<{ value: number; at: number }>; first: Promise<number> } {
  const answers: Array<{ value: number; at: number }> = [];
  const t0 = Date.now();
  let first: (v: number) => void = () => undefined;
  const p = new Promise<number>((r) => (first = r));
  ops.read('/v.img', fh, buf, len, pos, (v) => {
    answers.push({ value: v, at: Date.now() - t0 });
    first(v);
  });
  return { answers, first: p };
}

describe('FUSE requests', () => {
  test('a read storage answers too late: answered ETIMEDOUT once, its buffer never written afterwards', async () => {
    const logs: string[] = [];
    const dev = new SlowDevice(new Set([1]), 400);
    const ops = opsFor(dev, logs);
    const fh = await open(ops);
    // Within one block (the slow one), and across blocks (block 0 fast, block 1 slow).
    for (const [pos, len] of [[BLOCK + 100, 4096], [BLOCK - 4096, 8192]]) {
      const buf = Buffer.alloc(len, 0x5a);
      const r = read(ops, fh, buf, len, pos);
      assert.equal(await r.first, Errno.ETIMEDOUT);
      const snapshot = Buffer.from(buf);
      const late = dev.lateReads;
      await new Promise((res) => setTimeout(res, 600));
      assert.ok(dev.lateReads > late, 'the slow read did finish, after the answer');
      assert.equal(r.answers.length, 1, 'answered once');
      assert.ok(buf.equals(snapshot), 'nothing written into the buffer after the answer');
      assert.ok(buf.subarray(pos < BLOCK ? BLOCK - pos : 0).every((b) => b === 0x5a), 'the slow part never landed');
    }
    assert.ok(logs.some((l) => /no answer within 0\.1 s; answered ETIMEDOUT/.test(l)), logs.join('\n'));
  });

  test('fast reads and failures are answered once, with data or an errno', async () => {
    const ops = opsFor(new SlowDevice(new Set(), 0), []);
    const fh = await open(ops);
    const buf = Buffer.alloc(3 * BLOCK, 0x5a);
    const r = read(ops, fh, buf, 3 * BLOCK, BLOCK / 2);
    assert.equal(await r.first, 3 * BLOCK);
    assert.ok(buf.every((b) => b === 0xab));
    await new Promise((res) => setTimeout(res, 200));
    assert.equal(r.answers.length, 1, 'no second answer from the timer');

    const failing = opsFor(new SlowDevice(new Set(), 0, true), []);
    const fh2 = await open(failing);
    const f = read(failing, fh2, Buffer.alloc(4096), 4096, 0);
    assert.equal(await f.first, Errno.EIO);
    await new Promise((res) => setTimeout(res, 200));
    assert.equal(f.answers.length, 1);
  });
});

describe('FUSE mount on slow storage', () => {
  let s3: S3Server;
  let proxy: FaultProxy;
  let repo: TestRepo;
  let mount: MountProcess | undefined;
  let dir: string;
  let want: Buffer;

  before(async () => {
    s3 = await startS3Server();
    proxy = await startFaultProxy({ target: s3.endpoint, delayMs: 8000 });
    repo = makeTestRepo(`${s3.config({ endpoint_url: proxy.endpoint, prefix: 'slow/', read_timeout: 30 })}\n[DEFAULTS]\ncache_size = 64M\n`, { blockSize: 4 * MiB });
    await repo.ok(['initdb']);
    const img = path.join(repo.dir, 'disk.img');
    writeImage(img, 16 * MiB, 'random');
    want = fs.readFileSync(img);
    dir = path.join(repo.dir, 'mnt');
    fs.mkdirSync(dir);
  });

  after(async () => {
    await forceCleanup(dir, mount?.child);
    repo?.cleanup();
    await proxy?.close();
    await s3?.stop();
  });

  test('reads beyond the read timeout fail with ETIMEDOUT; the late data lands nowhere; the mount stays correct', async () => {
    const uid = (await repo.ok(['backup', `file://${path.join(repo.dir, 'disk.img')}`, 'disk'])).stdout.trim();
    mount = await startMount(repo, ['--read-timeout', '3', uid, dir], dir);
    const file = path.join(dir, 'disk.img');
    // The next GETs wait 8 s at the proxy: longer than the 3 s read timeout.
    proxy.eligible = (req) => req.method === 'GET';
    proxy.script = Array.from({ length: 8 }, () => 'delay' as const);
    const slow = await ddRange(file, 5 * MiB, 256 * KiB, { direct: true });
    assert.notEqual(slow.code, 0, 'the read failed');
    assert.match(slow.stderr, /timed out/i);
    // The late blobs arrive while other reads go on; all of them read exactly what was backed up.
    proxy.script = [];
    await new Promise((r) => setTimeout(r, 8500));
    for (const [off, len] of [[5 * MiB, 256 * KiB], [0, 4 * MiB], [12 * MiB + 123, 3 * MiB]]) {
      const r = await ddRange(file, off, len, { direct: off % 4096 === 0 });
      assert.equal(r.code, 0, `read at ${off}: ${r.stderr}\n${mount.log()}`);
      assert.equal(r.hash, sha256(want.subarray(off, off + len)), `bytes at ${off}`);
    }
    assert.equal(await mount.stop('SIGTERM'), 0, mount.log());
    mount = undefined;
  });
});
