import { createHash } from 'node:crypto';

/**
 * Version names become file and directory names. Any string is a valid version name, but a path component
 * cannot contain `/` or NUL, cannot be `.` or `..`, and is at most 255 bytes. Percent-encoding the
 * offending characters (and `%` itself) keeps the mapping reversible and leaves ordinary names unchanged.
 */
const MAX_COMPONENT_BYTES = 255;

function needsEscape(ch: string): boolean {
  const c = ch.codePointAt(0)!;
  return ch === '%' || ch === '/' || c < 0x20 || c === 0x7f;
}

function percent(ch: string): string {
  return [...Buffer.from(ch, 'utf8')].map((b) => `%${b.toString(16).toUpperCase().padStart(2, '0')}`).join('');
}

/**
 * The path component for `name`, with room for `suffix` (e.g. ".img") within the 255-byte limit. Names so
 * long that they do not fit are cut and end in `%~` and a hash of the whole name: still unique, no longer
 * reversible (the `name` info file holds the real one).
 */
export function escapeName(name: string, suffix = ''): string {
  let out = '';
  for (const ch of name) out += needsEscape(ch) ? percent(ch) : ch;
  if (out === '' || out === '.' || out === '..') out = out.replace(/\./g, '%2E') || '%';
  if (Buffer.byteLength(out + suffix) <= MAX_COMPONENT_BYTES) return out + suffix;
  const tail = `%~${createHash('sha256').update(name).digest('hex').slice(0, 16)}`;
  const room = MAX_COMPONENT_BYTES - Buffer.byteLength(tail + suffix);
  let cut = '';
  for (const ch of out) {
    if (Buffer.byteLength(cut + ch) > room) break;
    cut += ch;
  }
  // Never end in half an escape sequence.
  cut = cut.replace(/%[0-9A-F]?$/, '');
  return cut + tail + suffix;
}

/** The name an escaped component stands for (the inverse of escapeName for names that were not cut). */
export function unescapeName(component: string): string {
  if (component === '%') return '';
  const bytes: number[] = [];
  const raw = Buffer.from(component, 'utf8');
  for (let i = 0; i < raw.length; i++) {
    const hex = raw.subarray(i + 1, i + 3).toString('latin1');
    if (raw[i] === 0x25 && /^[0-9A-F]{2}$/.test(hex)) {
      bytes.push(parseInt(hex, 16));
      i += 2;
    } else {
      bytes.push(raw[i]);
    }
  }
  return Buffer.from(bytes).toString('utf8');
}
