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

export interface BlockDevice {
  /** Size in bytes; need not be a multiple of any block size. */
  readonly size: number;
  /** Reads exactly `length` bytes at `offset` (the caller keeps within `size`). */
  read(offset: number, length: number): Promise<Buffer>;
  /** Data and zero runs covering [offset, offset+length), answered from metadata without reading data. */
  extents(offset: number, length: number): Promise<Extent[]>;
  /** Hint that the range will be read soon: fetch it into the cache. Optional. */
  prefetch?(offset: number, length: number): Promise<void>;
  // Writable layers only.
  write?(offset: number, data: Buffer): Promise<void>;
  zero?(offset: number, length: number): Promise<void>;
  flush?(): Promise<void>;
  /** Releases what the device holds (not the shared cache). Optional. */
  close?(): Promise<void>;
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
}
