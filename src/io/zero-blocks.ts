import type { Source } from './types';

/**
 * Which blocks of a source read as zeroes, from the source's extents (NBD base:allocation), asked for one
 * window at a time as a backup walks forward: a block that is all hole need not be read. Blocks asked for out
 * of order just move the window.
 */
export class ZeroBlocks {
  private windowFirst = -1;
  private zero = new Uint8Array(0);
  private readonly perWindow: number;

  constructor(private readonly source: Source & Required<Pick<Source, 'extents'>>, private readonly blockSize: number, windowBytes = 1024 ** 3) {
    this.perWindow = Math.max(1, Math.floor(windowBytes / blockSize));
  }

  /** True when block `index` lies entirely in zero extents. */
  async isZero(index: number): Promise<boolean> {
    if (this.windowFirst < 0 || index < this.windowFirst || index >= this.windowFirst + this.zero.length) await this.load(index);
    return this.zero[index - this.windowFirst] === 1;
  }

  private async load(first: number): Promise<void> {
    const bs = this.blockSize;
    const start = first * bs;
    const end = Math.min(this.source.size, start + this.perWindow * bs);
    // Blocks count as zero only when zero extents cover them entirely; anything not covered is data.
    const flags = new Uint8Array(Math.ceil((end - start) / bs));
    for (const e of await this.source.extents(start, end - start)) {
      if (!e.zero) continue;
      const a = Math.ceil((e.offset - start) / bs);
      const b = e.offset + e.length >= end ? flags.length : Math.floor((e.offset + e.length - start) / bs);
      if (b > a) flags.fill(1, Math.max(0, a), Math.min(flags.length, b));
    }
    this.windowFirst = first;
    this.zero = flags;
  }
}
