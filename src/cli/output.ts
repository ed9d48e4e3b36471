import { formatBytes } from '../config/size';
import { fmtDate } from '../util/dates';
import { UsageError } from '../util/errors';
import { escapeText } from '../util/labels';

/** How a command prints results: a table (default), backy2's pipe-separated machine format (-m), or JSON. */
export interface OutputMode {
  machine: boolean;
  skipHeader: boolean;
  human: boolean;
  json: boolean;
}

export type Value = string | number | boolean | null | Date | undefined;

export { fmtDate };

/** A value as machine output and tables show it (escaped: see escapeText; JSON carries values as they are). */
function text(v: Value, human: boolean, isSize: boolean): string {
  if (v === null || v === undefined) return '';
  if (v instanceof Date) return fmtDate(v);
  if (typeof v === 'boolean') return v ? '1' : '0';
  if (isSize && human && typeof v === 'number') return formatBytes(v);
  return escapeText(String(v));
}

function jsonValue(v: Value): unknown {
  if (v instanceof Date) return v.toISOString();
  return v === undefined ? null : v;
}

/**
 * Prints rows. `fields` selects and orders columns; `sizeFields` are humanized with -r; `align` right-aligns
 * numeric columns in tables.
 */
export function printRows(mode: OutputMode, fields: string[], rows: Record<string, Value>[], opts: { sizeFields?: string[]; right?: string[] } = {}): void {
  const sizes = new Set(opts.sizeFields ?? []);
  if (mode.json) {
    process.stdout.write(`${JSON.stringify(rows.map((r) => Object.fromEntries(fields.map((f) => [f, jsonValue(r[f])]))), null, 2)}\n`);
    return;
  }
  const cells = rows.map((r) => fields.map((f) => text(r[f], mode.human, sizes.has(f))));
  if (mode.machine) {
    const lines = mode.skipHeader ? [] : [fields.join('|')];
    for (const c of cells) lines.push(c.join('|'));
    if (lines.length) process.stdout.write(`${lines.join('\n')}\n`);
    return;
  }
  const right = new Set(opts.right ?? []);
  const widths = fields.map((f, k) => Math.max(mode.skipHeader ? 0 : f.length, ...cells.map((c) => c[k].length)));
  const sep = `+${widths.map((w) => '-'.repeat(w + 2)).join('+')}+`;
  const line = (c: string[]) => `| ${c.map((v, k) => (right.has(fields[k]) ? v.padStart(widths[k]) : v.padEnd(widths[k]))).join(' | ')} |`;
  const out = [sep];
  if (!mode.skipHeader) out.push(line(fields), sep);
  for (const c of cells) out.push(line(c));
  out.push(sep);
  process.stdout.write(`${out.join('\n')}\n`);
}

/** A single result object: JSON with --json, else `key|value` lines with -m, else aligned lines. */
export function printObject(mode: OutputMode, obj: Record<string, Value>): void {
  if (mode.json) {
    process.stdout.write(`${JSON.stringify(Object.fromEntries(Object.entries(obj).map(([k, v]) => [k, jsonValue(v)])), null, 2)}\n`);
    return;
  }
  const keys = Object.keys(obj);
  if (mode.machine) {
    if (!mode.skipHeader) process.stdout.write(`${keys.join('|')}\n`);
    process.stdout.write(`${keys.map((k) => text(obj[k], mode.human, false)).join('|')}\n`);
    return;
  }
  const w = Math.max(...keys.map((k) => k.length));
  for (const k of keys) process.stdout.write(`${k.padEnd(w)}  ${text(obj[k], mode.human, false)}\n`);
}

export function parseFields(text: string, available: string[]): string[] {
  const fields = text.split(',').map((f) => f.trim()).filter(Boolean);
  const unknown = fields.filter((f) => !available.includes(f));
  if (unknown.length) {
    throw new UsageError(`unknown field(s) ${unknown.join(', ')}; available: ${available.join(',')}`);
  }
  return fields;
}
