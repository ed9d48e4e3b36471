import type { VersionRow } from '../../meta/types';
import type { Scheduler } from './schedulers';

export interface DueRow {
  name: string;
  /** the due schedulers, in the order they were asked for: the tags for `backup -t` */
  schedulers: string[];
  /** for `backup -e`: the latest of now + (keep + 1) * interval over the due schedulers */
  expireDate: number;
  /** the earliest time from which one of them was due (0 when a scheduler has no version yet) */
  dueSince: number;
}

type V = Pick<VersionRow, 'name' | 'date' | 'tags' | 'valid'>;

/** The newest valid version of `name` tagged with the scheduler's name, or undefined. */
function lastOf(versions: V[], name: string, tag: string): V | undefined {
  let last: V | undefined;
  for (const v of versions) if (v.valid && v.name === name && v.tags.includes(tag) && (!last || v.date >= last.date)) last = v;
  return last;
}

/** When a scheduler is due for a name (backy2): never with keep 0; at once without a version; else last + interval - sla. */
export function dueSince(versions: V[], name: string, s: Scheduler, now: number): number | undefined {
  if (s.keep === 0) return undefined;
  const last = lastOf(versions, name, s.name);
  if (!last) return 0;
  const at = last.date + s.intervalMs - s.slaMs;
  return now > at ? at : undefined;
}

/**
 * backy2's `due`: for every name (or just `name`), which schedulers need a backup now, with which expiry,
 * sorted by how long they have been due. Names come from all versions, the schedulers' versions must be valid.
 */
export function dueBackups(versions: V[], schedulers: Scheduler[], now: number, name?: string): DueRow[] {
  const names = name !== undefined ? [name] : [...new Set(versions.map((v) => v.name))].sort();
  const rows: DueRow[] = [];
  for (const n of names) {
    const due: string[] = [];
    let expireDate = now;
    let since = now;
    for (const s of schedulers) {
      const at = dueSince(versions, n, s, now);
      if (at === undefined) continue;
      due.push(s.name);
      expireDate = Math.max(expireDate, now + (s.keep + 1) * s.intervalMs);
      since = Math.min(since, at);
    }
    if (due.length) rows.push({ name: n, schedulers: due, expireDate, dueSince: since });
  }
  return rows.sort((a, b) => a.dueSince - b.dueSince || (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
}
