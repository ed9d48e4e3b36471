import * as fs from 'node:fs';
import * as path from 'node:path';
import { createHash } from 'node:crypto';
import { closeFd, fsyncDir, fsyncFd, openFd, preadFull, pwriteFull } from '../util/fd-io';

/**
 * A map of small integers (1 or 2 bits per entry) kept in memory and in a file, written in place a page at a
 * time. The copy-on-write overlay keeps the state of each granule in one (base / data / zero), a live restore
 * the blocks already in its target.
 *
 * File: a 4096-byte header (magic, format, bits per entry, entry count, the owner's identity string, and a
 * SHA-256 of all that), written once at creation and never again, then the entries, packed, in pages of
 * 4096 bytes. A new map is written to a temporary name, fsynced, renamed into place and its directory
 * fsynced, so a map file either does not exist or has a whole header.
 *
 * Crash safety is the caller's ordering plus two properties of this class:
 * - `takeDirty()` copies the changed pages at one instant; `writePages()` writes such copies in the order
 *   they were taken, one batch at a time, so a page on disk never goes back to an older copy of itself;
 * - a page write may tear at sector boundaries after a power loss; each sector then holds either its
 *   old or its new bytes, i.e. each entry (entries never straddle a byte) has the value of one of the two
 *   copies. Callers only persist values whose data is already durable, so either value is consistent.
 */
export const MAP_PAGE = 4096;
const HEADER = 4096;
const MAGIC = 'BACKYMAP';
const FORMAT = 1;

export interface MapIdentity {
  bits: 1 | 2;
  entries: number;
  /** what the map belongs to ("cow base=<uid> size=… granule=…"): checked on open */
  owner: string;
}

function encodeHeader(id: MapIdentity): Buffer {
  const h = Buffer.alloc(HEADER);
  h.write(MAGIC, 0, 'latin1');
  h.writeUInt32LE(FORMAT, 8);
  h.writeUInt32LE(id.bits, 12);
  h.writeBigUInt64LE(BigInt(id.entries), 16);
  const owner = Buffer.from(id.owner, 'utf8');
  if (owner.length > HEADER - 64) throw new Error('map owner string too long');
  h.writeUInt32LE(owner.length, 24);
  owner.copy(h, 28);
  createHash('sha256').update(h.subarray(0, 28 + owner.length)).digest().copy(h, HEADER - 32);
  return h;
}

function decodeHeader(h: Buffer, file: string): MapIdentity {
  if (h.length < HEADER || h.toString('latin1', 0, 8) !== MAGIC) throw new Error(`${file} is not a backy map file`);
  if (h.readUInt32LE(8) !== FORMAT) throw new Error(`${file}: unknown map format ${h.readUInt32LE(8)}`);
  const len = h.readUInt32LE(24);
  if (len > HEADER - 64) throw new Error(`${file}: corrupt map header`);
  const sum = createHash('sha256').update(h.subarray(0, 28 + len)).digest();
  if (!sum.equals(h.subarray(HEADER - 32))) throw new Error(`${file}: corrupt map header (checksum)`);
  const bits = h.readUInt32LE(12);
  if (bits !== 1 && bits !== 2) throw new Error(`${file}: corrupt map header (bits ${bits})`);
  return { bits, entries: Number(h.readBigUInt64LE(16)), owner: h.toString('utf8', 28, 28 + len) };
}

function bodyBytes(id: Pick<MapIdentity, 'bits' | 'entries'>): number {
  return Math.ceil((id.entries * id.bits) / 8);
}

export class PersistentMap {
  readonly bits: 1 | 2;
  readonly entries: number;
  private readonly perByte: number;
  private readonly mask: number;
  private dirty = new Set<number>();
  private writing: Promise<void> = Promise.resolve();
  private closed = false;

  private constructor(private fd: number, readonly file: string, readonly identity: MapIdentity, private readonly body: Uint8Array) {
    this.bits = identity.bits;
    this.entries = identity.entries;
    this.perByte = 8 / this.bits;
    this.mask = (1 << this.bits) - 1;
  }

  /**
   * Creates a map of all-zero entries at `file` (atomically: a temporary file renamed into place). With
   * `durable: false` nothing is fsynced yet: the caller makes the file and its directory entry durable
   * (`sync()` and an fsync of the directory) before it relies on them after a power loss.
   */
  static async create(file: string, id: MapIdentity, opts: { durable?: boolean } = {}): Promise<PersistentMap> {
    const durable = opts.durable ?? true;
    const tmp = `${file}.tmp-${process.pid}`;
    const fd = await openFd(tmp, 'w+', 0o600);
    try {
      await pwriteFull(fd, encodeHeader(id), 0);
      // The body is a hole until written: all zero entries.
      await new Promise<void>((resolve, reject) => fs.ftruncate(fd, HEADER + bodyBytes(id), (e) => (e ? reject(e) : resolve())));
      if (durable) await fsyncFd(fd);
      await fs.promises.rename(tmp, file);
      if (durable) await fsyncDir(path.dirname(file));
    } catch (e) {
      await closeFd(fd).catch(() => undefined);
      await fs.promises.rm(tmp, { force: true });
      throw e;
    }
    return new PersistentMap(fd, file, id, new Uint8Array(bodyBytes(id)));
  }

  /** Opens an existing map; `expect` must match what it was created with. */
  static async open(file: string, expect?: MapIdentity, readOnly = false): Promise<PersistentMap> {
    const fd = await openFd(file, readOnly ? 'r' : 'r+');
    try {
      const st = await fs.promises.stat(file);
      const header = Buffer.alloc(HEADER);
      const n = await preadFull(fd, header, 0, true);
      if (n < HEADER) throw new Error(`${file} is not a backy map file (too short)`);
      const id = decodeHeader(header, file);
      if (expect && (expect.bits !== id.bits || expect.entries !== id.entries || expect.owner !== id.owner)) {
        throw new Error(`${file} belongs to "${id.owner}" (${id.entries} entries), expected "${expect.owner}" (${expect.entries})`);
      }
      const len = bodyBytes(id);
      if (st.size < HEADER + len) throw new Error(`${file} is truncated (${st.size} bytes, expected ${HEADER + len})`);
      const body = Buffer.alloc(len);
      await preadFull(fd, body, HEADER);
      return new PersistentMap(fd, file, id, body);
    } catch (e) {
      await closeFd(fd).catch(() => undefined);
      throw e;
    }
  }

  /** Reads only the header of a map file. */
  static async identity(file: string): Promise<MapIdentity> {
    const fd = await openFd(file, 'r');
    try {
      const header = Buffer.alloc(HEADER);
      await preadFull(fd, header, 0, true);
      return decodeHeader(header, file);
    } finally {
      await closeFd(fd);
    }
  }

  get(i: number): number {
    const b = this.body[Math.floor(i / this.perByte)];
    return (b >> ((i % this.perByte) * this.bits)) & this.mask;
  }

  /** Sets entries [from, to) to `value` in memory; their pages become dirty when anything changed. */
  set(from: number, to: number, value: number): void {
    for (let i = from; i < to; i++) {
      const byte = Math.floor(i / this.perByte);
      const shift = (i % this.perByte) * this.bits;
      const old = this.body[byte];
      const next = (old & ~(this.mask << shift)) | ((value & this.mask) << shift);
      if (next !== old) {
        this.body[byte] = next;
        this.dirty.add(Math.floor(byte / MAP_PAGE));
      }
    }
  }

  /** First index in [from, to) whose value differs from that of `from` (or `to`). */
  runEnd(from: number, to: number): number {
    const v = this.get(from);
    let i = from + 1;
    // Whole bytes at a time where the run covers them: long runs of one value are the common case.
    const full = this.bits === 1 ? v * 0xff : v * 0x55;
    while (i < to) {
      if (i % this.perByte === 0) {
        while (i + this.perByte <= to && this.body[i / this.perByte] === full) i += this.perByte;
        if (i >= to) break;
      }
      if (this.get(i) !== v) return i;
      i++;
    }
    return to;
  }

  /** Entries with a value other than 0. */
  countNonZero(): number {
    let n = 0;
    for (let byte = 0; byte < this.body.length; byte++) {
      if (this.body[byte] === 0) continue;
      for (let k = 0; k < this.perByte; k++) {
        const i = byte * this.perByte + k;
        if (i < this.entries && ((this.body[byte] >> (k * this.bits)) & this.mask) !== 0) n++;
      }
    }
    return n;
  }

  get hasDirty(): boolean {
    return this.dirty.size > 0;
  }

  /** Copies of the pages changed since the last call, taken now (see the class comment). */
  takeDirty(): { page: number; bytes: Buffer }[] {
    const out = [...this.dirty].sort((a, b) => a - b).map((page) => {
      const start = page * MAP_PAGE;
      return { page, bytes: Buffer.from(this.body.subarray(start, Math.min(this.body.length, start + MAP_PAGE))) };
    });
    this.dirty.clear();
    return out;
  }

  /** Writes page copies into the file (no fsync), after every batch handed in before. */
  writePages(pages: { page: number; bytes: Buffer }[]): Promise<void> {
    const run = async () => {
      for (const p of pages) await pwriteFull(this.fd, p.bytes, HEADER + p.page * MAP_PAGE);
    };
    const next = this.writing.then(run);
    this.writing = next.catch(() => undefined);
    return next;
  }

  sync(): Promise<void> {
    return fsyncFd(this.fd);
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.writing;
    await closeFd(this.fd);
  }
}
