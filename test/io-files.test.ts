import { after, before, describe, test } from 'node:test';
import * as assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { makeTestRepo, TestRepo, writeImage } from './helpers/cli';
import { sha256File } from './helpers/images';
import { fileUrlPath, percentDecode, splitScheme } from '../src/io/url';

const run = promisify(execFile);
const MiB = 1024 * 1024;

test('file URLs: percent escapes decoded, bad escapes and host parts refused', () => {
  const p = (url: string) => fileUrlPath(splitScheme(url));
  assert.equal(p('file:///img/50%25.raw'), '/img/50%.raw');
  assert.equal(p('file:///img/a%20b%C3%A4.raw'), '/img/a bä.raw');
  assert.equal(p('file://localhost/img/x.raw'), '/img/x.raw');
  assert.equal(p('/img/50%.raw'), '/img/50%.raw', 'a plain path is taken literally');
  assert.throws(() => p('file:///img/50%.raw'), /write a literal % as %25/);
  assert.throws(() => p('file:///img/%zz'), /escape/);
  assert.throws(() => p('file:///img/%ff'), /not UTF-8/);
  assert.throws(() => p('file:///img/%00x'), /%00/);
  assert.throws(() => p('file://host/img/x.raw'), /not a host \("host"\)/);
  assert.throws(() => p('file:///img/x?y'), /%3F/);
  assert.equal(percentDecode('abc', 'x'), 'abc');
});

describe('file sources and targets (issue 9)', () => {
  let repo: TestRepo;
  let uid: string;
  before(async () => {
    repo = makeTestRepo();
    await repo.ok(['initdb']);
    writeImage(path.join(repo.dir, '50%.raw'), 2 * MiB + 100, 'mixed');
    fs.copyFileSync(path.join(repo.dir, '50%.raw'), path.join(repo.dir, 'a b.raw'));
  });
  after(() => repo.cleanup());

  test('a % that starts no escape: one line, exit 1', async () => {
    const r = await repo.run(['backup', `file://${repo.dir}/50%.raw`, 'pct']);
    assert.equal(r.code, 1, r.stderr);
    assert.equal(r.stderr.trim().split('\n').length, 1, r.stderr);
    assert.match(r.stderr, /%25/);
  });

  test('escaped names back up and restore the right files', async () => {
    uid = (await repo.ok(['backup', `file://${repo.dir}/50%25.raw`, 'pct'])).stdout.trim();
    const u2 = (await repo.ok(['backup', `file://${repo.dir}/a%20b.raw`, 'pct'])).stdout.trim();
    await repo.ok(['restore', u2, `file://${repo.dir}/out%2550.raw`]);
    assert.equal(sha256File(path.join(repo.dir, 'out%50.raw')), sha256File(path.join(repo.dir, '50%.raw')));
  });

  test('file://HOST/path is refused, never read or written as a relative path', async () => {
    // The relative path exists: code that drops the host part would read it and succeed.
    fs.mkdirSync(path.join(repo.dir, 'otherhost'), { recursive: true });
    fs.copyFileSync(path.join(repo.dir, '50%.raw'), path.join(repo.dir, 'otherhost', 'img.raw'));
    const r = await repo.run(['backup', 'file://otherhost/img.raw', 'host']);
    assert.equal(r.code, 1, r.stderr);
    assert.equal(r.stderr.trim().split('\n').length, 1, r.stderr);
    assert.match(r.stderr, /not a host \("otherhost"\)/);
    const t = await repo.run(['restore', uid, 'file://otherhost/restored.raw']);
    assert.equal(t.code, 1, t.stderr);
    assert.ok(!fs.existsSync(path.join(repo.dir, 'otherhost', 'restored.raw')), 'nothing written');
  });

  test('restore -f to a block device with a mounted filesystem is refused (O_EXCL), the filesystem intact', { skip: process.getuid?.() !== 0 ? 'needs root for losetup and mount' : false }, async (t) => {
    const fsImg = path.join(repo.dir, 'fs.img');
    fs.writeFileSync(fsImg, Buffer.alloc(0));
    fs.truncateSync(fsImg, 16 * MiB);
    await run('mke2fs', ['-q', '-F', '-t', 'ext4', fsImg]);
    const loop = (await run('losetup', ['-f', '--show', fsImg])).stdout.trim();
    const mnt = fs.mkdtempSync(path.join(repo.dir, 'mnt-'));
    let mounted = false;
    t.after(async () => {
      if (mounted) await run('umount', [mnt]).catch(() => undefined);
      await run('losetup', ['-d', loop]).catch(() => undefined);
    });
    await run('mount', [loop, mnt]);
    mounted = true;
    fs.writeFileSync(path.join(mnt, 'keep.txt'), 'still here');
    await run('umount', [mnt]);
    // Mounted read-only: the device is just as busy, and code that overwrote it anyway could not leave the
    // kernel with dirty pages to write back into a destroyed filesystem (that hangs umount).
    await run('mount', ['-o', 'ro', loop, mnt]);
    const r = await repo.run(['restore', '-f', uid, `file://${loop}`]);
    assert.equal(r.code, 1, `restore onto a mounted device must be refused: ${r.stderr}`);
    assert.equal(r.stderr.trim().split('\n').length, 1, r.stderr);
    assert.match(r.stderr, /in use/);
    await run('umount', [mnt]);
    mounted = false;
    await run('e2fsck', ['-n', '-f', loop]); // throws (non-zero exit) if the restore wrote into it
    await run('mount', ['-o', 'ro', loop, mnt]);
    mounted = true;
    assert.equal(fs.readFileSync(path.join(mnt, 'keep.txt'), 'utf8'), 'still here');
    await run('umount', [mnt]);
    mounted = false;
    // Unmounted, the same device is a fine target.
    const ok = await repo.run(['restore', '-f', uid, `file://${loop}`]);
    assert.equal(ok.code, 0, ok.stderr);
  });
});
