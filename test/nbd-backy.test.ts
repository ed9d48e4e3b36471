/**
 * `backy nbd` end to end: real images backed up with the CLI, the server run as a child process, and the
 * Debian NBD clients (nbdinfo, nbdcopy, qemu-img, qemu-io) plus raw sockets against it.
 */
import { after, before, describe, test } from 'node:test';
import * as assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import { ChildProcess, spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { alive, BACKY, blobFileOf, makeTestRepo, TestRepo } from './helpers/cli';
import { makeSparseVersion, startBackyNbd, BackyNbd } from './helpers/backy-nbd';
import { SeededRandom, sha256File, readRange } from './helpers/images';
import { RawPeer, run, waitFor } from './helpers/nbd-tools';
import { NbdClient } from '../nbd/client';
import * as C from '../nbd/constants';
import { freePort } from './helpers/net';

const MiB = 1024 * 1024;
const BS = 4 * MiB;

/** A byte range filled with one value before the backup, checked with qemu-io's read -P. */
interface Pattern { offset: number; length: number; value: number }

interface Image {
  file: string;
  size: number;
  uid: string;
  name: string;
  zeroBlocks: number[];
  patterns: Pattern[];
}

/** Random blocks (seeded), the listed blocks all zero, then the patterns written over them. */
function writeImage(file: string, size: number, zeroBlocks: number[], patterns: Pattern[], seed: string): void {
  const rnd = new SeededRandom(seed);
  const fd = fs.openSync(file, 'w');
  try {
    for (let off = 0, i = 0; off < size; off += BS, i++) {
      const len = Math.min(BS, size - off);
      fs.writeSync(fd, zeroBlocks.includes(i) ? Buffer.alloc(len) : rnd.bytes(len), 0, len, off);
    }
    for (const p of patterns) fs.writeSync(fd, Buffer.alloc(p.length, p.value), 0, p.length, p.offset);
  } finally {
    fs.closeSync(fd);
  }
}

function sha256(b: Buffer): string {
  return createHash('sha256').update(b).digest('hex');
}




describe('backy nbd with real clients', () => {
  let repo: TestRepo;
  let server: BackyNbd;
  const images: Record<'alpha' | 'beta' | 'corrupt' | 'gone' | 'multi', Image> = {} as never;

  async function backUp(name: string, size: number, zeroBlocks: number[], patterns: Pattern[], snapshot?: string): Promise<Image> {
    const file = path.join(repo.dir, `${name}.img`);
    writeImage(file, size, zeroBlocks, patterns, name);
    const r = await repo.ok(['backup', ...(snapshot ? ['-s', snapshot] : []), `file://${file}`, name]);
    return { file, size, uid: r.stdout.trim(), name, zeroBlocks, patterns };
  }

  before(async () => {
    repo = makeTestRepo('[DEFAULTS]\ncache_size = 256M\n');
    await repo.ok(['initdb']);
    // Not a multiple of 512: blocks 1 and 3 zero; patterns inside blocks, across a block boundary, in the tail.
    images.alpha = await backUp('alpha', 5 * BS + 1536 + 77, [1, 3], [
      { offset: 1000, length: 5000, value: 0xa5 },
      { offset: 5 * BS - 1234, length: 2000, value: 0x3c },
      { offset: 5 * BS + 1000, length: 600, value: 0x7e },
    ]);
    // A multiple of 512 (clients then use 512-byte sectors), not of 4 MiB; with a snapshot name.
    images.beta = await backUp('beta', 3 * BS + 7 * 512, [1], [{ offset: 2 * BS + 511, length: 1025, value: 0x11 }], 'snap-1');
    images.corrupt = await backUp('corrupt', 3 * BS, [], []);
    images.gone = await backUp('gone', 3 * BS, [], []);
    // Larger than nbdcopy's per-thread work unit (128 MiB), so several connections read at once.
    images.multi = await backUp('multi', 40 * BS + 4097, [3, 7, 11, 15, 19, 23, 27, 31, 35, 39], []);
    server = await startBackyNbd(repo.cfg);
  });

  after(async () => {
    if (server) {
      const code = await server.stop();
      assert.equal(code, 0, `backy nbd exit code; stderr:\n${server.stderr()}`);
      assert.ok(!alive(server.pid));
    }
    repo?.cleanup();
  });

  test('nbdinfo --list and --json: every version, named by uid, described by name, snapshot and date', async () => {
    const text = await run('nbdinfo', ['--list', `nbd://127.0.0.1:${server.port}`]);
    assert.equal(text.code, 0, text.stderr);
    const r = await run('nbdinfo', ['--list', '--json', `nbd://127.0.0.1:${server.port}`]);
    assert.equal(r.code, 0, r.stderr);
    const list = JSON.parse(r.stdout) as { exports: { 'export-name': string; description: string; 'export-size': number; is_read_only: boolean; can_multi_conn: boolean }[] };
    const ls = JSON.parse((await repo.ok(['--json', 'ls'])).stdout) as { uid: string; name: string; date: string }[];
    assert.ok(list.exports.length >= Object.keys(images).length);
    for (const img of Object.values(images)) {
      const e = list.exports.find((x) => x['export-name'] === img.uid);
      assert.ok(e, `${img.name} is listed`);
      assert.equal(e['export-size'], img.size);
      assert.equal(e.is_read_only, true);
      assert.equal(e.can_multi_conn, true);
      const date = ls.find((v) => v.uid === img.uid)!.date.replace('T', ' ').slice(0, 19);
      assert.ok(e.description.startsWith(`${img.name} `), e.description);
      assert.ok(e.description.includes(date), `${e.description} has the date ${date}`);
      assert.ok(text.stdout.includes(img.uid));
    }
    assert.match(list.exports.find((x) => x['export-name'] === images.beta.uid)!.description, /^beta snapshot snap-1 \d{4}-\d\d-\d\d \d\d:\d\d:\d\d$/);
    const one = await run('nbdinfo', ['--json', server.uri(images.beta.uid)]);
    assert.equal(one.code, 0, one.stderr);
    const info = JSON.parse(one.stdout).exports[0];
    assert.equal(info['export-size'], images.beta.size);
    assert.equal(info.block_size_minimum, 512, 'sector-multiple size: 512-byte minimum');
    assert.equal(info.block_size_preferred, 4096);
  });

  test('nbdinfo --map: zero blocks are holes, the rest data', async () => {
    for (const img of [images.alpha, images.beta, images.multi]) {
      const r = await run('nbdinfo', ['--map', '--json', server.uri(img.uid)]);
      assert.equal(r.code, 0, r.stderr);
      const map = JSON.parse(r.stdout) as { offset: number; length: number; type: number }[];
      const want: { offset: number; length: number; type: number }[] = [];
      for (let off = 0, i = 0; off < img.size; off += BS, i++) {
        const type = img.zeroBlocks.includes(i) ? 3 : 0;
        const length = Math.min(BS, img.size - off);
        const last = want[want.length - 1];
        if (last && last.type === type) last.length += length;
        else want.push({ offset: off, length, type });
      }
      assert.deepEqual(map.map(({ offset, length, type }) => ({ offset, length, type })), want, img.name);
    }
  });

  test('nbdcopy and qemu-img convert give byte-identical images (odd sizes)', async () => {
    for (const img of [images.alpha, images.beta]) {
      const want = sha256File(img.file);
      const out = path.join(repo.dir, `${img.name}.nbdcopy`);
      const c = await run('nbdcopy', [server.uri(img.uid), out], { timeoutMs: 60_000 });
      assert.equal(c.code, 0, c.stderr);
      assert.equal(fs.statSync(out).size, img.size);
      assert.equal(sha256File(out), want, `${img.name}: nbdcopy`);
      fs.rmSync(out);

      const q = path.join(repo.dir, `${img.name}.qemu`);
      const r = await run('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', server.uri(img.uid), q], { timeoutMs: 60_000 });
      assert.equal(r.code, 0, r.stderr);
      // qemu sees whole 512-byte sectors: an odd size is rounded up, the extra bytes read as zeroes.
      const qsize = fs.statSync(q).size;
      assert.equal(qsize, Math.ceil(img.size / 512) * 512);
      assert.equal(sha256(readRange(q, 0, img.size)), want, `${img.name}: qemu-img convert`);
      assert.ok(readRange(q, img.size, qsize - img.size).every((b) => b === 0), 'the rounded-up tail is zero');
      fs.rmSync(q);
    }
  });

  test('qemu-io -r: unaligned reads of known patterns and zero blocks', async () => {
    for (const img of [images.alpha, images.beta]) {
      const cmds: string[] = [];
      for (const p of img.patterns) {
        cmds.push(`read -P ${p.value} ${p.offset} ${p.length}`);
        cmds.push(`read -P ${p.value} ${p.offset + 3} ${p.length - 10}`);
      }
      for (const z of img.zeroBlocks) cmds.push(`read -P 0 ${z * BS + 777} ${BS - 1500}`, `read -P 0 ${z * BS} ${BS}`);
      const r = await run('qemu-io', ['-r', '-f', 'raw', ...cmds.flatMap((c) => ['-c', c]), server.uri(img.uid)]);
      assert.equal(r.code, 0, r.stderr);
      assert.doesNotMatch(r.stdout + r.stderr, /fail|error/i, `${img.name}: ${r.stdout}${r.stderr}`);
      assert.equal((r.stdout.match(/^read \d+\/\d+ bytes/gm) ?? []).length, cmds.length);
    }
    // The check is real: a wrong pattern is reported.
    const p = images.alpha.patterns[0];
    const bad = await run('qemu-io', ['-r', '-f', 'raw', '-c', `read -P ${p.value ^ 1} ${p.offset} ${p.length}`, server.uri(images.alpha.uid)]);
    assert.match(bad.stdout + bad.stderr, /Pattern verification failed/);
  });

  test('nbdcopy with its default parallelism: several connections, identical copy', async () => {
    const img = images.multi;
    const before = server.stderr().length;
    const out = path.join(repo.dir, 'multi.nbdcopy');
    const c = await run('nbdcopy', [server.uri(img.uid), out], { timeoutMs: 120_000 });
    assert.equal(c.code, 0, c.stderr);
    assert.equal(sha256File(out), sha256File(img.file));
    fs.rmSync(out);
    assert.ok(await waitFor(() => (server.stderr().slice(before).match(/connection closed after .*, [1-9]\d* reads of/g) ?? []).length >= 2, 5000),
      `at least two connections read data:\n${server.stderr().slice(before)}`);
  });

  test('a corrupt blob fails its range only; the rest and other clients keep working', async () => {
    const img = images.corrupt;
    const file = blobFileOf(repo, img.uid, 1);
    const blob = fs.readFileSync(file);
    blob[blob.length >> 1] ^= 0x40;
    fs.writeFileSync(file, blob);
    const before = server.stderr().length;

    const c = await NbdClient.connect({ host: '127.0.0.1', port: server.port }, { exportName: img.uid });
    const other = await NbdClient.connect({ host: '127.0.0.1', port: server.port }, { exportName: images.alpha.uid });
    try {
      const [bad, good0, good2, otherAll] = await Promise.allSettled([
        c.read(BS + 4096, 8192),
        c.read(0, BS),
        c.read(2 * BS + 5, BS - 5),
        other.read(0, images.alpha.size),
      ]);
      assert.equal(bad.status, 'rejected');
      assert.equal((bad as PromiseRejectedResult).reason.errno, 'EIO');
      assert.match(String((bad as PromiseRejectedResult).reason.message), /authentication failed|corrupt/);
      assert.equal(good0.status, 'fulfilled');
      assert.ok((good0 as PromiseFulfilledResult<Buffer>).value.equals(readRange(img.file, 0, BS)));
      assert.ok((good2 as PromiseFulfilledResult<Buffer>).value.equals(readRange(img.file, 2 * BS + 5, BS - 5)));
      assert.equal(sha256((otherAll as PromiseFulfilledResult<Buffer>).value), sha256File(images.alpha.file));
      // A read spanning good and bad blocks fails as a whole, and the connection goes on.
      await assert.rejects(c.read(BS - 100, 200), /offset|corrupt|authentication/);
      assert.ok((await c.read(100, 100)).equals(readRange(img.file, 100, 100)));
    } finally {
      await c.close();
      await other.close();
    }
    // Real clients: qemu-io reads around the damage, nbdcopy fails with an I/O error.
    const q = await run('qemu-io', ['-r', '-f', 'raw', '-c', `read 0 ${BS}`, '-c', `read ${2 * BS} ${BS}`, server.uri(img.uid)]);
    assert.equal(q.code, 0, q.stderr);
    const qbad = await run('qemu-io', ['-r', '-f', 'raw', '-c', `read ${BS + 512} 512`, server.uri(img.uid)]);
    assert.match(qbad.stdout + qbad.stderr, /Input\/output error/);
    const copy = await run('nbdcopy', [server.uri(img.uid), 'null:']);
    assert.notEqual(copy.code, 0);
    // Logged at error level with the offset, without a stack trace.
    const log = server.stderr().slice(before);
    assert.match(log, new RegExp(`ERROR: version ${img.uid}: cannot read block at offset ${BS}: blob .* is corrupt`));
    assert.doesNotMatch(log, /\n\s+at /);
    assert.ok(alive(server.pid));
    blob[blob.length >> 1] ^= 0x40;
    fs.writeFileSync(file, blob);
  });

  test('malformed handshakes and requests from a raw socket: the server survives', async () => {
    const port = server.port;
    let p = await RawPeer.connect(port);
    await p.reader.read(18);
    p.write(Buffer.from('GARBAGE GARBAGE GARBAGE'));
    assert.ok(await p.closedWithin(3000), 'garbage client flags: closed');

    p = await RawPeer.connect(port);
    await p.greet();
    p.sendOption(C.OPT_LIST, Buffer.alloc(0), 0x1122334455667788n);
    assert.ok(await p.closedWithin(3000), 'bad option magic: closed');

    p = await RawPeer.connect(port);
    await p.greet();
    p.sendOption(C.OPT_GO, Buffer.alloc(0), undefined, 0x7fffffff);
    assert.ok(await p.closedWithin(3000), 'huge option: closed');

    p = await RawPeer.connect(port);
    await p.greet();
    p.sendOption(C.OPT_EXPORT_NAME, Buffer.from('no-such-version'));
    assert.ok(await p.closedWithin(3000), 'unknown export: closed');

    // Transmission: errors for bad requests, the stream stays in sync, a wrong magic closes.
    p = await RawPeer.connect(port);
    await p.greet();
    const { size } = await p.go(images.alpha.uid);
    assert.equal(size, images.alpha.size);
    p.sendRequest(C.CMD_READ, size - 10, 11);
    assert.equal((await p.readSimpleReply()).error, C.EINVAL, 'read past the end');
    p.sendRequest(C.CMD_READ, 0, 1024 * MiB);
    assert.equal((await p.readSimpleReply()).error, C.EINVAL, 'oversized read');
    p.sendRequest(C.CMD_WRITE, 0, 1000, { payload: Buffer.alloc(1000, 1) });
    assert.equal((await p.readSimpleReply()).error, C.EPERM, 'write to a read-only export');
    p.sendRequest(C.CMD_TRIM, 0, 4096);
    assert.equal((await p.readSimpleReply()).error, C.EPERM, 'trim');
    p.sendRequest(C.CMD_READ, 1000, 5000, { cookie: 9n });
    const r = await p.readSimpleReply(5000);
    assert.equal(r.cookie, 9n);
    assert.ok(r.data.equals(Buffer.alloc(5000, 0xa5)), 'in sync after the errors');
    p.sendRequest(C.CMD_READ, 0, 1, { magic: 0x12345678 });
    assert.ok(await p.closedWithin(3000), 'wrong request magic: closed');

    // A client that vanishes in the middle of a request, and one with a read in flight.
    p = await RawPeer.connect(port);
    await p.greet();
    await p.go(images.multi.uid);
    p.write(Buffer.from([0x25, 0x60, 0x95, 0x13, 0, 0, 0]));
    p.destroy();
    p = await RawPeer.connect(port);
    await p.greet();
    await p.go(images.multi.uid);
    p.sendRequest(C.CMD_READ, 0, 32 * MiB);
    p.destroy();

    assert.ok(alive(server.pid));
    const still = await run('nbdinfo', ['--json', server.uri(images.beta.uid)]);
    assert.equal(still.code, 0, still.stderr);
    const c = await NbdClient.connect({ host: '127.0.0.1', port }, { exportName: images.beta.uid });
    assert.ok((await c.read(2 * BS + 511, 1025)).equals(Buffer.alloc(1025, 0x11)));
    await c.close();
    assert.doesNotMatch(server.stderr(), /\n\s+at /, 'no stack traces');
  });

  test('a version held by connected clients cannot be removed; a blob lost from storage gives EIO, no crash; once they leave, rm works', async () => {
    const img = images.gone;
    const want = fs.readFileSync(img.file);
    // a: has read block 0 (its block map is loaded); b: connected but has read nothing.
    const a = await NbdClient.connect({ host: '127.0.0.1', port: server.port }, { exportName: img.uid });
    const b = await NbdClient.connect({ host: '127.0.0.1', port: server.port }, { exportName: img.uid });
    try {
      assert.ok((await a.read(0, 4096)).equals(want.subarray(0, 4096)));
      const blob1 = blobFileOf(repo, img.uid, 1);
      // The export holds the version: rm is refused, naming the holder.
      const rm = await repo.run(['rm', '-f', img.uid]);
      assert.equal(rm.code, 100, rm.stderr);
      assert.match(rm.stderr, new RegExp(`NBD export of ${img.uid} holds it \\(pid ${server.pid} `));
      assert.ok((await a.read(2 * BS, BS)).equals(want.subarray(2 * BS, 3 * BS)));
      // b shares a's device (one per export): the block map a loaded serves b too.
      assert.ok((await b.read(2 * BS, 4096)).equals(want.subarray(2 * BS, 2 * BS + 4096)));
      // A blob that disappears from storage behind backy's back: blocks not in the cache fail, cached ones are still served.
      fs.rmSync(blob1);
      await assert.rejects(a.read(BS + 4096, 4096), (e: Error & { errno?: string }) => e.errno === 'EIO' && /missing/.test(e.message));
      assert.ok((await a.read(0, 8192)).equals(want.subarray(0, 8192)), 'cached block still served');
    } finally {
      await a.close();
      await b.close();
    }
    // Both gone: the hold ends with the export (closing is asynchronous on the server's side).
    let removed = await repo.run(['rm', '-f', img.uid]);
    for (let i = 0; i < 100 && removed.code === 100; i++) {
      await new Promise((r) => setTimeout(r, 100));
      removed = await repo.run(['rm', '-f', img.uid]);
    }
    assert.equal(removed.code, 0, removed.stderr);
    await repo.ok(['cleanup', '--dangerous-force']);
    // New connections no longer find it.
    await assert.rejects(NbdClient.connect({ host: '127.0.0.1', port: server.port }, { exportName: img.uid }), /unknown|refused/i);
    const l = await run('nbdinfo', ['--list', '--json', `nbd://127.0.0.1:${server.port}`]);
    assert.ok(!l.stdout.includes(img.uid));
    assert.ok(alive(server.pid));
    const other = await run('nbdcopy', [server.uri(images.beta.uid), path.join(repo.dir, 'beta.again')]);
    assert.equal(other.code, 0, other.stderr);
    assert.equal(sha256File(path.join(repo.dir, 'beta.again')), sha256File(images.beta.file));
  });

  test('a 1 TiB sparse version: opening it and the first read take well under a second', async (t) => {
    const TiB = 1024 ** 4;
    const block = new SeededRandom('tib').bytes(BS);
    const far = 200_000; // block index: offset 781 GiB, in map chunk 195
    const uid = await makeSparseVersion(repo.cfg, 'huge', TiB, new Map([[far, block]]));
    const t0 = performance.now();
    const c = await NbdClient.connect({ host: '127.0.0.1', port: server.port }, { exportName: uid });
    try {
      const got = await c.read(far * BS + 12345, 4096);
      const ms = performance.now() - t0;
      assert.ok(got.equals(block.subarray(12345, 12345 + 4096)));
      t.diagnostic(`1 TiB version: connect + first 4 KiB read ${ms.toFixed(0)} ms`);
      assert.ok(ms < 1000, `connect + first read took ${ms.toFixed(0)} ms`);
      const t1 = performance.now();
      assert.ok((await c.read(TiB - 65536, 65536)).every((x) => x === 0));
      assert.ok(performance.now() - t1 < 1000);
      assert.equal(c.size, TiB);
    } finally {
      await c.close();
    }
    // The whole map of 1 TiB from block status, without reading data.
    const t2 = performance.now();
    const m = await run('nbdinfo', ['--map', '--json', server.uri(uid)], { timeoutMs: 60_000 });
    assert.equal(m.code, 0, m.stderr);
    const map = JSON.parse(m.stdout) as { offset: number; length: number; type: number }[];
    assert.deepEqual(map.map(({ offset, length, type }) => ({ offset, length, type })), [
      { offset: 0, length: far * BS, type: 3 },
      { offset: far * BS, length: BS, type: 0 },
      { offset: (far + 1) * BS, length: TiB - (far + 1) * BS, type: 3 },
    ]);
    t.diagnostic(`1 TiB version: nbdinfo --map ${(performance.now() - t2).toFixed(0)} ms`);
    assert.ok(performance.now() - t2 < 20_000, `map of 1 TiB: ${(performance.now() - t2).toFixed(0)} ms`);
  });

  test('SIGTERM and SIGINT with clients connected: exit 0 promptly, no process left', async (t) => {
    for (const signal of ['SIGTERM', 'SIGINT'] as const) {
      const srv = await startBackyNbd(repo.cfg);
      try {
        const idle = await NbdClient.connect({ host: '127.0.0.1', port: srv.port }, { exportName: images.alpha.uid });
        const busy = await NbdClient.connect({ host: '127.0.0.1', port: srv.port }, { exportName: images.multi.uid });
        const inFlight = busy.read(0, 32 * MiB).then(() => 'done', () => 'failed');
        await new Promise((r) => setTimeout(r, 50));
        const t0 = performance.now();
        srv.child.kill(signal);
        const code = await Promise.race([srv.exited, new Promise<number>((r) => setTimeout(() => r(-1), 10_000))]);
        assert.equal(code, 0, `${signal}: exit code; stderr:\n${srv.stderr()}`);
        assert.ok(performance.now() - t0 < 10_000);
        const outcome = await inFlight;
        assert.ok(['done', 'failed'].includes(outcome), 'the in-flight read was answered or failed');
        t.diagnostic(`${signal}: exit 0 after ${(performance.now() - t0).toFixed(0)} ms, the read in flight ${outcome}`);
        assert.match(srv.stderr(), new RegExp(`${signal}: stopping`));
        await idle.close().catch(() => undefined);
        await busy.close().catch(() => undefined);
      } finally {
        await srv.stop();
      }
      assert.ok(!alive(srv.pid));
    }
  });

  test('command line: bad options exit 2, an address in use exits 1, one line each; a Unix socket works', async () => {
    const bad = await repo.run(['nbd', '-p', '70000']);
    assert.equal(bad.code, 2);
    assert.equal(bad.stderr.trim().split('\n').length, 1, bad.stderr);
    const both = await repo.run(['nbd', '--socket', path.join(repo.dir, 's'), '-p', '1234']);
    assert.equal(both.code, 2);
    assert.match(both.stderr, /cannot be combined/);
    const blocker = net.createServer();
    const port = await freePort();
    await new Promise<void>((r) => blocker.listen(port, '127.0.0.1', () => r()));
    try {
      const busy = await repo.run(['nbd', '-p', String(port)], { timeoutMs: 30_000 });
      assert.equal(busy.code, 1, busy.stderr);
      assert.match(busy.stderr, /^ERROR: cannot listen on 127\.0\.0\.1:\d+: address already in use \(EADDRINUSE\)$/m);
      assert.doesNotMatch(busy.stderr, /\n\s+at /);
    } finally {
      blocker.close();
    }

    const sock = path.join(repo.dir, 'nbd.sock');
    fs.writeFileSync(sock, ''); // not a socket: refused
    const notSock = await repo.run(['nbd', '--socket', sock]);
    assert.equal(notSock.code, 1);
    fs.rmSync(sock);
    const srv = await startBackyNbdOnSocket(repo.cfg, sock);
    try {
      const r = await run('nbdinfo', ['--json', `nbd+unix:///${images.beta.uid}?socket=${sock}`]);
      assert.equal(r.code, 0, r.stderr);
      assert.equal(JSON.parse(r.stdout).exports[0]['export-size'], images.beta.size);
    } finally {
      await new Promise<void>((resolve) => {
        if (srv.exitCode !== null || srv.signalCode !== null) return resolve();
        const t = setTimeout(() => srv.kill('SIGKILL'), 15_000);
        srv.once('exit', () => {
          clearTimeout(t);
          resolve();
        });
        srv.kill('SIGTERM');
      });
    }
    assert.equal(srv.exitCode, 0);
    assert.ok(!fs.existsSync(sock), 'the socket file is removed on exit');
  });
});

/** `backy nbd --socket PATH` as a child; resolves once its socket file exists. */
async function startBackyNbdOnSocket(cfg: string, sock: string): Promise<ChildProcess> {
  const child = spawn(process.execPath, [BACKY, '-c', cfg, 'nbd', '--socket', sock], { stdio: 'ignore' });
  const ok = await waitFor(() => fs.existsSync(sock), 15_000);
  if (!ok) {
    child.kill('SIGKILL');
    throw new Error('backy nbd --socket never created its socket');
  }
  return child;
}
