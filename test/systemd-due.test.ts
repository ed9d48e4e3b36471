/**
 * systemd/backy-due-backup, the script behind backy-due-backup.service: it backs up the due names of a list
 * with due's tags and expiry, skips what is not due, runs the hooks, and goes on past a failing name.
 * "Now" is fixed through BACKY_TEST_NOW, which the script passes on to backy.
 */
import { after, before, test } from 'node:test';
import * as assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { randomBytes } from 'node:crypto';
import { spawnSync } from 'node:child_process';
import { BACKY, makeTestRepo, TestRepo } from './helpers/cli';

const SCRIPT = path.resolve(__dirname, '../../systemd/backy-due-backup');
let repo: TestRepo;

before(async () => {
  repo = makeTestRepo('', { blockSize: 4096 });
  await repo.ok(['initdb']);
  for (const n of ['vm1', 'vm2']) fs.writeFileSync(path.join(repo.dir, `${n}.img`), randomBytes(3 * 4096));
  fs.writeFileSync(path.join(repo.dir, 'due.list'), [
    '# name source options',
    `vm1 file://${repo.dir}/vm1.img -s nightly`,
    '',
    `broken file://${repo.dir}/missing.img`,
    `vm2 file://${repo.dir}/vm2.img`,
  ].join('\n'));
});
after(() => repo.cleanup());

function dueBackup(now: string): { status: number; stdout: string; stderr: string } {
  const r = spawnSync(SCRIPT, [path.join(repo.dir, 'due.list')], {
    encoding: 'utf8',
    env: {
      ...process.env, BACKY: `${process.execPath} ${BACKY}`, BACKY_GLOBAL_ARGS: `-c ${repo.cfg}`, BACKY_TEST_NOW: now,
      BACKY_PRE: `echo "pre $BACKY_NAME $BACKY_SOURCE" >> ${repo.dir}/hooks`, BACKY_POST: `echo "post $BACKY_NAME" >> ${repo.dir}/hooks`,
    },
  });
  return { status: r.status ?? -1, stdout: r.stdout, stderr: r.stderr };
}

async function versions(): Promise<{ name: string; snapshot_name: string; tags: string; expire: string; date: string }[]> {
  return JSON.parse((await repo.ok(['--json', 'ls'])).stdout);
}

test('backy-due-backup backs up what is due with its tags and expiry, and only that', async () => {
  const first = dueBackup('2021-01-01T01:00:00Z');
  assert.equal(first.status, 1, `a failing name makes the run fail: ${first.stderr}`);
  assert.match(first.stderr, /broken: backup failed/);
  let vs = await versions();
  assert.deepEqual(vs.map((v) => [v.name, v.snapshot_name, v.tags, v.expire, v.date]), [
    // never backed up: every scheduler due; expiry now + (3 + 1) * 30 days
    ['vm1', 'nightly', 'daily,monthly,weekly', '2021-05-01T01:00:00.000Z', '2021-01-01T01:00:00.000Z'],
    ['vm2', '', 'daily,monthly,weekly', '2021-05-01T01:00:00.000Z', '2021-01-01T01:00:00.000Z'],
  ]);
  assert.equal(fs.readFileSync(path.join(repo.dir, 'hooks'), 'utf8'), [
    `pre vm1 file://${repo.dir}/vm1.img`, 'post vm1', `pre broken file://${repo.dir}/missing.img`, 'post broken', `pre vm2 file://${repo.dir}/vm2.img`, 'post vm2', '',
  ].join('\n'));

  // An hour later nothing is due for vm1 and vm2 (broken still is: it has no version).
  const again = dueBackup('2021-01-01T02:00:00Z');
  assert.deepEqual(again.stdout.split('\n').filter((l) => !l.startsWith('broken')), ['vm1: nothing due', 'vm2: nothing due', '']);
  assert.equal((await versions()).length, 2);

  // The next day only daily is due (weekly after 6.5 days, monthly after 27): expiry now + 9 days.
  dueBackup('2021-01-02T01:00:00Z');
  vs = await versions();
  assert.deepEqual(vs.slice(2).map((v) => [v.name, v.tags, v.expire]), [
    ['vm1', 'daily', '2021-01-11T01:00:00.000Z'], ['vm2', 'daily', '2021-01-11T01:00:00.000Z'],
  ]);
  fs.rmSync(path.join(repo.dir, 'broken'), { force: true });
  const missing = spawnSync(SCRIPT, [path.join(repo.dir, 'nope.list')], { encoding: 'utf8' });
  assert.equal(missing.status, 1);
  assert.match(missing.stderr, /cannot read/);
});
