import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { makeTestRepo, writeImage } from './helpers/cli';

const run = promisify(execFile);
const MiB = 1024 * 1024;

async function attach(file: string): Promise<string> {
  return (await run('losetup', ['-f', '--show', file])).stdout.trim();
}

test('block devices as source and target (loop devices)', { skip: process.getuid?.() !== 0 ? 'needs root for losetup' : false }, async (t) => {
  const repo = makeTestRepo();
  const loops: string[] = [];
  t.after(async () => {
    for (const l of loops) await run('losetup', ['-d', l]).catch(() => undefined);
    repo.cleanup();
  });
  await repo.ok(['initdb']);
  const srcFile = path.join(repo.dir, 'src.img');
  writeImage(srcFile, 10 * MiB + 512, 'mixed'); // loop devices have a 512-byte granularity
  const src = await attach(srcFile);
  loops.push(src);
  const uid = (await repo.ok(['-m', 'backup', `file://${src}`, 'loop'])).stdout.trim();
  const v = JSON.parse((await repo.ok(['--json', 'ls', 'loop'])).stdout)[0];
  assert.equal(v.size_bytes, 10 * MiB + 512, 'size of the block device from sysfs');

  // A target device that is too small is refused; a large enough one needs -f (it exists).
  const smallFile = path.join(repo.dir, 'small.img');
  fs.writeFileSync(smallFile, Buffer.alloc(MiB));
  const small = await attach(smallFile);
  loops.push(small);
  const tooSmall = await repo.run(['restore', '-f', uid, `file://${small}`]);
  assert.equal(tooSmall.code, 1);
  assert.match(tooSmall.stderr, /has 1048576 bytes/);
  const dstFile = path.join(repo.dir, 'dst.img');
  fs.writeFileSync(dstFile, Buffer.alloc(12 * MiB, 0xee)); // old data everywhere, also where the backup has holes
  const dst = await attach(dstFile);
  loops.push(dst);
  assert.equal((await repo.run(['restore', uid, `file://${dst}`])).code, 1, 'an existing device needs -f');
  const r = await repo.run(['restore', '-s', '-f', uid, `file://${dst}`]);
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stderr, /holes are written as zeroes/);
  await run('losetup', ['-d', dst]);
  loops.pop();
  const restored = fs.readFileSync(dstFile).subarray(0, 10 * MiB + 512);
  assert.ok(restored.equals(fs.readFileSync(srcFile)), 'device content equals the source, holes zeroed');
});
