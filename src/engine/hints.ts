import * as fs from 'node:fs';
import { IoError } from '../util/errors';

export interface Hint {
  offset: number;
  length: number;
  /** false: the range was discarded (reads as zeroes now); it changed all the same */
  exists: boolean;
}

/**
 * Parses the output of `rbd diff --format=json`: an array of {offset, length, exists} with exists as a
 * boolean or the strings "true"/"false". The whole file is parsed; extents may have any size.
 */
export function parseHints(text: string, source: string): Hint[] {
  let data: unknown;
  try {
    data = JSON.parse(text);
  } catch (e) {
    throw new IoError(`cannot parse hints ${source}: ${(e as Error).message}`);
  }
  if (!Array.isArray(data)) throw new IoError(`cannot parse hints ${source}: expected a JSON array of {offset, length, exists}`);
  return data.map((h, i) => {
    const o = h as Record<string, unknown>;
    const offset = Number(o?.offset);
    const length = Number(o?.length);
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0) {
      throw new IoError(`cannot parse hints ${source}: entry ${i} has no valid offset and length`);
    }
    const ex = o.exists;
    return { offset, length, exists: !(ex === false || ex === 'false') };
  });
}

export function readHints(file: string): Hint[] {
  let text: string;
  try {
    text = file === '-' ? fs.readFileSync(0, 'utf8') : fs.readFileSync(file, 'utf8');
  } catch (e) {
    throw new IoError(`cannot read hints file ${file}: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`);
  }
  return parseHints(text, file);
}

/** Block indices touched by the hints. */
export function hintedBlocks(hints: Hint[], blockSize: number, blocks: number): Set<number> {
  const out = new Set<number>();
  for (const h of hints) {
    if (h.length === 0) continue;
    const first = Math.floor(h.offset / blockSize);
    const last = Math.min(blocks - 1, Math.floor((h.offset + h.length - 1) / blockSize));
    for (let i = first; i <= last; i++) out.add(i);
  }
  return out;
}
