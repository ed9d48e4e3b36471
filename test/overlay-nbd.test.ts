/**
 * Writable NBD exports (`backy nbd -w`), overlays (`backy overlay ls|rm`) and `backy fixate`, end to end
 * with the CLI in child processes and Debian's NBD clients: qemu-io (write, FUA, discard, write_zeroes,
 * flush), qemu-img convert, nbdsh with two connections, kill -9 of the server in the middle of writes, and
 * fixate of a 1 GiB sparse version that must read only the 3 blocks written.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { spawn } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { blobFileOf, makeTestRepo, restoredHash, TestRepo, writeImage } from './helpers/cli';
import { BackyNbd, makeSparseVersion, startBackyNbd } from './helpers/backy-nbd';
import { sha256File, readRange } from './helpers/images';
import { NBDSH_ENV, run } from './helpers/nbd-tools';

const KiB = 1024;
const MiB = 1024 * KiB;
const BS = MiB; // the repository's block size
const SIZE = 16 * MiB;

const sha256 = (b: Buffer) => createHash('sha256').update(b).digest('hex');

/** The export's whole content, copied out with qemu-img convert. */
async function convertOut(uri: string, file: string): Promise<Buffer> {
  fs.rmSync(file, { force: true });
  const r = await run('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', uri, file], { timeoutMs: 120_000 });
  assert.equal(r.code, 0, r.stderr);
  return fs.readFileSync(file);
}

async function qemuIo(uri: string, cmds: string[]): Promise<string> {
  const r = await run('qemu-io', ['-f', 'raw', ...cmds.flatMap((c) => ['-c', c]), uri], { timeoutMs: 120_000 });
  assert.equal(r.code, 0, `qemu-io ${cmds.join('; ')}: ${r.stdout}${r.stderr}`);
  assert.doesNotMatch(r.stdout, /Pattern verification failed|error/i, r.stdout);
  return r.stdout;
}

/** Runs a Python script with libnbd (nbdsh's module); returns stdout. */
async function python(script: string, args: string[], timeoutMs = 120_000): Promise<{ code: number; stdout: string; stderr: string }> {
  return run('/usr/bin/python3', ['-c', script, ...args], { env: NBDSH_ENV, timeoutMs });
}

describe('writable NBD exports, overlays and fixate', () => {
  let repo: TestRepo;
  let image: string;
  let original: Buffer;
  let uid: string;

  before(async () => {
    repo = makeTestRepo('[DEFAULTS]\noverlay_dir = overlays', { blockSize: BS });
    await repo.ok(['initdb']);
    image = path.join(repo.dir, 'disk.img');
    writeImage(image, SIZE, 'mixed', 3);
    original = fs.readFileSync(image);
    uid = (await repo.ok(['backup', `file://${image}`, 'disk'])).stdout.trim();
  });
  after(() => repo?.cleanup());

  test('qemu-io writes, FUA, discard, write_zeroes and flush reach the overlay; qemu-img convert reads them back; the read-only export beside it and the backup stay unchanged', async () => {
    const server = await startBackyNbd(repo.cfg, ['-w', `${uid}:edit`]);
    const model = Buffer.from(original);
    try {
      const flags = JSON.parse((await run('nbdinfo', ['--json', '--list', `nbd://127.0.0.1:${server.port}`])).stdout) as { exports: Record<string, unknown>[] };
      const rw = flags.exports.find((e) => e['export-name'] === 'edit')!;
      const ro = flags.exports.find((e) => e['export-name'] === uid)!;
      for (const f of ['can_flush', 'can_fua', 'can_trim', 'can_zero', 'can_fast_zero', 'can_multi_conn']) assert.equal(rw[f], true, f);
      assert.equal(rw.is_read_only, false);
      assert.equal(ro.is_read_only, true, 'the version itself stays read-only');

      await qemuIo(server.uri('edit'), [
        'write -P 0x11 1000 5000', // unaligned, inside one block: the rest of its granules come from below
        'write -f -P 0x22 3M 64k', // FUA
        'discard 5M 1M',
        'write -z 7340000 100000', // write_zeroes, unaligned
        'write -z -u 9M 2M', // write_zeroes that may unmap
        'write -P 0x33 16773120 4096', // the last 4 KiB
        'flush',
        'read -P 0x11 1000 5000',
        'read -P 0x22 3M 64k',
        'read -P 0 5M 1M',
        'read -P 0 7340000 100000',
        'read -P 0 9M 2M',
        'read -P 0x33 16773120 4096',
      ]);
      model.fill(0x11, 1000, 6000);
      model.fill(0x22, 3 * MiB, 3 * MiB + 64 * KiB);
      model.fill(0, 5 * MiB, 6 * MiB);
      model.fill(0, 7340000, 7440000);
      model.fill(0, 9 * MiB, 11 * MiB);
      model.fill(0x33, SIZE - 4096, SIZE);

      const out = await convertOut(server.uri('edit'), path.join(repo.dir, 'out.img'));
      assert.equal(sha256(out), sha256(model), 'qemu-img convert of the writable export = version + writes');
      const ro2 = await convertOut(server.uri(uid), path.join(repo.dir, 'ro.img'));
      assert.equal(sha256(ro2), sha256(original), 'the read-only export of the same version is unchanged');

      // In use: listed with its user, and cannot be removed.
      const ls = JSON.parse((await repo.ok(['--json', 'overlay', 'ls'])).stdout) as Record<string, unknown>[];
      assert.equal(ls.length, 1);
      assert.equal(ls[0].name, 'edit');
      assert.equal(ls[0].base_uid, uid);
      assert.match(String(ls[0].in_use), /writable NBD export/);
      assert.ok(Number(ls[0].changed_bytes) >= 3 * MiB && Number(ls[0].changed_bytes) < 4 * MiB, `changed bytes ${ls[0].changed_bytes}`);
      const rm = await repo.run(['overlay', 'rm', 'edit']);
      assert.equal(rm.code, 100, rm.stderr);
      assert.match(rm.stderr, /overlay edit is in use by a writable NBD export/);
      // The base version is held while the overlay is in use.
      const rmUsed = await repo.run(['rm', '-f', uid]);
      assert.equal(rmUsed.code, 100, rmUsed.stderr);
      assert.match(rmUsed.stderr, /overlay edit/);
      // A second server cannot take the same overlay.
      const second = await repo.run(['nbd', '-p', '0', '-w', 'edit'], { timeoutMs: 30_000 });
      assert.equal(second.code, 100, second.stderr);
      assert.match(second.stderr, /overlay edit is in use by a writable NBD export \(pid \d+/);
    } finally {
      assert.equal(await server.stop(), 0, server.stderr());
    }
    // An overlay nobody uses still needs its base.
    const rmIdle = await repo.run(['rm', '-f', uid]);
    assert.equal(rmIdle.code, 100, rmIdle.stderr);
    assert.match(rmIdle.stderr, /base of overlay edit/);
    // The backup itself was never written.
    const scrub = await repo.run(['scrub', uid]);
    assert.equal(scrub.code, 0, scrub.stderr);
    assert.equal(await restoredHash(repo, uid), sha256(original));

    // The overlay outlives the server: named alone, it is served again with everything written.
    const again = await startBackyNbd(repo.cfg, ['-w', 'edit']);
    try {
      const out = await convertOut(again.uri('edit'), path.join(repo.dir, 'out2.img'));
      assert.equal(sha256(out), sha256(model), 'the overlay kept every flushed write');
    } finally {
      await again.stop();
    }

    // fixate: a new version with the changes, sharing the rest with its base; the old one unchanged.
    const fx = JSON.parse((await repo.ok(['--json', 'fixate', '-t', 'edited', 'edit', 'disk-edited'])).stdout) as Record<string, number | string>;
    assert.equal(await restoredHash(repo, String(fx.uid)), sha256(model));
    assert.equal(await restoredHash(repo, uid), sha256(original));
    // Only blocks the overlay touched were read (0, 3, 6, 7, 15), and those it zeroed whole (5, 9, 10) were
    // recorded as holes without a read.
    assert.equal(fx.blocksRead, 5, JSON.stringify(fx));
    assert.ok(Number(fx.blocksSparse) >= 3, JSON.stringify(fx));
    const ls = JSON.parse((await repo.ok(['--json', 'ls', 'disk-edited'])).stdout) as Record<string, unknown>[];
    assert.equal(ls[0].tags, 'edited');
    assert.equal(ls[0].snapshot_name, 'edit');
    await repo.ok(['overlay', 'rm', 'edit']);
    assert.equal(JSON.parse((await repo.ok(['--json', 'overlay', 'ls'])).stdout).length, 0);
    assert.deepEqual(fs.readdirSync(path.join(repo.dir, 'overlays')), [], 'nothing left in overlay_dir');
  });

  test('two connections to one writable export see each other\'s flushed writes', async () => {
    const server = await startBackyNbd(repo.cfg, ['-w', uid]);
    try {
      const r = await python(`
import nbd, sys
a = nbd.NBD(); a.set_strict_mode(a.get_strict_mode() & ~nbd.STRICT_ALIGN); a.connect_uri(sys.argv[1])
b = nbd.NBD(); b.set_strict_mode(b.get_strict_mode() & ~nbd.STRICT_ALIGN); b.connect_uri(sys.argv[1])
assert a.can_multi_conn() and b.can_multi_conn()
for i in range(20):
    off = 4096 * 97 * i + 512 * i
    data = bytes([(i * 7 + k) % 256 for k in range(3000)])
    w, r = (a, b) if i % 2 == 0 else (b, a)
    w.pwrite(data, off)
    w.flush()
    got = r.pread(len(data), off)
    if got != data:
        print("MISMATCH", i); sys.exit(1)
print("OK")
`, [server.uri(`${uid}-rw`)]);
      assert.equal(r.code, 0, r.stdout + r.stderr);
      assert.equal(r.stdout.trim(), 'OK');
    } finally {
      await server.stop();
    }
    await repo.ok(['overlay', 'rm', `${uid}-rw`]);
  });

  test('kill -9 of the server in the middle of writes: every write acknowledged after FLUSH or with FUA is in the overlay after a restart', async () => {
    const SLOT = 8 * KiB;
    const server = await startBackyNbd(repo.cfg, ['-w', `${uid}:crash`]);
    // Each write goes to its own 8 KiB slot (so writes never overlap): sizes 512, 1000 (unaligned) and
    // 4096, FUA on every fifth, a flush after every tenth. Lines: "S i ..." before write i is sent, "A i" once
    // it is acknowledged, "F i" once the flush after write i completed. A write sent but not acknowledged
    // when the server died may be there or not.
    const script = `
import nbd, sys, random
h = nbd.NBD()
h.set_strict_mode(h.get_strict_mode() & ~nbd.STRICT_ALIGN) # unaligned writes on purpose
h.connect_uri(sys.argv[1])
slots = int(sys.argv[2]) // ${SLOT}
order = list(range(slots)); random.Random(5).shuffle(order)
for i, slot in enumerate(order):
    size = (512, 1000, 4096)[i % 3]
    off = slot * ${SLOT} + (i * 389) % (${SLOT} - size)
    data = bytes([(i * 13 + k) % 251 for k in range(size)])
    print("S", i, off, size, int(i % 5 == 0), flush=True)
    h.pwrite(data, off, nbd.CMD_FLAG_FUA if i % 5 == 0 else 0)
    print("A", i, flush=True)
    if i % 10 == 9:
        h.flush()
        print("F", i, flush=True)
`;
    const child = spawn('/usr/bin/python3', ['-c', script, server.uri('crash'), String(SIZE)], { env: NBDSH_ENV, stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    child.stderr.on('data', (d) => (err += d));
    const clientExit = new Promise<number>((resolve) => child.on('exit', (c) => resolve(c ?? 1)));
    const flushesAtKill = await new Promise<number>((resolve, reject) => {
      void clientExit.then((c) => reject(new Error(`the client ended (${c}) before the kill: ${err}`)));
      child.stdout.on('data', (d) => {
        out += d;
        const flushes = (out.match(/^F /gm) ?? []).length;
        if (flushes >= 40 && server.child.exitCode === null) {
          server.child.kill('SIGKILL');
          resolve(flushes);
        }
      });
    });
    const clientCode = await clientExit;
    await server.exited;
    assert.notEqual(clientCode, 0, 'the client was cut off in the middle of its writes');
    assert.match(err, /nbd|connection|Broken pipe|EOF|reset/i, err);

    const lines = out.trim().split('\n').map((l) => l.split(' '));
    const writes = new Map<number, { off: number; size: number; fua: boolean; acked: boolean; durable: boolean }>();
    for (const l of lines) {
      if (l[0] === 'S') writes.set(Number(l[1]), { off: Number(l[2]), size: Number(l[3]), fua: l[4] === '1', acked: false, durable: false });
      else if (l[0] === 'A') {
        const w = writes.get(Number(l[1]))!;
        w.acked = true;
        w.durable = w.fua;
      } else if (l[0] === 'F') for (const [i, w] of writes) if (i <= Number(l[1]) && w.acked) w.durable = true;
    }
    const durable = [...writes.values()].filter((w) => w.durable).length;
    assert.ok(flushesAtKill >= 40 && durable >= 400, `durable writes ${durable}`);

    const again = await startBackyNbd(repo.cfg, ['-w', 'crash']);
    let content: Buffer;
    try {
      content = await convertOut(again.uri('crash'), path.join(repo.dir, 'crash.img'));
    } finally {
      await again.stop();
    }
    let lost = 0;
    let undecided = 0;
    for (const [i, w] of writes) {
      const want = Buffer.from(Array.from({ length: w.size }, (_, k) => (i * 13 + k) % 251));
      const got = content.subarray(w.off, w.off + w.size);
      if (w.durable) {
        if (!got.equals(want)) lost++;
      } else if (!got.equals(want)) {
        // Not durable: either the write or what was there before, nothing else.
        assert.ok(got.equals(original.subarray(w.off, w.off + w.size)), `write ${i} (not durable) left something else than old or new data`);
        undecided++;
      }
    }
    assert.equal(lost, 0, `${lost} durable writes lost`);
    // Outside the writes' own bytes everything is the version's data.
    const touched = Buffer.alloc(SIZE);
    for (const w of writes.values()) touched.fill(1, w.off, w.off + w.size);
    let stray = 0;
    for (let o = 0; o < SIZE; o++) if (!touched[o] && content[o] !== original[o]) stray++;
    assert.equal(stray, 0, 'no byte outside the writes changed');
    void undecided;
    await repo.ok(['overlay', 'rm', 'crash']);
  });

  test('fixate of 3 written blocks of a 1 GiB version reads only those blocks and stores at most 3 new blobs', async () => {
    const big = makeTestRepo('[DEFAULTS]\noverlay_dir = overlays');
    try {
      await big.ok(['initdb']);
      const B4 = 4 * MiB;
      const blocks = new Map([[3, randomBytes(B4)], [100, randomBytes(B4)], [200, randomBytes(B4)]]);
      const v = await makeSparseVersion(big.cfg, 'big', 1024 * MiB, blocks);
      const server = await startBackyNbd(big.cfg, ['-w', `${v}:big`]);
      try {
        await qemuIo(server.uri('big'), [
          `write -P 0x44 ${3 * B4 + 4096} 8192`, // part of a data block: the rest comes from the version
          `write -P 0x55 ${50 * B4} ${B4}`, // a whole hole block
          `write -P 0x66 ${250 * B4 + 777} 100`, // part of a hole block
          'flush',
        ]);
      } finally {
        await server.stop();
      }
      // Blocks 100 and 200 must not be read: their blobs are moved away while fixate runs.
      const away = [100, 200].map((i) => blobFileOf(big, v, i));
      for (const f of away) fs.renameSync(f, `${f}.away`);
      let fx: Record<string, number | string>;
      try {
        fx = JSON.parse((await big.ok(['--json', 'fixate', 'big'])).stdout) as Record<string, number | string>;
      } finally {
        for (const f of away) fs.renameSync(`${f}.away`, f);
      }
      assert.equal(fx.blocksRead, 3, `blocks read: ${JSON.stringify(fx)}`);
      assert.ok(Number(fx.blocksWritten) <= 3, `new blobs: ${fx.blocksWritten}`);
      const restored = path.join(big.dir, 'big.img');
      await big.ok(['restore', '-s', String(fx.uid), `file://${restored}`]);
      const expect3 = Buffer.from(blocks.get(3)!);
      expect3.fill(0x44, 4096, 4096 + 8192);
      assert.ok(readRange(restored, 3 * B4, B4).equals(expect3), 'block 3: version data + the write');
      assert.ok(readRange(restored, 50 * B4, B4).equals(Buffer.alloc(B4, 0x55)), 'block 50');
      const expect250 = Buffer.alloc(B4);
      expect250.fill(0x66, 777, 877);
      assert.ok(readRange(restored, 250 * B4, B4).equals(expect250), 'block 250');
      assert.ok(readRange(restored, 100 * B4, B4).equals(blocks.get(100)!), 'block 100 shared with the base');
      assert.ok(readRange(restored, 200 * B4, B4).equals(blocks.get(200)!), 'block 200 shared with the base');
      assert.equal(sha256File(restored).length, 64);
    } finally {
      big.cleanup();
    }
  });
});
