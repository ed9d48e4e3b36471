import { ConfigError } from './errors';

/** backy2's expiry format: "yyyy-mm-dd" or "yyyy-mm-dd HH:MM:SS" (UTC). Returns ms since the epoch. */
export function parseExpire(text: string): number {
  const m = /^(\d{4})-(\d{2})-(\d{2})(?:[ T](\d{2})[:-](\d{2})[:-](\d{2}))?$/.exec(text.trim());
  if (m) {
    const [y, mo, d, h = '0', mi = '0', s = '0'] = m.slice(1);
    const t = Date.UTC(+y, +mo - 1, +d, +h, +mi, +s);
    const back = new Date(t);
    if (back.getUTCFullYear() === +y && back.getUTCMonth() === +mo - 1 && back.getUTCDate() === +d && +h < 24 && +mi < 60 && +s < 60) return t;
  }
  throw new ConfigError(`invalid expiry date "${text}": expected yyyy-mm-dd or "yyyy-mm-dd HH:MM:SS"`);
}

/** Tags as backy2 takes them: one string, comma separated. */
export function parseTags(text: string | undefined): string[] {
  if (!text) return [];
  return [...new Set(text.split(',').map((t) => t.trim()).filter(Boolean))];
}

/** backy2's date format, in UTC: "yyyy-mm-dd HH:MM:SS". */
export function fmtDate(d: Date | number | null | undefined): string {
  if (d === null || d === undefined) return '';
  const dt = typeof d === 'number' ? new Date(d) : d;
  return dt.toISOString().replace('T', ' ').slice(0, 19);
}
