/**
 * File-level recovery: `backy mount --partitions` attaches the mounted image to a loop device and mounts its
 * filesystems read-only; the files inside must equal the files the filesystem was built from. Needs root
 * (loop devices, mount); skipped otherwise. Files are hashed by `sha256sum` in a child process.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as fsp from 'node:fs/promises';
import * as path from 'node:path';
import { makeTestRepo, TestRepo } from './helpers/cli';
import { alive, forceCleanup, loopsUnder, MountProcess, mountsUnder, run, startMount } from './helpers/fuse-mount';
import { hashTree, makeSourceTree, mkext4, parseSha256sum, writeMbr } from './helpers/fuse-images';

const MiB = 1024 * 1024;
const isRoot = process.geteuid?.() === 0;

/** Hashes every file below `dir` with sha256sum in one child process. */
async function hashMounted(dir: string): Promise<Map<string, string>> {
  const r = await run('sh', ['-c', 'find . -type f -print0 | xargs -0 -r sha256sum'], { cwd: dir });
  assert.equal(r.code, 0, r.stderr);
  return parseSha256sum(r.stdout.toString());
}

describe('backy mount --partitions', { skip: isRoot ? false : 'needs root (loop devices and mount)' }, () => {
  let repo: TestRepo;
  const mounted: MountProcess[] = [];

  before(async () => {
    repo = makeTestRepo();
    await repo.ok(['initdb']);
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

  test('an unpartitioned ext4 image: files under DIR/fs equal the source; SIGINT undoes everything', async () => {
    const src = path.join(repo.dir, 'src');
    makeSourceTree(src, 300);
    const image = path.join(repo.dir, 'ext4.img');
    await mkext4(image, src, 256 * MiB);
    const uid = (await repo.ok(['backup', `file://${image}`, 'ext4 fs'])).stdout.trim();

    const dir = path.join(repo.dir, 'mnt');
    fs.mkdirSync(dir);
    const m = await mount(['--partitions', uid, dir], dir);
    const fsDir = path.join(dir, 'fs');
    const fsMount = (await mountsUnder(dir)).find((x) => x.target === fsDir);
    assert.ok(fsMount, `ext4 mounted at ${fsDir}: ${m.log()}`);
    assert.equal(fsMount.type, 'ext4');
    assert.match(fsMount.options, /(^|,)ro(,|$)/);
    assert.equal((await loopsUnder(dir)).length, 1);

    const want = hashTree(src);
    const got = await hashMounted(fsDir);
    got.delete('lost+found');
    assert.equal(got.size, want.size);
    assert.deepEqual(got, want);
    await assert.rejects(fsp.writeFile(path.join(fsDir, 'new'), 'x'), { code: 'EROFS' });

    const code = await m.stop('SIGINT');
    assert.equal(code, 0, m.log());
    assert.equal(alive(m.pid), false);
    assert.deepEqual(await mountsUnder(dir), []);
    assert.deepEqual(await loopsUnder(dir), []);
    assert.deepEqual(fs.readdirSync(dir), []);
  });

  test('a partitioned image: part1 and part2 mounted; after SIGKILL, backy umount undoes it all', async () => {
    const image = path.join(repo.dir, 'disk.img');
    const srcs = [path.join(repo.dir, 'p1'), path.join(repo.dir, 'p2')];
    makeSourceTree(srcs[0], 60, 2);
    makeSourceTree(srcs[1], 40, 3);
    const parts = [{ startSector: 2048, sectors: 32 * 2048, type: 0x83 }, { startSector: 34 * 2048, sectors: 24 * 2048, type: 0x83 }];
    fs.writeFileSync(image, '');
    fs.truncateSync(image, 64 * MiB + 12345);
    for (let i = 0; i < 2; i++) await mkext4(image, srcs[i], parts[i].sectors * 512, parts[i].startSector * 512, `part${i + 1}`);
    writeMbr(image, parts);
    const uid = (await repo.ok(['backup', `file://${image}`, 'disk'])).stdout.trim();

    const dir = path.join(repo.dir, 'mnt2');
    fs.mkdirSync(dir);
    const m = await mount(['--partitions', uid, dir], dir);
    assert.deepEqual(fs.readdirSync(dir).filter((n) => n.startsWith('part')).sort(), ['part1', 'part2']);
    for (let i = 0; i < 2; i++) {
      const got = await hashMounted(path.join(dir, `part${i + 1}`));
      assert.deepEqual(got, hashTree(srcs[i]), `part${i + 1}`);
    }

    m.child.kill('SIGKILL');
    await m.exited;
    const u = await repo.run(['umount', dir]);
    assert.equal(u.code, 0, u.stderr);
    assert.deepEqual(await mountsUnder(dir), []);
    assert.deepEqual(await loopsUnder(dir), []);
  });
});
