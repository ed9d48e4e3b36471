/**
 * The lifecycle commands end to end: due, sla and enforce over a year of versions written through the
 * MetaStore (test/helpers/lifecycle.ts), rm --expired, enforce with real backups (dry run changes nothing,
 * removal is exactly what was printed, cleanup frees the blobs, every kept version restores), automatic
 * tags, du (exclusive bytes equal what rm + cleanup frees in the data directory) and diff-meta.
 */
import { after, before, describe, test } from 'node:test';
import * as assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { randomBytes } from 'node:crypto';
import Database from 'better-sqlite3';
import { decodeChunk } from '../src/meta/block-map';
import { createMetaStore } from '../src/meta/open';
import { blobKey } from '../src/storage/types';
import { makeTestRepo, RunResult, TestRepo } from './helpers/cli';
import { sha256File } from './helpers/images';
import { ENFORCE_KEPT, ENFORCE_RULES, SLA_VM1, vid, YEAR_NOW, yearOfVersions } from './helpers/lifecycle';

const BS = 4096;

/** Runs backy with "now" fixed (BACKY_TEST_NOW) and checks the exit code. */
async function at(repo: TestRepo, now: string | number, args: string[], code = 0): Promise<RunResult> {
  const r = await repo.run(args, { env: { BACKY_TEST_NOW: String(now) } });
  if (r.code !== code) throw new Error(`backy ${args.join(' ')} exited ${r.code}, expected ${code}\nstdout: ${r.stdout}\nstderr: ${r.stderr}`);
  return r;
}

/** The `-m` rows of a command as objects (header line first). */
function machineRows(stdout: string): Record<string, string>[] {
  const [header, ...lines] = stdout.trim().split('\n').filter(Boolean);
  const keys = header.split('|');
  return lines.map((l) => Object.fromEntries(l.split('|').map((v, k) => [keys[k], v])));
}

function dataFiles(repo: TestRepo): Map<string, number> {
  const out = new Map<string, number>();
  const walk = (d: string) => {
    for (const e of fs.readdirSync(d, { withFileTypes: true })) {
      const p = path.join(d, e.name);
      if (e.isDirectory()) walk(p);
      else if (e.isFile() && e.name !== 'backy-repository.json') out.set(path.relative(path.join(repo.dir, 'data'), p), fs.statSync(p).size);
    }
  };
  walk(path.join(repo.dir, 'data'));
  return out;
}

/** The blob files (relative to data/) the given versions' maps refer to. */
function referencedFiles(repo: TestRepo, uids: string[]): Set<string> {
  const db = new Database(path.join(repo.dir, 'backy.sqlite'), { readonly: true });
  try {
    const ids = new Set<number>();
    for (const uid of uids) {
      const v = db.prepare('SELECT id FROM versions WHERE uid = ?').get(uid) as { id: number };
      for (const r of db.prepare('SELECT data FROM block_maps WHERE version_id = ?').all(v.id) as { data: Buffer }[]) {
        for (const e of decodeChunk(r.data)) if (e > 0) ids.add(e);
      }
    }
    return new Set([...ids].map((id) => blobKey((db.prepare('SELECT uid FROM blobs WHERE id = ?').get(id) as { uid: string }).uid)));
  } finally {
    db.close();
  }
}

function writeBlocks(file: string, blocks: Buffer[]): void {
  fs.writeFileSync(file, Buffer.concat(blocks));
}

describe('due, sla, enforce and rm --expired over a year of versions', () => {
  let repo: TestRepo;
  const fixture = yearOfVersions();
  before(async () => {
    repo = makeTestRepo('[manual]\ninterval = 1d\nkeep = 1\nsla = 1d\n', { blockSize: BS });
    await repo.ok(['initdb']);
    // Metadata straight through the MetaStore: 368 one-block versions in well under a second.
    const store = createMetaStore(`sqlite:///${repo.dir}/backy.sqlite`);
    await store.open();
    try {
      for (const f of fixture) {
        const v = await store.createVersion({ uid: f.uid, name: f.name, snapshotName: '', date: f.date, size: BS, blockSize: BS, expire: f.expire, baseUid: null, tags: f.tags });
        if (!f.complete) continue;
        await store.recordBlocks(v.id, 'fixture', [{ index: 0, zero: true }]);
        await store.updateVersion(v.id, { complete: true, valid: f.valid, protected: f.protected });
      }
    } finally {
      await store.close();
    }
  });
  after(() => repo.cleanup());

  test('due: names, due schedulers, expiry and since (backy2 -ms due feeds backup -t ... -e ...)', async () => {
    const r = await at(repo, YEAR_NOW, ['-m', 'due']);
    assert.equal(r.stdout, [
      'name|schedulers|expire_date|due_since',
      'vm2|daily,weekly,monthly|2021-05-01 12:00:00|1970-01-01 00:00:00',
      'vm1|daily,monthly|2021-05-01 12:00:00|2020-12-28 00:00:00',
      '',
    ].join('\n'));
    const one = await at(repo, YEAR_NOW, ['-ms', 'due', '-s', 'daily', '-f', 'name,schedulers,expire_date', 'vm1']);
    assert.equal(one.stdout, 'vm1|daily|2021-01-10 12:00:00\n');
    const json = JSON.parse((await at(repo, '2020-12-31T18:00:00Z', ['--json', 'due', '-s', 'daily,weekly', 'vm1'])).stdout);
    assert.deepEqual(json, [], 'not due before last + interval - sla');
    const table = await at(repo, YEAR_NOW, ['due', 'vm1']);
    assert.match(table.stdout, /\| name \| schedulers\s+\| expire_date\s+\| due_since\s+\|/);
    const missing = await at(repo, YEAR_NOW, ['due', '-s', 'daily,yearly'], 1);
    assert.equal(missing.stderr.trim().split('\n').pop(), 'ERROR: no scheduler section [yearly] in the configuration (keys: interval, keep, sla)');
    await at(repo, YEAR_NOW, ['due', '-f', 'name,nope'], 2);
  });

  test('sla: backy2\'s breaches, exit 0 unless --exit-code', async () => {
    const r = await at(repo, YEAR_NOW, ['-m', 'sla', 'vm1']);
    assert.deepEqual(machineRows(r.stdout).map((x) => x.breach), SLA_VM1);
    assert.deepEqual(Object.keys(machineRows(r.stdout)[0]), ['name', 'breach']);
    await at(repo, YEAR_NOW, ['sla', '--exit-code', 'vm1'], 1);
    // vm2's one "manual" version fits its scheduler: no breach, exit 0 even with --exit-code.
    const ok = await at(repo, YEAR_NOW, ['--json', 'sla', '--exit-code', '-s', 'manual', 'vm2']);
    assert.deepEqual(JSON.parse(ok.stdout), []);
    const json = JSON.parse((await at(repo, YEAR_NOW, ['--json', 'sla', '-f', 'name,scheduler,breach'])).stdout);
    assert.equal(json.length, SLA_VM1.length + 3);
    assert.deepEqual(json[SLA_VM1.length], { name: 'vm2', scheduler: 'daily', breach: 'daily: Too few backups. Found 0, should be 8.' });
  });

  test('enforce: --dry-run changes nothing, enforce removes exactly what it printed (hand-computed)', async () => {
    const ls = async () => (await repo.ok(['-m', 'ls', '-f', 'uid,name,date,valid,protected,tags'])).stdout;
    const before = await ls();
    const dry = await at(repo, YEAR_NOW, ['-m', 'enforce', '--dry-run', ENFORCE_RULES]);
    const planned = machineRows(dry.stdout);
    assert.equal(planned.length, fixture.length);
    assert.deepEqual(Object.keys(planned[0]), ['name', 'uid', 'date', 'action', 'reason']);
    assert.deepEqual(planned.filter((p) => p.action === 'keep').map((p) => p.uid).sort(), [...ENFORCE_KEPT].sort());
    assert.ok(planned.every((p) => p.action === 'keep' || p.action === 'remove'));
    assert.equal(await ls(), before, 'a dry run changes nothing');
    assert.match(fs.readFileSync(path.join(repo.dir, 'backy.log'), 'utf8'), /dry run: 342 versions would be removed, 27 kept; nothing changed/);

    const real = await at(repo, YEAR_NOW, ['--json', 'enforce', ENFORCE_RULES]);
    const done = JSON.parse(real.stdout) as Record<string, string>[];
    assert.deepEqual(done.filter((d) => d.action === 'removed').map((d) => d.uid), planned.filter((p) => p.action === 'remove').map((p) => p.uid));
    assert.deepEqual(done.filter((d) => d.action === 'keep').map((d) => d.uid), planned.filter((p) => p.action === 'keep').map((p) => p.uid));
    assert.equal(done.find((d) => d.uid === vid('2020-12-27', 12))!.reason.split(';')[0], 'younger than 6 days (disallow_rm_when_younger_than_days, --force removes it)');
    const left = machineRows(await ls()).map((x) => x.uid).sort();
    assert.deepEqual(left, [...ENFORCE_KEPT].sort());
    // Enforcing again changes nothing; --force then takes the young one too.
    const again = JSON.parse((await at(repo, YEAR_NOW, ['--json', 'enforce', ENFORCE_RULES, 'vm1'])).stdout) as Record<string, string>[];
    assert.ok(again.every((d) => d.action === 'keep'));
    const forced = JSON.parse((await at(repo, YEAR_NOW, ['--json', 'enforce', '--force', ENFORCE_RULES, 'vm1'])).stdout) as Record<string, string>[];
    assert.deepEqual(forced.filter((d) => d.action === 'removed').map((d) => d.uid), [vid('2020-12-27', 12)]);
    await at(repo, YEAR_NOW, ['enforce', 'days0'], 2);
  });

  test('rm --expired: expired versions only, with enforce\'s guards', async () => {
    // Expiry dates on what enforce left: two passed, one passed but protected, one passed but young, one not yet.
    await repo.ok(['expire', vid('2020-01-01'), '2020-06-01']);
    await repo.ok(['expire', vid('2020-02-01'), '2021-01-01 11:59:59']);
    await repo.ok(['expire', vid('2020-06-15'), '2020-07-01']);
    await repo.ok(['expire', vid('2020-12-30'), '2020-12-31']);
    await repo.ok(['expire', vid('2020-03-01'), '2021-01-01 12:00:01']);
    const dry = machineRows((await at(repo, YEAR_NOW, ['-m', 'rm', '--expired', '--dry-run'])).stdout);
    assert.deepEqual(dry.map((d) => [d.uid, d.action]), [
      [vid('2020-01-01'), 'remove'], [vid('2020-02-01'), 'remove'], [vid('2020-06-15'), 'keep'], [vid('2020-12-30'), 'keep'],
    ]);
    assert.equal(dry[0].reason, 'expired 2020-06-01 00:00:00');
    assert.match(dry[3].reason, /^younger than 6 days/);
    assert.deepEqual(Object.keys(dry[0]), ['name', 'uid', 'date', 'expire', 'action', 'reason']);
    const done = machineRows((await at(repo, YEAR_NOW, ['-m', 'rm', '--expired'])).stdout);
    assert.deepEqual(done.filter((d) => d.action === 'removed').map((d) => d.uid), [vid('2020-01-01'), vid('2020-02-01')]);
    const uids = machineRows((await repo.ok(['-m', 'ls', '-f', 'uid'])).stdout).map((x) => x.uid);
    assert.ok(!uids.includes(vid('2020-01-01')) && !uids.includes(vid('2020-02-01')) && uids.includes(vid('2020-06-15')) && uids.includes(vid('2020-03-01')));
    assert.deepEqual(machineRows((await at(repo, YEAR_NOW, ['-m', 'ls', '-e', '-f', 'uid'])).stdout).map((x) => x.uid).sort(), [vid('2020-06-15'), vid('2020-12-30')].sort());
    await repo.ok(['rm', '--expired', vid('2020-03-01')], 2);
    await repo.ok(['rm'], 2);
  });
});

describe('enforce and cleanup with real backups', () => {
  let repo: TestRepo;
  const images: { uid: string; day: number; hash: string }[] = [];
  before(async () => {
    repo = makeTestRepo('', { blockSize: BS });
    await repo.ok(['initdb']);
    // Ten daily backups of a 24-block image: block 3 is new every day (that blob belongs to that day only),
    // block 5 + d changes on day d and stays (shared with every later version); blocks 20, 21 are zero.
    const blocks = Array.from({ length: 24 }, (_, i) => (i === 20 || i === 21 ? Buffer.alloc(BS) : randomBytes(BS)));
    for (let d = 1; d <= 10; d++) {
      blocks[3] = randomBytes(BS);
      blocks[5 + d] = randomBytes(BS);
      const img = path.join(repo.dir, `day${d}.img`);
      writeBlocks(img, blocks);
      const r = await at(repo, `2020-01-${String(d).padStart(2, '0')}T02:00:00Z`, ['-m', 'backup', `file://${img}`, 'vm1']);
      images.push({ uid: r.stdout.trim().split('\n').pop()!, day: d, hash: sha256File(img) });
    }
    await repo.ok(['protect', images[1].uid]);
  });
  after(() => repo.cleanup());

  test('dry run changes nothing; enforce removes what it printed; cleanup frees exactly their blobs; kept versions restore', async () => {
    // Monday 13 Jan 12:00: latest3 keeps 8, 9, 10 Jan; weeks1 keeps the oldest of Mon 6 .. Sun 12 Jan (6 Jan);
    // 2 Jan is protected; 1, 3, 4, 5 (week 2) and 7 Jan go.
    const now = '2020-01-13T12:00:00Z';
    const rules = 'latest3,weeks1';
    const ls = async () => (await repo.ok(['-m', 'ls'])).stdout;
    const lsBefore = await ls();
    const filesBefore = dataFiles(repo);
    const dry = machineRows((await at(repo, now, ['-m', 'enforce', '-n', rules])).stdout);
    const dayOf = (uid: string) => images.find((i) => i.uid === uid)!.day;
    assert.deepEqual(dry.filter((d) => d.action === 'remove').map((d) => dayOf(d.uid)), [1, 3, 4, 5, 7]);
    assert.equal(await ls(), lsBefore);
    assert.deepEqual(dataFiles(repo), filesBefore, 'a dry run touches no blob');

    const removedUids = dry.filter((d) => d.action === 'remove').map((d) => d.uid);
    const keptUids = images.map((i) => i.uid).filter((u) => !removedUids.includes(u));
    const onlyRemoved = [...referencedFiles(repo, removedUids)].filter((f) => !referencedFiles(repo, keptUids).has(f));
    assert.equal(onlyRemoved.length, 6, 'each removed version has its own block 3; day 1 also the original block 7');

    const done = machineRows((await at(repo, now, ['-m', 'enforce', rules])).stdout);
    assert.deepEqual(done.filter((d) => d.action === 'removed').map((d) => d.uid), removedUids);
    assert.deepEqual(machineRows(await ls()).map((x) => x.uid).sort(), [...keptUids].sort());
    await repo.ok(['cleanup', '--dangerous-force']);
    const filesAfter = dataFiles(repo);
    assert.deepEqual([...filesBefore.keys()].filter((f) => !filesAfter.has(f)).sort(), onlyRemoved.sort(), 'cleanup deleted exactly the removed versions\' own blobs');
    assert.deepEqual(new Set(filesAfter.keys()), referencedFiles(repo, keptUids));
    for (const uid of keptUids) {
      const out = path.join(repo.dir, `restore-${uid}`);
      await repo.ok(['restore', uid, `file://${out}`]);
      assert.equal(sha256File(out), images.find((i) => i.uid === uid)!.hash, `day ${dayOf(uid)} restores byte-identical`);
      fs.rmSync(out);
    }
  });
});

describe('automatic tags, du and diff-meta', () => {
  let repo: TestRepo;
  before(async () => {
    repo = makeTestRepo('', { blockSize: BS });
    await repo.ok(['initdb']);
  });
  after(() => repo.cleanup());

  test('automatic tags over simulated days; -t replaces them; the log names uid and tags', async () => {
    const img = path.join(repo.dir, 'tags.img');
    writeBlocks(img, [randomBytes(BS)]);
    const backup = async (now: string, extra: string[] = []) => {
      const r = await at(repo, now, ['backup', ...extra, `file://${img}`, 'tagged']);
      const uid = r.stdout.trim().split('\n').pop()!;
      const line = r.stderr.split('\n').find((l) => l.includes('New version:'));
      const tags = machineRows((await repo.ok(['-m', 'ls', '-f', 'uid,tags'])).stdout).find((x) => x.uid === uid)!.tags;
      return { uid, line, tags };
    };
    const first = await backup('2020-01-31T00:00:00Z');
    assert.equal(first.tags, 'b_daily,b_monthly,b_weekly');
    assert.equal(first.line, `New version: ${first.uid} (Tags: [b_daily,b_weekly,b_monthly])`);
    assert.equal((await backup('2020-01-31T23:59:59Z')).tags, '');
    assert.equal((await backup('2020-02-01T00:00:00Z')).tags, 'b_daily');
    assert.equal((await backup('2020-02-07T00:00:00Z', ['-t', 'manual,x'])).tags, 'manual,x', '-t replaces automatic tags');
    assert.equal((await backup('2020-02-07T01:00:00Z')).tags, 'b_daily,b_weekly');
    assert.equal((await backup('2020-02-29T00:00:00Z')).tags, 'b_daily,b_monthly,b_weekly');
    const last = await backup('2020-03-28T00:00:00Z');
    assert.equal(last.tags, 'b_daily,b_weekly', '28 Mar is not yet a month after 29 Feb');
    assert.equal(last.line, `New version: ${last.uid} (Tags: [b_daily,b_weekly])`);
  });

  test('du: backy2\'s columns by hand; the exclusive stored bytes are what rm + cleanup frees', async () => {
    // A: 16 full blocks (4, 5 zero; 10 = 11) and a last block of 1000 bytes. B: A with blocks 0 = 1 and 2 new.
    const a = Array.from({ length: 17 }, (_, i) => (i === 4 || i === 5 ? Buffer.alloc(BS) : randomBytes(i === 16 ? 1000 : BS)));
    a[11] = a[10];
    const b = [...a];
    b[0] = b[1] = randomBytes(BS);
    b[2] = randomBytes(BS);
    writeBlocks(path.join(repo.dir, 'a.img'), a);
    writeBlocks(path.join(repo.dir, 'b.img'), b);
    const uidA = (await repo.ok(['-m', 'backup', '-t', 'du', `file://${repo.dir}/a.img`, 'du'])).stdout.trim().split('\n').pop()!;
    const uidB = (await repo.ok(['-m', 'backup', '-t', 'du', `file://${repo.dir}/b.img`, 'du'])).stdout.trim().split('\n').pop()!;

    const du = JSON.parse((await repo.ok(['--json', 'du', '-f', 'uid,Real,Null,Dedup Own,Dedup Others,Individual,Est. Space,Est. Space freed,Est. Stored,Stored freed'])).stdout);
    const row = (uid: string) => du.versions.find((v: { uid: string }) => v.uid === uid);
    const real = 14 * BS + 1000;
    // Shared by A and B: blocks 3, 6-9, 12-15 (9 blobs, 2 uses each), the 10/11 blob (4 uses), the last block.
    // Est. Space splits each blob over its uses: own uses / all uses of its size.
    const shared = (9 * BS) / 2 + (BS * 2) / 4 + 1000 / 2;
    assert.deepEqual(
      [row(uidA).Real, row(uidA).Null, row(uidA)['Dedup Own'], row(uidA)['Dedup Others'], row(uidA).Individual, row(uidA)['Est. Space'], row(uidA)['Est. Space freed']],
      [real, 2 * BS, 0, real - 3 * BS, 3 * BS, 3 * BS + shared, 3 * BS]);
    assert.deepEqual(
      [row(uidB).Real, row(uidB).Null, row(uidB)['Dedup Own'], row(uidB)['Dedup Others'], row(uidB).Individual, row(uidB)['Est. Space'], row(uidB)['Est. Space freed']],
      [real, 2 * BS, BS, real - 3 * BS, BS, 2 * BS + shared, 2 * BS]);
    const tagsRepoPlain = du.totals['plain bytes'] - (3 * BS + 2 * BS + 9 * BS + BS + 1000);
    assert.ok(tagsRepoPlain > 0, 'the other test\'s versions are in the totals too');
    assert.equal(du.totals.versions, du.versions.length);
    assert.equal(du.totals['unreferenced blobs'], 0);

    // Backy2's column order first with -m; one version; totals alone.
    const m = await repo.ok(['-m', 'du', uidA]);
    assert.equal(m.stdout.split('\n')[0], 'Real|Null|Dedup Own|Dedup Others|Individual|Est. Space|Est. Space freed|Stored freed|uid|name');
    assert.equal(m.stdout.trim().split('\n').length, 2);
    const totals = JSON.parse((await repo.ok(['--json', 'du', '--totals'])).stdout);
    assert.deepEqual(totals, du.totals);
    assert.match((await repo.ok(['du'])).stdout, /\n\nversions +\d+\nblobs +\d+\nstored bytes/);
    await repo.ok(['du', 'no-such-uid'], 100);

    // What rm + cleanup --dangerous-force frees in the data directory is A's "Stored freed".
    const bytes = () => [...dataFiles(repo).values()].reduce((s, n) => s + n, 0);
    const before = bytes();
    await repo.ok(['rm', '-f', uidA]);
    await repo.ok(['cleanup', '--dangerous-force']);
    assert.equal(before - bytes(), row(uidA)['Stored freed']);
    assert.ok(row(uidA)['Stored freed'] >= 3 * BS, 'random blocks do not compress');
    const duB = JSON.parse((await repo.ok(['--json', 'du', uidB])).stdout).versions[0];
    assert.equal(duB['Est. Space freed'], 2 * BS + 9 * BS + BS + 1000, 'alone, B frees all it uses');
  });

  test('diff-meta: differing ranges from the maps, sizes that differ, -m and --json', async () => {
    const a = Array.from({ length: 12 }, () => randomBytes(BS));
    const b = [...a];
    b[0] = randomBytes(BS);
    b[1] = Buffer.alloc(BS);
    b[5] = randomBytes(BS);
    writeBlocks(path.join(repo.dir, 'da.img'), a);
    writeBlocks(path.join(repo.dir, 'db.img'), b);
    writeBlocks(path.join(repo.dir, 'dc.img'), [...a, randomBytes(100)]);
    const backup = async (f: string) => (await repo.ok(['-m', 'backup', '-t', 'd', `file://${repo.dir}/${f}`, 'diff'])).stdout.trim().split('\n').pop()!;
    const [ua, ub, uc] = [await backup('da.img'), await backup('db.img'), await backup('dc.img')];
    assert.equal((await repo.ok(['-m', 'diff-meta', ua, ub])).stdout, `offset|length\n0|${2 * BS}\n${5 * BS}|${BS}\n`);
    assert.deepEqual(JSON.parse((await repo.ok(['--json', 'diff-meta', ua, ub])).stdout), {
      ranges: [{ offset: 0, length: 2 * BS }, { offset: 5 * BS, length: BS }], differing_bytes: 3 * BS, differing_blocks: 3, compared_bytes: 12 * BS,
    });
    assert.match((await repo.ok(['diff-meta', ua, ub])).stdout, new RegExp(`total: ${3 * BS} bytes differ in 2 ranges \\(3 blocks of ${BS} bytes\\), of ${12 * BS} bytes`));
    assert.equal((await repo.ok(['-ms', 'diff-meta', ua, uc])).stdout, `${12 * BS}|100\n`, 'the grown tail differs');
    // A partial last block differs from the same block grown to full size.
    writeBlocks(path.join(repo.dir, 'dd.img'), [...a.slice(0, 11), a[11].subarray(0, 1000)]);
    const ud = await backup('dd.img');
    assert.equal((await repo.ok(['-ms', 'diff-meta', ud, ua])).stdout, `${11 * BS}|${BS}\n`);
    assert.equal((await repo.ok(['-ms', 'diff-meta', ua, ua])).stdout, '');
    await repo.ok(['diff-meta', ua, 'nope'], 100);
  });
});
