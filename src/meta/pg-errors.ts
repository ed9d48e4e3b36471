import { BackyError, DatabaseError } from '../util/errors';
import { enginePasswords, maskEngineUrl } from '../util/secrets';

export { enginePasswords, maskEngineUrl } from '../util/secrets';

/** "host:port/db" and the user of a postgresql:// URL, for messages. */
export function pgTarget(url: string): { where: string; user: string; db: string } {
  try {
    const u = new URL(url);
    const db = decodeURIComponent(u.pathname.replace(/^\//, '')) || decodeURIComponent(u.username) || 'postgres';
    const host = u.hostname || u.searchParams.get('host') || 'localhost';
    return { where: `${host}:${u.port || '5432'}/${db}`, user: decodeURIComponent(u.username) || 'the current user', db };
  } catch {
    return { where: maskEngineUrl(url), user: 'the configured user', db: '?' };
  }
}

const LOST_CODES = new Set(['57P01', '57P02', '57P03', 'ECONNRESET', 'EPIPE', 'ETIMEDOUT', '08006', '08003', '08000']);

/** Whether `e` means the connection to the server is gone (as opposed to an error in one statement). */
export function isConnectionError(e: unknown): boolean {
  const err = e as { code?: string; message?: string };
  if (err?.code && LOST_CODES.has(err.code)) return true;
  if (err?.code === 'ECONNREFUSED' || err?.code === 'ENOTFOUND' || err?.code === 'EAI_AGAIN' || err?.code === 'EHOSTUNREACH') return true;
  return /Connection terminated|connection error|not queryable|Client was closed|terminating connection/i.test(err?.message ?? '');
}

/**
 * Any error of the pg driver as a DatabaseError with one clear line (exit 1), never containing the password.
 * BackyErrors pass through unchanged.
 */
export function pgError(e: unknown, url: string): BackyError {
  if (e instanceof BackyError) return e;
  const err = e as { code?: string; message?: string };
  const t = pgTarget(url);
  const secrets = enginePasswords(url).sort((a, b) => b.length - a.length);
  const clean = (s: string) => {
    let line = String(s ?? '').split('\n')[0];
    for (const pw of secrets) line = line.split(pw).join('***');
    return maskEngineUrl(line);
  };
  const msg = clean(err?.message ?? String(e));
  switch (err?.code) {
    case 'ECONNREFUSED':
      return new DatabaseError(`cannot connect to PostgreSQL at ${t.where}: connection refused (is the server running and listening there?)`);
    case 'ENOTFOUND':
    case 'EAI_AGAIN':
      return new DatabaseError(`cannot connect to PostgreSQL at ${t.where}: unknown host`);
    case 'EHOSTUNREACH':
    case 'ENETUNREACH':
      return new DatabaseError(`cannot connect to PostgreSQL at ${t.where}: host unreachable`);
    case '28P01':
      return new DatabaseError(`PostgreSQL at ${t.where} refused the password of user "${t.user}" (check [MetaBackend] engine)`);
    case '28000':
      return new DatabaseError(`PostgreSQL at ${t.where} refused user "${t.user}": ${msg}`);
    case '3D000':
      return new DatabaseError(`PostgreSQL database "${t.db}" does not exist at ${t.where}: create it (createdb ${t.db}), then run "backy initdb"`);
    case '42P01':
      return new DatabaseError(`PostgreSQL database ${t.where} is not initialized: run "backy initdb"`);
    case '53300':
      return new DatabaseError(`PostgreSQL at ${t.where} has too many connections: ${msg}`);
    default:
      break;
  }
  if (/timeout/i.test(msg) && /connect/i.test(msg)) return new DatabaseError(`cannot connect to PostgreSQL at ${t.where}: timed out`);
  if (isConnectionError(e)) return new DatabaseError(`lost the connection to PostgreSQL at ${t.where}: ${msg}`);
  return new DatabaseError(`PostgreSQL ${t.where}: ${msg}${err?.code && /^[0-9A-Z]{5}$/.test(err.code) ? ` (${err.code})` : ''}`);
}
