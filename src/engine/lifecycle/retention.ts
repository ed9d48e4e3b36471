import type { VersionRow } from '../../meta/types';
import { fmtDate } from '../../util/dates';
import { UsageError } from '../../util/errors';
import { DAY, dayIndex, hourIndex, monthIndex, weekIndex, yearIndex } from './calendar';

/**
 * Retention rules in benji's syntax: `latest3,hours24,days7,weeks4,months12,years2` (any subset, any order,
 * each category once, counts > 0). Per version name: the newest `latestN` versions are kept; every other
 * version falls into the first of hours, days, weeks, months, years (in that order) whose period count
 * ago, by UTC calendar (hours since the start of its hour, days since its midnight, weeks since its Monday,
 * months, years) is at most N; in each such period one version is kept, the oldest; versions in no
 * period are removed.
 *
 * Differences from benji, for safety: within a period the oldest *valid* version is kept (an invalid one only
 * if the period has no valid one), and removals are vetoed by guards: protected and incomplete versions are
 * never considered, an invalid version newer than every valid version of its name is kept (it may hold the
 * only copy of the latest state), and versions younger than disallow_rm_when_younger_than_days are kept
 * unless --force.
 */
export const CATEGORIES = ['latest', 'hours', 'days', 'weeks', 'months', 'years'] as const;
export type Category = (typeof CATEGORIES)[number];
export type Rules = Partial<Record<Category, number>>;

const PERIODS: { category: Exclude<Category, 'latest'>; unit: string; index: (t: number) => number }[] = [
  { category: 'hours', unit: 'hour', index: hourIndex },
  { category: 'days', unit: 'day', index: dayIndex },
  { category: 'weeks', unit: 'week', index: weekIndex },
  { category: 'months', unit: 'month', index: monthIndex },
  { category: 'years', unit: 'year', index: yearIndex },
];

export function parseRules(spec: string): Rules {
  const rules: Rules = {};
  if (!spec.trim()) throw new UsageError('no retention rules given: e.g. latest3,days7,weeks4,months12');
  for (const token of spec.split(',')) {
    const m = /^([a-z]+)([0-9]+)$/.exec(token.trim());
    if (!m) throw new UsageError(`invalid retention rule "${token}": expected latestN, hoursN, daysN, weeksN, monthsN or yearsN`);
    const category = m[1] as Category;
    if (!(CATEGORIES as readonly string[]).includes(category)) throw new UsageError(`invalid retention rule "${token}": unknown category ${m[1]} (latest, hours, days, weeks, months, years)`);
    if (rules[category] !== undefined) throw new UsageError(`retention rule ${category} is given more than once`);
    const n = Number(m[2]);
    if (!Number.isSafeInteger(n) || n <= 0) throw new UsageError(`retention rule "${token}": the count must be a positive number`);
    rules[category] = n;
  }
  return rules;
}

export function formatRules(rules: Rules): string {
  return CATEGORIES.filter((c) => rules[c] !== undefined).map((c) => `${c}${rules[c]}`).join(',');
}

export type Plannable = Pick<VersionRow, 'uid' | 'name' | 'date' | 'valid' | 'complete' | 'protected' | 'expire'>;

export interface Decision<V extends Plannable = Plannable> {
  version: V;
  remove: boolean;
  reason: string;
}

export interface GuardOptions {
  /** disallow_rm_when_younger_than_days */
  youngerThanDays: number;
  /** --force: remove younger versions too */
  force: boolean;
}

const short = (uid: string) => uid.slice(0, 8);

/** Why a version the rules (or its expiry) would remove must stay, or undefined. */
function vetoOf(v: Plannable, newestValid: number | undefined, now: number, g: GuardOptions): string | undefined {
  if (v.protected) return 'protected';
  if (!v.complete) return 'incomplete (a backup is running or was interrupted)';
  if (!v.valid && (newestValid === undefined || v.date > newestValid)) return 'invalid, but newer than every valid version of its name (scrub it or back up again)';
  if (!g.force && g.youngerThanDays > 0 && now - v.date < g.youngerThanDays * DAY) {
    return `younger than ${g.youngerThanDays} days (disallow_rm_when_younger_than_days, --force removes it)`;
  }
  return undefined;
}

function newestValidByName(versions: Plannable[]): Map<string, number> {
  const out = new Map<string, number>();
  for (const v of versions) if (v.valid && v.complete && v.date > (out.get(v.name) ?? -Infinity)) out.set(v.name, v.date);
  return out;
}

const byDateDesc = (a: Plannable, b: Plannable) => b.date - a.date || (a.uid < b.uid ? 1 : a.uid > b.uid ? -1 : 0);

/** The rules' verdict for the versions of one name: kept with the period that keeps it, or removed and why. */
function applyRules<V extends Plannable>(versions: V[], rules: Rules, now: number): Map<V, { keep: boolean; reason: string }> {
  const out = new Map<V, { keep: boolean; reason: string }>();
  const sorted = [...versions].sort(byDateDesc);
  const latest = rules.latest ?? 0;
  sorted.slice(0, latest).forEach((v, i) => out.set(v, { keep: true, reason: `latest${latest}: newest ${i + 1}` }));
  const buckets = new Map<string, { label: string; members: V[] }>();
  for (const v of sorted.slice(latest)) {
    if (v.date > now) {
      out.set(v, { keep: true, reason: 'dated after now' });
      continue;
    }
    const p = PERIODS.find((x) => rules[x.category] !== undefined && x.index(now) - x.index(v.date) <= rules[x.category]!);
    if (!p) {
      out.set(v, { keep: false, reason: 'older than every rule' });
      continue;
    }
    const ago = p.index(now) - p.index(v.date);
    const key = `${p.category}:${ago}`;
    let b = buckets.get(key);
    if (!b) buckets.set(key, (b = { label: `${p.category}${rules[p.category]}: ${p.unit} ${ago}`, members: [] }));
    b.members.push(v); // newest first
  }
  for (const { label, members } of buckets.values()) {
    const oldestFirst = [...members].reverse();
    const keeper = oldestFirst.find((v) => v.valid) ?? oldestFirst[0];
    for (const v of members) {
      if (v === keeper) out.set(v, { keep: true, reason: `${label}${keeper.valid ? '' : ' (no valid version in it)'}` });
      else out.set(v, { keep: false, reason: `${label} keeps ${short(keeper.uid)} (${keeper.valid && !v.valid ? 'valid' : 'older'})` });
    }
  }
  return out;
}

/**
 * `enforce`: what the rules keep and remove, per name, guards applied. Protected and incomplete versions are
 * listed as kept without taking a place in the rules. Sorted by name, then date.
 */
export function planRetention<V extends Plannable>(versions: V[], rules: Rules, now: number, guards: GuardOptions): Decision<V>[] {
  const newestValid = newestValidByName(versions);
  const byName = new Map<string, V[]>();
  for (const v of versions) {
    if (!byName.has(v.name)) byName.set(v.name, []);
    byName.get(v.name)!.push(v);
  }
  const out: Decision<V>[] = [];
  for (const [name, vs] of byName) {
    const verdicts = applyRules(vs.filter((v) => v.complete && !v.protected), rules, now);
    for (const v of vs) {
      const verdict = verdicts.get(v);
      if (!verdict) {
        out.push({ version: v, remove: false, reason: vetoOf(v, newestValid.get(name), now, guards)! });
        continue;
      }
      const veto = verdict.keep ? undefined : vetoOf(v, newestValid.get(name), now, guards);
      out.push(veto ? { version: v, remove: false, reason: `${veto}; rules: ${verdict.reason}` } : { version: v, remove: !verdict.keep, reason: verdict.reason });
    }
  }
  return sortDecisions(out);
}

/** `rm --expired`: every version whose expiry date has passed, guards applied. */
export function planExpired<V extends Plannable>(versions: V[], now: number, guards: GuardOptions): Decision<V>[] {
  const newestValid = newestValidByName(versions);
  const out: Decision<V>[] = [];
  for (const v of versions) {
    if (v.expire === null || v.expire >= now) continue;
    const expired = `expired ${fmtDate(v.expire)}`;
    const veto = vetoOf(v, newestValid.get(v.name), now, guards);
    out.push(veto ? { version: v, remove: false, reason: `${veto}; ${expired}` } : { version: v, remove: true, reason: expired });
  }
  return sortDecisions(out);
}

function sortDecisions<V extends Plannable>(d: Decision<V>[]): Decision<V>[] {
  return d.sort((a, b) => (a.version.name < b.version.name ? -1 : a.version.name > b.version.name ? 1 : 0) ||
    a.version.date - b.version.date || (a.version.uid < b.version.uid ? -1 : 1));
}
