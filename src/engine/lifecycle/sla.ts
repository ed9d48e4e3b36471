import { fmtDate } from '../../util/dates';
import type { VersionRow } from '../../meta/types';
import { DAY } from './calendar';
import type { Scheduler } from './schedulers';

export interface SlaBreach {
  name: string;
  scheduler: string;
  breach: string;
}

type V = Pick<VersionRow, 'uid' | 'name' | 'date' | 'tags' | 'valid'>;

/**
 * backy2's SLA checks of one name and scheduler, over the valid versions of the name tagged with the
 * scheduler: too few (< keep), too many (> keep + 2, two allowed while removal lags), the newest older than
 * interval + sla, a version outside [previous + interval - sla, previous + interval + sla], the oldest older
 * than keep * interval + sla + 1 day. The texts are backy2's.
 */
export function slaBreachesOf(versions: V[], name: string, s: Scheduler, now: number): SlaBreach[] {
  const vs = versions.filter((v) => v.valid && v.name === name && v.tags.includes(s.name)).sort((a, b) => a.date - b.date);
  const out: string[] = [];
  if (vs.length < s.keep) out.push(`${s.name}: Too few backups. Found ${vs.length}, should be ${s.keep}.`);
  if (vs.length > s.keep + 2) out.push(`${s.name}: Too many backups. Found ${vs.length}, should be ${s.keep}.`);
  const last = vs[vs.length - 1];
  if (last && last.date + s.intervalMs + s.slaMs < now) {
    out.push(`${s.name}: Latest backup is too old. Version ${last.uid} has date ${fmtDate(last.date)}, new backup due since ${fmtDate(last.date + s.intervalMs + s.slaMs)}.`);
  }
  for (let i = 1; i < vs.length; i++) {
    const prev = vs[i - 1].date;
    const lo = prev + s.intervalMs - s.slaMs;
    const hi = prev + s.intervalMs + s.slaMs;
    if (vs[i].date < lo || vs[i].date > hi) {
      out.push(`${s.name}: Version ${vs[i].uid} is not in SLA range. It was created at ${fmtDate(vs[i].date)} and should be between ${fmtDate(lo)} and ${fmtDate(hi)}.`);
    }
  }
  const oldestAllowed = now - s.keep * s.intervalMs - s.slaMs - DAY;
  if (vs.length && vs[0].date < oldestAllowed) {
    out.push(`${s.name}: Backup too old. Found version_uid ${vs[0].uid} with backup date ${fmtDate(vs[0].date)}. Oldest allowed date is ${fmtDate(oldestAllowed)}.`);
  }
  return out.map((breach) => ({ name, scheduler: s.name, breach }));
}

/** Every breach of every name (or just `name`) and scheduler, names sorted, schedulers in the given order. */
export function slaBreaches(versions: V[], schedulers: Scheduler[], now: number, name?: string): SlaBreach[] {
  const names = name !== undefined ? [name] : [...new Set(versions.map((v) => v.name))].sort();
  return names.flatMap((n) => schedulers.flatMap((s) => slaBreachesOf(versions, n, s, now)));
}
