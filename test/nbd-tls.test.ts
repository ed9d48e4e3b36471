/**
 * NBD over TLS (NBD_OPT_STARTTLS): pre-shared keys and X.509 made in the test with psktool and certtool, real
 * clients (nbdinfo, nbdcopy, qemu-img), plain clients refused when TLS is required, and `backy nbd` with its
 * TLS options, the loopback rule and the socket mode.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import * as tls from 'node:tls';
import { spawn } from 'node:child_process';
import { NbdServer, NbdServerOptions, NbdTlsOptions, loadCertificateDir, parsePskFile } from '../nbd/server';
import * as C from '../nbd/constants';
import { SocketReader, SocketWriter } from '../nbd/wire';
import { MemoryCatalogue, MemoryDevice, buildImage, sha256 } from './helpers/nbd-memdev';
import { RawPeer, run } from './helpers/nbd-tools';
import { makePki, Pki } from './helpers/nbd-tls';
import { BACKY, makeTestRepo, TestRepo } from './helpers/cli';
import { startBackyNbd } from './helpers/backy-nbd';
import { freePort } from './helpers/net';

const MiB = 1024 * 1024;

let tmp: string;
let pki: Pki;
const img = buildImage([{ length: 2 * MiB + 4096, fill: 'random' }, { length: MiB, fill: 'zero' }, { length: MiB - 4096, fill: 0x6b }]);

before(() => {
  tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'nbd-tls-'));
  pki = makePki(path.join(tmp, 'pki'));
});
after(() => {
  fs.rmSync(tmp, { recursive: true, force: true });
});

async function withServer(tlsOptions: NbdTlsOptions, fn: (f: { port: number; logs: string[] }) => Promise<void>, extra: Partial<NbdServerOptions> = {}): Promise<void> {
  const catalogue = new MemoryCatalogue(new Map([['disk', { device: MemoryDevice.fromImage(img), description: 'a disk' }]]));
  const logs: string[] = [];
  const server = new NbdServer({ catalogue, tls: tlsOptions, log: (l) => { logs.push(l); if (process.env.NBD_TLS_DEBUG) console.error(l); }, ...extra });
  const a = await server.listen({ port: 0 });
  try {
    await fn({ port: (a as { port: number }).port, logs });
  } finally {
    await server.close();
  }
  assert.equal(server.connectionCount, 0);
  assert.equal(catalogue.closes, catalogue.opens, 'every opened export is closed');
}

const psk = (): NbdTlsOptions => ({ mode: 'require', psk: parsePskFile(fs.readFileSync(pki.pskFile, 'utf8')) });
const x509 = (verifyPeer = false): NbdTlsOptions => ({ mode: 'require', ...loadCertificateDir(pki.serverDir, verifyPeer) });

function nbdinfoJson(stdout: string): { TLS: boolean; exports: Array<{ 'export-size': number }> } {
  return JSON.parse(stdout);
}

describe('NBD server with TLS', () => {
  test('PSK: nbdinfo, nbdcopy and qemu-img read over TLS; plain clients and wrong keys are refused', async () => {
    await withServer(psk(), async ({ port, logs }) => {
      const uri = `nbds://alice@127.0.0.1:${port}/disk?tls-psk-file=${pki.pskFile}`;
      const info = await run('nbdinfo', ['--json', uri]);
      assert.equal(info.code, 0, info.stderr);
      assert.equal(nbdinfoJson(info.stdout).TLS, true);
      assert.equal(nbdinfoJson(info.stdout).exports[0]['export-size'], img.data.length);

      const out = path.join(tmp, 'psk.nbdcopy');
      const c = await run('nbdcopy', ['--connections=2', uri, out]);
      assert.equal(c.code, 0, c.stderr);
      assert.equal(sha256(fs.readFileSync(out)), sha256(img.data));

      const q = path.join(tmp, 'psk.qemu');
      const r = await run('qemu-img', ['convert', '-O', 'raw',
        '--object', `tls-creds-psk,id=tls0,endpoint=client,dir=${pki.pskDir},username=alice`,
        '--image-opts', `driver=nbd,host=127.0.0.1,port=${port},export=disk,tls-creds=tls0`, q]);
      assert.equal(r.code, 0, r.stderr);
      assert.equal(sha256(fs.readFileSync(q)), sha256(img.data));

      // Plain text: refused (TLS required), and no data.
      const plain = await run('nbdinfo', ['--json', `nbd://127.0.0.1:${port}/disk`]);
      assert.notEqual(plain.code, 0);
      const plainCopy = await run('nbdcopy', [`nbd://127.0.0.1:${port}/disk`, path.join(tmp, 'plain.out')]);
      assert.notEqual(plainCopy.code, 0);
      assert.ok(!fs.existsSync(path.join(tmp, 'plain.out')) || fs.statSync(path.join(tmp, 'plain.out')).size === 0);
      // The right identity with the wrong key, and an unknown identity.
      const wrong = await run('nbdinfo', [`nbds://alice@127.0.0.1:${port}/disk?tls-psk-file=${pki.wrongPskFile}`]);
      assert.notEqual(wrong.code, 0);
      const bob = path.join(tmp, 'bob.psk');
      fs.writeFileSync(bob, fs.readFileSync(pki.pskFile, 'utf8').replace(/^alice:/, 'bob:'));
      const stranger = await run('nbdinfo', [`nbds://bob@127.0.0.1:${port}/disk?tls-psk-file=${bob}`]);
      assert.notEqual(stranger.code, 0);
      assert.ok(logs.some((l) => /TLS handshake failed/.test(l)), logs.join('\n'));
      assert.ok(logs.every((l) => !/\n/.test(l) && !/statem_srvr\.c/.test(l)), `one line each, without OpenSSL's source lines: ${logs.join('\n')}`);
    });
  });

  test('X.509: server certificate checked by the client; with verifyPeer, clients need a certificate of the CA', async () => {
    await withServer(x509(), async ({ port }) => {
      const info = await run('nbdinfo', ['--json', `nbds://localhost:${port}/disk?tls-certificates=${pki.caOnlyDir}`]);
      assert.equal(info.code, 0, info.stderr);
      assert.equal(nbdinfoJson(info.stdout).TLS, true);
      const q = path.join(tmp, 'x509.qemu');
      const r = await run('qemu-img', ['convert', '-O', 'raw',
        '--object', `tls-creds-x509,id=tls0,endpoint=client,dir=${pki.caOnlyDir}`,
        '--image-opts', `driver=nbd,host=localhost,port=${port},export=disk,tls-creds=tls0`, q]);
      assert.equal(r.code, 0, r.stderr);
      assert.equal(sha256(fs.readFileSync(q)), sha256(img.data));
      // A client that trusts another CA refuses the server.
      const other = path.join(tmp, 'other-ca');
      fs.mkdirSync(other, { recursive: true });
      fs.copyFileSync(path.join(tmp, 'pki', 'other-ca', 'other-cert.pem'), path.join(other, 'ca-cert.pem'));
      const distrust = await run('nbdinfo', [`nbds://localhost:${port}/disk?tls-certificates=${other}`]);
      assert.notEqual(distrust.code, 0);
    });
    await withServer(x509(true), async ({ port, logs }) => {
      const ok = await run('nbdcopy', [`nbds://localhost:${port}/disk?tls-certificates=${pki.clientDir}`, path.join(tmp, 'peer.out')]);
      assert.equal(ok.code, 0, ok.stderr);
      assert.equal(sha256(fs.readFileSync(path.join(tmp, 'peer.out'))), sha256(img.data));
      const none = await run('nbdinfo', [`nbds://localhost:${port}/disk?tls-certificates=${pki.caOnlyDir}`]);
      assert.notEqual(none.code, 0, 'no client certificate: refused');
      const stranger = await run('nbdinfo', [`nbds://localhost:${port}/disk?tls-certificates=${pki.strangerDir}`]);
      assert.notEqual(stranger.code, 0, 'a client certificate of another CA: refused');
      assert.ok(logs.filter((l) => /TLS handshake failed/.test(l)).length >= 2, logs.join('\n'));
    });
  });

  test('require: every option but STARTTLS gets TLS_REQD, EXPORT_NAME ends the session; on: plain clients are served', async () => {
    await withServer(psk(), async ({ port }) => {
      const p = await RawPeer.connect(port);
      await p.greet();
      for (const opt of [C.OPT_LIST, C.OPT_STRUCTURED_REPLY, C.OPT_INFO, C.OPT_GO, 42]) {
        p.sendOption(opt, opt === C.OPT_GO || opt === C.OPT_INFO ? goPayload('disk') : Buffer.alloc(0));
        const r = await p.readOptionReply();
        assert.deepEqual([r.option, r.type], [opt, C.REP_ERR_TLS_REQD], `option ${opt}`);
      }
      p.sendOption(C.OPT_EXPORT_NAME, Buffer.from('disk'));
      assert.ok(await p.closedWithin(2000), 'EXPORT_NAME without TLS closes');
    });
    await withServer({ ...psk(), mode: 'on' }, async ({ port }) => {
      const plain = await run('nbdinfo', ['--json', `nbd://127.0.0.1:${port}/disk`]);
      assert.equal(plain.code, 0, plain.stderr);
      assert.equal(nbdinfoJson(plain.stdout).TLS, false);
      const secure = await run('nbdinfo', ['--json', `nbds://alice@127.0.0.1:${port}/disk?tls-psk-file=${pki.pskFile}`]);
      assert.equal(secure.code, 0, secure.stderr);
      assert.equal(nbdinfoJson(secure.stdout).TLS, true);
    });
  });

  test('STARTTLS: state negotiated in plain text is dropped; a second STARTTLS is invalid; bytes before the TLS hello end the session', async () => {
    await withServer(psk(), async ({ port }) => {
      // Structured replies asked for before TLS are forgotten: the export is entered without them (no DF).
      // The server is in FORCEDTLS mode, so the plain request is refused anyway; use mode 'on' below.
      const key = parsePskFile(fs.readFileSync(pki.pskFile, 'utf8')).get('alice')!;
      const p = await RawPeer.connect(port);
      await p.greet();
      p.sendOption(C.OPT_STARTTLS, Buffer.from('x'));
      assert.equal((await p.readOptionReply()).type, C.REP_ERR_INVALID, 'STARTTLS with data');
      p.sendOption(C.OPT_STARTTLS);
      assert.equal((await p.readOptionReply()).type, C.REP_ACK);
      const s = await secureClient(p, key);
      s.sendOption(C.OPT_STARTTLS);
      assert.equal((await s.readOptionReply()).type, C.REP_ERR_INVALID, 'second STARTTLS');
      s.close();

      // Plain bytes right behind STARTTLS (before the ACK could be read) are refused.
      const q = await RawPeer.connect(port);
      await q.greet();
      q.sendOption(C.OPT_STARTTLS);
      q.sendOption(C.OPT_LIST);
      assert.ok(await q.closedWithin(3000), 'plain bytes after STARTTLS: closed');
    });
    await withServer({ ...psk(), mode: 'on' }, async ({ port }) => {
      const key = parsePskFile(fs.readFileSync(pki.pskFile, 'utf8')).get('alice')!;
      const p = await RawPeer.connect(port);
      await p.greet();
      p.sendOption(C.OPT_STRUCTURED_REPLY);
      assert.equal((await p.readOptionReply()).type, C.REP_ACK);
      p.sendOption(C.OPT_STARTTLS);
      assert.equal((await p.readOptionReply()).type, C.REP_ACK);
      const s = await secureClient(p, key);
      const flags = await s.go('disk');
      assert.equal(flags & C.FLAG_SEND_DF, 0, 'structured replies from before TLS are not kept');
      s.close();
    });
  });
});

function goPayload(name: string): Buffer {
  const n = Buffer.from(name);
  const b = Buffer.alloc(4 + n.length + 2);
  b.writeUInt32BE(n.length, 0);
  n.copy(b, 4);
  return b;
}

/** The client side of STARTTLS over a raw peer, with just enough protocol for these tests. */
async function secureClient(p: RawPeer, key: Buffer): Promise<{
  sendOption(opt: number, data?: Buffer): void;
  readOptionReply(): Promise<{ type: number; data: Buffer }>;
  go(name: string): Promise<number>;
  close(): void;
}> {
  p.reader.detach();
  const t = tls.connect({
    socket: p.socket,
    pskCallback: () => ({ identity: "alice", psk: key }),
    ciphers: 'TLS_AES_128_GCM_SHA256:PSK-AES128-GCM-SHA256',
    checkServerIdentity: () => undefined,
  });
  await new Promise<void>((resolve, reject) => {
    t.once('secureConnect', () => resolve());
    t.once('error', reject);
  });
  const reader = new SocketReader(t);
  const writer = new SocketWriter(t);
  const sendOption = (opt: number, data: Buffer = Buffer.alloc(0)): void => {
    const h = Buffer.alloc(16);
    h.writeBigUInt64BE(C.IHAVEOPT, 0);
    h.writeUInt32BE(opt, 8);
    h.writeUInt32BE(data.length, 12);
    void writer.write([h, data]);
  };
  const readOptionReply = async (): Promise<{ type: number; data: Buffer }> => {
    const h = await reader.read(20);
    return { type: h.readUInt32BE(12), data: Buffer.from(await reader.read(h.readUInt32BE(16))) };
  };
  return {
    sendOption,
    readOptionReply,
    async go(name) {
      sendOption(C.OPT_GO, goPayload(name));
      let flags = -1;
      for (;;) {
        const r = await readOptionReply();
        if (r.type === C.REP_INFO && r.data.readUInt16BE(0) === C.INFO_EXPORT) flags = r.data.readUInt16BE(10);
        if (r.type === C.REP_ACK) return flags;
        if (r.type >= 0x80000000) throw new Error(`GO refused: ${r.type}`);
      }
    },
    close: () => t.destroy(),
  };
}

describe('backy nbd with TLS options', () => {
  let repo: TestRepo;
  let uid: string;
  let file: string;
  before(async () => {
    repo = makeTestRepo('[DEFAULTS]\ncache_size = 64M\n');
    await repo.ok(['initdb']);
    file = path.join(repo.dir, 'vm.img');
    fs.writeFileSync(file, img.data);
    uid = (await repo.ok(['backup', `file://${file}`, 'vm'])).stdout.trim();
  });
  after(() => repo?.cleanup());

  test('--tls-psk: served over TLS only; qemu-img reads the version; the address printed is nbds://', async () => {
    const server = await startBackyNbd(repo.cfg, ['--tls-psk', pki.pskFile]);
    try {
      assert.match(server.stderr(), /nbds:\/\/127\.0\.0\.1:\d+ .*TLS required/);
      const q = path.join(tmp, 'cli.qemu');
      const r = await run('qemu-img', ['convert', '-O', 'raw',
        '--object', `tls-creds-psk,id=tls0,endpoint=client,dir=${pki.pskDir},username=alice`,
        '--image-opts', `driver=nbd,host=127.0.0.1,port=${server.port},export=${uid},tls-creds=tls0`, q]);
      assert.equal(r.code, 0, r.stderr);
      assert.equal(sha256(fs.readFileSync(q)), sha256(img.data));
      const plain = await run('nbdinfo', [server.uri(uid)]);
      assert.notEqual(plain.code, 0, 'plain client refused');
    } finally {
      assert.equal(await server.stop(), 0);
    }
  });

  test('--tls-certificates and --tls on: TLS and plain clients both served', async () => {
    const server = await startBackyNbd(repo.cfg, ['--tls', 'on', '--tls-certificates', pki.serverDir]);
    try {
      const secure = await run('nbdcopy', [`nbds://localhost:${server.port}/${uid}?tls-certificates=${pki.caOnlyDir}`, path.join(tmp, 'cli.x509')]);
      assert.equal(secure.code, 0, secure.stderr);
      assert.equal(sha256(fs.readFileSync(path.join(tmp, 'cli.x509'))), sha256(img.data));
      const plain = await run('nbdinfo', ['--json', server.uri(uid)]);
      assert.equal(plain.code, 0, plain.stderr);
    } finally {
      assert.equal(await server.stop(), 0);
    }
  });

  test('bad TLS options: usage errors exit 2, unreadable files exit 1; one line each', async () => {
    const cases: Array<[string[], number, RegExp]> = [
      [['--tls', 'on'], 2, /--tls on needs --tls-psk FILE or --tls-certificates DIR/],
      [['--tls', 'maybe'], 2, /expected off, on or require/],
      [['--tls', 'off', '--tls-psk', pki.pskFile], 2, /cannot be combined/],
      [['--tls-psk', pki.pskFile, '--tls-certificates', pki.serverDir], 2, /cannot be combined/],
      [['--tls-verify-peer'], 2, /needs --tls-certificates/],
      [['--tls-psk', path.join(tmp, 'no-such.psk')], 1, /no-such\.psk: does not exist/],
      [['--tls-certificates', pki.caOnlyDir], 1, /server-cert\.pem: missing/],
      [['--tls-certificates', pki.serverDir, '--tls-verify-peer', '--tls', 'require'], -1, /./],
    ];
    const garbage = path.join(tmp, 'garbage.psk');
    fs.writeFileSync(garbage, 'no key here\n');
    cases.push([['--tls-psk', garbage], 1, /line 1: expected "identity:hexkey"/]);
    const badCert = path.join(tmp, 'bad-cert');
    fs.mkdirSync(badCert, { recursive: true });
    fs.writeFileSync(path.join(badCert, 'server-cert.pem'), 'not a certificate');
    fs.writeFileSync(path.join(badCert, 'server-key.pem'), 'not a key');
    cases.push([['--tls-certificates', badCert], 1, /cannot set up TLS/]);
    for (const [args, code, re] of cases) {
      if (code === -1) continue; // valid: covered by the serving tests
      const r = await repo.run(['nbd', '-p', '0', ...args], { timeoutMs: 30_000 });
      assert.equal(r.code, code, `${args.join(' ')}: ${r.stderr}`);
      assert.match(r.stderr, re, args.join(' '));
      assert.equal(r.stderr.trim().split('\n').length, 1, `one line: ${r.stderr}`);
      assert.doesNotMatch(r.stderr, /\n\s+at /);
    }
  });

  test('a non-loopback address needs --tls require or --insecure; --socket is created mode 0600', async () => {
    const open = await repo.run(['nbd', '-a', '0.0.0.0', '-p', '0'], { timeoutMs: 30_000 });
    assert.equal(open.code, 2, open.stderr);
    assert.match(open.stderr, /refusing to listen on 0\.0\.0\.0 without --tls require/);
    const on = await repo.run(['nbd', '-a', '::', '-p', '0', '--tls', 'on', '--tls-psk', pki.pskFile], { timeoutMs: 30_000 });
    assert.equal(on.code, 2, '--tls on is not enough');
    // With --tls require it starts (on all addresses; a client connects over loopback).
    const port = await freePort();
    const req = await startBackyNbdAt(repo.cfg, ['-a', '0.0.0.0', '-p', String(port), '--tls-psk', pki.pskFile], port);
    try {
      const r = await run('nbdinfo', ['--json', `nbds://alice@127.0.0.1:${port}/${uid}?tls-psk-file=${pki.pskFile}`]);
      assert.equal(r.code, 0, r.stderr);
    } finally {
      assert.equal(await req.stop(), 0);
    }
    const port2 = await freePort();
    const insecure = await startBackyNbdAt(repo.cfg, ['-a', '0.0.0.0', '-p', String(port2), '--insecure'], port2);
    try {
      const r = await run('nbdinfo', ['--json', `nbd://127.0.0.1:${port2}/${uid}`]);
      assert.equal(r.code, 0, r.stderr);
    } finally {
      assert.equal(await insecure.stop(), 0);
    }

    const sock = path.join(repo.dir, 'nbd.sock');
    // A permissive umask must not make the socket reachable by others.
    const child = spawn('sh', ['-c', `umask 000 && exec "${process.execPath}" "$@"`, 'sh', BACKY, '-c', repo.cfg, 'nbd', '--socket', sock], { stdio: 'ignore' });
    try {
      const deadline = Date.now() + 15_000;
      while (!fs.existsSync(sock) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
      assert.ok(fs.existsSync(sock), 'socket created');
      assert.equal(fs.statSync(sock).mode & 0o777, 0o600, `mode ${(fs.statSync(sock).mode & 0o777).toString(8)}`);
      const r = await run('nbdinfo', ['--json', `nbd+unix:///${uid}?socket=${sock}`]);
      assert.equal(r.code, 0, r.stderr);
    } finally {
      child.kill('SIGTERM');
      await new Promise((r) => child.once('exit', r));
    }
  });
});

/** `backy nbd ARGS` listening on `port` (the helper parses 127.0.0.1 addresses; this waits for any). */
async function startBackyNbdAt(cfg: string, args: string[], port: number): Promise<{ stop(): Promise<number> }> {
  const child = spawn(process.execPath, [BACKY, '-c', cfg, 'nbd', ...args], { stdio: ['ignore', 'ignore', 'pipe'] });
  let err = '';
  child.stderr!.on('data', (d: Buffer) => (err += d.toString()));
  const exited = new Promise<number>((resolve) => child.once('exit', (code, sig) => resolve(code ?? (sig ? 128 : 1))));
  const deadline = Date.now() + 30_000;
  while (!new RegExp(`:${port}\\b`).test(err)) {
    if (Date.now() > deadline || child.exitCode !== null) {
      child.kill('SIGKILL');
      throw new Error(`backy nbd did not start: ${err}`);
    }
    await new Promise((r) => setTimeout(r, 50));
  }
  return {
    async stop() {
      child.kill('SIGTERM');
      return exited;
    },
  };
}
