import { createHash } from 'node:crypto';
import { Packr } from 'msgpackr';

/**
 * A version's block map as a multiset of distinct chunk contents. Differential versions copy their base's
 * chunks byte for byte and a sparse image's empty chunks are all alike, so a repository of thousands of
 * 1 TiB versions has few distinct chunks: `du` decodes each distinct chunk once and counts the rest.
 *
 * A complete version's map never changes, so its summary is computed once (when the version becomes
 * complete, or on first use) and kept in map_summaries; running and interrupted versions are summarized
 * afresh each time.
 */
export interface MapSummary {
  /** the distinct chunk contents: digest (hex), how many chunks have it, the first chunk number that has it */
  chunks: { digest: string; count: number; chunk: number }[];
  /** digest of the map's last chunk ('' for an empty map) */
  last: string;
}

/** Everything `du` needs, read in one consistent snapshot. */
export interface MapUsage {
  /** every version's summary, by version id */
  summaries: Map<number, MapSummary>;
  /** the encoded chunk of every digest the summaries mention */
  contents: Map<string, Uint8Array>;
  /** every blob not being deleted (parallel arrays): id, plaintext size, stored size */
  blobs: { ids: Float64Array; sizes: Float64Array; stored: Float64Array };
}

const packr = new Packr({ useRecords: false });

/** 128 bits of sha256: an identity for chunk contents, not a security boundary. */
export function chunkDigest(raw: Uint8Array): string {
  return createHash('sha256').update(raw).digest('hex').slice(0, 32);
}

/** The summary of a map from its chunk rows (any order). `keep` receives each distinct chunk's bytes once. */
export function summarizeChunks(rows: Iterable<{ chunk: number; data: Uint8Array }>, keep?: (digest: string, data: Uint8Array) => void): MapSummary {
  const byDigest = new Map<string, { digest: string; count: number; chunk: number }>();
  let lastChunk = -1;
  let last = '';
  for (const r of rows) {
    const digest = chunkDigest(r.data);
    const e = byDigest.get(digest);
    if (e) {
      e.count++;
      if (r.chunk < e.chunk) e.chunk = r.chunk;
    } else {
      byDigest.set(digest, { digest, count: 1, chunk: r.chunk });
      keep?.(digest, r.data);
    }
    if (r.chunk > lastChunk) {
      lastChunk = r.chunk;
      last = digest;
    }
  }
  return { chunks: [...byDigest.values()].sort((a, b) => a.chunk - b.chunk), last };
}

export function encodeSummary(s: MapSummary): Buffer {
  return packr.pack([s.chunks.map((c) => [Buffer.from(c.digest, 'hex'), c.count, c.chunk]), s.last]);
}

export function decodeSummary(data: Uint8Array): MapSummary {
  const v = packr.unpack(data) as [[Uint8Array, number, number][], string];
  if (!Array.isArray(v) || !Array.isArray(v[0])) throw new Error('corrupt map summary');
  return { chunks: v[0].map(([d, count, chunk]) => ({ digest: Buffer.from(d).toString('hex'), count, chunk })), last: v[1] };
}

/** MapUsage's blob arrays from "id,size,stored,id,size,stored,..." (how both stores read them: one value, not a row per blob). */
export function blobSizesFromTriples(text: string): MapUsage['blobs'] {
  const flat = JSON.parse(`[${text}]`) as number[];
  if (flat.length % 3) throw new Error('corrupt blob size list');
  const n = flat.length / 3;
  const out = { ids: new Float64Array(n), sizes: new Float64Array(n), stored: new Float64Array(n) };
  for (let k = 0; k < n; k++) {
    out.ids[k] = flat[3 * k];
    out.sizes[k] = flat[3 * k + 1];
    out.stored[k] = flat[3 * k + 2];
  }
  return out;
}
