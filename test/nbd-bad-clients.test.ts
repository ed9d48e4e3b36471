/**
 * Bad NBD clients cannot take the server down for everyone else: a connection limit, a handshake timeout, a
 * timeout for clients that stop reading, and memory bounded per connection including replies queued to a
 * client that never reads: 50 such clients against `backy nbd` keep its RSS bounded while another client
 * copies a version.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { NbdServer, NbdServerOptions } from '../nbd/server';
import * as C from '../nbd/constants';
import { MemoryCatalogue, MemoryDevice, ZeroDevice, sha256 } from './helpers/nbd-memdev';
import { RawPeer, run, waitFor } from './helpers/nbd-tools';
import { makeTestRepo, TestRepo } from './helpers/cli';
import { BackyNbd, startBackyNbd } from './helpers/backy-nbd';
import { SeededRandom } from './helpers/images';
import { NbdClient } from '../nbd/client';

const MiB = 1024 * 1024;
const GiB = 1024 * MiB;

async function withServer(fn: (f: { server: NbdServer; port: number; logs: string[]; device: MemoryDevice }) => Promise<void>, options: Partial<NbdServerOptions>): Promise<void> {
  const device = new MemoryDevice(Buffer.alloc(64 * MiB, 0x5c));
  const catalogue = new MemoryCatalogue(new Map<string, { device: MemoryDevice | ZeroDevice; description: string }>([
    ['disk', { device, description: 'disk' }],
    ['zeros', { device: new ZeroDevice(4 * GiB), description: 'zeros' }],
  ]));
  const logs: string[] = [];
  const server = new NbdServer({ catalogue, log: (l) => logs.push(l), closeTimeoutMs: 1000, ...options });
  const a = await server.listen({ port: 0 });
  try {
    await fn({ server, port: (a as { port: number }).port, logs, device });
  } finally {
    await server.close();
  }
  assert.equal(server.connectionCount, 0);
}

async function served(port: number): Promise<void> {
  const c = await NbdClient.connect({ host: '127.0.0.1', port }, { exportName: 'disk' });
  try {
    assert.ok((await c.read(5 * MiB, 4096)).equals(Buffer.alloc(4096, 0x5c)));
  } finally {
    await c.close();
  }
}

describe('NBD server against bad clients', () => {
  test('connection limit: more connections are closed at once, logged once per interval; freed slots are reused', async () => {
    await withServer(async ({ server, port, logs }) => {
      const held: RawPeer[] = [];
      for (let i = 0; i < 3; i++) {
        const p = await RawPeer.connect(port);
        await p.greet();
        held.push(p);
      }
      assert.ok(await waitFor(() => server.connectionCount === 3));
      const refused: RawPeer[] = [];
      for (let i = 0; i < 20; i++) refused.push(await RawPeer.connect(port));
      for (const p of refused) assert.ok(await p.closedWithin(2000), 'over the limit: closed');
      const lines = logs.filter((l) => /connections open, the limit/.test(l));
      assert.equal(lines.length, 1, `one line for 20 refusals: ${lines.join('\n')}`);
      held.pop()!.destroy();
      assert.ok(await waitFor(() => server.connectionCount === 2));
      await served(port);
      for (const p of held) p.destroy();
    }, { maxConnections: 3 });
  });

  test('handshake timeout: a client that sends nothing, or stops in the middle of an option, is dropped', async () => {
    await withServer(async ({ port, logs }) => {
      const silent = await RawPeer.connect(port);
      const halfway = await RawPeer.connect(port);
      await halfway.greet();
      halfway.write(Buffer.from('IHAVEOPT'));
      const t0 = Date.now();
      assert.ok(await silent.closedWithin(5000), 'silent client dropped');
      assert.ok(await halfway.closedWithin(5000), 'half an option: dropped');
      assert.ok(Date.now() - t0 >= 300, 'not before the timeout');
      assert.ok(logs.filter((l) => /no export chosen within 0\.5 s/.test(l)).length >= 2, logs.join('\n'));
      // A client in transmission is not subject to it.
      const c = await NbdClient.connect({ host: '127.0.0.1', port }, { exportName: 'disk' });
      await new Promise((r) => setTimeout(r, 1000));
      assert.ok((await c.read(0, 10)).equals(Buffer.alloc(10, 0x5c)));
      await c.close();
    }, { handshakeTimeoutMs: 500 });
  });

  test('a client that stops reading is dropped after the reply timeout; others are served meanwhile', async () => {
    await withServer(async ({ port, logs, server }) => {
      const p = await RawPeer.connect(port);
      await p.greet();
      await p.go('disk', { structured: true });
      p.socket.pause();
      for (let i = 0; i < 8; i++) p.sendRequest(C.CMD_READ, i * 8 * MiB, 8 * MiB, { cookie: BigInt(i) });
      const t0 = Date.now();
      await served(port);
      assert.ok(await waitFor(() => logs.some((l) => /replies unread for 1 s; closing connection/.test(l)), 10_000), logs.join('\n'));
      const waited = Date.now() - t0;
      assert.ok(waited >= 900 && waited < 8000, `dropped after ${waited} ms`);
      assert.ok(await waitFor(() => server.connectionCount === 0));
      // The client, reading again, finds the connection closed.
      p.socket.resume();
      assert.ok(await p.closedWithin(5000), 'closed');
    }, { replyTimeoutMs: 1000 });
  });

  test('a structured client that never reads holds at most its reply budget; simple ones share one budget', async () => {
    await withServer(async ({ port, device }) => {
      // 16 reads of 32 MiB: pieces are read only as the budget (2 MiB) and the socket allow.
      const p = await RawPeer.connect(port);
      await p.greet();
      await p.go('disk', { structured: true });
      p.socket.pause();
      const before = device.reads;
      for (let i = 0; i < 16; i++) p.sendRequest(C.CMD_READ, (i % 2) * 32 * MiB, 32 * MiB, { cookie: BigInt(i) });
      await new Promise((r) => setTimeout(r, 1500));
      const pieces = device.reads - before;
      // Socket buffers (a few MiB in the kernel) plus the 2 MiB budget, in 1 MiB pieces; 512 pieces were asked for.
      assert.ok(pieces > 0 && pieces < 24, `${pieces} pieces read for a client that reads nothing`);

      // Simple replies must be read whole: two stalled clients use up the shared 64 MiB; a third simple
      // read waits, a structured client is served.
      const stalled: RawPeer[] = [];
      for (let i = 0; i < 2; i++) {
        const s = await RawPeer.connect(port);
        await s.greet();
        await s.go('disk');
        s.socket.pause();
        for (let k = 0; k < 4; k++) s.sendRequest(C.CMD_READ, k * 16 * MiB, 32 * MiB, { cookie: BigInt(k) });
        stalled.push(s);
      }
      await new Promise((r) => setTimeout(r, 500));
      await served(port);
      p.destroy();
      for (const s of stalled) s.destroy();
    }, { maxReplyBytesPerConnection: 2 * MiB, maxWholeReplyBytes: 64 * MiB });
  });
});

/** Resident and peak resident set size of a process, in bytes. */
function rss(pid: number): { now: number; peak: number } {
  const s = fs.readFileSync(`/proc/${pid}/status`, 'utf8');
  const kb = (k: string): number => Number(new RegExp(`${k}:\\s+(\\d+) kB`).exec(s)?.[1] ?? 0) * 1024;
  return { now: kb('VmRSS'), peak: kb('VmHWM') };
}

describe('backy nbd under 50 clients that never read', () => {
  let repo: TestRepo;
  let server: BackyNbd;
  let big: { uid: string; size: number };
  let small: { uid: string; hash: string; size: number };

  before(async () => {
    repo = makeTestRepo('[DEFAULTS]\ncache_size = 64M\n');
    await repo.ok(['initdb']);
    const rnd = new SeededRandom('attack');
    const bigFile = path.join(repo.dir, 'big.img');
    const fd = fs.openSync(bigFile, 'w');
    for (let off = 0; off < 192 * MiB; off += 4 * MiB) fs.writeSync(fd, rnd.bytes(4 * MiB), 0, 4 * MiB, off);
    fs.closeSync(fd);
    big = { uid: (await repo.ok(['backup', `file://${bigFile}`, 'big'])).stdout.trim(), size: 192 * MiB };
    fs.rmSync(bigFile);
    const smallFile = path.join(repo.dir, 'small.img');
    const data = rnd.bytes(24 * MiB);
    fs.writeFileSync(smallFile, data);
    small = { uid: (await repo.ok(['backup', `file://${smallFile}`, 'small'])).stdout.trim(), hash: sha256(data), size: data.length };
    server = await startBackyNbd(repo.cfg, ['--reply-timeout', '8']);
  });

  after(async () => {
    if (server) assert.equal(await server.stop(), 0, server.stderr());
    repo?.cleanup();
  });

  test('RSS stays bounded and another client copies a version meanwhile; the stalled clients are dropped after the reply timeout', async () => {
    // Warm up: one read of each kind, so the baseline includes the code paths and worker threads.
    const warm = await run('nbdcopy', [server.uri(small.uid), 'null:']);
    assert.equal(warm.code, 0, warm.stderr);
    const base = rss(server.pid);

    const clients: RawPeer[] = [];
    for (let i = 0; i < 50; i++) {
      const p = await RawPeer.connect(server.port);
      await p.greet();
      // Half with structured replies (reads in pieces), half with simple replies (reads whole).
      await p.go(big.uid, { structured: i % 2 === 0 });
      p.socket.pause();
      for (let k = 0; k < 4; k++) {
        const at = ((i * 4 + k) * 32 * MiB) % (big.size - 32 * MiB);
        p.sendRequest(C.CMD_READ, at, 32 * MiB, { cookie: BigInt(k) });
      }
      clients.push(p);
    }
    let peak = base.peak;
    const sample = setInterval(() => (peak = Math.max(peak, rss(server.pid).peak)), 100);
    try {
      // Another client copies a whole version while the 50 hold their connections.
      const out = path.join(repo.dir, 'small.copy');
      const t0 = Date.now();
      const c = await run('nbdcopy', [server.uri(small.uid), out], { timeoutMs: 60_000 });
      assert.equal(c.code, 0, c.stderr);
      assert.equal(sha256(fs.readFileSync(out)), small.hash);
      const copyMs = Date.now() - t0;
      await new Promise((r) => setTimeout(r, 3000)); // let the server do all it will for the stalled clients
      peak = Math.max(peak, rss(server.pid).peak);
      const grown = peak - base.now;
      // 50 × 4 × 32 MiB = 6.4 GiB asked for. Bound: the 64 MiB cache, 256 MiB shared by the simple replies
      // that must be read whole, and per structured connection its 8 MiB budget plus one queued block.
      process.stdout.write(`# 50 stalled clients: server RSS ${(base.now / MiB).toFixed(0)} MiB before, peak ${(peak / MiB).toFixed(0)} MiB ` +
        `(+${(grown / MiB).toFixed(0)} MiB); a 24 MiB nbdcopy meanwhile took ${copyMs} ms\n`);
      assert.ok(grown < 1024 * MiB, `server RSS grew by ${(grown / MiB).toFixed(0)} MiB`);
    } finally {
      clearInterval(sample);
    }
    // After the reply timeout the stalled clients are dropped (one warning line for all of them, with a
    // count: the log is not flooded), each connection's closing line says so, and each client finds its
    // connection closed once it reads again. Simple-reply clients waiting for the shared budget are served
    // (and then dropped) in waves as the ones ahead of them are dropped.
    const dropped = (): number => (server.stderr().match(/connection closed after .*: 4 requests, 4 reads of 134217728 bytes/g) ?? []).length;
    assert.ok(await waitFor(() => dropped() === 50, 120_000), `${dropped()} dropped: ${server.stderr().slice(-2000)}`);
    const warnings = server.stderr().match(/replies unread for 8 s; closing connection.*/g) ?? [];
    assert.ok(warnings.length >= 1 && warnings.length < 25, `${warnings.length} warning lines for 50 drops:\n${warnings.join('\n')}`);
    for (const p of clients) {
      p.socket.resume();
      assert.ok(await p.closedWithin(10_000), 'closed');
    }
  });
});
