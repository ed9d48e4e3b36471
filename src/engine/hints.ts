import * as fs from 'node:fs';
import type { ChangedRange, ChangeSupplier } from '../io/types';
import { IoError } from '../util/errors';

/** A range rbd diff reports as changed. */
export type Hint = ChangedRange;

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

/** rbd diff output as a supplier of changed ranges. */
export function hintChanges(hints: Hint[]): ChangeSupplier {
  return { describe: 'the hints', ranges: async () => hints };
}

/** The source's own dirty bitmap (a QEMU bitmap over NBD) as a supplier of changed ranges. */
export function bitmapChanges(name: string): ChangeSupplier {
  return {
    describe: `dirty bitmap ${name}`,
    async ranges(source) {
      if (!source.changedRanges) throw new IoError(`${source.url} has no dirty bitmap ${name}`);
      return source.changedRanges();
    },
  };
}

/** Block indices touched by changed ranges. */
export function hintedBlocks(hints: ChangedRange[], blockSize: number, blocks: number): Set<number> {
  const out = new Set<number>();
  for (const h of hints) {
    if (h.length === 0) continue;
    const first = Math.floor(h.offset / blockSize);
    const last = Math.min(blocks - 1, Math.floor((h.offset + h.length - 1) / blockSize));
    for (let i = first; i <= last; i++) out.add(i);
  }
  return out;
}
