import type { Extent } from '../src/device/types';

/**
 * Turns what a device reports for [offset, offset+length) into a sorted, gap-free, merged list clipped to that
 * range. Only zero runs are trusted: anything not covered by a zero run is data. Zero runs are shrunk inward
 * to `align` boundaries where they start or end inside the range (the export end counts as aligned), so
 * partially-zero sectors are reported as data.
 */
export function normalizeExtents(raw: readonly Extent[], offset: number, length: number, size: number, align: number): Extent[] {
  const end = offset + length;
  const out: Extent[] = [];
  const push = (o: number, l: number, zero: boolean): void => {
    if (l <= 0) return;
    const last = out[out.length - 1];
    if (last && last.zero === zero && last.offset + last.length === o) last.length += l;
    else out.push({ offset: o, length: l, zero });
  };
  let sorted = raw;
  for (let i = 1; i < raw.length; i++) {
    if (raw[i].offset < raw[i - 1].offset) {
      sorted = [...raw].sort((a, b) => a.offset - b.offset);
      break;
    }
  }
  let pos = offset;
  for (const e of sorted) {
    if (!e.zero || !(e.length > 0)) continue;
    // Boundaries at or beyond the request's own edges are not shrunk: devices usually clip extents to the
    // query, and the first/last descriptor of an unaligned query may be unaligned anyway.
    const a = e.offset <= pos ? pos : Math.ceil(e.offset / align) * align;
    let b = e.offset + e.length;
    if (b >= end) b = end;
    else if (b < size) b = Math.floor(b / align) * align;
    if (b <= a) continue;
    push(pos, a - pos, false);
    push(a, b - a, true);
    pos = b;
  }
  push(pos, end - pos, false);
  return out;
}
