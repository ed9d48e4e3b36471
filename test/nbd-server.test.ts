/**
 * NBD server tests against real clients (nbdinfo, nbdcopy, nbdsh, qemu-img, qemu-io from Debian), raw
 * malformed input, and our own client. The server runs in this process; clients are child processes run
 * asynchronously. Every test starts its own server and closes it, then checks no connection or opened device
 * is left behind.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { NbdServer, NbdServerOptions, normalizeExtents } from '../nbd/server';
import { NbdClient, NbdError } from '../nbd/client';
import * as C from '../nbd/constants';
import { Extent } from '../src/device/types';
import { Image, MemoryCatalogue, MemoryDevice, ZeroDevice, buildImage, sha256 } from './helpers/nbd-memdev';
import { NBDSH_ENV, RawPeer, metaContextPayload, nbdshAvailable, run, waitFor } from './helpers/nbd-tools';

const KiB = 1024;
const MiB = 1024 * KiB;
const GiB = 1024 * MiB;

// ---- Images ----------------------------------------------------------------------------------------------

const BIG_SIZE = 10 * MiB + 513;
const bigRegions = [
  { length: MiB + 7, fill: 'random' as const },
  { length: 300_000, fill: 0xa5 },
  { length: 2 * MiB + 123, fill: 'zero' as const },
  { length: MiB, fill: 0x3c },
  { length: 777, fill: 'zero' as const },
  { length: 2 * MiB, fill: 'random' as const },
];
bigRegions.push({ length: BIG_SIZE - bigRegions.reduce((s, r) => s + r.length, 0), fill: 0x7e });
const big = buildImage(bigRegions);
const one = buildImage([{ length: 1, fill: 0x42 }]);
// 4 MiB - 1: the final zero run ends at an unaligned export end.
const odd = buildImage([
  { length: MiB + 100, fill: 'random' },
  { length: MiB, fill: 0x5a },
  { length: 2 * MiB - 101, fill: 'zero' },
]);
// A sector-multiple size: minimum block size 512 is advertised.
const aligned = buildImage([
  { length: 3 * MiB + 100, fill: 'random' },
  { length: 2 * MiB + 900, fill: 'zero' },
  { length: 3 * MiB - 1000, fill: 0xc3 },
]);
const failing = buildImage([{ length: 6 * MiB, fill: 'random' }]);
const FAIL_AT = 2 * MiB + 1000;
const FAIL_LEN = 5000;

const IMAGES: Record<string, Image> = { big, one, odd, aligned, failing };

interface Fixture {
  server: NbdServer;
  port: number;
  uri: (name: string) => string;
  catalogue: MemoryCatalogue;
  devices: Record<string, MemoryDevice>;
  logs: string[];
}

function makeCatalogue(): { catalogue: MemoryCatalogue; devices: Record<string, MemoryDevice> } {
  const devices: Record<string, MemoryDevice> = {};
  const entries = new Map<string, { device: MemoryDevice | ZeroDevice; description: string }>();
  for (const [name, img] of Object.entries(IMAGES)) {
    devices[name] = MemoryDevice.fromImage(img);
    entries.set(name, { device: devices[name], description: `${name} export (${img.data.length} bytes)` });
  }
  devices.failing.failReads(FAIL_AT, FAIL_LEN, 'chunk 1234 failed verification');
  entries.set('zeros', { device: new ZeroDevice(3 * GiB), description: 'three GiB of zeroes' });
  devices.slow = new MemoryDevice(Buffer.alloc(MiB, 0x11), [], { readDelayMs: 300 });
  entries.set('slow', { device: devices.slow, description: 'slow' });
  return { catalogue: new MemoryCatalogue(entries), devices };
}

async function withServer(fn: (f: Fixture) => Promise<void>, options: Partial<NbdServerOptions> = {}): Promise<void> {
  const { catalogue, devices } = makeCatalogue();
  const logs: string[] = [];
  const server = new NbdServer({ catalogue, readOnly: true, log: (l) => logs.push(l), ...options });
  const addr = await server.listen({ port: 0 });
  assert.ok('port' in addr && addr.port > 0 && addr.host === '127.0.0.1');
  const port = addr.port;
  try {
    await fn({ server, port, uri: (n) => `nbd://127.0.0.1:${port}/${n}`, catalogue, devices, logs });
  } finally {
    await server.close();
  }
  assert.equal(server.connectionCount, 0, 'connections left open');
  assert.equal(catalogue.closes, catalogue.opens, 'every opened export is closed');
  for (const l of logs) assert.ok(!l.includes('\n') && !/\n\s+at /.test(l), `log lines are single lines: ${l}`);
}

/** Zero runs as the server reports them: shrunk inward to 512-byte boundaries, the export end counting as one. */
function expectedHoles(img: Image): Array<[number, number]> {
  const size = img.data.length;
  const out: Array<[number, number]> = [];
  for (const [o, l] of img.zeroRuns) {
    const a = Math.ceil(o / 512) * 512;
    const b = o + l >= size ? size : Math.floor((o + l) / 512) * 512;
    if (b > a) out.push([a, b - a]);
  }
  return out;
}

function holesOf(extents: Array<{ offset: number; length: number; zero: boolean }>): Array<[number, number]> {
  const merged: Array<{ offset: number; length: number; zero: boolean }> = [];
  for (const e of extents) {
    const last = merged[merged.length - 1];
    if (last && last.zero === e.zero && last.offset + last.length === e.offset) last.length += e.length;
    else merged.push({ ...e });
  }
  return merged.filter((e) => e.zero).map((e) => [e.offset, e.length]);
}

/** [offset, length, status] chunks sorted, adjacent ones of one status merged. */
function mergeChunks(chunks: number[][]): number[][] {
  const out: number[][] = [];
  for (const [o, l, st] of [...chunks].sort((a, b) => a[0] - b[0])) {
    const last = out[out.length - 1];
    if (last && last[2] === st && last[0] + last[1] === o) last[1] += l;
    else out.push([o, l, st]);
  }
  return out;
}

let tmp: string;
before(async () => {
  tmp = await mkdtemp(path.join(os.tmpdir(), 'nbd-test-'));
});
after(async () => {
  await rm(tmp, { recursive: true, force: true });
});

// ---- Unit ------------------------------------------------------------------------------------------------

describe('normalizeExtents', () => {
  test('clips, fills gaps as data, merges, aligns zero runs inward (export end counts as aligned)', () => {
    const raw: Extent[] = [
      { offset: 0, length: 1000, zero: false },
      { offset: 1000, length: 5000, zero: true },
      { offset: 6000, length: 10, zero: true },
      { offset: 9000, length: 1001, zero: true },
    ];
    assert.deepEqual(normalizeExtents(raw, 0, 10001, 10001, 512), [
      { offset: 0, length: 1024, zero: false },
      { offset: 1024, length: 5632 - 1024, zero: true },
      { offset: 5632, length: 9216 - 5632, zero: false },
      { offset: 9216, length: 10001 - 9216, zero: true },
    ]);
    assert.deepEqual(normalizeExtents(raw, 2000, 100, 10001, 512), [{ offset: 2000, length: 100, zero: true }]);
    // Extents already clipped to an unaligned query keep the query's edges.
    assert.deepEqual(normalizeExtents([{ offset: 700, length: 3000, zero: true }], 700, 3000, 10001, 512), [{ offset: 700, length: 3000, zero: true }]);
    assert.deepEqual(normalizeExtents([{ offset: 0, length: 3000, zero: true }], 700, 3000, 10001, 512), [
      { offset: 700, length: 2560 - 700, zero: true },
      { offset: 2560, length: 3700 - 2560, zero: false },
    ]);
    assert.deepEqual(normalizeExtents([], 5, 10, 100, 512), [{ offset: 5, length: 10, zero: false }]);
  });
});

// ---- Real clients ------------------------------------------------------------------------------------------

describe('NBD server with real clients', () => {
  test('nbdinfo --list shows every export with its description; --json gives sizes and block sizes', async () => {
    await withServer(async ({ port, uri, catalogue }) => {
      const text = await run('nbdinfo', ['--list', `nbd://127.0.0.1:${port}`]);
      assert.equal(text.code, 0, text.stderr);
      for (const e of await catalogue.list()) {
        assert.match(text.stdout, new RegExp(`export="${e.name}":\\n\\s+description: ${e.description.replace(/[()]/g, '\\$&')}\\n`));
      }
      const r = await run('nbdinfo', ['--json', '--list', `nbd://127.0.0.1:${port}`]);
      assert.equal(r.code, 0, r.stderr);
      const j = JSON.parse(r.stdout);
      assert.equal(j.protocol, 'newstyle-fixed');
      assert.equal(j.structured, true);
      const byName = new Map<string, Record<string, unknown>>(j.exports.map((e: Record<string, unknown>) => [e['export-name'], e]));
      for (const e of await catalogue.list()) {
        const x = byName.get(e.name);
        assert.ok(x, `export ${e.name} listed`);
        assert.equal(x.description, e.description);
      }
      for (const [name, img] of Object.entries(IMAGES)) {
        const x = byName.get(name)!;
        assert.equal(x['export-size'], img.data.length);
        assert.equal(x.block_size_minimum, img.data.length % 512 === 0 ? 512 : 1, name);
        assert.equal(x.block_size_preferred, 4096);
        assert.equal(x.block_size_maximum, 32 * MiB);
        assert.equal(x.is_read_only, true);
        assert.equal(x.can_multi_conn, true);
        assert.equal(x.can_cache, true);
        assert.equal(x.can_flush, true);
        assert.equal(x.can_df, true);
        assert.equal(x.can_trim, false);
        assert.equal(x.can_zero, false);
        assert.deepEqual(x.contexts, ['base:allocation']);
      }
      const single = await run('nbdinfo', ['--json', uri('big')]);
      assert.equal(single.code, 0, single.stderr);
      assert.equal(JSON.parse(single.stdout).exports[0]['export-size'], BIG_SIZE);
      const missing = await run('nbdinfo', [uri('no-such-export')]);
      assert.notEqual(missing.code, 0);
    });
  });

  test('nbdinfo --map reports the zero runs as hole,zero and the rest as data', async () => {
    await withServer(async ({ uri }) => {
      for (const name of ['big', 'odd', 'aligned', 'one']) {
        const img = IMAGES[name];
        const r = await run('nbdinfo', ['--json', '--map', uri(name)]);
        assert.equal(r.code, 0, r.stderr);
        const map: Array<{ offset: number; length: number; type: number }> = JSON.parse(r.stdout);
        let pos = 0;
        for (const m of map) {
          assert.equal(m.offset, pos);
          assert.ok(m.type === 0 || m.type === 3, `type ${m.type}`);
          pos += m.length;
        }
        assert.equal(pos, img.data.length, `${name}: map covers the export`);
        const holes = holesOf(map.map((m) => ({ offset: m.offset, length: m.length, zero: m.type === 3 })));
        assert.deepEqual(holes, expectedHoles(img), name);
      }
      assert.ok(expectedHoles(big).length === 1 && expectedHoles(odd).length === 1 && expectedHoles(aligned).length === 1);
    });
  });

  test('nbdcopy and qemu-img convert copy exports exactly (sizes not a multiple of 512 included)', async () => {
    await withServer(async ({ uri }) => {
      for (const name of ['big', 'one', 'odd', 'aligned']) {
        const img = IMAGES[name];
        const size = img.data.length;
        const want = sha256(img.data);
        const a = path.join(tmp, `${name}-nbdcopy.img`);
        const r1 = await run('nbdcopy', [uri(name), a]);
        assert.equal(r1.code, 0, r1.stderr);
        const got = await readFile(a);
        assert.equal(got.length, size);
        assert.equal(sha256(got), want, `nbdcopy ${name}`);

        const b = path.join(tmp, `${name}-qemu.img`);
        const r2 = await run('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', uri(name), b]);
        assert.equal(r2.code, 0, r2.stderr);
        const q = await readFile(b);
        // qemu's block layer rounds every image size up to a 512-byte sector (its NBD driver reads the slop
        // as zeroes), so the copy is the export followed by < 512 zero bytes.
        assert.equal(q.length, Math.ceil(size / 512) * 512, `qemu-img ${name} length`);
        assert.equal(sha256(q.subarray(0, size)), want, `qemu-img ${name}`);
        assert.ok(q.subarray(size).every((x) => x === 0));
        await rm(a);
        await rm(b);
      }
    });
  });

  test('nbdcopy with 4 connections and 64 requests in flight', async () => {
    await withServer(async ({ uri, server }) => {
      const out = path.join(tmp, 'multi.img');
      const before = server.accepted;
      const r = await run('nbdcopy', ['--connections=4', '--threads=4', '--requests=64', '--request-size=65536', uri('big'), out]);
      assert.equal(r.code, 0, r.stderr);
      assert.equal(sha256(await readFile(out)), sha256(big.data));
      assert.ok(server.accepted - before >= 4, `nbdcopy opened ${server.accepted - before} connections`);
      await rm(out);
      const r2 = await run('nbdcopy', ['--connections=4', '--threads=4', '--requests=64', uri('odd'), 'null:']);
      assert.equal(r2.code, 0, r2.stderr);
    });
  });

  test('qemu-io reads at unaligned offsets and lengths match the known patterns', async () => {
    await withServer(async ({ uri }) => {
      const r = big.regions;
      const cmds: string[] = [];
      const pat = (reg: (typeof r)[number], skipHead: number, skipTail: number, fill: number): void => {
        cmds.push('-c', `read -P 0x${fill.toString(16)} ${reg.offset + skipHead} ${reg.length - skipHead - skipTail}`);
      };
      pat(r[1], 1, 3, 0xa5); // 0xa5 region, unaligned both ends
      pat(r[1], 0, 0, 0xa5);
      pat(r[2], 5, 7, 0); // zero run
      pat(r[3], 511, 513, 0x3c);
      pat(r[4], 0, 0, 0); // small zero run
      pat(r[6], 3, 0, 0x7e); // up to the unaligned export end
      cmds.push('-c', `read -P 0x7e ${BIG_SIZE - 1} 1`);
      const res = await run('qemu-io', ['-r', '-f', 'raw', uri('big'), ...cmds]);
      assert.equal(res.code, 0, res.stdout + res.stderr);
      assert.doesNotMatch(res.stdout, /Pattern verification failed|failed/);
      assert.equal((res.stdout.match(/^read (\d+)\/\1 bytes at offset \d+$/gm) ?? []).length, cmds.length / 2);

      // Hex dumps of random data at odd places compared with the device content.
      for (const [off, len] of [
        [5, 40],
        [MiB + 7 - 20, 53],
        [r[5].offset + 4095, 35],
        [BIG_SIZE - 37, 37],
      ]) {
        const v = await run('qemu-io', ['-r', '-f', 'raw', uri('big'), '-c', `read -v ${off} ${len}`]);
        assert.equal(v.code, 0, v.stderr);
        const bytes: number[] = [];
        for (const line of v.stdout.split('\n')) {
          const m = /^([0-9a-f]{8}):  ((?:[0-9a-f]{2} )*[0-9a-f]{2})/.exec(line);
          if (m) bytes.push(...m[2].split(' ').map((h) => parseInt(h, 16)));
        }
        assert.deepEqual(Buffer.from(bytes), big.data.subarray(off, off + len), `read -v ${off} ${len}`);
      }
    });
  });

  test('a failing device range fails only the requests touching it', async () => {
    await withServer(async ({ uri, port, logs }) => {
      const out = path.join(tmp, 'failing.img');
      const c1 = await run('nbdcopy', [uri('failing'), out]);
      assert.notEqual(c1.code, 0, 'nbdcopy of an export with an unreadable range fails');
      const c2 = await run('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', uri('failing'), out]);
      assert.notEqual(c2.code, 0, 'qemu-img convert fails too');
      await rm(out, { force: true });

      const bad = await run('qemu-io', ['-r', '-f', 'raw', uri('failing'), '-c', `read ${FAIL_AT + 100} 512`]);
      assert.match(bad.stdout + bad.stderr, /Input\/output error/);
      // qemu aligns requests to the advertised 512-byte minimum, so stay clear of the failing sectors.
      const good = await run('qemu-io', ['-r', '-f', 'raw', uri('failing'), '-c', `read -v ${2 * MiB + 5} 400`, '-c', `read 0 ${2 * MiB}`, '-c', `read ${FAIL_AT + FAIL_LEN + 512} ${MiB}`]);
      assert.equal(good.code, 0, good.stdout + good.stderr);
      assert.doesNotMatch(good.stdout, /failed/);

      const info = await run('nbdinfo', ['--no-content', uri('failing')]);
      assert.equal(info.code, 0, info.stderr);

      const failLogs = logs.filter((l) => l.includes('READ') && l.includes('EIO'));
      assert.ok(failLogs.length >= 3, `failures logged: ${logs.join(' | ')}`);
      assert.ok(failLogs.every((l) => l.includes('chunk 1234 failed verification') && l.includes('export "failing"')));
    });
  });

  test('nbdsh: block status with REQ_ONE, structured reads with holes and DF, CACHE, FLUSH, writes refused', async (t) => {
    if (!(await nbdshAvailable())) {
      t.skip('nbdsh (python3-libnbd) is not installed');
      return;
    }
    await withServer(async ({ uri, devices }) => {
      const hole = expectedHoles(big)[0];
      const script = `
import nbd, json
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.connect_uri(${JSON.stringify(uri('big'))})
h.set_strict_mode(0)
out = {}
bs = []
h.block_status(3000000, 1000000, lambda m, o, e, err: bs.append([m, o, list(e)]) or 0, nbd.CMD_FLAG_REQ_ONE)
out['req_one'] = bs[:]
bs.clear()
h.block_status(3000000, 1000000, lambda m, o, e, err: bs.append([m, o, list(e)]) or 0)
out['all'] = bs[:]
bs.clear()
h.block_status(1000, ${hole[0] + 100}, lambda m, o, e, err: bs.append([m, o, list(e)]) or 0, nbd.CMD_FLAG_REQ_ONE)
out['in_hole'] = bs[:]
chunks = []
def rc(buf, off, status, err):
    chunks.append([off, len(buf), status, bytes(buf[:4]).hex()])
    return 0
buf = h.pread_structured(3000000, 1000000, rc)
out['chunks'] = chunks[:]
out['sha'] = __import__('hashlib').sha256(bytes(buf)).hexdigest()
chunks.clear()
h.pread_structured(3000000, 1000000, rc, nbd.CMD_FLAG_DF)
out['df_chunks'] = chunks[:]
h.cache(65536, 4096)
h.flush()
errs = {}
for name, f in [('pwrite', lambda: h.pwrite(b'x' * 1000, 0)), ('trim', lambda: h.trim(4096, 0)), ('zero', lambda: h.zero(4096, 0)),
                ('past_end', lambda: h.pread(10, ${BIG_SIZE - 5})), ('bad_flag', lambda: h.pread(10, 0, 0x40))]:
    try:
        f()
        errs[name] = None
    except nbd.Error as e:
        errs[name] = e.errno
out['errs'] = errs
out['after'] = bytes(h.pread(4, 1048584)).hex()
h.shutdown()
print(json.dumps(out))
`;
      const r = await run('nbdsh', ['-c', script], { env: NBDSH_ENV });
      assert.equal(r.code, 0, r.stderr);
      const o = JSON.parse(r.stdout);
      // REQ_ONE: exactly one descriptor, not longer than the request.
      assert.equal(o.req_one.length, 1);
      assert.equal(o.req_one[0][0], 'base:allocation');
      assert.deepEqual(o.req_one[0][2], [hole[0] - 1000000, 0]);
      assert.deepEqual(o.all[0][2], [hole[0] - 1000000, 0, hole[1], 3, 4000000 - hole[0] - hole[1], 0]);
      assert.deepEqual(o.in_hole[0][2], [1000, 3]);
      // Structured read: data, hole, data chunks covering the request (data may come in pieces, in any
      // order); content correct.
      assert.deepEqual(
        mergeChunks(o.chunks),
        [
          [1000000, hole[0] - 1000000, 1],
          [hole[0], hole[1], 2],
          [hole[0] + hole[1], 4000000 - hole[0] - hole[1], 1],
        ],
      );
      assert.equal(o.sha, sha256(big.data.subarray(1000000, 4000000)));
      assert.deepEqual(o.df_chunks.map((c: number[]) => [c[0], c[1], c[2]]), [[1000000, 3000000, 1]]);
      assert.deepEqual(o.errs, { pwrite: 'EPERM', trim: 'EPERM', zero: 'EPERM', past_end: 'EINVAL', bad_flag: 'EINVAL' });
      assert.equal(o.after, 'a5a5a5a5');
      assert.deepEqual(devices.big.prefetches, [[4096, 65536]]);

      // A structured read over the failing range: an error chunk with the failing offset, data for the rest.
      const f = await run(
        'nbdsh',
        [
          '-u',
          uri('failing'),
          '-c',
          `
import nbd, json
chunks = []
def rc(buf, off, status, err):
    chunks.append([off, len(buf), status])
    return 0
try:
    h.pread_structured(4096 * 8, ${2 * MiB}, rc)
    res = None
except nbd.Error as e:
    res = e.errno
print(json.dumps({'chunks': chunks, 'err': res}))
`,
        ],
        { env: NBDSH_ENV },
      );
      assert.equal(f.code, 0, f.stderr);
      const fo = JSON.parse(f.stdout);
      assert.equal(fo.err, 'EIO');
      assert.deepEqual(fo.chunks, [[FAIL_AT, 0, 3]]);
    });
  });
});

// ---- Malformed input ---------------------------------------------------------------------------------------

describe('NBD server with malformed input', () => {
  async function stillWorks(uri: string): Promise<void> {
    const r = await run('nbdinfo', ['--json', uri]);
    assert.equal(r.code, 0, `nbdinfo still works: ${r.stderr}`);
  }

  test('handshake: garbage flags, no fixed newstyle, bad option magic, huge option, unknown export', async () => {
    await withServer(async ({ port, uri, logs, server }) => {
      let p = await RawPeer.connect(port);
      await p.reader.read(18);
      p.write(Buffer.from('GARBAGE GARBAGE GARBAGE'));
      assert.ok(await p.closedWithin(2000), 'garbage flags: closed');
      assert.ok(logs.some((l) => l.includes('unknown client flags')));

      p = await RawPeer.connect(port);
      const hflags = await p.greet(0);
      assert.equal(hflags, C.FLAG_FIXED_NEWSTYLE | C.FLAG_NO_ZEROES);
      assert.ok(await p.closedWithin(2000), 'no fixed newstyle: closed');
      assert.ok(logs.some((l) => l.includes('fixed newstyle')));

      p = await RawPeer.connect(port);
      await p.greet();
      p.sendOption(C.OPT_LIST, Buffer.alloc(0), 0x1122334455667788n);
      assert.ok(await p.closedWithin(2000), 'bad option magic: closed');
      assert.ok(logs.some((l) => l.includes('bad option magic')));

      p = await RawPeer.connect(port);
      await p.greet();
      p.sendOption(C.OPT_GO, Buffer.alloc(0), undefined, 0x7fffffff); // announces 2 GiB, sends nothing
      assert.ok(await p.closedWithin(2000), 'huge option: closed');
      assert.ok(logs.some((l) => l.includes('2147483647 bytes')));

      p = await RawPeer.connect(port);
      await p.greet();
      p.sendOption(C.OPT_EXPORT_NAME, Buffer.from('nope'));
      assert.ok(await p.closedWithin(2000), 'EXPORT_NAME of an unknown export: closed');

      p = await RawPeer.connect(port);
      await p.greet();
      p.write(Buffer.from('IHAVEOPT').subarray(0, 5));
      p.destroy(); // vanishes mid-option
      await stillWorks(uri('big'));
      assert.ok(await waitFor(() => server.connectionCount === 0));
    });
  });

  test('options: unsupported and invalid ones are refused and the session goes on', async () => {
    await withServer(async ({ port, uri }) => {
      const p = await RawPeer.connect(port);
      await p.greet();
      p.sendOption(42);
      let r = await p.readOptionReply();
      assert.deepEqual([r.option, r.type], [42, C.REP_ERR_UNSUP]);
      p.sendOption(C.OPT_STARTTLS);
      r = await p.readOptionReply();
      assert.equal(r.type, C.REP_ERR_UNSUP);
      p.sendOption(C.OPT_LIST, Buffer.from('x'));
      r = await p.readOptionReply();
      assert.equal(r.type, C.REP_ERR_INVALID);
      p.sendOption(C.OPT_SET_META_CONTEXT, metaContextPayload('big', ['base:allocation']));
      r = await p.readOptionReply();
      assert.equal(r.type, C.REP_ERR_INVALID, 'SET_META_CONTEXT before structured replies');
      const bad = Buffer.alloc(10);
      bad.writeUInt32BE(100, 0); // name longer than the option
      p.sendOption(C.OPT_GO, bad);
      r = await p.readOptionReply();
      assert.equal(r.type, C.REP_ERR_INVALID);
      const unknown = Buffer.alloc(4 + 4 + 2);
      unknown.writeUInt32BE(4, 0);
      unknown.write('nope', 4);
      p.sendOption(C.OPT_GO, unknown);
      r = await p.readOptionReply();
      assert.equal(r.type, C.REP_ERR_UNKNOWN);
      assert.match(r.data.toString(), /nope/);

      // Meta contexts: no query lists base:allocation, "base:" matches it, foreign namespaces are ignored.
      for (const [queries, expect] of [
        [[], true],
        [['base:'], true],
        [['base:allocation'], true],
        [['qemu:dirty-bitmap:x'], false],
      ] as Array<[string[], boolean]>) {
        p.sendOption(C.OPT_LIST_META_CONTEXT, metaContextPayload('big', queries));
        const rs = await p.readOptionReplies();
        assert.equal(rs[rs.length - 1].type, C.REP_ACK);
        const names = rs.filter((x) => x.type === C.REP_META_CONTEXT).map((x) => x.data.toString('utf8', 4));
        assert.deepEqual(names, expect ? ['base:allocation'] : [], JSON.stringify(queries));
      }
      // LIST still works after all that: the stream stayed in sync.
      p.sendOption(C.OPT_LIST);
      const list = await p.readOptionReplies();
      assert.equal(list.filter((x) => x.type === C.REP_SERVER).length, 7);
      // INFO then GO on the same export.
      const info = Buffer.alloc(4 + 3 + 2 + 2);
      info.writeUInt32BE(3, 0);
      info.write('one', 4);
      info.writeUInt16BE(1, 7);
      info.writeUInt16BE(C.INFO_NAME, 9);
      p.sendOption(C.OPT_INFO, info);
      const infos = await p.readOptionReplies();
      assert.equal(infos[infos.length - 1].type, C.REP_ACK);
      const types = infos.filter((x) => x.type === C.REP_INFO).map((x) => x.data.readUInt16BE(0));
      assert.deepEqual(types.sort(), [C.INFO_EXPORT, C.INFO_NAME, C.INFO_BLOCK_SIZE].sort());
      p.sendOption(C.OPT_ABORT);
      r = await p.readOptionReply();
      assert.equal(r.type, C.REP_ACK);
      assert.ok(await p.closedWithin(2000));
      await stillWorks(uri('one'));
    });
  });

  test('NBD_OPT_EXPORT_NAME with and without NBD_FLAG_C_NO_ZEROES', async () => {
    await withServer(async ({ port }) => {
      for (const flags of [C.FLAG_C_FIXED_NEWSTYLE, C.FLAG_C_FIXED_NEWSTYLE | C.FLAG_C_NO_ZEROES]) {
        const p = await RawPeer.connect(port);
        await p.greet(flags);
        p.sendOption(C.OPT_EXPORT_NAME, Buffer.from('big'));
        const reply = await p.reader.read(flags & C.FLAG_C_NO_ZEROES ? 10 : 134);
        assert.equal(Number(reply.readBigUInt64BE(0)), BIG_SIZE);
        const tflags = reply.readUInt16BE(8);
        assert.equal(tflags & (C.FLAG_HAS_FLAGS | C.FLAG_READ_ONLY), C.FLAG_HAS_FLAGS | C.FLAG_READ_ONLY);
        assert.equal(tflags & C.FLAG_SEND_DF, 0, 'no DF without structured replies');
        if (!(flags & C.FLAG_C_NO_ZEROES)) assert.ok(reply.subarray(10).every((b) => b === 0));
        p.sendRequest(C.CMD_READ, MiB + 7, 8, { cookie: 0xdeadbeefcafen });
        const r = await p.readSimpleReply(8);
        assert.equal(r.error, 0);
        assert.equal(r.cookie, 0xdeadbeefcafen);
        assert.deepEqual(r.data, Buffer.alloc(8, 0xa5));
        p.sendRequest(C.CMD_DISC, 0, 0);
        assert.ok(await p.closedWithin(2000));
      }
    });
  });

  test('transmission: bad requests get errors and the stream stays in sync', async () => {
    await withServer(async ({ port, uri, logs }) => {
      // Simple replies.
      const p = await RawPeer.connect(port);
      await p.greet();
      const { size } = await p.go('big');
      assert.equal(size, BIG_SIZE);
      const expectError = async (errno: number, what: string): Promise<void> => {
        const r = await p.readSimpleReply();
        assert.equal(r.error, errno, what);
      };
      p.sendRequest(C.CMD_READ, BIG_SIZE - 10, 11);
      await expectError(C.EINVAL, 'read past the end');
      p.sendRequest(C.CMD_READ, 2 ** 62, 1);
      await expectError(C.EINVAL, 'offset far past the end');
      p.sendRequest(C.CMD_READ, 0, 0);
      await expectError(C.EINVAL, 'zero-length read');
      p.sendRequest(C.CMD_READ, 0, GiB);
      await expectError(C.EINVAL, '1 GiB read');
      p.sendRequest(C.CMD_READ, 0, 512, { flags: C.CMD_FLAG_DF });
      await expectError(C.EINVAL, 'DF without structured replies');
      p.sendRequest(99, 0, 512);
      await expectError(C.EINVAL, 'unknown command');
      p.sendRequest(C.CMD_BLOCK_STATUS, 0, 512);
      await expectError(C.EINVAL, 'block status without a meta context');
      p.sendRequest(C.CMD_WRITE, 0, 1000, { payload: Buffer.alloc(1000, 0x77) });
      await expectError(C.EPERM, 'write');
      p.sendRequest(C.CMD_TRIM, 0, 1000);
      await expectError(C.EPERM, 'trim');
      p.sendRequest(C.CMD_WRITE_ZEROES, 0, 1000);
      await expectError(C.EPERM, 'write zeroes');
      p.sendRequest(C.CMD_FLUSH, 0, 0);
      await expectError(0, 'flush');
      p.sendRequest(C.CMD_CACHE, 0, 4096);
      await expectError(0, 'cache');
      p.sendRequest(C.CMD_READ, BIG_SIZE - 3, 3, { cookie: 7n });
      const tail = await p.readSimpleReply(3);
      assert.equal(tail.cookie, 7n);
      assert.deepEqual(tail.data, Buffer.alloc(3, 0x7e), 'in sync after the errors');
      // A wrong request magic closes the connection.
      p.sendRequest(C.CMD_READ, 0, 1, { magic: 0x12345678 });
      assert.ok(await p.closedWithin(2000));
      assert.ok(logs.some((l) => l.includes('bad request magic 0x12345678')));

      // Structured replies: errors are error chunks; 1 GiB on a 3 GiB export is EOVERFLOW.
      const s = await RawPeer.connect(port);
      await s.greet();
      await s.go('zeros', { structured: true, meta: true });
      s.sendRequest(C.CMD_READ, 0, GiB);
      let chunks = await s.readStructuredReply();
      assert.equal(chunks.length, 1);
      assert.equal(chunks[0].type, C.REPLY_TYPE_ERROR);
      assert.equal(chunks[0].data.readUInt32BE(0), C.EOVERFLOW);
      s.sendRequest(C.CMD_READ, 3 * GiB - 1, 2);
      chunks = await s.readStructuredReply();
      assert.equal(chunks[0].type, C.REPLY_TYPE_ERROR);
      assert.equal(chunks[0].data.readUInt32BE(0), C.EINVAL);
      // Reads of a hole: a single hole chunk.
      s.sendRequest(C.CMD_READ, 4096, 8 * MiB);
      chunks = await s.readStructuredReply();
      assert.equal(chunks.length, 1);
      assert.equal(chunks[0].type, C.REPLY_TYPE_OFFSET_HOLE);
      assert.equal(Number(chunks[0].data.readBigUInt64BE(0)), 4096);
      assert.equal(chunks[0].data.readUInt32BE(8), 8 * MiB);
      // Block status of almost 4 GiB on a 3 GiB export is past the end; of the last 2 GiB is one hole.
      s.sendRequest(C.CMD_BLOCK_STATUS, GiB, 0xffffffff);
      chunks = await s.readStructuredReply();
      assert.equal(chunks[0].type, C.REPLY_TYPE_ERROR);
      s.sendRequest(C.CMD_BLOCK_STATUS, GiB, 2 * GiB);
      chunks = await s.readStructuredReply();
      assert.equal(chunks[0].type, C.REPLY_TYPE_BLOCK_STATUS);
      assert.deepEqual([chunks[0].data.readUInt32BE(4), chunks[0].data.readUInt32BE(8)], [2 * GiB, 3]);
      // A WRITE payload above the limit closes the connection.
      s.sendRequest(C.CMD_WRITE, 0, 64 * MiB);
      assert.ok(await s.closedWithin(2000));
      assert.ok(logs.some((l) => l.includes('NBD_CMD_WRITE payload of 67108864 bytes')));
      await stillWorks(uri('big'));
    });
  });

  test('clients that vanish mid-request or before reading large replies do not hurt the server', async () => {
    await withServer(async ({ port, uri, server }) => {
      // Half a request header, then gone.
      let p = await RawPeer.connect(port);
      await p.greet();
      await p.go('big');
      p.write(Buffer.from([0x25, 0x60, 0x95, 0x13, 0, 0, 0, 0, 1, 2]));
      p.destroy();
      // Many large reads, then gone before reading any reply (the server must not buffer them all).
      p = await RawPeer.connect(port);
      await p.greet();
      await p.go('zeros', { structured: true });
      for (let i = 0; i < 64; i++) p.sendRequest(C.CMD_READ, i * 32 * MiB, 32 * MiB, { cookie: BigInt(i) });
      await new Promise((r) => setTimeout(r, 50));
      p.destroy();
      // Same with simple replies, and half of a WRITE payload.
      p = await RawPeer.connect(port);
      await p.greet();
      await p.go('big');
      for (let i = 0; i < 16; i++) p.sendRequest(C.CMD_READ, 0, 8 * MiB);
      p.sendRequest(C.CMD_WRITE, 0, MiB);
      p.write(Buffer.alloc(1000));
      await p.reader.read(1000);
      p.destroy();
      assert.ok(await waitFor(() => server.connectionCount === 0), 'connections are cleaned up');
      await stillWorks(uri('big'));
      const r = await run('nbdcopy', [uri('odd'), 'null:']);
      assert.equal(r.code, 0, r.stderr);
    });
  });

  test('a client that stops reading is bounded by backpressure and close() still finishes', async () => {
    await withServer(
      async ({ port, server, devices }) => {
        const p = await RawPeer.connect(port);
        await p.greet();
        await p.go('big', { structured: true });
        p.socket.pause(); // never read replies
        for (let i = 0; i < 200; i++) p.sendRequest(C.CMD_READ, (i % 2) * MiB, 8 * MiB, { cookie: BigInt(i) });
        await new Promise((r) => setTimeout(r, 300));
        // Replies are 8 MiB each: the server must stop after what the socket buffers plus its in-flight limit.
        assert.ok(devices.big.reads < 40, `server read ${devices.big.reads} times for a client that reads nothing`);
        const t0 = Date.now();
        await server.close();
        assert.ok(Date.now() - t0 < 5000, 'close() finished');
        p.destroy();
      },
      { closeTimeoutMs: 500 },
    );
  });
});

// ---- Our client ------------------------------------------------------------------------------------------

describe('NBD server with nbd/client.ts', () => {
  test('list, reads, extents and block status match the devices', async () => {
    await withServer(async ({ port, catalogue }) => {
      const addr = { host: '127.0.0.1', port };
      assert.deepEqual(await NbdClient.list(addr), await catalogue.list());
      for (const [name, img] of Object.entries(IMAGES)) {
        if (name === 'failing') continue;
        const c = await NbdClient.connect(addr, { exportName: name });
        try {
          assert.equal(c.size, img.data.length);
          assert.equal(c.description, `${name} export (${img.data.length} bytes)`);
          assert.ok(c.readOnly && c.structuredReplies && c.hasBlockStatus);
          assert.equal(c.blockSizes.minimum, img.data.length % 512 ? 1 : 512);
          assert.equal(sha256(await c.read(0, c.size)), sha256(img.data), name);
          // Many concurrent unaligned reads.
          let seed = 12345;
          const rand = (n: number): number => ((seed = (seed * 1103515245 + 12345) % 2 ** 31), seed % n);
          const reads = Array.from({ length: 200 }, () => {
            const off = rand(img.data.length);
            const len = 1 + rand(Math.min(img.data.length - off, 300 * KiB));
            return [off, len] as const;
          });
          const got = await Promise.all(reads.map(([o, l]) => c.read(o, l)));
          reads.forEach(([o, l], i) => assert.ok(got[i].equals(img.data.subarray(o, o + l)), `${name} read ${o}+${l}`));
          assert.deepEqual(holesOf(await c.extents(0, c.size)), expectedHoles(img), `${name} extents`);
          const first = await c.blockStatus(0, c.size, { reqOne: true });
          assert.equal(first.length, 1);
          assert.ok(first[0].length <= c.size);
          await c.prefetch(0, c.size);
          await c.flush();
          await assert.rejects(c.command(C.CMD_WRITE, 0, 0, 4, Buffer.from('abcd')), (e: NbdError) => e.nbdErrno === C.EPERM);
          await assert.rejects(c.command(C.CMD_READ, 0, c.size, 1), (e: NbdError) => e.nbdErrno === C.EINVAL);
        } finally {
          await c.close();
        }
      }
      await assert.rejects(NbdClient.connect(addr, { exportName: 'missing' }), /NBD_REP_ERR_UNKNOWN/);
    });
  });

  test('read errors carry errno and offset; other requests on the connection still succeed', async () => {
    await withServer(async ({ port }) => {
      for (const structuredReplies of [true, false]) {
        const c = await NbdClient.connect({ port }, { exportName: 'failing', structuredReplies });
        try {
          const results = await Promise.allSettled([c.read(0, MiB), c.read(2 * MiB, MiB), c.read(4 * MiB, MiB)]);
          assert.equal(results[0].status, 'fulfilled');
          assert.equal(results[2].status, 'fulfilled');
          assert.ok((results[0] as PromiseFulfilledResult<Buffer>).value.equals(failing.data.subarray(0, MiB)));
          assert.equal(results[1].status, 'rejected');
          const e = (results[1] as PromiseRejectedResult).reason as NbdError;
          assert.ok(e instanceof NbdError);
          assert.equal(e.nbdErrno, C.EIO);
          assert.equal(e.errno, 'EIO');
          assert.equal(e.offset, structuredReplies ? FAIL_AT : undefined);
          if (structuredReplies) assert.match(e.message, /chunk 1234 failed verification/);
        } finally {
          await c.close();
        }
      }
    });
  });

  test('simple replies; close() lets requests in flight finish', async () => {
    await withServer(async ({ port, server, devices }) => {
      const c = await NbdClient.connect({ port }, { exportName: 'big', structuredReplies: false });
      assert.ok(!c.structuredReplies && !c.hasBlockStatus);
      assert.equal(sha256(await c.read(0, c.size)), sha256(big.data));
      assert.deepEqual(await c.extents(0, 100), [{ offset: 0, length: 100, zero: false }]);
      await c.close();

      const s = await NbdClient.connect({ port }, { exportName: 'slow' });
      const pending = [s.read(0, 1000), s.read(4096, 1000), s.read(MiB - 10, 10)];
      await new Promise((r) => setTimeout(r, 50));
      assert.equal(s.inFlight, 3);
      const closing = server.close();
      const results = await Promise.all(pending);
      for (const r of results) assert.ok(r.every((b) => b === 0x11));
      await closing;
      await assert.rejects(s.read(0, 10));
      await s.close();
      assert.ok(devices.slow.reads >= 3);
    });
  });

  test('readInto: replies cut into random pieces (1 byte to 200 KiB) land intact; unbroken ones mostly in place', async () => {
    await withServer(async ({ port }) => {
      // A proxy that re-cuts the server's stream into random pieces, several of them sometimes in one write.
      let seed = 777;
      // The high bits: an LCG's low bits repeat with a short period.
      const rand = (n: number): number => ((seed = (seed * 1103515245 + 12345) % 2 ** 31), Math.floor(seed / 65536) % n);
      const proxy = net.createServer((down) => {
        down.setNoDelay(true); // tiny pieces must not wait for delayed ACKs
        const up = net.connect({ host: '127.0.0.1', port });
        down.on('data', (d) => up.write(d));
        let queue = Buffer.alloc(0);
        let busy = false;
        const pump = (): void => {
          if (busy || queue.length === 0) return;
          busy = true;
          const sizes = [1, 7, 12, 16, 100, 4 * KiB, 64 * KiB + 3, 200 * KiB];
          const n = Math.min(queue.length, sizes[rand(sizes.length)]);
          const piece = queue.subarray(0, n);
          queue = queue.subarray(n);
          down.write(Buffer.from(piece));
          setImmediate(() => {
            busy = false;
            pump();
          });
        };
        up.on('data', (d) => {
          queue = Buffer.concat([queue, d]);
          pump();
        });
        up.on('close', () => down.destroy());
        down.on('close', () => up.destroy());
        down.on('error', () => undefined);
        up.on('error', () => undefined);
      });
      await new Promise<void>((r) => proxy.listen(0, '127.0.0.1', r));
      const proxyPort = (proxy.address() as net.AddressInfo).port;
      try {
        for (const structuredReplies of [true, false]) {
          for (const [p, cut] of [[proxyPort, true], [port, false]] as const) {
            const c = await NbdClient.connect({ port: p }, { exportName: 'big', structuredReplies });
            try {
              const whole = Buffer.alloc(c.size, 0xee);
              // Several readInto() at once, of every size class, covering the export.
              const parts: Promise<void>[] = [];
              for (let o = 0; o < c.size;) {
                const l = Math.min(c.size - o, [1, 511, 4 * KiB, 100 * KiB, 300 * KiB, MiB + 17][rand(6)]);
                parts.push(c.readInto(whole.subarray(o, o + l), o));
                o += l;
              }
              await Promise.all(parts);
              assert.equal(sha256(whole), sha256(big.data), `structured ${structuredReplies}, cut ${cut}`);
              // Unbroken replies: the bulk of the data never went through the scratch buffer.
              if (!cut) assert.ok(c.bytesInPlace > c.bytesRead / 2, `${c.bytesInPlace} of ${c.bytesRead} bytes in place`);
            } finally {
              await c.close();
            }
          }
        }
      } finally {
        proxy.close();
      }
    });
  });

  test('many connections at once', async () => {
    await withServer(async ({ port }) => {
      const clients = await Promise.all(Array.from({ length: 20 }, () => NbdClient.connect({ port }, { exportName: 'odd' })));
      try {
        const bufs = await Promise.all(clients.map((c, i) => c.read(i * 1000, 100 * KiB)));
        bufs.forEach((b, i) => assert.ok(b.equals(odd.data.subarray(i * 1000, i * 1000 + 100 * KiB))));
      } finally {
        await Promise.all(clients.map((c) => c.close()));
      }
    });
  });
});
