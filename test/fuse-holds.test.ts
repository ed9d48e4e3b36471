/**
 * An image opened through an all-versions FUSE mount is held before the open succeeds: an `rm` that is under
 * way when the file is opened makes the open fail (ENOENT) instead of letting it succeed and every read
 * later fail with EIO.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import Database from 'better-sqlite3';
import { makeTestRepo, TestRepo, writeImage } from './helpers/cli';
import { forceCleanup, MountProcess, run, sha256sum, startMount } from './helpers/fuse-mount';
import { sha256File } from './helpers/images';
import { processStart } from '../src/util/process-info';

let repo: TestRepo;
let mnt: string;
let mount: MountProcess | undefined;
let uid: string;
let image: string;

before(async () => {
  repo = makeTestRepo('', { blockSize: 64 * 1024 });
  await repo.ok(['initdb']);
  image = path.join(repo.dir, 'src.img');
  writeImage(image, 1024 * 1024 + 17, 'random', 5);
  uid = (await repo.ok(['backup', `file://${image}`, 'vm'])).stdout.trim();
  mnt = fs.mkdtempSync(path.join(os.tmpdir(), 'backy-fuse-holds-'));
  mount = await startMount(repo, [mnt], mnt);
});

after(async () => {
  await mount?.stop().catch(() => undefined);
  await forceCleanup(mnt, mount?.child);
  fs.rmSync(mnt, { recursive: true, force: true });
  repo.cleanup();
});

test('open of an image whose version is being removed fails at open (ENOENT), not with EIO on read', async () => {
  const file = path.join(mnt, 'by_version_uid', uid, 'vm.img');
  assert.equal(await sha256sum(file), sha256File(image), 'readable before');
  // What `rm` holds while it removes the version: its removal lock, taken by a live process (this one).
  const db = new Database(path.join(repo.dir, 'backy.sqlite'));
  try {
    db.prepare('INSERT INTO locks (name, session, host, pid, pid_start, what, since) VALUES (?, ?, ?, ?, ?, ?, ?)')
      .run(`remove:${uid}`, 'test-session', os.hostname(), process.pid, processStart(process.pid), `removal of ${uid}`, Date.now());
    // dd opens, then reads: which of the two fails tells whether the open waited for the hold.
    const r = await run('dd', [`if=${file}`, 'of=/dev/null', 'bs=64k', 'count=1', 'iflag=direct']);
    assert.notEqual(r.code, 0, 'the image must not be readable while its version is being removed');
    const err = r.stderr.toString();
    assert.match(err, /failed to open/, `the open fails, not a read: ${err}`);
    assert.match(err, /No such file or directory/);
  } finally {
    db.prepare('DELETE FROM locks WHERE name = ?').run(`remove:${uid}`);
    db.close();
  }
  // The removal did not happen after all: the image opens and reads again.
  assert.equal(await sha256sum(file), sha256File(image), 'readable after');
});
