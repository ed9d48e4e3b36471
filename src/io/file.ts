import * as fs from 'node:fs';
import * as fsp from 'node:fs/promises';
import { execFile } from 'node:child_process';
import { IoError } from '../util/errors';
import { log } from '../util/log';
import { zeroes } from '../device/version-device';
import { directView } from '../codec/transfer';
import { native } from '../codec/native';
import { PAGE_CACHE_WRITE } from '../util/fd-io';
import type { Source, Target, TargetOptions } from './types';

/** Size of a regular file or block device (block devices report 0 in stat; sysfs knows). */
async function sizeOf(p: string, st: fs.Stats): Promise<number> {
  if (st.isFile()) return st.size;
  if (st.isBlockDevice()) {
    // Linux dev_t: 12 bits of major at 8..19 plus the rest above bit 32; minor in bits 0..7 and 20..31.
    const major = (Math.floor(st.rdev / 256) & 0xfff) | (Math.floor(st.rdev / 2 ** 32) & ~0xfff);
    const minor = (st.rdev & 0xff) | (Math.floor(st.rdev / 4096) & ~0xff & 0xfffff);
    try {
      const sectors = (await fsp.readFile(`/sys/dev/block/${major}:${minor}/size`, 'utf8')).trim();
      return Number(sectors) * 512;
    } catch (e) {
      throw new IoError(`cannot find the size of block device ${p}: ${(e as Error).message}`);
    }
  }
  throw new IoError(`${p} is neither a regular file nor a block device`);
}

const errCode = (e: unknown) => (e as NodeJS.ErrnoException).code ?? (e as Error).message;

export async function openFileSource(p: string, url: string): Promise<Source> {
  let fh: fsp.FileHandle;
  try {
    fh = await fsp.open(p, 'r');
  } catch (e) {
    throw new IoError(`cannot open source ${p}: ${(e as NodeJS.ErrnoException).code === 'ENOENT' ? 'no such file or device' : (e as Error).message}`);
  }
  try {
    const size = await sizeOf(p, await fh.stat());
    let bytesRead = 0;
    return {
      url,
      size,
      // One reader: the kernel's readahead keeps a sequential file or device busy.
      parallelReads: 1,
      get bytesRead() {
        return bytesRead;
      },
      async read(buf, offset, length) {
        let done = 0;
        while (done < length) {
          let n: number;
          try {
            ({ bytesRead: n } = await fh.read(buf, done, length - done, offset + done));
          } catch (e) {
            throw new IoError(`cannot read source ${p} at offset ${offset + done}: ${errCode(e)}`);
          }
          if (n === 0) throw new IoError(`source ${p} ended at offset ${offset + done}, expected ${size} bytes (truncated while reading?)`);
          done += n;
          bytesRead += n;
        }
      },
      close: () => fh.close(),
    };
  } catch (e) {
    await fh.close();
    throw e;
  }
}

const FALLOC_FL_KEEP_SIZE = 1;
const FALLOC_FL_PUNCH_HOLE = 2;

/**
 * fallocate(2) on an open file: through backy's native module, or util-linux's fallocate program where the
 * module is not built. False when the filesystem cannot.
 */
function fallocate(fh: fsp.FileHandle, p: string, punch: boolean, offset: number, length: number): Promise<boolean> {
  if (native) return Promise.resolve(native.fallocate(fh.fd, punch ? FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE : 0, offset, length) === 0);
  const args = punch ? ['--punch-hole', '--keep-size', '-o', String(offset), '-l', String(length), p] : ['-o', String(offset), '-l', String(length), p];
  return new Promise((resolve) => execFile('fallocate', args, (err) => resolve(!err)));
}

/** Deallocates a range of a file (it reads as zeroes); false when the filesystem cannot. */
const punchHole = (fh: fsp.FileHandle, p: string, offset: number, length: number) => fallocate(fh, p, true, offset, length);

/** Allocates the whole file (unwritten extents, read as zeroes). */
const preallocate = (fh: fsp.FileHandle, p: string, size: number) => fallocate(fh, p, false, 0, size);

/**
 * Opens a restore target. An existing file or device is refused unless `force`; a regular file is created
 * (or truncated) at exactly `size` bytes, so skipped holes stay holes; a block device must be large enough,
 * and is opened exclusively: a device with a mounted filesystem (or held by another program) is refused.
 */
export async function openFileTarget(p: string, url: string, opts: TargetOptions): Promise<Target> {
  const { size, force, sparse } = opts;
  let st: fs.Stats | undefined;
  try {
    st = await fsp.stat(p);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw new IoError(`cannot use target ${p}: ${(e as Error).message}`);
  }
  if (opts.existing && !st) throw new IoError(`target ${p} does not exist`);
  if (st && !force && !opts.existing) throw new IoError(`target ${p} already exists; use -f to overwrite it`);
  let fh: fsp.FileHandle;
  let zeroed = false;
  /** zero() punches holes (an existing file restored with -s) */
  let punch = false;
  let available = size;
  try {
    if (st?.isBlockDevice()) {
      available = await sizeOf(p, st);
      if (available < size) throw new IoError(`target device ${p} has ${available} bytes, the version needs ${size}`);
      try {
        // O_EXCL on a block device (Linux): fails with EBUSY while a filesystem on it is mounted or another
        // program holds it exclusively. Writing under a mounted filesystem would corrupt both.
        fh = await fsp.open(p, fs.constants.O_RDWR | fs.constants.O_EXCL);
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code === 'EBUSY') {
          throw new IoError(`target device ${p} is in use (a mounted filesystem, or held by another program): refusing to overwrite it`);
        }
        throw e;
      }
      if (sparse) log.warn('sparse restore onto a block device: holes are written as zeroes so no old data remains');
    } else {
      if (st && !st.isFile()) throw new IoError(`target ${p} is neither a regular file nor a block device`);
      if (opts.existing) {
        fh = await fsp.open(p, 'r+');
        if (st!.size !== size) await fh.truncate(size);
      } else {
        fh = await fsp.open(p, st ? 'w+' : 'wx+', 0o600);
        await fh.truncate(size);
      }
      // Not sparse: the file gets all its space. fallocate does that without writing gigabytes of zeroes;
      // where the filesystem cannot, the zeroes are written (zeroed stays false).
      zeroed = !opts.existing && (size === 0 || sparse || (await preallocate(fh, p, size)));
      punch = sparse && !!opts.existing;
    }
  } catch (e) {
    if (e instanceof IoError) throw e;
    throw new IoError(`cannot open target ${p}: ${errCode(e)}`);
  }
  let direct = opts.direct ? await DirectWriter.open(p) : undefined;
  // Buffered writes go one at a time, in pieces of PAGE_CACHE_WRITE. Writers of one file in parallel contend
  // for its inode lock, and the kernel spins waiting for it: a restore to the page cache measured 6.5 s (8.6 s
  // of system CPU) with them in parallel and under 2 s with them in a row. With `blockingWrites` they are made
  // on this thread (see TargetOptions).
  let lastBuffered: Promise<void> = Promise.resolve();
  const buffered = (buf: Buffer, offset: number): Promise<void> => {
    const mine = lastBuffered.then(() => writeBuffered(buf, offset));
    lastBuffered = mine.catch(() => undefined);
    return mine;
  };
  const writeBuffered = async (buf: Buffer, offset: number) => {
    let done = 0;
    while (done < buf.length) {
      try {
        const length = Math.min(PAGE_CACHE_WRITE, buf.length - done);
        done += opts.blockingWrites ? fs.writeSync(fh.fd, buf, done, length, offset + done) : (await fh.write(buf, done, length, offset + done)).bytesWritten;
      } catch (e) {
        throw new IoError(`cannot write target ${p} at offset ${offset + done}: ${errCode(e)}`);
      }
    }
  };
  const write = async (buf: Buffer, offset: number) => {
    const aligned = buf.length - (buf.length % DIRECT_ALIGN);
    if (direct && offset % DIRECT_ALIGN === 0 && aligned > 0) {
      try {
        await direct.write(buf.subarray(0, aligned), offset);
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code !== 'EINVAL') throw new IoError(`cannot write target ${p} at offset ${offset}: ${errCode(e)}`);
        // The device wants another alignment: the page cache from here on.
        const d = direct;
        direct = undefined;
        await d.close().catch(() => undefined);
        return buffered(buf, offset);
      }
      if (aligned < buf.length) await buffered(buf.subarray(aligned), offset + aligned);
      return;
    }
    await buffered(buf, offset);
  };
  return {
    url,
    size: available,
    zeroed,
    parallelWrites: 64,
    write,
    async read(buf, offset) {
      let done = 0;
      // What was written around the page cache is read back the same way (a repeated block copied from its
      // first copy): a buffered read would fill the page cache, and read ahead into blocks not written yet.
      const aligned = buf.length - (buf.length % DIRECT_ALIGN);
      if (direct && offset % DIRECT_ALIGN === 0 && aligned > 0) {
        try {
          await direct.read(buf.subarray(0, aligned), offset);
          done = aligned;
        } catch (e) {
          if ((e as NodeJS.ErrnoException).code !== 'EINVAL') throw new IoError(`cannot read target ${p} at offset ${offset}: ${errCode(e)}`);
        }
      }
      while (done < buf.length) {
        let n: number;
        try {
          ({ bytesRead: n } = await fh.read(buf, done, buf.length - done, offset + done));
        } catch (e) {
          throw new IoError(`cannot read target ${p} at offset ${offset + done}: ${errCode(e)}`);
        }
        if (!n) throw new IoError(`target ${p} is shorter than expected at offset ${offset + done}`);
        done += n;
      }
    },
    async zero(offset, length) {
      if (punch && (await punchHole(fh, p, offset, length))) return;
      const step = 4 * 1024 * 1024;
      for (let o = offset; o < offset + length; o += step) await write(zeroes(Math.min(step, offset + length - o)), o);
    },
    async flush() {
      try {
        await fh.sync();
      } catch (e) {
        throw new IoError(`cannot flush target ${p}: ${errCode(e)}`);
      }
    },
    async close() {
      await direct?.close().catch(() => undefined);
      await fh.close();
    },
  };
}

/** WebAssembly's memory object, not in the type libraries this project compiles with. */
const Wasm = (globalThis as unknown as { WebAssembly: { Memory: new (d: { initial: number }) => { buffer: ArrayBuffer } } }).WebAssembly;

/** A page-aligned buffer of `size` bytes (a multiple of 64 KiB). */
function alignedBuffer(size: number): Buffer {
  return Buffer.from(new Wasm.Memory({ initial: size / 65536 }).buffer);
}

/** Offsets, lengths and memory of O_DIRECT writes are multiples of this (any device's logical block size). */
const DIRECT_ALIGN = 4096;
/** Writes go through aligned staging buffers of this size. */
const STAGE = 1024 * 1024;

/**
 * Writes (and reads back) around the page cache: a second descriptor of the target opened with O_DIRECT. Data is copied into
 * page-aligned staging buffers (WebAssembly memory is page-aligned; Node gives no other way to get aligned
 * memory) and written from there. The page cache is not filled with what a restore writes, so nothing is
 * copied into it and written back later: the final fsync has only metadata left to do.
 */
class DirectWriter {
  private readonly spare: Buffer[] = [];

  private constructor(private readonly fh: fsp.FileHandle) {}

  /** undefined where the filesystem refuses O_DIRECT (tmpfs, some FUSE filesystems). */
  static async open(p: string): Promise<DirectWriter | undefined> {
    try {
      return new DirectWriter(await fsp.open(p, fs.constants.O_RDWR | fs.constants.O_DIRECT));
    } catch {
      return undefined;
    }
  }

  /** `buf.length` and `offset` are multiples of DIRECT_ALIGN. */
  async write(buf: Buffer, offset: number): Promise<void> {
    // Aligned memory already (a restore's block buffers): written from where it is, in one request.
    if (directView(buf)) return this.writeAt(buf, buf.length, offset);
    const stage = this.spare.pop() ?? alignedBuffer(STAGE);
    try {
      for (let at = 0; at < buf.length; at += STAGE) {
        const n = Math.min(STAGE, buf.length - at);
        buf.copy(stage, 0, at, at + n);
        await this.writeAt(stage, n, offset + at);
      }
    } finally {
      if (this.spare.length < 16) this.spare.push(stage);
    }
  }

  /** Fills `buf` (its length and `offset` multiples of DIRECT_ALIGN) from the file. */
  async read(buf: Buffer, offset: number): Promise<void> {
    if (directView(buf)) return this.readAt(buf, buf.length, offset);
    const stage = this.spare.pop() ?? alignedBuffer(STAGE);
    try {
      for (let at = 0; at < buf.length; at += STAGE) {
        const n = Math.min(STAGE, buf.length - at);
        await this.readAt(stage, n, offset + at);
        stage.copy(buf, at, 0, n);
      }
    } finally {
      if (this.spare.length < 16) this.spare.push(stage);
    }
  }

  /** The first `length` bytes of aligned `buf` to the file at `position`; a short write is EIO. */
  private async writeAt(buf: Buffer, length: number, position: number): Promise<void> {
    for (let done = 0; done < length;) {
      const { bytesWritten } = await this.fh.write(buf, done, length - done, position + done);
      if (bytesWritten <= 0 || bytesWritten % DIRECT_ALIGN) throw Object.assign(new Error('short direct write'), { code: 'EIO' });
      done += bytesWritten;
    }
  }

  /** `length` bytes from the file at `position` into aligned `buf`; a short read is EIO. */
  private async readAt(buf: Buffer, length: number, position: number): Promise<void> {
    for (let done = 0; done < length;) {
      const { bytesRead } = await this.fh.read(buf, done, length - done, position + done);
      if (bytesRead <= 0 || bytesRead % DIRECT_ALIGN) throw Object.assign(new Error('short direct read'), { code: 'EIO' });
      done += bytesRead;
    }
  }

  close(): Promise<void> {
    return this.fh.close();
  }
}
