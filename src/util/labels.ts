import { BackyError, ExitCode } from './errors';

/**
 * Names, snapshot names and tags are printed in backy2's machine format (`|`-separated columns, one row per
 * line) that scripts parse, and in tables on terminals. `|` would forge a column; line breaks and other
 * control characters would forge rows or send terminal escapes. Such labels are refused when they are given;
 * labels already in a database are escaped on output (see escapeText).
 */
const FORBIDDEN = /[|\p{Cc}\u2028\u2029]/u;

/** A control character or `|` spelled out, e.g. `"\n" (U+000A)`. */
function describe(c: string): string {
  return `${JSON.stringify(c)} (U+${c.codePointAt(0)!.toString(16).toUpperCase().padStart(4, '0')})`;
}

/** Refuses a label (exit 1, one line) that contains `|` or a control character. */
export function checkLabel(kind: 'name' | 'snapshot name' | 'tag', value: string): void {
  const m = FORBIDDEN.exec(value);
  if (!m) return;
  throw new BackyError(`invalid ${kind} "${escapeText(value).slice(0, 80)}": it contains ${describe(m[0])}; ` +
    'names, snapshot names and tags may not contain "|" or control characters', ExitCode.CONFIG);
}

const ESCAPES: Record<string, string> = { '\\': '\\\\', '|': '\\|', '\n': '\\n', '\r': '\\r', '\t': '\\t' };

/**
 * A value as machine output and tables print it: backslash, `|` and control characters escaped C-style
 * (`\\`, `\|`, `\n`, `\u001b`), so no value can add a column or a row. Values without them print unchanged.
 */
export function escapeText(s: string): string {
  return s.replace(/[\\|\p{Cc}\u2028\u2029]/gu, (c) => ESCAPES[c] ?? `\\u${c.codePointAt(0)!.toString(16).padStart(4, '0')}`);
}
