import { Packr } from 'msgpackr';

/**
 * backy2 dated every block row of a version (the moment the row was written), and its exports print those
 * dates to the second. An imported version keeps them so `export` reproduces backy2's files byte for byte.
 * They are seconds after the version's own second, run-length coded over the blocks in order: a backup
 * writes dozens of blocks per second, so a 100 GiB version takes a few hundred bytes. Blocks without a row
 * have no date (null). Versions whose blocks all share the version's second store nothing.
 */
const packr = new Packr({ useRecords: false });

/** Encodes per-block dates (ms, or NaN for none) relative to `versionDate`; undefined when nothing differs. */
export function encodeBlockDates(versionDate: number, dates: Float64Array): Buffer | undefined {
  const base = Math.floor(versionDate / 1000);
  const runs: (number | null)[] = [];
  let differs = false;
  let prev: number | null | undefined;
  let count = 0;
  const flush = () => {
    if (count) runs.push(prev!, count);
  };
  for (let i = 0; i < dates.length; i++) {
    const d = Number.isNaN(dates[i]) ? null : Math.floor(dates[i] / 1000) - base;
    if (d !== null && d !== 0) differs = true;
    if (d === prev) {
      count++;
      continue;
    }
    flush();
    prev = d;
    count = 1;
  }
  flush();
  return differs ? packr.pack(runs) : undefined;
}

/** The dates (ms, whole seconds, NaN for none) of `blocks` blocks; without data every block has the version's second. */
export function decodeBlockDates(versionDate: number, blocks: number, data: Uint8Array | undefined): Float64Array {
  const base = Math.floor(versionDate / 1000) * 1000;
  const out = new Float64Array(blocks).fill(base);
  if (!data) return out;
  const runs = packr.unpack(data) as (number | null)[];
  if (!Array.isArray(runs) || runs.length % 2) throw new Error('corrupt block dates');
  let at = 0;
  for (let k = 0; k < runs.length && at < blocks; k += 2) {
    const d = runs[k];
    const n = Number(runs[k + 1]);
    out.fill(d === null ? NaN : base + d * 1000, at, Math.min(blocks, at + n));
    at += n;
  }
  return out;
}
