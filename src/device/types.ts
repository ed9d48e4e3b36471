/**
 * A backup version, seen as a block device. Everything that reads backups (restore, scrub, the NBD server,
 * the FUSE mount) goes through this interface; features are layers that wrap one device in another.
 */

/** A run of the device that is either data or known to read as zeroes (a hole). */
export interface Extent {
  offset: number;
  length: number;
  /** true when the range reads as zeroes and nothing is stored for it. */
  zero: boolean;
}

/** Options of a write, zero or trim. */
export interface WriteOptions {
  /** Force unit access: the data is durable when the promise resolves. */
  fua?: boolean;
}

export interface ZeroOptions extends WriteOptions {
  /** The range must stay allocated (NBD's NO_HOLE): write zeroes rather than punch a hole. */
  noHole?: boolean;
  /** Fail at once with ENOTSUP unless zeroing is faster than writing zeroes (NBD's FAST_ZERO). */
  fast?: boolean;
}

export interface BlockDevice {
  /** Size in bytes; need not be a multiple of any block size. */
  readonly size: number;
  /** Reads exactly `length` bytes at `offset` (the caller keeps within `size`). */
  read(offset: number, length: number): Promise<Buffer>;
  /** Data and zero runs covering [offset, offset+length), answered from metadata without reading data. */
  extents(offset: number, length: number): Promise<Extent[]>;
  /** Hint that the range will be read soon: fetch it into the cache. Optional. */
  prefetch?(offset: number, length: number): Promise<void>;
  // Writable devices only. A writable device without flush() makes every write durable before it resolves.
  write?(offset: number, data: Buffer, opts?: WriteOptions): Promise<void>;
  /** The range reads as zeroes afterwards. */
  zero?(offset: number, length: number, opts?: ZeroOptions): Promise<void>;
  /** The range is no longer needed: its content is unspecified afterwards (it may also stay as it was). */
  trim?(offset: number, length: number, opts?: WriteOptions): Promise<void>;
  /** Every write that resolved before the call is durable when this resolves. */
  flush?(): Promise<void>;
  /**
   * What the device can do. Leaf devices may leave it out: their methods say it (see capabilitiesOf).
   * Layers answer it, usually by asking the device below (PassThroughDevice does).
   */
  capabilities?(): DeviceCapabilities;
  /** Releases what the device holds (not the shared cache). Optional. */
  close?(): Promise<void>;
}

/** What a device supports beyond reading, the way nbdkit's can_write/can_flush/... describe a plugin. */
export interface DeviceCapabilities {
  /** write() is served; without it the device is read-only. */
  write: boolean;
  /** zero() is served natively (a front end may otherwise write zero buffers). */
  zero: boolean;
  /** trim() is served. */
  trim: boolean;
  /** flush() is served (a writable device without it makes each write durable before it resolves). */
  flush: boolean;
  /** write/zero/trim honour `fua` themselves; otherwise a front end flushes after a FUA request. */
  fua: boolean;
  /** zero() honours `fast` (fails at once with ENOTSUP when it would not be faster than a write). */
  fastZero: boolean;
  /** Every user of this one device object sees the same data (what one flushes, all read). */
  multiConn: boolean;
  /** prefetch() is served. */
  prefetch: boolean;
}

/** The capabilities a device declares, or those its methods imply. */
export function capabilitiesOf(d: BlockDevice): DeviceCapabilities {
  if (typeof d.capabilities === 'function') return d.capabilities();
  const write = typeof d.write === 'function';
  return {
    write,
    zero: write && typeof d.zero === 'function',
    trim: write && typeof d.trim === 'function',
    flush: typeof d.flush === 'function',
    fua: false,
    fastZero: false,
    multiConn: true,
    prefetch: typeof d.prefetch === 'function',
  };
}

/**
 * An error of one device operation. `errno` says what a protocol front end should answer (EIO for a block
 * that cannot be fetched or fails verification, EPERM for a write to a read-only device, EINVAL for a range
 * outside the device); `offset`, when known, is the first byte that could not be read.
 */
export class DeviceError extends Error {
  constructor(
    message: string,
    readonly errno: 'EIO' | 'EPERM' | 'EINVAL' | 'ENOSPC' | 'ENOTSUP' = 'EIO',
    readonly offset?: number,
  ) {
    super(message);
    this.name = 'DeviceError';
  }
}

/** What a server exports: a set of named devices. Implemented by the backup side; the NBD server and the FUSE
 * mount only see this. */
export interface ExportInfo {
  name: string;
  description: string;
}

export interface ExportCatalogue {
  list(): Promise<ExportInfo[]>;
  /** Opens the named export, or returns undefined when there is no such export. */
  open(name: string): Promise<{ device: BlockDevice; description: string } | undefined>;
  /**
   * Whether the export still exists. A server that shares one open device among connections asks this before
   * letting another connection join it (an export removed meanwhile is not offered to new clients).
   * Optional: without it, joining is always allowed.
   */
  exists?(name: string): Promise<boolean>;
}
