/**
 * The NBD server with writable devices: transmission flags follow what the device can do, WRITE / TRIM /
 * WRITE_ZEROES / FLUSH with FUA reach the device (checked with qemu-io, nbdsh, nbdcopy and raw requests), and
 * one device per export is shared by all its connections, so multi-conn clients see each other's writes.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import * as os from 'node:os';
import * as path from 'node:path';
import { randomFillSync } from 'node:crypto';
import { NbdServer, NbdServerOptions } from '../nbd/server';
import * as C from '../nbd/constants';
import { ExportCatalogue } from '../src/device/types';
import { FreshDeviceCatalogue, MemoryCatalogue, MemoryDevice, WritableMemoryDevice, buildImage, sha256 } from './helpers/nbd-memdev';
import { NBDSH_ENV, RawPeer, nbdshAvailable, run, waitFor } from './helpers/nbd-tools';

const KiB = 1024;
const MiB = 1024 * KiB;

let tmp: string;
before(async () => {
  tmp = await mkdtemp(path.join(os.tmpdir(), 'nbd-writable-'));
});
after(async () => {
  await rm(tmp, { recursive: true, force: true });
});

interface Devices {
  rw: WritableMemoryDevice;
  native: WritableMemoryDevice;
  plain: WritableMemoryDevice;
  ro: MemoryDevice;
}

function makeDevices(): Devices {
  const img = () => buildImage([{ length: MiB, fill: 0x11 }, { length: MiB, fill: 'zero' }, { length: 2 * MiB, fill: 'random' }]);
  const rw = img();
  const native = img();
  const plain = img();
  return {
    // FUA emulated by a flush; zero and trim native.
    rw: new WritableMemoryDevice(rw.data, rw.zeroRuns),
    // FUA and fast zero native.
    native: new WritableMemoryDevice(native.data, native.zeroRuns, { nativeFua: true, fastZero: true }),
    // Neither zero nor trim: WRITE_ZEROES is written as zero buffers, TRIM is not offered.
    plain: new WritableMemoryDevice(plain.data, plain.zeroRuns, { zero: false, trim: false }),
    ro: new MemoryDevice(Buffer.alloc(MiB, 0x22)),
  };
}

async function withServer(
  fn: (f: { server: NbdServer; port: number; uri: (n: string) => string; logs: string[] }) => Promise<void>,
  catalogue: ExportCatalogue,
  options: Partial<NbdServerOptions> = {},
): Promise<void> {
  const logs: string[] = [];
  const server = new NbdServer({ catalogue, log: (l) => logs.push(l), ...options });
  const addr = await server.listen({ port: 0 });
  const port = (addr as { port: number }).port;
  try {
    await fn({ server, port, uri: (n) => `nbd://127.0.0.1:${port}/${n}`, logs });
  } finally {
    await server.close();
  }
  assert.equal(server.connectionCount, 0, 'connections left open');
  assert.equal(server.openExports, 0, 'every export closed');
}

function catalogueOf(d: Devices): MemoryCatalogue {
  return new MemoryCatalogue(new Map(Object.entries(d).map(([n, device]) => [n, { device, description: n }])));
}

type Flags = Record<'is_read_only' | 'can_flush' | 'can_fua' | 'can_trim' | 'can_zero' | 'can_fast_zero' | 'can_multi_conn' | 'can_cache', boolean>;

async function flagsOf(port: number): Promise<Map<string, Flags>> {
  const r = await run('nbdinfo', ['--json', '--list', `nbd://127.0.0.1:${port}`]);
  assert.equal(r.code, 0, r.stderr);
  return new Map(JSON.parse(r.stdout).exports.map((e: Flags & { 'export-name': string }) => [e['export-name'], e]));
}

function pick(f: Flags | undefined): Flags {
  assert.ok(f);
  const { is_read_only, can_flush, can_fua, can_trim, can_zero, can_fast_zero, can_multi_conn, can_cache } = f;
  return { is_read_only, can_flush, can_fua, can_trim, can_zero, can_fast_zero, can_multi_conn, can_cache };
}

describe('NBD server with writable devices', () => {
  test('transmission flags follow the device (nbdinfo); readOnly forces read-only', async () => {
    const d = makeDevices();
    await withServer(async ({ port }) => {
      const f = await flagsOf(port);
      const all = { is_read_only: false, can_flush: true, can_fua: true, can_zero: true, can_fast_zero: true, can_multi_conn: true, can_cache: true };
      assert.deepEqual(pick(f.get('rw')), { ...all, can_trim: true });
      assert.deepEqual(pick(f.get('native')), { ...all, can_trim: true });
      assert.deepEqual(pick(f.get('plain')), { ...all, can_trim: false });
      assert.deepEqual(pick(f.get('ro')), { ...all, is_read_only: true, can_fua: false, can_trim: false, can_zero: false, can_fast_zero: false });
    }, catalogueOf(d));
    await withServer(async ({ port }) => {
      const f = await flagsOf(port);
      for (const n of ['rw', 'native', 'plain', 'ro']) assert.equal(f.get(n)?.is_read_only, true, n);
    }, catalogueOf(d), { readOnly: true });
  });

  test('qemu-io: write, FUA write, write zeroes (with and without unmap, fast), discard, flush reach the device', async () => {
    const d = makeDevices();
    const want = { rw: Buffer.from(d.rw.data), native: Buffer.from(d.native.data), plain: Buffer.from(d.plain.data) };
    await withServer(async ({ uri }) => {
      for (const name of ['rw', 'native', 'plain'] as const) {
        const dev = d[name];
        const cmds = [
          'write -P 0xab 4096 65536',
          'write -f -P 0xcd 131072 4096',
          'write -z 3145728 65536',
          'write -z -u 3211264 65536',
          ...(name === 'plain' ? [] : ['discard 512000 65536']),
          'flush',
          'read -P 0xab 4096 65536',
          'read -P 0xcd 131072 4096',
          'read -P 0 3145728 131072',
        ];
        const r = await run('qemu-io', ['-f', 'raw', uri(name), ...cmds.flatMap((c) => ['-c', c])]);
        assert.equal(r.code, 0, r.stdout + r.stderr);
        assert.doesNotMatch(r.stdout + r.stderr, /failed|error/i, `${name}: ${r.stdout}${r.stderr}`);
        const w = want[name];
        w.fill(0xab, 4096, 4096 + 65536);
        w.fill(0xcd, 131072, 131072 + 4096);
        w.fill(0, 3145728, 3145728 + 131072);
        if (name !== 'plain') w.fill(0, 512000, 512000 + 65536);
        assert.equal(sha256(dev.data), sha256(w), `${name}: device content`);
        assert.equal(sha256(dev.durable), sha256(w), `${name}: everything flushed`);

        const ops = dev.ops;
        const fuaWrite = ops.findIndex((o) => o.op === 'write' && o.offset === 131072);
        assert.ok(fuaWrite >= 0, `${name}: FUA write seen: ${JSON.stringify(ops)}`);
        if (name === 'native') {
          assert.equal(ops[fuaWrite].fua, true, 'native FUA passed to the device');
        } else {
          assert.equal(ops[fuaWrite].fua, false);
          assert.equal(ops[fuaWrite + 1]?.op, 'flush', `${name}: FUA emulated by a flush right after the write`);
        }
        if (name === 'plain') {
          // No zero(): the zeroes were written as buffers, no trim was offered.
          assert.ok(!ops.some((o) => o.op === 'zero' || o.op === 'trim'));
          assert.ok(ops.some((o) => o.op === 'write' && o.offset === 3145728));
        } else {
          const z = ops.filter((o) => o.op === 'zero');
          assert.deepEqual(z.map((o) => [o.offset, o.length, o.noHole]), [[3145728, 65536, true], [3211264, 65536, false]]);
          assert.ok(ops.some((o) => o.op === 'trim' && o.offset === 512000 && o.length === 65536));
        }
      }
      // Fast zero: refused at once (ENOTSUP) unless the device can promise it; the native device can over zeroes.
      const fastRw = await run('qemu-io', ['-f', 'raw', uri('rw'), '-c', 'write -z -n 0 4096']);
      assert.match(fastRw.stdout + fastRw.stderr, /Operation not supported/);
      assert.ok(!d.rw.ops.some((o) => o.fast), 'the device never saw the fast zero');
      assert.ok(d.rw.data.subarray(0, 4096).every((b) => b === 0x11), 'content untouched');
      const fastNative = await run('qemu-io', ['-f', 'raw', uri('native'), '-c', `write -z -n ${MiB} 4096`, '-c', 'write -z -n 0 4096']);
      assert.match(fastNative.stdout, new RegExp(`wrote 4096/4096 bytes at offset ${MiB}`));
      assert.match(fastNative.stdout + fastNative.stderr, /Operation not supported/);
      // Writes to a read-only export are refused.
      const ro = await run('qemu-io', ['-f', 'raw', uri('ro'), '-c', 'write 0 512']);
      assert.match(ro.stdout + ro.stderr, /Permission denied|Operation not permitted/);
      assert.notEqual(ro.code, 0);
      assert.ok(d.ro.data.every((b) => b === 0x22));
    }, catalogueOf(d));
  });

  test('two connections share one device: writes flushed on one are read on the other (nbdsh)', async (t) => {
    if (!(await nbdshAvailable())) return t.skip('nbdsh (python3-libnbd) is not installed');
    // A catalogue that opens a new device per open, like overlays: only sharing makes the writes visible.
    const cat = new FreshDeviceCatalogue(() => new WritableMemoryDevice(Buffer.alloc(4 * MiB), [[0, 4 * MiB]]));
    await withServer(async ({ uri, server }) => {
      const script = `
import nbd, json
h1 = nbd.NBD(); h1.connect_uri(${JSON.stringify(uri('disk'))})
h2 = nbd.NBD(); h2.connect_uri(${JSON.stringify(uri('disk'))})
out = {'multi': [h1.can_multi_conn(), h2.can_multi_conn()], 'ro': h1.is_read_only()}
h1.pwrite(b'\\xaa' * 65536, 0)
h1.flush()
out['after_flush'] = bytes(h2.pread(65536, 0)) == b'\\xaa' * 65536
h2.pwrite(b'\\xbb' * 4096, 1048576, nbd.CMD_FLAG_FUA)
out['after_fua'] = bytes(h1.pread(4096, 1048576)) == b'\\xbb' * 4096
h1.zero(8192, 2097152)
h2.flush()
out['zeroed'] = bytes(h2.pread(8192, 2097152)) == bytes(8192)
out['open'] = 1
h1.shutdown(); h2.shutdown()
print(json.dumps(out))
`;
      const r = await run('nbdsh', ['-c', script], { env: NBDSH_ENV });
      assert.equal(r.code, 0, r.stderr);
      const out = JSON.parse(r.stdout);
      assert.deepEqual(out, { multi: [true, true], ro: false, after_flush: true, after_fua: true, zeroed: true, open: 1 });
      assert.equal(cat.opened.length, 1, 'one device for both connections');
      const dev = cat.opened[0];
      assert.ok(dev.durable.subarray(0, 65536).every((b) => b === 0xaa), 'the flush of connection 1 reached the device');
      assert.ok(dev.durable.subarray(1048576, 1048576 + 4096).every((b) => b === 0xbb), 'the FUA write of connection 2 is durable');
      assert.ok(await waitFor(() => server.openExports === 0), 'the device is closed after the last connection');
      assert.equal(cat.closes, 1);
    }, cat);
  });

  test('nbdcopy with 4 connections writes an image into the export; it reads back identical', async () => {
    const src = buildImage([
      { length: 3 * MiB + 512, fill: 'random' },
      { length: 4 * MiB, fill: 'zero' },
      { length: MiB, fill: 0x5a },
      { length: 2 * MiB - 512, fill: 'random' },
    ]);
    const file = path.join(tmp, 'src.img');
    await writeFile(file, src.data);
    // The target starts full of junk, so zero runs must really be written as zeroes.
    const junk = Buffer.alloc(src.data.length);
    randomFillSync(junk);
    const cat = new FreshDeviceCatalogue(() => new WritableMemoryDevice(junk));
    await withServer(async ({ uri }) => {
      const r = await run('nbdcopy', ['--connections=4', '--requests=16', '--request-size=262144', file, uri('disk')]);
      assert.equal(r.code, 0, r.stderr);
      assert.equal(cat.opened.length, 1);
      assert.equal(sha256(cat.opened[0].data), sha256(src.data));
      const out = path.join(tmp, 'back.img');
      const b = await run('nbdcopy', ['--connections=4', uri('disk'), out]);
      assert.equal(b.code, 0, b.stderr);
      assert.equal(sha256(await readFile(out)), sha256(src.data));
    }, cat);
  });

  test('raw requests: limits, errors, flags; the stream stays in sync', async () => {
    const d = makeDevices();
    d.rw.failWrites(2 * MiB, 4096);
    const size = d.rw.size;
    await withServer(async ({ port, logs }) => {
      const p = await RawPeer.connect(port);
      await p.greet();
      const { flags } = await p.go('rw');
      assert.equal(flags & C.FLAG_READ_ONLY, 0);
      const expect = async (errno: number, what: string): Promise<void> => assert.equal((await p.readSimpleReply()).error, errno, what);
      p.sendRequest(C.CMD_WRITE, size - 10, 20, { payload: Buffer.alloc(20, 1) });
      await expect(C.ENOSPC, 'write past the end');
      p.sendRequest(C.CMD_WRITE_ZEROES, size - 10, 20);
      await expect(C.ENOSPC, 'zero past the end');
      p.sendRequest(C.CMD_TRIM, size - 10, 20);
      await expect(C.EINVAL, 'trim past the end');
      p.sendRequest(C.CMD_WRITE, 0, 0);
      await expect(C.EINVAL, 'zero-length write');
      p.sendRequest(C.CMD_WRITE, 0, 100, { flags: C.CMD_FLAG_DF, payload: Buffer.alloc(100, 2) });
      await expect(C.EINVAL, 'DF on a write');
      p.sendRequest(C.CMD_FLUSH, 0, 0, { flags: C.CMD_FLAG_NO_HOLE });
      await expect(C.EINVAL, 'NO_HOLE on a flush');
      p.sendRequest(C.CMD_WRITE, 2 * MiB + 100, 5000, { payload: Buffer.alloc(5000, 3) });
      await expect(C.EIO, 'a failing device write');
      assert.ok(logs.some((l) => /WRITE 2097252\+5000 failed: EIO: simulated write failure/.test(l)), logs.join('\n'));
      // Several writes in flight, answered; then a flush covers them all (the spec: writes replied to before it).
      for (let i = 0; i < 20; i++) p.sendRequest(C.CMD_WRITE, i * 4096, 4096, { cookie: BigInt(100 + i), payload: Buffer.alloc(4096, i + 1) });
      const cookies = new Set<bigint>();
      for (let i = 0; i < 20; i++) {
        const r = await p.readSimpleReply();
        assert.equal(r.error, 0);
        cookies.add(r.cookie);
      }
      assert.equal(cookies.size, 20);
      assert.ok(!d.rw.durable.subarray(0, 20 * 4096).equals(d.rw.data.subarray(0, 20 * 4096)), 'not durable before the flush');
      p.sendRequest(C.CMD_FLUSH, 0, 0, { cookie: 200n });
      assert.equal((await p.readSimpleReply()).error, 0);
      p.sendRequest(C.CMD_READ, 19 * 4096, 4096, { cookie: 7n });
      const back = await p.readSimpleReply(4096);
      assert.equal(back.cookie, 7n);
      assert.ok(back.data.equals(Buffer.alloc(4096, 20)), 'in sync, content written');
      assert.ok(d.rw.durable.subarray(0, 20 * 4096).equals(d.rw.data.subarray(0, 20 * 4096)));
      p.destroy();

      // Trim on a device without trim: EINVAL (not offered); writes still work.
      const q = await RawPeer.connect(port);
      await q.greet();
      const g = await q.go('plain', { structured: true });
      assert.equal(g.flags & C.FLAG_SEND_TRIM, 0);
      q.sendRequest(C.CMD_TRIM, 0, 4096);
      let chunks = await q.readStructuredReply();
      assert.equal(chunks[0].type, C.REPLY_TYPE_ERROR);
      assert.equal(chunks[0].data.readUInt32BE(0), C.EINVAL);
      q.sendRequest(C.CMD_WRITE, 0, 3, { payload: Buffer.from('abc') });
      chunks = await q.readStructuredReply();
      assert.equal(chunks[0].simpleError, 0);
      assert.equal(d.plain.data.toString('latin1', 0, 3), 'abc');
      q.destroy();
    }, catalogueOf(d));

    // Served read-only: the payload of a refused write is consumed, the stream stays in sync.
    await withServer(async ({ port }) => {
      const p = await RawPeer.connect(port);
      await p.greet();
      const { flags } = await p.go('rw');
      assert.equal(flags & C.FLAG_READ_ONLY, C.FLAG_READ_ONLY);
      p.sendRequest(C.CMD_WRITE, 0, 1000, { payload: Buffer.alloc(1000, 9) });
      assert.equal((await p.readSimpleReply()).error, C.EPERM);
      p.sendRequest(C.CMD_READ, 0, 10, { cookie: 3n });
      const r = await p.readSimpleReply(10);
      assert.equal(r.cookie, 3n);
      assert.ok(r.data.equals(Buffer.alloc(10, 1)), 'content as written before, not 9');
      p.destroy();
    }, catalogueOf(d), { readOnly: true });
  });
});
