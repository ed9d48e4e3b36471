import * as fs from 'node:fs';
import * as fsp from 'node:fs/promises';
import { execFile } from 'node:child_process';
import { IoError } from '../util/errors';
import { parseIoUrl } from './url';

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

export interface Source {
  readonly url: string;
  readonly size: number;
  /** Reads exactly `length` bytes at `offset` into `buf`; a short read (source shrank) is an IoError. */
  read(buf: Buffer, offset: number, length: number): Promise<void>;
  close(): Promise<void>;
}

export async function openSource(url: string): Promise<Source> {
  const { path: p } = parseIoUrl(url);
  let fh: fsp.FileHandle;
  try {
    fh = await fsp.open(p, 'r');
  } catch (e) {
    throw new IoError(`cannot open source ${p}: ${(e as NodeJS.ErrnoException).code === 'ENOENT' ? 'no such file or device' : (e as Error).message}`);
  }
  try {
    const size = await sizeOf(p, await fh.stat());
    return {
      url,
      size,
      async read(buf, offset, length) {
        let done = 0;
        while (done < length) {
          let n: number;
          try {
            ({ bytesRead: n } = await fh.read(buf, done, length - done, offset + done));
          } catch (e) {
            throw new IoError(`cannot read source ${p} at offset ${offset + done}: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`);
          }
          if (n === 0) throw new IoError(`source ${p} ended at offset ${offset + done}, expected ${size} bytes (truncated while reading?)`);
          done += n;
        }
      },
      close: () => fh.close(),
    };
  } catch (e) {
    await fh.close();
    throw e;
  }
}

/** Allocates the whole file (util-linux fallocate: unwritten extents, read as zeroes). */
function preallocate(p: string, size: number): Promise<boolean> {
  return new Promise((resolve) => {
    execFile('fallocate', ['-l', String(size), p], (err) => resolve(!err));
  });
}

export interface Target {
  readonly url: string;
  /** true for a regular file we created or truncated: unwritten ranges read as zeroes */
  readonly zeroed: boolean;
  /** true when holes need no write: a sparse file, or a file whose space was preallocated */
  readonly holesDone: boolean;
  write(buf: Buffer, offset: number): Promise<void>;
  /** Reads back what was written (restore copies a repeated block from its first copy). */
  read(buf: Buffer, offset: number): Promise<void>;
  close(): Promise<void>;
}

/**
 * Opens a restore target. An existing file or device is refused unless `force`; a regular file is created
 * (or truncated) at exactly `size` bytes, so skipped holes stay holes; a block device must be large enough.
 */
export async function openTarget(url: string, size: number, force: boolean, sparse = false, sync = true): Promise<Target> {
  const { path: p } = parseIoUrl(url);
  let st: fs.Stats | undefined;
  try {
    st = await fsp.stat(p);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw new IoError(`cannot use target ${p}: ${(e as Error).message}`);
  }
  if (st && !force) throw new IoError(`target ${p} already exists; use -f to overwrite it`);
  let fh: fsp.FileHandle;
  let zeroed = false;
  let holesDone = false;
  try {
    if (st?.isBlockDevice()) {
      const devSize = await sizeOf(p, st);
      if (devSize < size) throw new IoError(`target device ${p} has ${devSize} bytes, the version needs ${size}`);
      fh = await fsp.open(p, 'r+');
    } else {
      if (st && !st.isFile()) throw new IoError(`target ${p} is neither a regular file nor a block device`);
      fh = await fsp.open(p, st ? 'w+' : 'wx+', 0o600);
      await fh.truncate(size);
      zeroed = true;
      // Not sparse: the file gets all its space. fallocate does that without writing gigabytes of zeroes;
      // where the filesystem cannot, the zeroes are written.
      holesDone = sparse || (size > 0 && (await preallocate(p, size)));
      if (size === 0) holesDone = true;
    }
  } catch (e) {
    if (e instanceof IoError) throw e;
    throw new IoError(`cannot open target ${p}: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`);
  }
  return {
    url,
    zeroed,
    holesDone,
    async write(buf, offset) {
      let done = 0;
      while (done < buf.length) {
        try {
          const { bytesWritten } = await fh.write(buf, done, buf.length - done, offset + done);
          done += bytesWritten;
        } catch (e) {
          throw new IoError(`cannot write target ${p} at offset ${offset + done}: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`);
        }
      }
    },
    async read(buf, offset) {
      let done = 0;
      while (done < buf.length) {
        const { bytesRead } = await fh.read(buf, done, buf.length - done, offset + done);
        if (!bytesRead) throw new IoError(`target ${p} is shorter than expected at offset ${offset + done}`);
        done += bytesRead;
      }
    },
    async close() {
      try {
        // A restore reports success only once the data is on disk (unless the caller chose otherwise).
        if (sync) await fh.sync();
      } finally {
        await fh.close();
      }
    },
  };
}
