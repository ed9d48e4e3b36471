/**
 * Issue 13: backups over NBD from qemu-nbd (full, and driven by a QEMU dirty bitmap), restores into qemu-nbd,
 * with real QEMU tools only: qemu-img (create, convert, bitmap --add, compare, info), qemu-io for writes,
 * qemu-nbd as the server (and nbdkit for a server without structured replies).
 */
import { after, before, describe, test } from 'node:test';
import * as assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { randomBytes } from 'node:crypto';
import { makeTestRepo, TestRepo } from './helpers/cli';
import { sha256File } from './helpers/images';
import { countingProxy, imageInfo, nbdkit, qemuNbd, Server, sh } from './helpers/qemu-nbd';
import { makePki, Pki } from './helpers/nbd-tls';

const MiB = 1024 * 1024;
const BS = MiB; // the repository's block size: small, so the images stay small
const BLOCKS = 64;

/** A 64 MiB raw image: every third block zero, the others random, block 50 a copy of block 0. */
function writeRawImage(file: string): { zeroBlocks: number[] } {
  const fd = fs.openSync(file, 'w');
  const zeroBlocks: number[] = [];
  const first = randomBytes(BS);
  for (let i = 0; i < BLOCKS; i++) {
    if (i % 3 === 1) {
      zeroBlocks.push(i);
      continue;
    }
    fs.writeSync(fd, i === 50 ? first : i === 0 ? first : randomBytes(BS), 0, BS, i * BS);
  }
  fs.ftruncateSync(fd, BLOCKS * BS);
  fs.closeSync(fd);
  return { zeroBlocks };
}

/** sha256 of the qcow2's content as raw (what qemu-img convert -O raw makes of it). */
async function rawHash(dir: string, image: string): Promise<string> {
  const raw = path.join(dir, `raw-${path.basename(image)}-${Date.now()}`);
  await sh('qemu-img', ['convert', '-O', 'raw', image, raw]);
  const h = sha256File(raw);
  fs.rmSync(raw);
  return h;
}

async function restoredHash(repo: TestRepo, uid: string): Promise<string> {
  const out = path.join(repo.dir, `out-${uid}`);
  await repo.ok(['restore', '--no-sync', uid, `file://${out}`]);
  const h = sha256File(out);
  fs.rmSync(out);
  return h;
}

const json = (r: { stdout: string }) => JSON.parse(r.stdout);
const oneLine = (stderr: string) => stderr.trim().split('\n').length === 1;

describe('NBD sources and targets with QEMU (issue 13)', () => {
  let repo: TestRepo;
  let disk: string;
  let full: string; // uid of the full backup
  let dataBlocks: number;
  const servers: Server[] = [];
  const serve = async (...a: Parameters<typeof qemuNbd>) => {
    const s = await qemuNbd(...a);
    servers.push(s);
    return s;
  };

  before(async () => {
    repo = makeTestRepo('', { blockSize: BS });
    await repo.ok(['initdb']);
    const raw = path.join(repo.dir, 'base.raw');
    const { zeroBlocks } = writeRawImage(raw);
    dataBlocks = BLOCKS - zeroBlocks.length;
    disk = path.join(repo.dir, 'disk.qcow2');
    await sh('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', raw, disk]); // zero blocks stay unallocated
    fs.rmSync(raw);
    // The bitmap starts now: it records every write after the full backup below.
    await sh('qemu-img', ['bitmap', '--add', disk, 'b1']);
  });
  after(async () => {
    for (const s of servers) await s.stop('SIGKILL');
    repo.cleanup();
  });

  test('full backup over nbd:// reads only allocated blocks, over several connections, and restores byte-identical', async () => {
    const server = await serve(disk, { extra: ['-r'] });
    const proxy = await countingProxy({ path: server.uri.split('socket=')[1] });
    try {
      const r = json(await repo.ok(['--json', 'backup', `nbd://127.0.0.1:${proxy.port}/`, 'vm']));
      full = r.uid;
      assert.equal(r.blocksRead, dataBlocks, 'holes (base:allocation) are not read');
      assert.equal(r.blocksSparse, BLOCKS - dataBlocks);
      assert.ok(proxy.down >= dataBlocks * BS && proxy.down < dataBlocks * BS + MiB, `bytes from the server: ${proxy.down}`);
      assert.ok(proxy.connections >= 2, `qemu-nbd -e 8 allows multi-conn: ${proxy.connections} connection(s)`);
    } finally {
      await proxy.close();
      await server.stop();
    }
    assert.equal(await restoredHash(repo, full), await rawHash(repo.dir, disk));
  });

  test('backup -f BASE --bitmap NAME reads only the dirty blocks (counted through a proxy) and restores byte-identical', async () => {
    // Changes while no server runs (qemu-nbd -r holds the image): blocks 5, 30 and 31, and block 42 zeroed.
    await sh('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x5a 5M 4k', '-c', 'write -P 0xa5 31232k 1M', '-c', 'write -z 42M 1M', disk]);
    const server = await serve(disk, { extra: ['-r', '-B', 'b1'] });
    const proxy = await countingProxy({ path: server.uri.split('socket=')[1] });
    try {
      const before = proxy.down;
      const r = json(await repo.ok(['--json', 'backup', '-f', full, '--bitmap', 'b1', `nbd://127.0.0.1:${proxy.port}/`, 'vm']));
      const read = proxy.down - before;
      assert.equal(r.blocksRead + r.blocksSparse, 4, 'blocks 5, 30, 31, 42 only');
      assert.equal(r.blocksRead, 3, 'block 42 reads as zeroes: recorded without reading it');
      // The dirty blocks, plus the sanity sample of 10 clean blocks compared with the base.
      assert.ok(read <= (3 + 10) * BS + MiB, `bytes from the server: ${read}`);
      assert.equal(await restoredHash(repo, r.uid), await rawHash(repo.dir, disk));

      // The same differential without the bitmap reads every allocated block.
      const plain = proxy.down;
      const f = json(await repo.ok(['--json', 'backup', '-f', full, `nbd://127.0.0.1:${proxy.port}/`, 'vm']));
      assert.ok(f.blocksRead >= dataBlocks - 1, `-f without bitmap read ${f.blocksRead} blocks`);
      assert.ok(proxy.down - plain > 3 * read, `${proxy.down - plain} bytes without the bitmap vs ${read} with it`);
    } finally {
      await proxy.close();
      await server.stop();
    }
  });

  test('a missing bitmap, a server without it, a server without structured replies: one line, exit 1, no version', async () => {
    const count = async () => json(await repo.ok(['--json', 'ls', 'vm'])).length;
    const versions = await count();
    const withB1 = await serve(disk, { extra: ['-r', '-B', 'b1'] });
    const wrong = await repo.run(['backup', '-f', full, '--bitmap', 'nope', withB1.uri, 'vm']);
    assert.equal(wrong.code, 1, wrong.stderr);
    assert.ok(oneLine(wrong.stderr), wrong.stderr);
    assert.match(wrong.stderr, /no dirty bitmap "nope"/);
    await withB1.stop();

    const without = await serve(disk, { extra: ['-r'] });
    const none = await repo.run(['backup', '-f', full, '--bitmap', 'b1', without.uri, 'vm']);
    assert.equal(none.code, 1, none.stderr);
    assert.ok(oneLine(none.stderr), none.stderr);
    assert.match(none.stderr, /no dirty bitmap "b1" \(no metadata context qemu:dirty-bitmap:b1/);
    await without.stop();

    const raw = path.join(repo.dir, 'plain.raw');
    await sh('qemu-img', ['convert', '-O', 'raw', disk, raw]);
    const old = await nbdkit(['--no-sr', '-r', 'file', raw]);
    servers.push(old);
    const noSr = await repo.run(['backup', '-f', full, '--bitmap', 'b1', old.uri, 'vm']);
    assert.equal(noSr.code, 1, noSr.stderr);
    assert.ok(oneLine(noSr.stderr), noSr.stderr);
    assert.match(noSr.stderr, /does not support structured replies/);
    // Without --bitmap the same server serves a full backup (simple replies, no block status).
    const plain = json(await repo.ok(['--json', 'backup', old.uri, 'plain']));
    assert.equal(plain.blocksRead, BLOCKS, 'no base:allocation: every block is read');
    assert.equal(await restoredHash(repo, plain.uid), sha256File(raw));
    await old.stop();

    const noBase = await repo.run(['backup', '--bitmap', 'b1', `file://${raw}`, 'vm']);
    assert.equal(noBase.code, 100, noBase.stderr);
    assert.match(noBase.stderr, /--bitmap needs a base version/);
    assert.equal(await count(), versions);
  });

  test('a bitmap that missed changes fails the sanity check: exit 5', async () => {
    const lying = path.join(repo.dir, 'lying.qcow2');
    fs.copyFileSync(disk, lying);
    await sh('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x77 0 64M', lying]);
    await sh('qemu-img', ['bitmap', '--add', lying, 'late']); // started after the writes: knows nothing of them
    const server = await serve(lying, { extra: ['-r', '-B', 'late'] });
    const r = await repo.run(['backup', '-f', full, '--bitmap', 'late', server.uri, 'vm']);
    assert.equal(r.code, 5, r.stderr);
    assert.match(r.stderr, /differs from base .* although dirty bitmap late says it did not change/);
    await server.stop();
  });

  test('the server dies mid-backup: the version stays invalid, -c continues once it is back', async () => {
    const server = await serve(disk, { extra: ['-r'] });
    const socket = server.uri.split('socket=')[1];
    const proxy = await countingProxy({ path: socket });
    let killed = false;
    proxy.onDown = (n) => {
      if (n > 10 * MiB && !killed) {
        killed = true;
        server.child.kill('SIGKILL');
        proxy.cut(); // what was in flight is lost with the server
      }
    };
    const uri = `nbd://127.0.0.1:${proxy.port}/`;
    const r = await repo.run(['backup', uri, 'dies']);
    assert.ok(killed, 'the server was killed during the backup');
    assert.equal(r.code, 1, r.stderr);
    assert.match(r.stderr, /cannot read nbd:\/\/127\.0\.0\.1:\d+\/ at offset \d+: NBD connection lost/);
    const [v] = json(await repo.ok(['--json', 'ls', 'dies']));
    assert.equal(v.valid, false);
    const back = await serve(disk, { socket, extra: ['-r'] });
    const c = json(await repo.ok(['--json', 'backup', '-c', v.uid, uri, 'dies']));
    assert.equal(c.uid, v.uid);
    assert.ok(c.blocksRead < dataBlocks, `the continued backup read ${c.blocksRead} of ${dataBlocks} data blocks`);
    assert.equal(json(await repo.ok(['--json', 'ls', 'dies']))[0].valid, true);
    assert.equal(await restoredHash(repo, v.uid), await rawHash(repo.dir, disk));
    await proxy.close();
    await back.stop();
  });

  test('restore into qemu-nbd serving a fresh qcow2: identical (qemu-img compare), sparse, repeats read back, flushed; -f and size checks', async () => {
    const fresh = path.join(repo.dir, 'fresh.qcow2');
    await sh('qemu-img', ['create', '-f', 'qcow2', fresh, String(BLOCKS * BS)]);
    const target = await serve(fresh);
    const r = json(await repo.ok(['--json', 'restore', full, target.uri]));
    assert.equal(r.blocksRepeated, 1, 'block 50 copied from block 0 in the target');
    assert.equal(r.blocksZeroed, 0, 'a fresh qcow2 reads as zeroes: holes cost nothing');
    const again = await repo.run(['restore', full, target.uri]);
    assert.equal(again.code, 1, again.stderr);
    assert.match(again.stderr, /holds data; use -f/);
    await target.stop();
    // The full backup's content: the image before the writes of the bitmap test.
    const original = path.join(repo.dir, 'original.raw');
    await repo.ok(['restore', full, `file://${original}`]);
    await sh('qemu-img', ['compare', '-f', 'raw', '-F', 'qcow2', original, fresh]);
    const info = await imageInfo(fresh);
    assert.ok(info['actual-size'] < dataBlocks * BS + 4 * MiB, `qcow2 allocates ${info['actual-size']} bytes for ${dataBlocks} MiB of data`);

    // With -f onto an export holding other data: holes are zeroed (WRITE_ZEROES).
    const dirty = path.join(repo.dir, 'dirty.qcow2');
    await sh('qemu-img', ['create', '-f', 'qcow2', dirty, String(BLOCKS * BS)]);
    await sh('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x99 0 64M', dirty]);
    const t2 = await serve(dirty);
    const forced = json(await repo.ok(['--json', 'restore', '-f', full, t2.uri]));
    assert.equal(forced.blocksZeroed, BLOCKS - dataBlocks);
    await t2.stop();
    await sh('qemu-img', ['compare', '-f', 'raw', '-F', 'qcow2', original, dirty]);

    const small = path.join(repo.dir, 'small.qcow2');
    await sh('qemu-img', ['create', '-f', 'qcow2', small, String(BLOCKS * BS - MiB)]);
    const t3 = await serve(small);
    const tooSmall = await repo.run(['restore', full, t3.uri]);
    assert.equal(tooSmall.code, 1, tooSmall.stderr);
    assert.ok(oneLine(tooSmall.stderr), tooSmall.stderr);
    assert.match(tooSmall.stderr, /has 66060288 bytes, the version needs 67108864/);
    await t3.stop();
    const ro = await serve(disk, { extra: ['-r'] });
    const readOnly = await repo.run(['restore', '-f', full, ro.uri]);
    assert.equal(readOnly.code, 1);
    assert.match(readOnly.stderr, /read-only/);
    await ro.stop();
  });

  test('an export larger than 4 GiB with sparse ranges: backup reads only the data, restore into a fresh qcow2 stays sparse', async () => {
    const big = path.join(repo.dir, 'big.qcow2');
    const size = 6 * 1024 * MiB;
    await sh('qemu-img', ['create', '-f', 'qcow2', big, String(size)]);
    await sh('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x11 0 1M', '-c', 'write -P 0x22 4097M 2M', '-c', 'write -P 0x33 6143M 1M', big]);
    const server = await serve(big, { extra: ['-r'] });
    const started = Date.now();
    const r = json(await repo.ok(['--json', 'backup', server.uri, 'big']));
    await server.stop();
    assert.equal(r.blocksRead, 4, 'blocks 0, 4097, 4098 and 6143');
    assert.equal(r.blocksSparse, 6144 - 4);
    const fresh = path.join(repo.dir, 'big-fresh.qcow2');
    await sh('qemu-img', ['create', '-f', 'qcow2', fresh, String(size)]);
    const target = await serve(fresh);
    await repo.ok(['restore', r.uid, target.uri]);
    await target.stop();
    await sh('qemu-img', ['compare', big, fresh]);
    const info = await imageInfo(fresh);
    assert.equal(info['virtual-size'], size);
    assert.ok(info['actual-size'] < 16 * MiB, `6 GiB image with 4 MiB of data allocates ${info['actual-size']} bytes`);
    assert.ok(Date.now() - started < 120_000);
  });
});

describe('nbds:// (TLS) sources and targets with qemu-nbd', () => {
  let repo: TestRepo;
  let disk: string;
  let uid: string;
  let pki: Pki;
  const servers: Server[] = [];
  before(async () => {
    repo = makeTestRepo('', { blockSize: BS });
    await repo.ok(['initdb']);
    disk = path.join(repo.dir, 'tls.qcow2');
    await sh('qemu-img', ['create', '-f', 'qcow2', disk, String(16 * MiB)]);
    await sh('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x42 1M 3M', disk]);
    pki = makePki(path.join(repo.dir, 'pki'));
  });
  after(async () => {
    for (const s of servers) await s.stop('SIGKILL');
    repo.cleanup();
  });

  test('PSK: backup with --tls-psk (identity from the URI), plain nbd:// and a wrong key refused with one line', async () => {
    // A key file with two identities: the URI's user picks the one the server knows.
    const keys = path.join(repo.dir, 'keys.psk');
    fs.writeFileSync(keys, `someone:${randomBytes(32).toString('hex')}\n${fs.readFileSync(pki.pskFile, 'utf8')}`);
    const server = await qemuNbd(disk, { tcp: true, scheme: 'nbds', extra: ['-r', '--object', `tls-creds-psk,id=tls0,endpoint=server,dir=${pki.pskDir}`, '--tls-creds', 'tls0'] });
    servers.push(server);
    const withUser = server.uri.replace('nbds://', 'nbds://alice@');
    uid = json(await repo.ok(['--json', 'backup', '--tls-psk', keys, withUser, 'tls'])).uid;
    assert.equal(await restoredHash(repo, uid), await rawHash(repo.dir, disk));
    const plain = await repo.run(['backup', server.uri.replace('nbds://', 'nbd://'), 'tls']);
    assert.equal(plain.code, 1, plain.stderr);
    assert.ok(oneLine(plain.stderr), plain.stderr);
    assert.match(plain.stderr, /requires TLS/);
    const bad = await repo.run(['backup', '--tls-psk', pki.wrongPskFile, server.uri, 'tls']);
    assert.equal(bad.code, 1, bad.stderr);
    assert.ok(oneLine(bad.stderr), bad.stderr);
    const noCreds = await repo.run(['backup', server.uri, 'tls']);
    assert.equal(noCreds.code, 1);
    assert.match(noCreds.stderr, /needs credentials/);
    await server.stop();
  });

  test('X.509: restore into an nbds:// target with --tls-certificates (client certificate, server name checked)', async () => {
    const target = path.join(repo.dir, 'x509-target.qcow2');
    await sh('qemu-img', ['create', '-f', 'qcow2', target, String(16 * MiB)]);
    // qemu's x509 server verifies clients by default: the client directory has a certificate for it.
    const server = await qemuNbd(target, { tcp: true, scheme: 'nbds', extra: ['--object', `tls-creds-x509,id=tls0,endpoint=server,dir=${pki.serverDir}`, '--tls-creds', 'tls0'] });
    servers.push(server);
    await repo.ok(['restore', '--tls-certificates', pki.clientDir, uid, server.uri]);
    // A CA that did not sign the server's certificate: backy refuses the server, one line.
    const otherCa = path.join(repo.dir, 'other-ca');
    fs.mkdirSync(otherCa);
    fs.copyFileSync(path.join(repo.dir, 'pki', 'other-ca', 'other-cert.pem'), path.join(otherCa, 'ca-cert.pem'));
    for (const dir of [otherCa, pki.strangerDir]) { // ... and a client certificate the server does not trust
      const bad = await repo.run(['restore', '-f', '--tls-certificates', dir, uid, server.uri]);
      assert.equal(bad.code, 1, bad.stderr);
      assert.ok(oneLine(bad.stderr), bad.stderr);
      assert.match(bad.stderr, /TLS handshake/);
    }
    await server.stop();
    await sh('qemu-img', ['compare', disk, target]);
  });
});
