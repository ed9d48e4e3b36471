import * as fs from 'node:fs';
import * as fsp from 'node:fs/promises';
import * as path from 'node:path';
import { randomBytes } from 'node:crypto';
import { BlobNotFoundError, StorageError } from '../util/errors';
import type { BlobStore, StoredObject } from './types';
import { DIRECT_ALIGNMENT, directView, directWindow } from '../codec/transfer';
import { PAGE_CACHE_WRITE } from '../util/fd-io';

const TMP_PREFIX = '.tmp.';
/** open(2) flags of a new blob file written with direct I/O */
const DIRECT_CREATE = fs.constants.O_WRONLY | fs.constants.O_CREAT | fs.constants.O_EXCL | fs.constants.O_DIRECT;
/** open(2) flags of a blob read around the page cache */
const DIRECT_READ = fs.constants.O_RDONLY | fs.constants.O_DIRECT;
/** The repository marker (see engine/repository-settings.ts), beside the shard directories. */
export const MARKER_NAME = 'backy-repository.json';
const MARKER = MARKER_NAME;
/** What a key may look like: relative, no empty parts (checked with '.' and '..' excluded). */
const SAFE_KEY = /^[0-9A-Za-z._-]+(\/[0-9A-Za-z._-]+)*$/;

/**
 * Blobs as files under a directory (local disk or an NFS mount): `path/ab/cd/<uid>`. Each blob is written
 * to a temporary name in its final directory, fsynced, then renamed, and the directory fsynced, so a crash
 * leaves either the whole blob or a temporary file that `cleanup --full` removes.
 */
export class FileStore implements BlobStore {
  readonly description: string;
  private knownDirs = new Set<string>();
  /** false once the filesystem refused O_DIRECT */
  private direct = true;
  /** false once the filesystem refused an O_DIRECT read (or BACKY_DIRECT_READS=0) */
  private directReads = process.env.BACKY_DIRECT_READS !== '0';

  constructor(readonly root: string, private readonly fsync = true) {
    this.description = `directory ${root}`;
  }

  /** The file of a key. Keys come from blobKey or list(); anything that could leave the root is refused. */
  private file(key: string): string {
    if (!SAFE_KEY.test(key) || key.split('/').some((part) => part === '.' || part === '..')) {
      throw new StorageError(`refusing storage key ${JSON.stringify(key.slice(0, 80))}: not a blob key`);
    }
    return path.join(this.root, key);
  }

  async check(): Promise<void> {
    let st: fs.Stats;
    try {
      st = await fsp.stat(this.root);
    } catch (e) {
      throw new StorageError(`data directory ${this.root} is not usable: ${(e as NodeJS.ErrnoException).code === 'ENOENT' ? 'it does not exist (run "backy initdb", or mount the share)' : (e as Error).message}`);
    }
    if (!st.isDirectory()) throw new StorageError(`data directory ${this.root} is not a directory`);
  }

  /** Creates the root directory (initdb). */
  async create(): Promise<void> {
    await fsp.mkdir(this.root, { recursive: true, mode: 0o700 });
  }

  async readMarker(): Promise<string | undefined> {
    try {
      return await fsp.readFile(path.join(this.root, MARKER), 'utf8');
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
      throw new StorageError(`cannot read ${path.join(this.root, MARKER)}: ${writeFailure(e)}`);
    }
  }

  async writeMarker(text: string): Promise<void> {
    const file = path.join(this.root, MARKER);
    const tmp = path.join(this.root, `${TMP_PREFIX}${MARKER}.${randomBytes(4).toString('hex')}`);
    try {
      const fh = await fsp.open(tmp, 'wx', 0o600);
      try {
        await writeAll(fh, Buffer.from(text));
        await fh.sync();
      } finally {
        await fh.close();
      }
      await fsp.rename(tmp, file);
      await syncDir(this.root);
    } catch (e) {
      await fsp.unlink(tmp).catch(() => undefined);
      throw new StorageError(`cannot write ${file}: ${writeFailure(e)}`);
    }
  }

  async put(key: string, data: Buffer): Promise<void> {
    const final = this.file(key);
    const dir = path.dirname(final);
    const tmp = path.join(dir, `${TMP_PREFIX}${path.basename(final)}.${randomBytes(4).toString('hex')}`);
    // With fsync (the blob waits for the disk anyway) and a buffer allocAligned gave: O_DIRECT, from the buffer
    // to the disk. Through the page cache, each blob took fresh pages, and filling them cost a backup more CPU
    // than hashing and encrypting (35% of its samples on the benchmark VM).
    const direct = this.fsync && this.direct ? directView(data) : undefined;
    try {
      if (!this.knownDirs.has(dir)) {
        await fsp.mkdir(dir, { recursive: true, mode: 0o700 });
        this.knownDirs.add(dir);
      }
      const fh = await fsp.open(tmp, direct ? DIRECT_CREATE : 'wx', 0o600);
      try {
        if (direct) {
          // Whole aligned blocks (past the blob: whatever the buffer holds there), then cut to the blob's size.
          await writeAll(fh, direct, true);
          await fh.truncate(data.length);
        } else {
          await writeAll(fh, data);
        }
        if (this.fsync) await fh.datasync();
        // The last word before the blob gets its final name: the file holds exactly the blob.
        const { size } = await fh.stat();
        if (size !== data.length) throw new Error(`wrote ${size} of ${data.length} bytes`);
      } finally {
        // close() may report a write error of its own (NFS reports a full disk or quota there).
        await fh.close();
      }
      await fsp.rename(tmp, final);
      if (this.fsync) await syncDir(dir);
    } catch (e) {
      await fsp.unlink(tmp).catch(() => undefined);
      if (direct && (e as NodeJS.ErrnoException).code === 'EINVAL') {
        // A filesystem without direct I/O (or other alignment rules): the page cache from now on.
        this.direct = false;
        return this.put(key, data);
      }
      throw new StorageError(`cannot write blob ${key} to ${this.root}: ${writeFailure(e)}`);
    }
  }

  async get(key: string): Promise<Buffer> {
    try {
      return await fsp.readFile(this.file(key));
    } catch (e) {
      throw this.readError(key, e);
    }
  }

  /** What a failed blob read throws: BlobNotFoundError for a missing file, else a one-line StorageError. */
  private readError(key: string, e: unknown): Error {
    const code = (e as NodeJS.ErrnoException).code;
    if (code === 'ENOENT') return new BlobNotFoundError(key);
    return new StorageError(`cannot read blob ${key} from ${this.root}: ${code ?? (e as Error).message}`);
  }

  async getInto(key: string, into: Buffer): Promise<Buffer> {
    if (this.directReads) {
      const window = directWindow(into, DIRECT_ALIGNMENT);
      if (window) {
        const got = await this.getDirect(key, window);
        if (got) return got;
      }
    }
    let fh: fsp.FileHandle;
    try {
      fh = await fsp.open(this.file(key), 'r');
    } catch (e) {
      throw this.readError(key, e);
    }
    try {
      const size = (await fh.stat()).size;
      const buf = size <= into.length ? into.subarray(0, size) : Buffer.allocUnsafe(size);
      let done = 0;
      while (done < size) {
        const { bytesRead } = await fh.read(buf, done, size - done, done);
        if (!bytesRead) break;
        done += bytesRead;
      }
      return buf.subarray(0, done);
    } catch (e) {
      throw this.readError(key, e);
    } finally {
      await fh.close();
    }
  }

  /**
   * A blob read with O_DIRECT into `window` (aligned memory, see directWindow), or undefined when it must be
   * read through the page cache: the file system refuses O_DIRECT (it is then not asked again), or the blob
   * is larger than the window. Why: a blob is read once and then kept decoded in the block cache or written
   * to a restore target, so its copy in the page cache is never used; reading around it saves the copy and
   * the page-cache pages (reading the 265 blob files of the benchmark image cold: 0.36-0.41 s and 0.11-0.16 s
   * of system CPU, against 0.48-0.81 s and 0.20-0.30 s through the page cache). A read that ends off a block
   * boundary is the end of the file, so most blobs take three trips to the thread pool (open, read, close),
   * not four (no stat).
   */
  private async getDirect(key: string, window: Buffer): Promise<Buffer | undefined> {
    let fh: fsp.FileHandle;
    try {
      fh = await fsp.open(this.file(key), DIRECT_READ);
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      if (code === 'EINVAL' || code === 'EOPNOTSUPP') {
        this.directReads = false;
        return undefined;
      }
      throw this.readError(key, e);
    }
    try {
      let done = 0;
      for (;;) {
        const want = window.length - done;
        const { bytesRead } = await fh.read(window, done, want, done);
        done += bytesRead;
        // O_DIRECT reads whole aligned blocks: less than that, or nothing, is the end of the file.
        if (bytesRead === 0 || bytesRead % DIRECT_ALIGNMENT !== 0 || done === window.length) break;
      }
      if (done === window.length && (await fh.stat()).size > done) return undefined;
      return window.subarray(0, done);
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      if (code === 'EINVAL') {
        // Opened, but the file system (or a stacked one) refuses the read itself.
        this.directReads = false;
        return undefined;
      }
      throw this.readError(key, e);
    } finally {
      await fh.close();
    }
  }

  async delete(keys: string[]): Promise<void> {
    await Promise.all(keys.map(async (key) => {
      try {
        await fsp.unlink(this.file(key));
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code !== 'ENOENT') {
          throw new StorageError(`cannot delete blob ${key} from ${this.root}: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`);
        }
      }
    }));
  }

  async *list(): AsyncIterable<(StoredObject & { partial?: boolean })[]> {
    const page: (StoredObject & { partial?: boolean })[] = [];
    for (const a of await readdirSorted(this.root)) {
      if (!/^[0-9a-f]{2}$/.test(a)) continue;
      for (const b of await readdirSorted(path.join(this.root, a))) {
        if (!/^[0-9a-f]{2}$/.test(b)) continue;
        const dir = path.join(this.root, a, b);
        for (const name of await readdirSorted(dir)) {
          let st: fs.Stats;
          try {
            st = await fsp.stat(path.join(dir, name));
          } catch {
            continue; // removed meanwhile
          }
          if (!st.isFile()) continue;
          const partial = name.startsWith(TMP_PREFIX);
          page.push({ key: `${a}/${b}/${name}`, size: st.size, mtime: st.mtimeMs, ...(partial ? { partial } : {}) });
          if (page.length >= 1000) yield page.splice(0);
        }
      }
    }
    if (page.length) yield page;
  }

  async *listUnder(prefix: string): AsyncIterable<StoredObject[]> {
    const page: StoredObject[] = [];
    const walk = async function* (dir: string, rel: string): AsyncGenerator<StoredObject[]> {
      for (const name of await readdirSorted(dir)) {
        const full = path.join(dir, name);
        let st: fs.Stats;
        try {
          st = await fsp.stat(full);
        } catch {
          continue; // removed meanwhile
        }
        if (st.isDirectory()) yield* walk(full, `${rel}${name}/`);
        else if (st.isFile() && !name.startsWith(TMP_PREFIX) && `${rel}${name}`.startsWith(prefix)) {
          page.push({ key: `${rel}${name}`, size: st.size, mtime: st.mtimeMs });
          if (page.length >= 1000) yield page.splice(0);
        }
      }
    };
    // The directory part of the prefix is walked; a partial last component filters names.
    const dirPart = prefix.includes('/') ? prefix.slice(0, prefix.lastIndexOf('/') + 1) : '';
    if (dirPart.split('/').some((p) => p === '..')) throw new StorageError(`refusing to list ${prefix}`);
    yield* walk(path.join(this.root, dirPart), dirPart);
    if (page.length) yield page;
  }

  async close(): Promise<void> {
    /* nothing held open */
  }
}

/**
 * Writes all of `data` at offset 0. One write() may store fewer bytes than asked (a disk filling up, a
 * quota, a file size limit): the rest is written by further calls, and the first that stores nothing
 * fails with the reason the kernel gives (ENOSPC, EDQUOT, EFBIG).
 */
async function writeAll(fh: fsp.FileHandle, data: Buffer, whole = false): Promise<void> {
  let done = 0;
  while (done < data.length) {
    // Through the page cache in pieces (see PAGE_CACHE_WRITE); an O_DIRECT write (`whole`) goes at once.
    const { bytesWritten } = await fh.write(data, done, whole ? data.length - done : Math.min(PAGE_CACHE_WRITE, data.length - done), done);
    if (bytesWritten <= 0) throw Object.assign(new Error('write stored nothing'), { code: 'EIO' });
    done += bytesWritten;
  }
}

const REASONS: Record<string, string> = {
  ENOSPC: 'no space left on the device (ENOSPC)',
  EDQUOT: 'disk quota exceeded (EDQUOT)',
  EFBIG: 'file too large for the filesystem (EFBIG)',
  EROFS: 'read-only filesystem (EROFS)',
  EACCES: 'permission denied (EACCES)',
};

function writeFailure(e: unknown): string {
  const code = (e as NodeJS.ErrnoException).code;
  return (code && REASONS[code]) ?? code ?? (e as Error).message;
}

async function readdirSorted(dir: string): Promise<string[]> {
  try {
    return (await fsp.readdir(dir)).sort();
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return [];
    throw new StorageError(`cannot list ${dir}: ${(e as Error).message}`);
  }
}

async function syncDir(dir: string): Promise<void> {
  const fh = await fsp.open(dir, 'r');
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}
