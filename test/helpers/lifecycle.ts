/**
 * A year of daily versions with hand-computed expectations for due, sla and enforce (test/lifecycle-*.test.ts).
 *
 * vm1: one version at 00:00 UTC on every day of 2020 (a leap year) except 2020-03-15, tagged daily; Mondays
 * also weekly, the 1st of each month also monthly. Besides: 2020-12-26 12:00 and 2020-12-27 12:00 (second
 * versions of those days, no tags), 2020-12-31 06:00 (an interrupted backup: incomplete, invalid, tagged
 * daily). 2020-06-15 (a Monday) is protected; 2020-02-10 (a Monday) and 2020-11-01 (a monthly) are invalid.
 * vm2: one version, 2020-12-31 00:00, tagged manual. "Now" is 2021-01-01 12:00 UTC, a Friday in ISO week 53
 * of 2020.
 */
export const YEAR_NOW = Date.UTC(2021, 0, 1, 12);

export interface FixtureVersion {
  uid: string;
  name: string;
  date: number;
  tags: string[];
  valid: boolean;
  complete: boolean;
  protected: boolean;
  expire: number | null;
}

/** "v2020-12-27T12": the uid of vm1's version of that day and hour. */
export function vid(day: string, hour = 0): string {
  return `v${day}T${String(hour).padStart(2, '0')}`;
}

export function yearOfVersions(): FixtureVersion[] {
  const out: FixtureVersion[] = [];
  const add = (date: number, tags: string[], over: Partial<FixtureVersion> = {}) => {
    const iso = new Date(date).toISOString();
    out.push({ uid: vid(iso.slice(0, 10), new Date(date).getUTCHours()), name: 'vm1', date, tags, valid: true, complete: true, protected: false, expire: null, ...over });
  };
  for (let t = Date.UTC(2020, 0, 1); t < Date.UTC(2021, 0, 1); t += 86400e3) {
    const d = new Date(t);
    const day = d.toISOString().slice(0, 10);
    if (day === '2020-03-15') continue;
    const tags = ['daily'];
    if (d.getUTCDay() === 1) tags.push('weekly');
    if (d.getUTCDate() === 1) tags.push('monthly');
    add(t, tags, {
      protected: day === '2020-06-15',
      valid: day !== '2020-02-10' && day !== '2020-11-01',
    });
  }
  add(Date.UTC(2020, 11, 26, 12), []);
  add(Date.UTC(2020, 11, 27, 12), []);
  add(Date.UTC(2020, 11, 31, 6), ['daily'], { valid: false, complete: false });
  out.push({ uid: 'vm2-only', name: 'vm2', date: Date.UTC(2020, 11, 31), tags: ['manual'], valid: true, complete: true, protected: false, expire: null });
  return out.sort((a, b) => a.date - b.date);
}

/** What `enforce latest3,days7,weeks5,months13,years2` keeps of vm1 at YEAR_NOW (disallow_rm_when_younger_than_days 6, no --force). */
export const ENFORCE_RULES = 'latest3,days7,weeks5,months13,years2';
export const ENFORCE_KEPT = [
  // latest3
  vid('2020-12-31'), vid('2020-12-30'), vid('2020-12-29'),
  // days7: days 4 to 7 ago (1 to 3 hold only the latest3 versions); each day's oldest version
  vid('2020-12-28'), vid('2020-12-27'), vid('2020-12-26'), vid('2020-12-25'),
  // removed by the rules (day 5 keeps the 00:00 version), but 4.5 days old: younger than 6 days
  vid('2020-12-27', 12),
  // weeks5: weeks start on Monday; week 0 (Mon 28 Dec, ISO week 53) holds only versions kept above
  vid('2020-12-21'), vid('2020-12-14'), vid('2020-12-07'), vid('2020-11-30'), vid('2020-11-23'),
  // months13: month 1 (December) is all in days and weeks; month 2 keeps 2 Nov, as 1 Nov is invalid
  vid('2020-11-02'), vid('2020-10-01'), vid('2020-09-01'), vid('2020-08-01'), vid('2020-07-01'), vid('2020-06-01'),
  vid('2020-05-01'), vid('2020-04-01'), vid('2020-03-01'), vid('2020-02-01'), vid('2020-01-01'),
  // never considered
  vid('2020-06-15'), vid('2020-12-31', 6),
  // vm2: latest3
  'vm2-only',
];

/** backy2's sla texts for vm1 at YEAR_NOW with the default daily, weekly, monthly schedulers. */
export const SLA_VM1 = [
  'daily: Too many backups. Found 363, should be 8.',
  `daily: Latest backup is too old. Version ${vid('2020-12-31')} has date 2020-12-31 00:00:00, new backup due since 2021-01-01 06:00:00.`,
  `daily: Version ${vid('2020-02-11')} is not in SLA range. It was created at 2020-02-11 00:00:00 and should be between 2020-02-09 18:00:00 and 2020-02-10 06:00:00.`,
  `daily: Version ${vid('2020-03-16')} is not in SLA range. It was created at 2020-03-16 00:00:00 and should be between 2020-03-14 18:00:00 and 2020-03-15 06:00:00.`,
  `daily: Version ${vid('2020-11-02')} is not in SLA range. It was created at 2020-11-02 00:00:00 and should be between 2020-10-31 18:00:00 and 2020-11-01 06:00:00.`,
  `daily: Backup too old. Found version_uid ${vid('2020-01-01')} with backup date 2020-01-01 00:00:00. Oldest allowed date is 2020-12-23 06:00:00.`,
  'weekly: Too many backups. Found 51, should be 5.',
  `weekly: Version ${vid('2020-02-17')} is not in SLA range. It was created at 2020-02-17 00:00:00 and should be between 2020-02-09 12:00:00 and 2020-02-10 12:00:00.`,
  `weekly: Backup too old. Found version_uid ${vid('2020-01-06')} with backup date 2020-01-06 00:00:00. Oldest allowed date is 2020-11-26 00:00:00.`,
  'monthly: Too many backups. Found 11, should be 3.',
  `monthly: Version ${vid('2020-12-01')} is not in SLA range. It was created at 2020-12-01 00:00:00 and should be between 2020-10-28 00:00:00 and 2020-11-03 00:00:00.`,
  `monthly: Backup too old. Found version_uid ${vid('2020-01-01')} with backup date 2020-01-01 00:00:00. Oldest allowed date is 2020-09-29 12:00:00.`,
];
