/**
 * `backy mount -w`: an ext4 filesystem in a version, loop-mounted read-write through the writable FUSE image,
 * changed, checked with fsck; `fixate` makes a version with the changes, the old version has none of them.
 * Needs root (loop devices, mount).
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { randomBytes } from 'node:crypto';
import { makeTestRepo, restoredHash, TestRepo } from './helpers/cli';
import { sha256File } from './helpers/images';
import { forceCleanup, run, startMount } from './helpers/fuse-mount';

const root = process.geteuid?.() === 0;

/** A file's content inside an ext4 image, read with debugfs (no mount needed). */
async function catInImage(image: string, file: string): Promise<{ code: number; out: Buffer }> {
  const r = await run('debugfs', ['-R', `cat ${file}`, image]);
  return { code: r.code, out: r.stdout };
}

async function lsInImage(image: string): Promise<string[]> {
  const r = await run('debugfs', ['-R', 'ls -l /', image]);
  return r.stdout.toString().split('\n').map((l) => l.trim().split(/\s+/).pop() ?? '').filter(Boolean);
}

describe('backy mount -w', { skip: !root && 'needs root for loop devices' }, () => {
  let repo: TestRepo;
  let uid: string;
  let image: string;
  let originalHash: string;
  const big = randomBytes(300_000);
  const mnt = () => path.join(repo.dir, 'fs');
  const dir = () => path.join(repo.dir, 'm');

  before(async () => {
    repo = makeTestRepo('[DEFAULTS]\noverlay_dir = overlays', { blockSize: 1024 * 1024 });
    await repo.ok(['initdb']);
    const tree = path.join(repo.dir, 'tree');
    fs.mkdirSync(path.join(tree, 'docs'), { recursive: true });
    fs.writeFileSync(path.join(tree, 'docs', 'keep.txt'), 'kept\n');
    fs.writeFileSync(path.join(tree, 'gone.bin'), randomBytes(200_000));
    fs.writeFileSync(path.join(tree, 'edit.txt'), 'before\n');
    image = path.join(repo.dir, 'ext4.img');
    const mk = await run('mkfs.ext4', ['-q', '-F', '-d', tree, image, '24M']);
    assert.equal(mk.code, 0, mk.stderr);
    originalHash = sha256File(image);
    uid = (await repo.ok(['backup', `file://${image}`, 'fsimg'])).stdout.trim();
    fs.mkdirSync(dir());
    fs.mkdirSync(mnt());
  });
  after(async () => {
    await run('umount', ['-l', mnt()]).catch(() => undefined);
    await forceCleanup(dir());
    repo?.cleanup();
  });

  test('ext4 loop-mounted read-write through the writable image, changed, fsck clean; fixate has the changes, the old version not', async () => {
    const m = await startMount(repo, ['-w', `${uid}:fsedit`, dir()], dir());
    let loop = '';
    try {
      const img = path.join(dir(), 'fsimg.img');
      const st = fs.statSync(img);
      assert.equal(st.mode & 0o777, 0o644, 'the image is writable');
      const l = await run('losetup', ['-f', '--show', img]);
      assert.equal(l.code, 0, l.stderr);
      loop = l.stdout.toString().trim();
      const mo = await run('mount', ['-o', 'rw', loop, mnt()]);
      assert.equal(mo.code, 0, mo.stderr);
      // File changes through the kernel's ext4 driver (run by child processes: this process serves nothing,
      // but keep every access out of the event loop's way anyway).
      assert.equal((await run('sh', ['-c', `echo after > ${mnt()}/edit.txt && rm ${mnt()}/gone.bin && mkdir ${mnt()}/new`])).code, 0);
      fs.writeFileSync(path.join(repo.dir, 'big.bin'), big);
      assert.equal((await run('cp', [path.join(repo.dir, 'big.bin'), `${mnt()}/new/big.bin`])).code, 0);
      assert.equal((await run('sync', ['-f', `${mnt()}/new/big.bin`])).code, 0);
      assert.equal((await run('umount', [mnt()])).code, 0);
      const fsck = await run('fsck.ext4', ['-f', '-n', loop]);
      assert.equal(fsck.code, 0, `fsck: ${fsck.stdout}${fsck.stderr}`);
    } finally {
      if (loop) await run('losetup', ['-d', loop]);
      assert.equal(await m.stop('SIGINT'), 0, m.log());
    }
    // The version under the overlay is unchanged.
    assert.equal(await restoredHash(repo, uid), originalHash);

    const fixed = (await repo.ok(['fixate', 'fsedit', 'fsimg'])).stdout.trim();
    const out = path.join(repo.dir, 'fixed.img');
    await repo.ok(['restore', fixed, `file://${out}`]);
    assert.equal((await catInImage(out, '/edit.txt')).out.toString(), 'after\n');
    assert.equal((await catInImage(out, '/docs/keep.txt')).out.toString(), 'kept\n');
    assert.ok((await catInImage(out, '/new/big.bin')).out.equals(big), 'the new file is in the fixated version');
    assert.ok(!(await lsInImage(out)).includes('gone.bin'), 'the removed file is gone');
    const fsck = await run('fsck.ext4', ['-f', '-n', out]);
    assert.equal(fsck.code, 0, `fsck of the fixated version: ${fsck.stdout}`);

    const old = path.join(repo.dir, 'old.img');
    await repo.ok(['restore', uid, `file://${old}`]);
    assert.equal((await catInImage(old, '/edit.txt')).out.toString(), 'before\n');
    assert.ok((await lsInImage(old)).includes('gone.bin'), 'the old version still has the removed file');
    assert.ok(!(await lsInImage(old)).includes('new'), 'and not the new directory');

    // Mounted read-only again (without -w) the image refuses writes.
    const ro = await startMount(repo, [uid, dir()], dir());
    try {
      const w = await run('dd', ['if=/dev/zero', `of=${path.join(dir(), 'fsimg.img')}`, 'bs=4096', 'count=1', 'conv=notrunc', 'status=none']);
      assert.notEqual(w.code, 0, 'a read-only mount refuses writes');
    } finally {
      await ro.stop('SIGINT');
    }
  });
});
