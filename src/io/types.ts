/**
 * What a backup reads from and a restore writes to, whatever the URL scheme (file://, nbd://, ...). Openers
 * live in one module per scheme; `registry.ts` picks the opener by scheme.
 */
import type { Extent } from '../device/types';

export type { Extent };

/** A byte range that changed since some earlier point (rbd diff, a QEMU dirty bitmap). */
export interface ChangedRange {
  offset: number;
  length: number;
  /** false: the range was discarded (reads as zeroes now); it changed all the same */
  exists: boolean;
}

export interface Source {
  /** The URL as given (for messages; never holds secrets). */
  readonly url: string;
  readonly size: number;
  /** How many reads in flight pay off (1 for a local file: the page cache reads ahead; more over a network). */
  readonly parallelReads: number;
  /** Reads exactly `length` bytes at `offset` into `buf`; a short read (source shrank) is an IoError. */
  read(buf: Buffer, offset: number, length: number): Promise<void>;
  /** Data and zero runs (zero: reads as zeroes, need not be read). Absent: everything is data. */
  extents?(offset: number, length: number): Promise<Extent[]>;
  /** Present when the source tracks changes itself (a dirty bitmap): the ranges changed since tracking began. */
  changedRanges?(): Promise<ChangedRange[]>;
  /** Bytes read from the source so far (what crossed the wire for a network source). */
  readonly bytesRead: number;
  close(): Promise<void>;
}

/** Where a set of changed ranges comes from (rbd diff output, a dirty bitmap of the source). */
export interface ChangeSupplier {
  /** For messages: "the hints", "dirty bitmap backy-2". */
  readonly describe: string;
  ranges(source: Source): Promise<ChangedRange[]>;
}

export interface SourceOptions {
  /** Ask the source for this QEMU dirty bitmap (NBD: the qemu:dirty-bitmap:NAME context). */
  bitmap?: string;
  tls?: TlsFiles;
}

/** TLS credentials for nbds:// (the same files the NBD server takes). */
export interface TlsFiles {
  /** psktool key file: lines of `identity:hexkey` */
  pskFile?: string;
  /** directory with ca-cert.pem (and client-cert.pem / client-key.pem when the server asks for them) */
  certificatesDir?: string;
}

export interface TargetOptions {
  /** bytes the restore needs: a smaller target is refused */
  size: number;
  /** an existing file or a device (or an NBD export that holds data) may be overwritten */
  force: boolean;
  /** -s: holes stay holes (a sparse file); otherwise the space is allocated */
  sparse: boolean;
  /**
   * Keep what the target holds (delta restore, a live restore continued): an existing file or device is
   * opened as it is, without -f and without truncating it (a file is only cut or extended to `size`); a
   * missing target is an error. With `sparse`, zeroing a file's range punches a hole.
   */
  existing?: boolean;
  /**
   * The caller flushes when it needs durability (a plain restore at the end, a live restore at checkpoints):
   * aligned writes and reads may go around the page cache (O_DIRECT), which saves copying every byte into it
   * only to write it out at the flush (fresh page-cache pages are dear on VMs). Linux keeps such a file
   * coherent with the buffered I/O used for unaligned pieces.
   */
  direct?: boolean;
  /**
   * Nothing else in the process waits on its event loop (a plain restore): writes through the page cache are
   * made on the calling thread. They go one at a time in pieces (see openFileTarget), and a trip through the
   * thread pool for each piece made that chain what limited a restore: 2 GiB --no-sync copied in 1.24-1.32 s
   * that way, in 0.93-0.96 s with the writes made in place.
   */
  blockingWrites?: boolean;
  tls?: TlsFiles;
}

export interface Target {
  readonly url: string;
  /** Bytes available (at least the size asked for). */
  readonly size: number;
  /**
   * True when every range not written reads as zeroes (a file just created or truncated, preallocated or
   * sparse; an NBD export that reads as zeroes throughout): holes need no work at all.
   */
  readonly zeroed: boolean;
  /** How many writes in flight pay off. */
  readonly parallelWrites: number;
  write(buf: Buffer, offset: number): Promise<void>;
  /** Reads back what is in the target (repeated blocks are copied from their first copy; delta restore). */
  read(buf: Buffer, offset: number): Promise<void>;
  /** Makes the range read as zeroes: WRITE_ZEROES (the server may leave a hole) or written zeroes. */
  zero(offset: number, length: number): Promise<void>;
  /** Makes everything written durable. */
  flush(): Promise<void>;
  /** Releases the target (no flush: call flush first when the data must be durable). */
  close(): Promise<void>;
}
