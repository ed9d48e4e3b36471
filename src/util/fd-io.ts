import * as fs from 'node:fs';

/**
 * Positional reads and writes on plain file descriptors, with callbacks rather than FileHandle: on the
 * write path of a writable export every request is one of these, and the callback API allocates less.
 */

export function openFd(file: string, flags: string | number, mode?: number): Promise<number> {
  return new Promise((resolve, reject) => fs.open(file, flags, mode, (e, fd) => (e ? reject(e) : resolve(fd))));
}

export function closeFd(fd: number): Promise<void> {
  return new Promise((resolve, reject) => fs.close(fd, (e) => (e ? reject(e) : resolve())));
}

export function fsyncFd(fd: number): Promise<void> {
  return new Promise((resolve, reject) => fs.fsync(fd, (e) => (e ? reject(e) : resolve())));
}

export function fdatasyncFd(fd: number): Promise<void> {
  return new Promise((resolve, reject) => fs.fdatasync(fd, (e) => (e ? reject(e) : resolve())));
}

/** fsync of a directory: makes a rename or a new entry in it durable. */
export async function fsyncDir(dir: string): Promise<void> {
  const fd = await openFd(dir, 'r');
  try {
    await fsyncFd(fd);
  } finally {
    await closeFd(fd);
  }
}

/**
 * The most one write() through the page cache stores. Larger writes to ext4 (Linux 6.x) get larger folios,
 * and in a VM that hands free memory back to its host (virtio-balloon free page reporting) filling those was
 * slow: 1.4 GiB in 4 MiB writes took 3.3-4.5 s of system CPU where 1 MiB writes took 0.25 s; in a 2 GiB
 * restore, 1 MiB writes still cost 1.2-1.9 s of system CPU and 256 KiB writes 1.0-1.2 s. The extra calls cost
 * nothing measurable.
 */
export const PAGE_CACHE_WRITE = 256 * 1024;

function readOnce(fd: number, buf: Buffer, off: number, len: number, pos: number): Promise<number> {
  return new Promise((resolve, reject) => fs.read(fd, buf, off, len, pos, (e, n) => (e ? reject(e) : resolve(n))));
}

function writeOnce(fd: number, buf: Buffer, off: number, len: number, pos: number): Promise<number> {
  return new Promise((resolve, reject) => fs.write(fd, buf, off, len, pos, (e, n) => (e ? reject(e) : resolve(n))));
}

/**
 * Fills `buf` from `pos`. Past the end of the file the rest reads as zeroes when `short` is false (a sparse
 * file's tail), else the number of bytes read is returned.
 */
export async function preadFull(fd: number, buf: Buffer, pos: number, short = false): Promise<number> {
  let done = 0;
  while (done < buf.length) {
    const n = await readOnce(fd, buf, done, buf.length - done, pos + done);
    if (n === 0) {
      if (short) return done;
      buf.fill(0, done);
      return buf.length;
    }
    done += n;
  }
  return done;
}

export async function pwriteFull(fd: number, buf: Buffer | Uint8Array, pos: number): Promise<void> {
  const b = Buffer.isBuffer(buf) ? buf : Buffer.from(buf.buffer, buf.byteOffset, buf.byteLength);
  let done = 0;
  while (done < b.length) done += await writeOnce(fd, b, done, Math.min(PAGE_CACHE_WRITE, b.length - done), pos + done);
}

/** pwrite of all of `buf`, synchronously (see CowDevice for when that pays). */
export function pwriteFullSync(fd: number, buf: Buffer, pos: number): void {
  let done = 0;
  while (done < buf.length) done += fs.writeSync(fd, buf, done, Math.min(PAGE_CACHE_WRITE, buf.length - done), pos + done);
}

/**
 * fsync calls that share work: a caller waits for an fsync that *started* after its call (so it covers every
 * write that completed before), and callers arriving while one runs share the next one.
 */
export class SharedSync {
  private running: Promise<void> | null = null;
  private queued: Promise<void> | null = null;

  constructor(private readonly syncOnce: () => Promise<void>) {}

  sync(): Promise<void> {
    if (!this.running) return this.start();
    if (!this.queued) {
      this.queued = this.running.catch(() => undefined).then(() => {
        this.queued = null;
        return this.start();
      });
    }
    return this.queued;
  }

  private start(): Promise<void> {
    const p = this.syncOnce();
    this.running = p;
    const clear = () => {
      if (this.running === p) this.running = null;
    };
    p.then(clear, clear);
    return p;
  }
}
