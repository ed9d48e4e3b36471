import type { BlockDevice } from '../device/types';
import { replyBuffers } from '../device/reply-buffers';
import type { VersionRow } from '../meta/types';

interface OpenImage {
  device: BlockDevice;
  version: VersionRow;
}

/**
 * Images opened through the mount, by file handle. Each open gets its own device stack (its own readahead
 * streams) over the mount's one shared block cache; release closes it.
 */
export class OpenImages {
  private handles = new Map<number, OpenImage>();
  private next = 1;

  /** `openDevice` resolves once the device may be read (its version held), or rejects: the open fails then. */
  constructor(private readonly openDevice: (v: VersionRow) => BlockDevice | Promise<BlockDevice>) {}

  async open(version: VersionRow): Promise<number> {
    const device = await this.openDevice(version);
    // Handles are 32-bit and 0 means "none" to fuse-native.
    while (this.handles.has(this.next) || this.next === 0) this.next = (this.next + 1) >>> 0;
    const fh = this.next;
    this.next = (this.next + 1) >>> 0;
    this.handles.set(fh, { device, version });
    return fh;
  }

  get(fh: number): OpenImage | undefined {
    return this.handles.get(fh);
  }

  get count(): number {
    return this.handles.size;
  }

  async release(fh: number): Promise<void> {
    const img = this.handles.get(fh);
    this.handles.delete(fh);
    await img?.device.close?.();
  }
}

/**
 * Reads `len` bytes at `pos` of `device` (clipped at its end) straight into `buf`, the kernel request's
 * buffer. The range is split at block boundaries: a read within one block is a view of the cached block,
 * so each byte is copied once, from the cache into `buf`. Resolves only when no piece can touch `buf` any
 * more. `owned()` says whether `buf` is still ours: once the request has been answered (a timeout), libfuse
 * frees it, so every copy checks, in the same tick as it writes.
 */
export async function readInto(device: BlockDevice, blockSize: number, buf: Buffer, len: number, pos: number, owned: () => boolean = () => true): Promise<number> {
  const n = Math.max(0, Math.min(len, device.size - pos));
  if (n === 0) return 0;
  const end = pos + n;
  const firstBlockEnd = (Math.floor(pos / blockSize) + 1) * blockSize;
  if (end <= firstBlockEnd) {
    const data = await device.read(pos, n);
    if (owned()) data.copy(buf, 0, 0, n);
    replyBuffers.give(data);
    return n;
  }
  const pieces: Promise<void>[] = [];
  for (let from = pos; from < end;) {
    const to = Math.min(end, (Math.floor(from / blockSize) + 1) * blockSize);
    const at = from - pos;
    const n = to - from;
    pieces.push(device.read(from, n).then((data) => {
      if (owned()) data.copy(buf, at, 0, n);
      replyBuffers.give(data);
    }));
    from = to;
  }
  const results = await Promise.allSettled(pieces);
  const failed = results.find((r): r is PromiseRejectedResult => r.status === 'rejected');
  if (failed) throw failed.reason;
  return n;
}
