/**
 * `backy mount` / `backy umount` end to end: real repositories, the real CLI in a child process serving the
 * mount, and readers in other child processes (sha256sum, dd) or async fs calls, comparing bytes by hash.
 * Every test leaves no mount, process or temp dir behind (checked, and forced in t.after otherwise).
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as fsp from 'node:fs/promises';
import * as path from 'node:path';
import { makeTestRepo, TestRepo, writeImage } from './helpers/cli';
import { alive, ddRange, forceCleanup, MountProcess, mountsUnder, run, sha256, sha256sum, startMount, waitFor, withTimeout } from './helpers/fuse-mount';
import { FailureLog } from '../src/fuse/failure-log';
import { escapeName, unescapeName } from '../src/fuse/escape';

const KiB = 1024;
const MiB = 1024 * KiB;

interface Img {
  name: string;
  file: string;
  size: number;
  uid: string;
  hash: string;
}

function fileHash(file: string): string {
  return sha256(fs.readFileSync(file));
}

async function backUp(repo: TestRepo, file: string, name: string): Promise<string> {
  const r = await repo.ok(['backup', `file://${file}`, name]);
  return r.stdout.trim();
}

function mountDir(repo: TestRepo, name = 'mnt'): string {
  const d = path.join(repo.dir, name);
  fs.mkdirSync(d, { recursive: true });
  return d;
}

/** Stops the mount with `signal` and checks it exited 0 leaving no process and no mount. */
async function stopCleanly(m: MountProcess, signal: NodeJS.Signals = 'SIGINT'): Promise<void> {
  const code = await m.stop(signal);
  assert.equal(code, 0, `backy mount exited ${code}: ${m.log()}`);
  assert.equal(alive(m.pid), false);
  assert.deepEqual(await mountsUnder(m.dir), []);
}

describe('backy mount', () => {
  let repo: TestRepo;
  const imgs: Record<string, Img> = {};
  const mounted: MountProcess[] = [];

  before(async () => {
    repo = makeTestRepo();
    await repo.ok(['initdb']);
    // Sizes that are multiples of neither 4 MiB nor 512; a name that needs escaping.
    const specs: [string, string, number, 'mixed' | 'random'][] = [
      ['big', 'web server', 10 * MiB + 513, 'mixed'],
      ['one', 'one byte', 1, 'random'],
      ['odd', 'db/main%1', 4 * MiB - 1, 'random'],
    ];
    for (const [key, name, size, pattern] of specs) {
      const file = path.join(repo.dir, `${key}.raw`);
      writeImage(file, size, pattern, size);
      imgs[key] = { name, file, size, uid: await backUp(repo, file, name), hash: fileHash(file) };
    }
  });

  after(async () => {
    for (const m of mounted) await forceCleanup(m.dir, m.child);
    repo.cleanup();
  });

  const mount = async (args: string[], dir: string): Promise<MountProcess> => {
    const m = await startMount(repo, args, dir);
    mounted.push(m);
    return m;
  };

  test('one version: the image hashes like the original, info files describe it, SIGINT unmounts', async () => {
    for (const img of Object.values(imgs)) {
      const dir = mountDir(repo, `single-${img.size}`);
      const m = await mount([img.uid, dir], dir);
      const image = path.join(dir, `${escapeName(img.name)}.img`);
      const st = await fsp.stat(image);
      assert.equal(st.size, img.size);
      assert.equal(await sha256sum(image), img.hash, `${img.name} (${img.size} bytes)`);
      assert.deepEqual((await fsp.readdir(dir)).sort(), [path.basename(image), 'date', 'name', 'snapshot', 'tags', 'uid', 'valid'].sort());
      assert.equal(await fsp.readFile(path.join(dir, 'uid'), 'utf8'), `${img.uid}\n`);
      assert.equal(await fsp.readFile(path.join(dir, 'name'), 'utf8'), `${img.name}\n`);
      assert.equal(await fsp.readFile(path.join(dir, 'valid'), 'utf8'), '1\n');
      assert.match(await fsp.readFile(path.join(dir, 'date'), 'utf8'), /^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\n$/);
      await stopCleanly(m);
    }
  });

  test('names with / and % are escaped reversibly and never break the tree', () => {
    assert.equal(escapeName('db/main%1'), 'db%2Fmain%251');
    for (const name of ['db/main%1', '..', '.', '', 'a\nb', 'naïve/ü', '%2F']) {
      const e = escapeName(name);
      assert.ok(!e.includes('/') && e !== '.' && e !== '..' && e !== '' && !e.includes('\n'), JSON.stringify(e));
      assert.equal(unescapeName(e), name);
    }
    const long = escapeName('x/'.repeat(200), '.img');
    assert.ok(Buffer.byteLength(long) <= 255 && long.endsWith('.img'));
    assert.notEqual(long, escapeName(`${'x/'.repeat(200)}y`, '.img'));
  });

  test('failure lines are repeated at most once per interval, with a count', () => {
    const lines: string[] = [];
    let now = 0;
    const f = new FailureLog((l) => lines.push(l), 10_000, () => now);
    f.report('blob A', 'A at 0');
    f.report('blob A', 'A at 4096');
    f.report('blob B', 'B at 0');
    now = 9_999;
    f.report('blob A', 'A at 8192');
    now = 10_000;
    f.report('blob A', 'A at 12288');
    assert.deepEqual(lines, ['A at 0', 'B at 0', 'A at 12288 (and 2 similar failures)']);
  });

  test('all versions: by_version_uid and by_name follow the database; writes are refused', async () => {
    const dir = mountDir(repo, 'all');
    const m = await mount([dir], dir);
    assert.deepEqual((await fsp.readdir(dir)).sort(), ['by_name', 'by_version_uid']);
    assert.deepEqual((await fsp.readdir(path.join(dir, 'by_version_uid'))).sort(), Object.values(imgs).map((i) => i.uid).sort());
    assert.deepEqual((await fsp.readdir(path.join(dir, 'by_name'))).sort(), Object.values(imgs).map((i) => escapeName(i.name)).sort());
    const odd = imgs.odd;
    const byName = path.join(dir, 'by_name', 'db%2Fmain%251', odd.uid, 'db%2Fmain%251.img');
    assert.equal(await sha256sum(byName), odd.hash);
    assert.equal(await sha256sum(path.join(dir, 'by_version_uid', imgs.big.uid, 'web server.img')), imgs.big.hash);

    // Read-only, whatever is tried.
    const img = path.join(dir, 'by_version_uid', odd.uid, 'db%2Fmain%251.img');
    await assert.rejects(fsp.writeFile(img, 'x'), { code: 'EROFS' });
    await assert.rejects(fsp.writeFile(path.join(dir, 'new'), 'x'), { code: 'EROFS' });
    await assert.rejects(fsp.mkdir(path.join(dir, 'by_name', 'x')), { code: 'EROFS' });
    await assert.rejects(fsp.unlink(img), { code: 'EROFS' });
    await assert.rejects(fsp.truncate(img, 0), { code: 'EROFS' });

    // Info files follow the database: a tag added while mounted shows up despite the kernel's page cache.
    const tagsFile = path.join(dir, 'by_version_uid', odd.uid, 'tags');
    // The backup gave the version automatic tags (b_daily ...): the file lists them, sorted.
    const autoTags: string[] = JSON.parse((await repo.ok(['--json', 'ls', '-f', 'uid,tags'])).stdout).find((v: { uid: string }) => v.uid === odd.uid).tags.split(',').filter(Boolean);
    const tagLine = (extra: string[]) => `${[...autoTags, ...extra].sort().join(',')}\n`;
    assert.equal((await run('cat', [tagsFile])).stdout.toString(), tagLine([]));
    await repo.ok(['add-tag', odd.uid, 'weekly,keep']);
    const tagged = await waitFor(async () => (await run('cat', [tagsFile])).stdout.toString() === tagLine(['keep', 'weekly']), 5000);
    assert.ok(tagged, `tags file: ${JSON.stringify((await run('cat', [tagsFile])).stdout.toString())}`);
    // Same size, new content: only the changed mtime tells the kernel its cached page is stale.
    await repo.ok(['remove-tag', odd.uid, 'weekly']);
    await repo.ok(['add-tag', odd.uid, 'yearly']);
    // (Without the new mtime the kernel kept serving the old page for about 4 s here.)
    const retagged = await waitFor(async () => (await run('cat', [tagsFile])).stdout.toString() === tagLine(['keep', 'yearly']), 2000);
    assert.ok(retagged, `tags file: ${JSON.stringify((await run('cat', [tagsFile])).stdout.toString())}`);

    // A version added while mounted appears; one removed disappears (within about a second).
    const extraFile = path.join(repo.dir, 'extra.raw');
    writeImage(extraFile, 3 * MiB + 5, 'random', 77);
    const extra = await backUp(repo, extraFile, 'added/later');
    const listed = await waitFor(async () => (await fsp.readdir(path.join(dir, 'by_version_uid'))).includes(extra), 5000);
    assert.ok(listed, 'new version listed');
    assert.ok((await fsp.readdir(path.join(dir, 'by_name'))).includes('added%2Flater'));
    const extraImg = path.join(dir, 'by_version_uid', extra, 'added%2Flater.img');
    assert.equal(await sha256sum(extraImg), fileHash(extraFile));

    // An open image holds its version: rm is refused until it is closed; then the version disappears.
    const fh = await fsp.open(extraImg, 'r');
    try {
      const refused = await repo.run(['rm', '-f', extra]);
      assert.equal(refused.code, 100, refused.stderr);
      assert.match(refused.stderr, new RegExp(`open image of ${extra} holds it \\(pid ${m.pid} `));
      const buf = Buffer.alloc(MiB);
      const { bytesRead } = await fh.read(buf, 0, MiB, 2 * MiB);
      assert.equal(sha256(buf.subarray(0, bytesRead)), sha256(fs.readFileSync(extraFile).subarray(2 * MiB, 2 * MiB + bytesRead)));
    } finally {
      await fh.close();
    }
    // The release reaches the mount asynchronously.
    const removed = await waitFor(async () => (await repo.run(['rm', '-f', extra])).code === 0, 10_000, 200);
    assert.ok(removed, 'rm works once the image is closed');
    const gone = await waitFor(async () => !(await fsp.readdir(path.join(dir, 'by_version_uid'))).includes(extra), 5000);
    assert.ok(gone, 'removed version no longer listed');
    // The mount is unharmed.
    assert.equal(await sha256sum(byName), odd.hash);
    await stopCleanly(m, 'SIGTERM');
  });

  test('four parallel readers at different offsets, one killed mid-read; then a clean exit', async () => {
    const file = path.join(repo.dir, 'par.raw');
    const size = 64 * MiB + 4097;
    writeImage(file, size, 'mixed', 9);
    const data = fs.readFileSync(file);
    const uid = await backUp(repo, file, 'parallel');
    const dir = mountDir(repo, 'par');
    const m = await mount([uid, dir], dir);
    const image = path.join(dir, 'parallel.img');
    const ranges = [[0, 16 * MiB], [16 * MiB + 12345, 16 * MiB], [40 * MiB - 7, 9 * MiB + 3], [56 * MiB, size - 56 * MiB]];
    const reads = await Promise.all(ranges.map(([off, len], k) => ddRange(image, off, len, { bs: [65536, 4096, 1 << 20, 131072][k] })));
    reads.forEach((r, k) => {
      const [off, len] = ranges[k];
      assert.equal(r.code, 0, r.stderr);
      assert.equal(r.bytes, len);
      assert.equal(r.hash, sha256(data.subarray(off, off + len)), `range ${k}`);
    });

    // O_DIRECT 4 KiB reads: every read is a request to the mount, so the kill lands while one is in flight.
    const k = await ddRange(image, 0, size, { bs: 4096, direct: true, onProgress: (bytes, c) => bytes >= 2 * MiB && c.kill('SIGKILL') });
    assert.ok(k.bytes >= 2 * MiB && k.bytes < size, `the reader was killed after ${k.bytes} bytes, before it finished`);

    assert.equal(await sha256sum(image), sha256(data));
    const again = await Promise.all(ranges.map(([off, len]) => ddRange(image, off, len, { direct: true })));
    again.forEach((r, i) => assert.equal(r.hash, sha256(data.subarray(ranges[i][0], ranges[i][0] + ranges[i][1]))));
    assert.doesNotMatch(m.log(), /ERROR|fuse:/, 'nothing went wrong on the serving side');
    await stopCleanly(m, 'SIGTERM');
  });

  test('reads that cross block boundaries (64 KiB blocks) at odd offsets', async () => {
    const small = makeTestRepo('', { blockSize: 64 * KiB });
    let m: MountProcess | undefined;
    try {
      await small.ok(['initdb']);
      const file = path.join(small.dir, 'small.raw');
      const size = 10 * MiB + 513;
      writeImage(file, size, 'mixed', 3);
      const data = fs.readFileSync(file);
      const uid = (await small.ok(['backup', `file://${file}`, 'small'])).stdout.trim();
      const dir = path.join(small.dir, 'mnt');
      fs.mkdirSync(dir);
      m = await startMount(small, [uid, dir], dir);
      const image = path.join(dir, 'small.img');
      assert.equal(await sha256sum(image), sha256(data));
      for (const [off, len] of [[12345, 300_000], [64 * KiB - 1, 2], [size - 1000, 1000], [3 * MiB + 17, 2 * MiB + 1]]) {
        const r = await ddRange(image, off, len, { bs: 200_000 });
        assert.equal(r.hash, sha256(data.subarray(off, off + len)), `${len} bytes at ${off}`);
      }
      await stopCleanly(m);
    } finally {
      if (m) await forceCleanup(m.dir, m.child);
      small.cleanup();
    }
  });

  test('a missing and a corrupt blob: EIO for those blocks only, logged, the mount keeps working', async () => {
    const bad = makeTestRepo();
    let m: MountProcess | undefined;
    try {
      await bad.ok(['initdb']);
      const file = path.join(bad.dir, 'four.raw');
      writeImage(file, 16 * MiB, 'random', 4);
      const data = fs.readFileSync(file);
      const uid = (await bad.ok(['backup', `file://${file}`, 'four'])).stdout.trim();
      const blobs = (await fsp.readdir(path.join(bad.dir, 'data'), { recursive: true, withFileTypes: true }))
        .filter((d) => d.isFile() && d.name !== 'backy-repository.json').map((d) => path.join(d.parentPath, d.name))
        .filter((f) => !path.relative(path.join(bad.dir, 'data'), f).startsWith(`meta${path.sep}`)).sort(); // metadata objects are not blobs
      assert.equal(blobs.length, 4);
      fs.rmSync(blobs[0]);
      const fd = fs.openSync(blobs[1], 'r+');
      fs.writeSync(fd, Buffer.from('garbage'), 0, 7, Math.floor(fs.fstatSync(fd).size / 2));
      fs.closeSync(fd);

      const dir = path.join(bad.dir, 'mnt');
      fs.mkdirSync(dir);
      m = await startMount(bad, [uid, dir], dir);
      const image = path.join(dir, 'four.img');
      const results = [];
      for (let b = 0; b < 4; b++) results.push(await ddRange(image, b * 4 * MiB, 4 * MiB, { bs: MiB }));
      const failed = results.filter((r) => r.code !== 0);
      assert.equal(failed.length, 2, 'exactly the two damaged blocks fail');
      for (const r of failed) assert.match(r.stderr, /Input\/output error/);
      results.forEach((r, b) => {
        if (r.code === 0) assert.equal(r.hash, sha256(data.subarray(b * 4 * MiB, (b + 1) * 4 * MiB)));
      });
      // Still serving: the good blocks, the info files, and the bad ones still answer EIO (no hang, no crash).
      assert.equal(await fsp.readFile(path.join(dir, 'uid'), 'utf8'), `${uid}\n`);
      const bads = results.map((r, b) => (r.code !== 0 ? b : -1)).filter((b) => b >= 0);
      const retry = await ddRange(image, bads[0] * 4 * MiB + 4096, 4096, { bs: 4096 });
      assert.notEqual(retry.code, 0);
      const errorLines = m.log().split('\n').filter((l) => l.startsWith('ERROR'));
      assert.ok(errorLines.length >= 1 && errorLines.length <= 12, `a few log lines, not a flood: ${errorLines.length}\n${errorLines.join('\n')}`);
      assert.ok(alive(m.pid));
      await stopCleanly(m);
    } finally {
      if (m) await forceCleanup(m.dir, m.child);
      bad.cleanup();
    }
  });

  test('bad input: busy or unusable mount point, unknown uid, --partitions without uid, umount of a non-mount', async () => {
    const dir = mountDir(repo, 'busy');
    const m = await mount([imgs.one.uid, dir], dir);
    const oneLine = (s: string) => s.trim().split('\n').length === 1;

    const second = await repo.run(['mount', imgs.odd.uid, dir]);
    assert.equal(second.code, 100, second.stderr);
    assert.match(second.stderr, /busy/);
    assert.ok(oneLine(second.stderr), second.stderr);

    const unknown = await repo.run(['mount', 'no-such-uid', mountDir(repo, 'unknown')]);
    assert.equal(unknown.code, 100);
    assert.match(unknown.stderr, /no-such-uid/);
    assert.ok(oneLine(unknown.stderr));

    const missing = await repo.run(['mount', imgs.one.uid, path.join(repo.dir, 'does-not-exist')]);
    assert.equal(missing.code, 1);
    assert.ok(oneLine(missing.stderr));

    const full = mountDir(repo, 'full');
    fs.writeFileSync(path.join(full, 'f'), 'x');
    const notEmpty = await repo.run(['mount', imgs.one.uid, full]);
    assert.equal(notEmpty.code, 100);
    assert.match(notEmpty.stderr, /not empty/);

    const noUid = await repo.run(['mount', '--partitions', mountDir(repo, 'nouid')]);
    assert.equal(noUid.code, 2);

    const notMounted = await repo.run(['umount', mountDir(repo, 'never')]);
    assert.equal(notMounted.code, 1);
    assert.match(notMounted.stderr, /not mounted/);
    assert.ok(oneLine(notMounted.stderr));

    // The first mount is unaffected by all this.
    assert.equal(await sha256sum(path.join(dir, 'one byte.img')), imgs.one.hash);
    await stopCleanly(m);
  });

  test('a mount left by a killed process: backy umount clears it, and DIR can be mounted again', async () => {
    const dir = mountDir(repo, 'killed');
    const m = await mount([imgs.big.uid, dir], dir);
    m.child.kill('SIGKILL');
    await m.exited;
    await assert.rejects(fsp.readdir(dir), { code: 'ENOTCONN' });
    const again = await repo.run(['mount', imgs.big.uid, dir]);
    assert.equal(again.code, 100);
    assert.match(again.stderr, /backy umount/);

    const u = await repo.run(['umount', dir]);
    assert.equal(u.code, 0, u.stderr);
    assert.deepEqual(await mountsUnder(dir), []);

    const m2 = await mount([imgs.big.uid, dir], dir);
    assert.equal(await sha256sum(path.join(dir, 'web server.img')), imgs.big.hash);
    // `backy umount` on a live mount: the serving process notices and exits 0 by itself.
    const u2 = await repo.run(['umount', dir]);
    assert.equal(u2.code, 0, u2.stderr);
    const ended = await withTimeout(m2.exited, 10_000);
    assert.equal(ended?.code, 0, m2.log());
    assert.deepEqual(await mountsUnder(dir), []);
  });
});
