import type { VersionRow } from '../../meta/types';
import { DAY, dayIndex, wholeMonthsBetween } from './calendar';

export const AUTO_TAGS = ['b_daily', 'b_weekly', 'b_monthly'] as const;

/**
 * backy2's automatic tags for a new backup of `name` made at `now` (only when no -t is given and no version
 * is continued), from the versions of that name so far:
 * - b_daily when none of them tagged b_daily is dated today,
 * - b_weekly when the newest b_weekly one is at least 7 days old,
 * - b_monthly when the newest b_monthly one is at least one calendar month old (31 Jan -> 28/29 Feb),
 * all by calendar day in UTC. The first backup of a name gets all three.
 */
export function autoTags(versions: Pick<VersionRow, 'name' | 'date' | 'tags'>[], name: string, now: number): string[] {
  const newest = new Map<string, number>();
  for (const v of versions) {
    if (v.name !== name) continue;
    for (const t of v.tags) if ((AUTO_TAGS as readonly string[]).includes(t) && v.date > (newest.get(t) ?? -Infinity)) newest.set(t, v.date);
  }
  const today = dayIndex(now);
  const tags: string[] = [];
  const daily = newest.get('b_daily');
  if (daily === undefined || today - dayIndex(daily) > 0) tags.push('b_daily');
  const weekly = newest.get('b_weekly');
  if (weekly === undefined || Math.floor((today - dayIndex(weekly)) / 7) > 0) tags.push('b_weekly');
  const monthly = newest.get('b_monthly');
  if (monthly === undefined || (dayIndex(monthly) <= today && wholeMonthsBetween(dayIndex(monthly) * DAY, now) > 0)) tags.push('b_monthly');
  return tags;
}

/** Tags as backy2's "New version" line lists them: automatic ones in their order, then the others. */
export function tagsForLog(tags: string[]): string {
  const auto = AUTO_TAGS.filter((t) => tags.includes(t));
  return [...auto, ...tags.filter((t) => !(AUTO_TAGS as readonly string[]).includes(t))].join(',');
}
