import { PassThroughDevice } from './pass-through';
import type { BlockDevice } from './types';

/**
 * Sees sequential reads and asks the inner device to prefetch what comes next, several blocks in flight.
 * Several streams are tracked at once (nbdcopy reads with many connections, a FUSE reader and a prefetching
 * kernel interleave). The window grows while a stream stays sequential and resets when it jumps. Everything
 * else (writes included) passes through.
 */
export class ReadaheadDevice extends PassThroughDevice {
  private streams: { next: number; window: number; prefetchedTo: number; used: number }[] = [];
  private static readonly MAX_STREAMS = 16;

  constructor(
    next: BlockDevice & { prefetch(offset: number, length: number): Promise<void> },
    private readonly unit: number,
    private readonly maxWindowUnits = 8,
  ) {
    super(next);
  }

  override read(offset: number, length: number): Promise<Buffer> {
    this.observe(offset, length);
    return this.next.read(offset, length);
  }

  private observe(offset: number, length: number): void {
    const end = offset + length;
    // A stream continues when this read starts at (or a little before/after) where it stopped.
    const slack = this.unit;
    let s = this.streams.find((st) => offset >= st.next - slack && offset <= st.next + slack);
    if (!s) {
      s = { next: end, window: 0, prefetchedTo: end, used: Date.now() };
      this.streams.push(s);
      if (this.streams.length > ReadaheadDevice.MAX_STREAMS) {
        this.streams.sort((a, b) => b.used - a.used);
        this.streams.length = ReadaheadDevice.MAX_STREAMS;
      }
      return;
    }
    s.next = Math.max(s.next, end);
    s.used = Date.now();
    s.window = Math.min(this.maxWindowUnits, Math.max(2, s.window * 2));
    const want = Math.min(this.size, s.next + s.window * this.unit);
    const from = Math.max(s.prefetchedTo, s.next);
    if (want > from) {
      s.prefetchedTo = want;
      void this.prefetch(from, want - from);
    }
  }
}
