import type { VersionDevice } from '../device/version-device';
import type { BlobRef } from '../meta/types';
import { errorLine } from '../util/errors';

/**
 * One step of a restore, in block-map order:
 * - `data`: a block with a blob (the copier decides whether it repeats a blob already copied);
 * - `hole`: `count` consecutive blocks that read as zeroes (one zeroing request for the whole run);
 * - `missing`: a block that cannot be restored (never backed up, or its map entry unreadable): reported with
 *   its offset, and zeroed like a hole so no old data stays behind.
 */
export type PlanStep =
  | { kind: 'data'; index: number; ref: BlobRef }
  | { kind: 'hole'; index: number; count: number }
  | { kind: 'missing'; index: number; message: string };

/** Longest run of holes in one step: a zeroing request stays bounded, and progress moves. */
const MAX_HOLE_RUN = 256;

/** The single step for block `index` (what a prioritised request needs). */
export async function planBlock(dev: VersionDevice, index: number): Promise<PlanStep> {
  const offset = index * dev.blockSize;
  try {
    const slot = await dev.slot(index);
    if (slot.kind === 'data') return { kind: 'data', index, ref: slot.ref };
    if (slot.kind === 'hole') return { kind: 'hole', index, count: 1 };
    return { kind: 'missing', index, message: `block at offset ${offset} was never backed up (incomplete version)` };
  } catch (e) {
    return { kind: 'missing', index, message: errorLine(e) };
  }
}

/**
 * Walks the version's block map from `from` to the end and says what each block needs. Reads only metadata
 * (a map chunk at a time, through the device's chunk cache).
 */
export async function* planRestore(dev: VersionDevice, from = 0, maxHoleRun = MAX_HOLE_RUN): AsyncGenerator<PlanStep> {
  let held: PlanStep | undefined;
  for (let i = from; i < dev.blocks; i++) {
    const step = await planBlock(dev, i);
    if (step.kind === 'hole' && held?.kind === 'hole' && held.count < maxHoleRun) {
      held.count++;
      continue;
    }
    if (held) yield held;
    held = step;
  }
  if (held) yield held;
}
