import type { Config } from '../../config/config';
import { ConfigError, UsageError } from '../../util/errors';
import { DAY, HOUR, MINUTE, SECOND } from './calendar';

/** A scheduler section of backy.cfg: back up every `interval`, keep `keep` versions, tolerate `sla` lateness. */
export interface Scheduler {
  /** the section name, which is also the tag its versions carry */
  name: string;
  intervalMs: number;
  keep: number;
  slaMs: number;
}

/**
 * The scheduler sections backy2 ships in its etc/backy.cfg, used for any key a configuration does not set.
 * Other section names work too when they set all three keys.
 */
export const DEFAULT_SCHEDULERS: Record<string, { interval: string; keep: string; sla: string }> = {
  hourly: { interval: '1h', keep: '25', sla: '1h' },
  daily: { interval: '1d', keep: '8', sla: '6h' },
  weekly: { interval: '7d', keep: '5', sla: '12h' },
  monthly: { interval: '30d', keep: '3', sla: '3d' },
  longterm_hourly: { interval: '1h', keep: '49', sla: '2h' },
  longterm_daily: { interval: '1d', keep: '14', sla: '12h' },
  longterm_weekly: { interval: '7d', keep: '10', sla: '1d' },
  longterm_monthly: { interval: '30d', keep: '6', sla: '7d' },
};

export const DEFAULT_SCHEDULER_LIST = 'daily,weekly,monthly';

const UNIT: Record<string, number> = { s: SECOND, m: MINUTE, h: HOUR, d: DAY };

/** backy2's durations: `<int>s|m|h|d`. */
export function parseDuration(text: string): number | undefined {
  const m = /^\s*(\d+)\s*([smhd])\s*$/.exec(text);
  return m ? Number(m[1]) * UNIT[m[2]] : undefined;
}

/** The schedulers named by -s (comma separated), from the configuration with backy2's defaults. */
export function schedulersFrom(cfg: Pick<Config, 'ini'>, list: string): Scheduler[] {
  const names = [...new Set(list.split(',').map((s) => s.trim()).filter(Boolean))];
  if (!names.length) throw new UsageError('-s expects scheduler names, e.g. daily,weekly,monthly');
  return names.map((name) => {
    const section = cfg.ini.get(name.toLowerCase());
    const defaults = DEFAULT_SCHEDULERS[name.toLowerCase()];
    if (!section && !defaults) throw new ConfigError(`no scheduler section [${name}] in the configuration (keys: interval, keep, sla)`);
    const get = (key: 'interval' | 'keep' | 'sla'): string => {
      const v = section?.get(key) ?? defaults?.[key];
      if (v === undefined) throw new ConfigError(`[${name}] has no ${key} (a scheduler needs interval, keep and sla)`);
      return v;
    };
    const duration = (key: 'interval' | 'sla'): number => {
      const ms = parseDuration(get(key));
      if (ms === undefined) throw new ConfigError(`invalid [${name}] ${key} = "${get(key)}": expected <number>s|m|h|d, e.g. 1d or 6h`);
      return ms;
    };
    const keepText = get('keep').trim();
    if (!/^\d+$/.test(keepText)) throw new ConfigError(`invalid [${name}] keep = "${keepText}": expected a whole number`);
    const intervalMs = duration('interval');
    if (intervalMs <= 0) throw new ConfigError(`invalid [${name}] interval = "${get('interval')}": must be more than 0`);
    return { name, intervalMs, keep: Number(keepText), slaMs: duration('sla') };
  });
}
