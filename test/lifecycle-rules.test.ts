/**
 * The lifecycle rules as pure functions, against hand-computed expectations: automatic tags over simulated
 * days, weeks and months; due, sla and enforce over a year of daily versions (test/helpers/lifecycle.ts);
 * ISO week 53, month ends, versions at midnight UTC, protected, invalid and incomplete versions.
 */
import { test } from 'node:test';
import * as assert from 'node:assert/strict';
import { configFromText } from '../src/config/config';
import { addMonthsClipped, weekIndex, wholeMonthsBetween } from '../src/engine/lifecycle/calendar';
import { autoTags } from '../src/engine/lifecycle/auto-tags';
import { dueBackups } from '../src/engine/lifecycle/due';
import { parseRules, planExpired, planRetention } from '../src/engine/lifecycle/retention';
import { parseDuration, schedulersFrom } from '../src/engine/lifecycle/schedulers';
import { slaBreaches } from '../src/engine/lifecycle/sla';
import { scanChunk } from '../src/engine/lifecycle/usage';
import { encodeChunk } from '../src/meta/block-map';
import { decodeSummary, encodeSummary, MapSummary, SummaryTable } from '../src/meta/map-summary';
import { Packr } from 'msgpackr';
import { ConfigError, UsageError } from '../src/util/errors';
import { ENFORCE_KEPT, ENFORCE_RULES, FixtureVersion, SLA_VM1, vid, YEAR_NOW, yearOfVersions } from './helpers/lifecycle';

const KEY = 'a'.repeat(64);
const DAY = 86400e3;
const at = (iso: string) => Date.parse(`${iso}Z`);
const day = (t: number) => new Date(t).toISOString().slice(0, 10);
const SCHEDULERS = schedulersFrom(configFromText(`[DEFAULTS]\nencryption_key = ${KEY}\n`), 'daily,weekly,monthly');

function version(uid: string, date: number, over: Partial<FixtureVersion> = {}): FixtureVersion {
  return { uid, name: 'vm1', date, tags: [], valid: true, complete: true, protected: false, expire: null, ...over };
}

/** Simulates one backup at each time, each getting the automatic tags the versions before it give. */
function simulate(times: number[]): { date: number; tags: string[] }[] {
  const made: { name: string; date: number; tags: string[] }[] = [];
  for (const t of times) made.push({ name: 'vm1', date: t, tags: autoTags(made, 'vm1', t) });
  return made;
}

test('calendar: month ends clip, whole months like dateutil, weeks start on Monday (ISO week 53)', () => {
  assert.equal(day(addMonthsClipped(at('2020-01-31T15:00:00'), 1)), '2020-02-29');
  assert.equal(day(addMonthsClipped(at('2021-01-31T00:00:00'), 1)), '2021-02-28');
  assert.equal(day(addMonthsClipped(at('2020-12-31T00:00:00'), 2)), '2021-02-28');
  assert.equal(wholeMonthsBetween(at('2021-01-31T00:00:00'), at('2021-02-27T23:59:59')), 0);
  assert.equal(wholeMonthsBetween(at('2021-01-31T00:00:00'), at('2021-02-28T00:00:00')), 1);
  assert.equal(wholeMonthsBetween(at('2020-01-15T00:00:00'), at('2020-12-14T00:00:00')), 10);
  // Mon 28 Dec 2020 .. Sun 3 Jan 2021 is ISO week 53 of 2020: one week across the year's end.
  const w53 = weekIndex(at('2020-12-28T00:00:00'));
  for (const d of ['2020-12-29T12:00:00', '2020-12-31T23:59:59', '2021-01-01T00:00:00', '2021-01-03T23:59:59']) assert.equal(weekIndex(at(d)), w53, d);
  assert.equal(weekIndex(at('2020-12-27T23:59:59')), w53 - 1);
  assert.equal(weekIndex(at('2021-01-04T00:00:00')), w53 + 1);
});

test('automatic tags: daily backups for 14 months from 31 Jan of a leap year', () => {
  const times: number[] = [];
  for (let t = at('2020-01-31T00:00:00'); t <= at('2021-03-31T00:00:00'); t += DAY) times.push(t);
  const made = simulate(times);
  assert.ok(made.every((v) => v.tags.includes('b_daily')), 'the first backup of each day is b_daily');
  const weekly = made.filter((v) => v.tags.includes('b_weekly')).map((v) => day(v.date));
  const expectedWeekly: string[] = [];
  for (let t = at('2020-01-31T00:00:00'); t <= at('2021-03-31T00:00:00'); t += 7 * DAY) expectedWeekly.push(day(t));
  assert.deepEqual(weekly, expectedWeekly);
  // 31 Jan + 1 month is 29 Feb (clipped); from then on the 29th, until February 2021 has no 29th.
  assert.deepEqual(made.filter((v) => v.tags.includes('b_monthly')).map((v) => day(v.date)), [
    '2020-01-31', '2020-02-29', '2020-03-29', '2020-04-29', '2020-05-29', '2020-06-29', '2020-07-29', '2020-08-29',
    '2020-09-29', '2020-10-29', '2020-11-29', '2020-12-29', '2021-01-29', '2021-02-28', '2021-03-28',
  ]);
  assert.deepEqual(made[0].tags, ['b_daily', 'b_weekly', 'b_monthly'], 'the first backup of a name gets all three');
});

test('automatic tags: several backups a day, gaps, midnight UTC, other names and manual tags', () => {
  const made = simulate([
    at('2020-03-01T00:00:00'), // first: all three
    at('2020-03-01T12:00:00'), // same day: nothing
    at('2020-03-01T23:59:59.999'), // still the same UTC day
    at('2020-03-02T00:00:00'), // midnight: a new day
    at('2020-03-07T23:00:00'), // 6 days after the last b_weekly: not yet weekly
    at('2020-03-08T00:00:00'), // 7 days: weekly
    at('2020-03-20T10:00:00'), // a gap: daily and weekly (12 days)
    at('2020-03-31T10:00:00'), // 11 days after 20 Mar: weekly
    at('2020-04-01T10:00:00'), // one calendar month after 1 Mar: monthly
  ]);
  assert.deepEqual(made.map((v) => v.tags), [
    ['b_daily', 'b_weekly', 'b_monthly'], [], [], ['b_daily'], ['b_daily'], ['b_daily', 'b_weekly'], ['b_daily', 'b_weekly'],
    ['b_daily', 'b_weekly'], ['b_daily', 'b_monthly'],
  ]);
  // Versions of other names, and manual tags, do not count.
  const others = [{ name: 'vm2', date: at('2020-03-01T00:00:00'), tags: ['b_daily', 'b_weekly', 'b_monthly'] }, { name: 'vm1', date: at('2020-03-01T01:00:00'), tags: ['daily'] }];
  assert.deepEqual(autoTags(others, 'vm1', at('2020-03-01T02:00:00')), ['b_daily', 'b_weekly', 'b_monthly']);
  // A version dated after now (a clock set back) does not make today's backup "already tagged" forever.
  assert.deepEqual(autoTags([{ name: 'vm1', date: at('2020-03-05T00:00:00'), tags: ['b_daily', 'b_weekly', 'b_monthly'] }], 'vm1', at('2020-03-01T00:00:00')), []);
});

test('schedulers: backy2 defaults, own sections, durations, clear errors', () => {
  assert.deepEqual(SCHEDULERS.map((s) => [s.name, s.intervalMs / 3600e3, s.keep, s.slaMs / 3600e3]), [['daily', 24, 8, 6], ['weekly', 168, 5, 12], ['monthly', 720, 3, 72]]);
  const cfg = configFromText(`[DEFAULTS]\nencryption_key = ${KEY}\n[daily]\nkeep: 14\n[minutely]\ninterval = 60s\nkeep = 5\nsla = 30s\n`);
  const [daily, minutely, lth] = schedulersFrom(cfg, 'daily,minutely,longterm_hourly');
  assert.deepEqual([daily.keep, daily.intervalMs, daily.slaMs], [14, DAY, 6 * 3600e3]);
  assert.deepEqual([minutely.intervalMs, minutely.keep, minutely.slaMs], [60e3, 5, 30e3]);
  assert.deepEqual([lth.intervalMs, lth.keep, lth.slaMs], [3600e3, 49, 2 * 3600e3]);
  assert.equal(parseDuration('7d'), 7 * DAY);
  assert.equal(parseDuration('5m'), 300e3);
  assert.equal(parseDuration('7w'), undefined);
  assert.equal(parseDuration('d'), undefined);
  const bad = (text: string, list: string, re: RegExp) =>
    assert.throws(() => schedulersFrom(configFromText(`[DEFAULTS]\nencryption_key = ${KEY}\n${text}`), list), (e: unknown) => e instanceof ConfigError && re.test((e as Error).message));
  bad('', 'yearly', /no scheduler section \[yearly\]/);
  bad('[yearly]\ninterval = 365d\nkeep = 2\n', 'yearly', /\[yearly\] has no sla/);
  bad('[daily]\ninterval = 1 day\n', 'daily', /invalid \[daily\] interval = "1 day"/);
  bad('[daily]\nkeep = -1\n', 'daily', /invalid \[daily\] keep/);
  assert.throws(() => schedulersFrom(cfg, ' , '), UsageError);
});

test('due over a year of daily versions (hand-computed)', () => {
  const vs = yearOfVersions();
  const rows = dueBackups(vs, SCHEDULERS, YEAR_NOW);
  assert.deepEqual(rows.map((r) => [r.name, r.schedulers.join(','), new Date(r.expireDate).toISOString(), new Date(r.dueSince).toISOString()]), [
    // no version tagged with any scheduler: due since 1970; expiry now + (3 + 1) * 30 days
    ['vm2', 'daily,weekly,monthly', '2021-05-01T12:00:00.000Z', '1970-01-01T00:00:00.000Z'],
    // daily: 31 Dec + 1 d - 6 h; weekly: Mon 28 Dec + 7 d - 12 h is 3 Jan 12:00, not yet; monthly: 1 Dec + 30 d - 3 d
    ['vm1', 'daily,monthly', '2021-05-01T12:00:00.000Z', '2020-12-28T00:00:00.000Z'],
  ]);
  // Only daily: due since 31 Dec 18:00, expiry now + 9 days. Invalid and incomplete versions do not count.
  const daily = SCHEDULERS.filter((s) => s.name === 'daily');
  assert.deepEqual(dueBackups(vs, daily, YEAR_NOW, 'vm1').map((r) => [new Date(r.dueSince).toISOString(), new Date(r.expireDate).toISOString()]),
    [['2020-12-31T18:00:00.000Z', '2021-01-10T12:00:00.000Z']]);
  const lastInvalid = vs.map((v) => (v.uid === vid('2020-12-31') ? { ...v, valid: false } : v));
  assert.equal(new Date(dueBackups(lastInvalid, daily, YEAR_NOW, 'vm1')[0].dueSince).toISOString(), '2020-12-30T18:00:00.000Z');
  // Due strictly after last + interval - sla.
  assert.deepEqual(dueBackups(vs, daily, at('2020-12-31T18:00:00'), 'vm1'), []);
  assert.equal(dueBackups(vs, daily, at('2020-12-31T18:00:01'), 'vm1').length, 1);
  // keep 0: never due.
  assert.deepEqual(dueBackups([], [{ ...daily[0], keep: 0 }], YEAR_NOW, 'vm9'), []);
  assert.equal(dueBackups([], daily, YEAR_NOW, 'vm9')[0].dueSince, 0, 'a name without versions is due since 1970');
});

test('sla over a year of daily versions (hand-computed): too many, too old, gaps', () => {
  const vs = yearOfVersions();
  const all = slaBreaches(vs, SCHEDULERS, YEAR_NOW);
  assert.deepEqual(all.filter((b) => b.name === 'vm1').map((b) => b.breach), SLA_VM1);
  assert.deepEqual(all.filter((b) => b.name === 'vm2').map((b) => b.breach), [
    'daily: Too few backups. Found 0, should be 8.', 'weekly: Too few backups. Found 0, should be 5.', 'monthly: Too few backups. Found 0, should be 3.',
  ]);
  // The last 8 daily versions at 03:00 on 1 Jan: within every daily rule.
  const lastEight = vs.filter((v) => v.name === 'vm1' && v.complete && v.tags.includes('daily') && v.date >= at('2020-12-24T00:00:00'));
  assert.equal(lastEight.length, 8);
  const daily = SCHEDULERS.filter((s) => s.name === 'daily');
  assert.deepEqual(slaBreaches(lastEight, daily, at('2021-01-01T03:00:00')), []);
  // One hour later than allowed, and one day too many after 2 more.
  assert.match(slaBreaches(lastEight, daily, at('2021-01-01T06:00:01'))[0].breach, /Latest backup is too old/);
});

test('enforce over a year of daily versions (hand-computed)', () => {
  const vs = yearOfVersions();
  const plan = planRetention(vs, parseRules(ENFORCE_RULES), YEAR_NOW, { youngerThanDays: 6, force: false });
  assert.equal(plan.length, vs.length);
  const kept = plan.filter((d) => !d.remove).map((d) => d.version.uid);
  assert.deepEqual([...kept].sort(), [...ENFORCE_KEPT].sort());
  const reason = (uid: string) => plan.find((d) => d.version.uid === uid)!.reason;
  assert.equal(reason(vid('2020-12-30')), 'latest3: newest 2');
  assert.equal(reason(vid('2020-12-28')), 'days7: day 4');
  assert.match(reason(vid('2020-12-27', 12)), /^younger than 6 days .*; rules: days7: day 5 keeps /);
  assert.match(reason(vid('2020-12-26', 12)), /^days7: day 6 keeps /);
  assert.equal(reason(vid('2020-12-21')), 'weeks5: week 1');
  assert.match(reason(vid('2020-12-24')), /^weeks5: week 1 keeps /);
  assert.equal(reason(vid('2020-11-02')), 'months13: month 2');
  assert.match(reason(vid('2020-11-01')), /^months13: month 2 keeps .* \(valid\)$/);
  assert.equal(reason(vid('2020-01-01')), 'months13: month 12');
  assert.equal(reason(vid('2020-06-15')), 'protected');
  assert.match(reason(vid('2020-12-31', 6)), /^incomplete/);
  // --force also removes the young one.
  const forced = planRetention(vs, parseRules(ENFORCE_RULES), YEAR_NOW, { youngerThanDays: 6, force: true });
  assert.deepEqual(forced.filter((d) => !d.remove).map((d) => d.version.uid).sort(), ENFORCE_KEPT.filter((u) => u !== vid('2020-12-27', 12)).sort());
  // The rules' order does not matter; a rule set keeping everything removes nothing.
  assert.deepEqual(planRetention(vs, parseRules('years2,months13,weeks5,days7,latest3'), YEAR_NOW, { youngerThanDays: 6, force: false }), plan);
  assert.equal(planRetention(vs, parseRules('latest1000'), YEAR_NOW, { youngerThanDays: 0, force: false }).filter((d) => d.remove).length, 0);
});

test('enforce: ISO week 53 across the new year, midnight boundaries', () => {
  const vs: FixtureVersion[] = [];
  for (let t = at('2020-12-14T00:00:00'); t <= at('2021-01-03T00:00:00'); t += DAY) vs.push(version(`d${day(t)}`, t));
  // Sunday 3 Jan 2021, 12:00 (ISO week 53 of 2020): week 0 is Mon 28 Dec .. Sun 3 Jan.
  const plan = planRetention(vs, parseRules('weeks2'), at('2021-01-03T12:00:00'), { youngerThanDays: 0, force: false });
  assert.deepEqual(plan.filter((d) => !d.remove).map((d) => d.version.uid), ['d2020-12-14', 'd2020-12-21', 'd2020-12-28']);
  // At Monday 4 Jan 00:00 a new week has begun: week 0 is empty, 28 Dec is week 1, 14 Dec week 3 (outside weeks2).
  const monday = planRetention(vs, parseRules('weeks2'), at('2021-01-04T00:00:00'), { youngerThanDays: 0, force: false });
  assert.deepEqual(monday.filter((d) => !d.remove).map((d) => d.version.uid), ['d2020-12-21', 'd2020-12-28']);
  // days: a version at 23:59:59.999 and one at 00:00 the next day are different days.
  const edge = [version('late', at('2020-12-30T23:59:59.999')), version('early', at('2020-12-31T00:00:00')), version('later', at('2020-12-31T00:00:01'))];
  assert.deepEqual(planRetention(edge, parseRules('days1'), at('2020-12-31T12:00:00'), { youngerThanDays: 0, force: false }).map((d) => [d.version.uid, d.remove]),
    [['late', false], ['early', false], ['later', true]]);
  // hours, months, years
  const hourly = [version('h0', at('2021-01-01T10:00:00')), version('h1', at('2021-01-01T10:59:59')), version('h2', at('2021-01-01T11:00:00'))];
  assert.deepEqual(planRetention(hourly, parseRules('hours1'), at('2021-01-01T11:30:00'), { youngerThanDays: 0, force: false }).map((d) => d.remove), [false, true, false]);
  const yearly = [version('y2018', at('2018-06-01T00:00:00')), version('y2019a', at('2019-01-01T00:00:00')), version('y2019b', at('2019-12-31T23:59:59')), version('y2021', at('2021-01-01T00:00:00'))];
  assert.deepEqual(planRetention(yearly, parseRules('years1'), at('2021-06-01T00:00:00'), { youngerThanDays: 0, force: false }).map((d) => d.remove), [true, true, true, false]);
  assert.deepEqual(planRetention(yearly, parseRules('years2'), at('2021-06-01T00:00:00'), { youngerThanDays: 0, force: false }).map((d) => d.remove), [true, false, true, false]);
});

test('enforce guards: invalid-but-newest, invalid periods, young, dated after now', () => {
  const now = at('2021-01-01T12:00:00');
  const vs = [
    version('d29-valid', at('2020-12-29T00:00:00')),
    version('d29-invalid', at('2020-12-29T12:00:00'), { valid: false }),
    version('d30-invalid', at('2020-12-30T12:00:00'), { valid: false }), // alone in its day: kept, no valid one
    version('d31-valid', at('2020-12-31T00:00:00')),
    version('d31-invalid', at('2020-12-31T12:00:00'), { valid: false }), // newer than every valid version
  ];
  const plan = planRetention(vs, parseRules('days7'), now, { youngerThanDays: 0, force: false });
  assert.deepEqual(plan.map((d) => [d.version.uid, d.remove]), [
    ['d29-valid', false], ['d29-invalid', true], ['d30-invalid', false], ['d31-valid', false], ['d31-invalid', false],
  ]);
  assert.match(plan[2].reason, /day 2 \(no valid version in it\)/);
  assert.match(plan[4].reason, /^invalid, but newer than every valid version/);
  // A valid version after it: the invalid one goes like any other.
  const later = planRetention([...vs, version('d31-later', at('2020-12-31T18:00:00'))], parseRules('days7'), now, { youngerThanDays: 0, force: false });
  assert.deepEqual(later.filter((d) => d.remove).map((d) => d.version.uid), ['d29-invalid', 'd31-invalid', 'd31-later']);
  // Dated after now (a clock set back): kept.
  const future = planRetention([version('future', at('2021-01-02T00:00:00'))], parseRules('days7'), now, { youngerThanDays: 0, force: false });
  assert.deepEqual(future.map((d) => [d.remove, d.reason]), [[false, 'dated after now']]);
  // latest1 keeps d31-invalid; with the young guard at 2 days d30-invalid (exactly 2 days old) goes, d31-valid (1.5) stays.
  const young = planRetention(vs, parseRules('latest1'), now, { youngerThanDays: 2, force: false });
  assert.deepEqual(young.filter((d) => d.remove).map((d) => d.version.uid), ['d29-valid', 'd29-invalid', 'd30-invalid']);
  assert.match(young.find((d) => d.version.uid === 'd31-valid')!.reason, /^younger than 2 days/);
});

test('rm --expired plan: expired only, same guards', () => {
  const now = at('2021-01-01T12:00:00');
  const vs = [
    version('old', at('2020-12-01T00:00:00'), { expire: at('2020-12-31T00:00:00') }),
    version('exactly-now', at('2020-12-01T00:00:00'), { expire: now }), // not yet: expire < now
    version('not-yet', at('2020-12-01T00:00:00'), { expire: at('2021-02-01T00:00:00') }),
    version('never', at('2020-12-01T00:00:00')),
    version('prot', at('2020-12-01T00:00:00'), { expire: at('2020-12-02T00:00:00'), protected: true }),
    version('young', at('2020-12-30T00:00:00'), { expire: at('2020-12-31T00:00:00') }),
    version('bad-newest', at('2020-12-31T00:00:00'), { expire: at('2020-12-31T01:00:00'), valid: false }),
  ];
  const plan = planExpired(vs, now, { youngerThanDays: 6, force: false });
  assert.deepEqual(plan.map((d) => [d.version.uid, d.remove]), [['old', true], ['prot', false], ['young', false], ['bad-newest', false]]);
  assert.equal(plan[0].reason, 'expired 2020-12-31 00:00:00');
  assert.deepEqual(planExpired(vs, now, { youngerThanDays: 6, force: true }).filter((d) => d.remove).map((d) => d.version.uid), ['old', 'young']);
});

test('retention rules: benji syntax and clear errors', () => {
  assert.deepEqual(parseRules('latest3,hours24,days7,weeks4,months12,years2'), { latest: 3, hours: 24, days: 7, weeks: 4, months: 12, years: 2 });
  for (const [spec, re] of [['', /no retention rules/], ['days0', /positive/], ['days', /invalid retention rule "days"/], ['fortnights2', /unknown category fortnights/],
    ['days3,days4', /more than once/], ['days3,', /invalid retention rule ""/], ['Days3', /invalid retention rule/]] as [string, RegExp][]) {
    assert.throws(() => parseRules(spec), (e: unknown) => e instanceof UsageError && re.test((e as Error).message), spec);
  }
});

test('du reads encoded chunks like the generic decoder: holes, pending, small and large ids', () => {
  const cases: number[][] = [
    [], [0], [-1], [1, 2, 3, 0, 0, 4], [5, 5, 5, -1, 0, 70000, 69999, 3, 2 ** 31, 1],
    Array.from({ length: 1024 }, (_, i) => (i % 7 === 0 ? 0 : i % 11 === 0 ? -1 : 1 + ((i * 2654435761) % 4_000_000_000))),
    Array.from({ length: 20 }, (_, i) => 100 + i),
  ];
  for (const entries of cases) {
    const raw = encodeChunk(Float64Array.from(entries));
    const s = scanChunk(raw);
    const ids = entries.filter((e) => e > 0);
    assert.deepEqual({ holes: s.holes, pending: s.pending, n: s.end - s.start }, { holes: entries.filter((e) => e === 0).length, pending: entries.filter((e) => e === -1).length, n: ids.length });
    assert.equal(s.last, entries.length ? entries[entries.length - 1] : 0);
  }
  const pool = new (class { ids = new Uint32Array(16); length = 0; reserve(n: number) { if (this.length + n > this.ids.length) { const g = new Uint32Array(this.length + n); g.set(this.ids); this.ids = g; } } })();
  scanChunk(encodeChunk(Float64Array.from([3, 1, 0, 2])), pool);
  scanChunk(encodeChunk(Float64Array.from([9, 9])), pool);
  assert.deepEqual([...pool.ids.subarray(0, pool.length)], [3, 1, 2, 9, 9], 'chunks are appended to one pool');
  assert.throws(() => scanChunk(encodeChunk(Float64Array.from([2 ** 33]))), /beyond what du counts/);
});

test('map summaries: the fast decoder and the summary table read what encodeSummary wrote, odd values through the generic decoder', () => {
  const packr = new Packr({ useRecords: false });
  /** What the generic msgpack decoder makes of a summary: the reference. */
  const generic = (data: Uint8Array): MapSummary => {
    const v = packr.unpack(data) as [[Uint8Array, number, number][], string, [number, number[], number[]] | null];
    const out: MapSummary = { chunks: v[0].map(([d, count, chunk]) => ({ digest: Buffer.from(d).toString('hex'), count, chunk })), last: v[1] };
    if (v[2]) out.delta = { base: v[2][0], ids: v[2][1], counts: v[2][2] };
    return out;
  };
  const plain = (s: MapSummary): MapSummary => ({ chunks: s.chunks, last: s.last, ...(s.delta ? { delta: s.delta } : {}) });
  const digest = (k: number) => k.toString(16).padStart(32, '0');
  const summaries: MapSummary[] = [
    { chunks: [], last: '' },
    { chunks: [{ digest: digest(1), count: 254, chunk: 2 }, { digest: digest(2), count: 1, chunk: 0 }], last: digest(1) },
    // every integer width msgpack has up to 32 bits, negative counts, a delta of 70,000 entries (array32)
    { chunks: [{ digest: digest(3), count: 70000, chunk: 65536 }], last: digest(3), delta: { base: 2 ** 32 - 1, ids: [1, 127, 128, 255, 256, 65535, 65536, 2 ** 32 - 1], counts: [-1, -32, -33, -128, -129, -32768, -32769, -(2 ** 31)] } },
    { chunks: [{ digest: digest(4), count: 1, chunk: 0 }], last: digest(4), delta: { base: 7, ids: Array.from({ length: 70000 }, (_, k) => k + 1), counts: Array.from({ length: 70000 }, (_, k) => (k % 2 ? 1 : -1)) } },
    // beyond 32 bits: msgpackr writes doubles, which only the generic decoder reads
    { chunks: [{ digest: digest(5), count: 1, chunk: 0 }], last: digest(5), delta: { base: 2 ** 40, ids: [2 ** 33], counts: [1] } },
    { chunks: [{ digest: digest(6), count: 2 ** 35, chunk: 1 }], last: digest(6) },
  ];
  const table = new SummaryTable();
  // back to back in one buffer, as PostgreSQL sends them
  const encoded = summaries.map((s) => encodeSummary(s));
  const joined = Buffer.concat(encoded);
  let off = 0;
  encoded.forEach((e, k) => {
    assert.deepEqual(plain(decodeSummary(e)), generic(e), `summary ${k}`);
    assert.deepEqual(plain(decodeSummary(e)), summaries[k], `summary ${k} round trip`);
    // the first four are read by the fast decoder (its own class), the two with doubles by the generic one
    assert.equal(Object.getPrototypeOf(decodeSummary(e)) === Object.prototype, k >= 4, `summary ${k}: which decoder`);
    table.addEncoded(100 + k, joined, off, off + e.length);
    off += e.length;
  });
  table.add(200, summaries[2]);
  assert.equal(table.size, summaries.length + 1);
  summaries.forEach((s, k) => {
    const slot = table.slotOf(100 + k);
    assert.deepEqual(plain(table.get(100 + k)!), s, `table ${k}`);
    assert.deepEqual(table.chunksOf(slot), s.chunks);
    assert.equal(table.lastOf(slot), s.last);
    assert.equal(table.deltaBase(slot), s.delta ? s.delta.base : -1);
    assert.deepEqual([...table.deltaIds.subarray(table.deltaStart(slot), table.deltaEnd(slot))], s.delta?.ids ?? []);
    assert.deepEqual([...table.deltaCounts.subarray(table.deltaStart(slot), table.deltaEnd(slot))], s.delta?.counts ?? []);
  });
  assert.deepEqual(plain(table.get(200)!), summaries[2]);
  assert.equal(table.slotOf(999), -1);
  assert.equal(table.get(999), undefined);
  // roots: no delta, or a delta against a version the table does not hold
  assert.deepEqual(table.roots().sort((a, b) => a - b), [100, 101, 102, 103, 104, 105, 200]);
  const empty = encodeSummary({ chunks: [], last: '' });
  table.addEncoded(7, empty, 0, empty.length);
  assert.deepEqual(table.roots().sort((a, b) => a - b), [7, 100, 101, 102, 104, 105, 200], '103 is a delta against 7 now');
  assert.throws(() => table.add(7, summaries[0]), /two summaries of version 7/);
  // damaged bytes: the generic decoder's error, never a wrong summary
  assert.throws(() => decodeSummary(Buffer.from([0x93, 0x01])));
  assert.throws(() => decodeSummary(encodeSummary(summaries[1]).subarray(0, 10)));
});
