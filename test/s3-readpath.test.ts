import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { makeTestRepo, writeImage } from './helpers/cli';
import { sha256File } from './helpers/images';
import { startS3Server } from './helpers/s3-server';
import { startBackyNbd } from './helpers/backy-nbd';
import { forceCleanup, run, sha256sum, startMount } from './helpers/fuse-mount';

const MiB = 1024 * 1024;

/**
 * The live read paths on S3: a version stored in a real S3-compatible server is served over NBD (read with
 * nbdcopy) and mounted with FUSE (read with sha256sum from another process), byte-identical.
 */
test('NBD export and FUSE mount of a version stored in S3', async (t) => {
  const s3 = await startS3Server();
  const repo = makeTestRepo(s3.config({ prefix: 'readpath/' }));
  const mountDir = path.join(repo.dir, 'mnt');
  let mount: Awaited<ReturnType<typeof startMount>> | undefined;
  t.after(async () => {
    await forceCleanup(mountDir, mount?.child);
    repo.cleanup();
    await s3.stop();
  });
  await repo.ok(['initdb']);
  const img = path.join(repo.dir, 'disk.img');
  writeImage(img, 9 * MiB + 1234, 'mixed');
  const uid = (await repo.ok(['-m', 'backup', `file://${img}`, 'disk'])).stdout.trim();
  const want = sha256File(img);

  const srv = await startBackyNbd(repo.cfg);
  try {
    const out = path.join(repo.dir, 'nbd.out');
    const r = await run('nbdcopy', [srv.uri(uid), out]);
    assert.equal(r.code, 0, r.stderr);
    assert.equal(sha256File(out), want, 'nbdcopy from the NBD export of an S3 version');
  } finally {
    assert.equal(await srv.stop(), 0, srv.stderr());
  }

  fs.mkdirSync(mountDir);
  mount = await startMount(repo, [uid, mountDir], mountDir);
  const images = fs.readdirSync(mountDir).filter((f) => f.endsWith('.img'));
  assert.deepEqual(images, ['disk.img']);
  assert.equal(await sha256sum(path.join(mountDir, 'disk.img')), want, 'sha256sum of the FUSE image of an S3 version');
  assert.equal(await mount.stop('SIGTERM'), 0, mount.log());
});
