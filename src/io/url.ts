import * as path from 'node:path';
import { IoError } from '../util/errors';

/**
 * Sources and targets are URLs (file:///dev/sda, file:///images/vm.img, nbd://host/export); a plain path
 * (no `scheme://`) means that file, taken literally.
 */
export interface IoUrl {
  /** lower case, without "://" */
  scheme: string;
  /** the URL as given */
  url: string;
  /** everything after "scheme://" */
  rest: string;
  /** a plain path given instead of a URL (taken literally, no escapes) */
  path?: string;
}

export function splitScheme(url: string): IoUrl {
  if (!url) throw new IoError('empty source/target');
  const m = /^([a-z][a-z0-9+.-]*):\/\/(.*)$/is.exec(url);
  if (!m) return { scheme: 'file', url, rest: '', path: path.resolve(url) };
  return { scheme: m[1].toLowerCase(), url, rest: m[2] };
}

/**
 * Decodes %XX escapes (RFC 3986) into UTF-8 text. A `%` that does not start an escape, or escapes that are not
 * UTF-8, are an error (one line, exit 1), never a guess: `50%.raw` must be written `50%25.raw`.
 */
export function percentDecode(s: string, what: string): string {
  if (!s.includes('%')) return s;
  const bytes: number[] = [];
  const out: string[] = [];
  const flush = () => {
    if (!bytes.length) return;
    const b = Buffer.from(bytes);
    const text = b.toString('utf8');
    if (!Buffer.from(text, 'utf8').equals(b)) throw new IoError(`${what}: percent escapes that are not UTF-8 text`);
    out.push(text);
    bytes.length = 0;
  };
  for (let i = 0; i < s.length; i++) {
    if (s[i] === '%') {
      const hex = s.slice(i + 1, i + 3);
      if (!/^[0-9a-f]{2}$/i.test(hex)) {
        throw new IoError(`${what}: "%" must start an escape like %20 (write a literal % as %25)`);
      }
      bytes.push(parseInt(hex, 16));
      i += 2;
    } else {
      flush();
      out.push(s[i]);
    }
  }
  flush();
  if (out.join('').includes('\0')) throw new IoError(`${what}: a path cannot contain %00`);
  return out.join('');
}

/**
 * The local path of a file URL (RFC 8089): `file:///abs/path` or `file://localhost/abs/path`, percent escapes
 * decoded. A host part names another machine: refused, never read as a relative path.
 */
export function fileUrlPath(u: IoUrl): string {
  if (u.path !== undefined) return u.path;
  const rest = u.rest;
  const slash = rest.indexOf('/');
  const host = slash < 0 ? rest : rest.slice(0, slash);
  if (host && host.toLowerCase() !== 'localhost') {
    throw new IoError(`${u.url}: file URLs name local files only (file:///path), not a host ("${host}")`);
  }
  const p = slash < 0 ? '' : rest.slice(slash);
  if (!p || p === '/') throw new IoError(`no path in ${u.url}`);
  const q = /[?#]/.exec(p);
  if (q) throw new IoError(`${u.url}: a file URL has no ${q[0] === '?' ? 'query' : 'fragment'}; write "${q[0]}" in a file name as ${q[0] === '?' ? '%3F' : '%23'}`);
  return path.resolve(percentDecode(p, u.url));
}

/** The scheme and, for a file URL or plain path, the local path (kept for callers that handle files only). */
export function parseIoUrl(url: string): { scheme: string; path: string } {
  const u = splitScheme(url);
  if (u.scheme !== 'file') return { scheme: u.scheme, path: '' };
  return { scheme: 'file', path: fileUrlPath(u) };
}
