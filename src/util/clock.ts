import { ConfigError } from './errors';

/**
 * The current time in ms since the epoch (UTC). Everything that dates versions or judges their age (backup,
 * rm, ls -e, due, sla, enforce, automatic tags) asks here, so tests can fix "now".
 *
 * BACKY_TEST_NOW is for tests only: an ISO 8601 time ("2020-12-31T00:00:00Z"; without a zone it is UTC) or
 * ms since the epoch. Never set it in production: versions would get that date.
 */
export function now(): number {
  const fixed = process.env.BACKY_TEST_NOW;
  if (fixed === undefined || fixed === '') return Date.now();
  const t = /^\d+$/.test(fixed) ? Number(fixed) : Date.parse(/[zZ]|[+-]\d\d:?\d\d$/.test(fixed) ? fixed : `${fixed}Z`);
  if (!Number.isFinite(t)) throw new ConfigError(`invalid BACKY_TEST_NOW "${fixed}" (test only): expected an ISO 8601 time or ms since the epoch`);
  return t;
}
