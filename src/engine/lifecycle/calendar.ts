/**
 * UTC calendar arithmetic for tags, schedules and retention. backy2 mixed UTC version dates with the local
 * date; backy counts every day, week, month and year in UTC.
 */

export const SECOND = 1000;
export const MINUTE = 60 * SECOND;
export const HOUR = 60 * MINUTE;
export const DAY = 24 * HOUR;

/** Days since 1970-01-01 (UTC). */
export function dayIndex(t: number): number {
  return Math.floor(t / DAY);
}

export function hourIndex(t: number): number {
  return Math.floor(t / HOUR);
}

/** Weeks starting on Monday (ISO), counted from the week of 1970-01-01, a Thursday. */
export function weekIndex(t: number): number {
  return Math.floor((dayIndex(t) + 3) / 7);
}

export function monthIndex(t: number): number {
  const d = new Date(t);
  return d.getUTCFullYear() * 12 + d.getUTCMonth();
}

export function yearIndex(t: number): number {
  return new Date(t).getUTCFullYear();
}

/** Midnight (UTC) of the day `months` calendar months after `t`'s day; the 31st becomes the month's last day. */
export function addMonthsClipped(t: number, months: number): number {
  const d = new Date(t);
  const m = d.getUTCFullYear() * 12 + d.getUTCMonth() + months;
  const y = Math.floor(m / 12);
  const mo = m - y * 12;
  const last = new Date(Date.UTC(y, mo + 1, 0)).getUTCDate();
  return Date.UTC(y, mo, Math.min(d.getUTCDate(), last));
}

/** Whole calendar months from `from`'s day to `to`'s day (dateutil's relativedelta on dates), for from <= to. */
export function wholeMonthsBetween(from: number, to: number): number {
  const toDay = dayIndex(to) * DAY;
  let m = monthIndex(to) - monthIndex(from);
  while (m > 0 && addMonthsClipped(from, m) > toDay) m--;
  return m;
}
