/**
 * The transmission phase (nbdkit's protocol.c): requests are parsed in a loop and handled concurrently;
 * replies go out in completion order. Memory is bounded: at most `maxInFlight` requests and `maxInFlightBytes`
 * bytes of READ results and WRITE payloads are held at once; beyond that the loop stops reading and the socket
 * is paused (TCP backpressure to the client).
 */
import { BlockDevice, capabilitiesOf, DeviceCapabilities, DeviceError, Extent } from '../src/device/types';
import { replyBuffers } from '../src/device/reply-buffers';
import * as C from './constants';
import { errnoOf, failingOffset, messageForClient, oneLine } from './errors';
import { normalizeExtents } from './extents';
import { BASE_ALLOCATION_ID, Negotiated } from './handshake';
import { ByteBudget, once } from './budget';
import { Cookie, Replies } from './replies';
import { EMPTY, ProtocolError, SocketReader, readU64 } from './wire';

export interface TransmissionLimits {
  /** Largest READ or WRITE payload accepted (the advertised maximum). */
  maxRequestBytes: number;
  /** Requests handled concurrently before the loop stops reading. */
  maxInFlight: number;
  /** Bytes of WRITE payloads held before the loop stops reading. */
  maxInFlightBytes: number;
}

/** Budgets for the data of read replies, from the device read until it has left the process. */
export interface ReplyBudgets {
  /** This connection's: bounds what one client makes the server hold, replies queued to it included. */
  connection: ByteBudget;
  /**
   * Shared by all connections, for replies that must be read whole before they are sent (simple replies
   * larger than a piece): bounds what clients that do not read can pin together.
   */
  whole: ByteBudget;
}

/** Reads are served in pieces of at most this size (aligned to it), each sent as soon as it is read. */
export const READ_PIECE = 1024 * 1024;

interface Request extends Cookie {
  flags: number;
  type: number;
  offset: number;
  length: number;
}

/** Zero runs shorter than this inside a structured READ are sent as data (a hole chunk saves nothing and would
 * split the device read). */
const MIN_HOLE_CHUNK = 4096;
/** Reads shorter than this are answered as one data chunk without asking the device for its zero runs: a
 * hole chunk would save the client almost nothing, and small random reads are where per-request work shows. */
const MIN_PLANNED_READ = 64 * 1024;
/** Zero runs are reported to clients on this alignment (the spec asks for multiples of 512 where possible). */
const HOLE_ALIGN = 512;
/** WRITE_ZEROES on a device that cannot zero is written in pieces of at most this size. */
const ZERO_WRITE_PIECE = 1024 * 1024;

export class Transmission {
  private readonly device: BlockDevice;
  private readonly caps: DeviceCapabilities;
  private readonly size: number;
  private inFlight = 0;
  private inFlightBytes = 0;
  private slotWaiter: (() => void) | null = null;
  private idleWaiters: Array<() => void> = [];
  private stopping = false;
  /** What this connection asked for, for its closing line. */
  readonly stats = { requests: 0, reads: 0, bytesRead: 0, writes: 0, bytesWritten: 0 };

  constructor(
    private readonly reader: SocketReader,
    private readonly replies: Replies,
    private readonly negotiated: Negotiated,
    private readonly limits: TransmissionLimits,
    private readonly budgets: ReplyBudgets,
    private readonly log: (msg: string) => void,
    /** A request failed in a way that leaves the stream unusable: drop the connection. */
    private readonly abort: () => void,
  ) {
    this.device = negotiated.export.device;
    this.caps = capabilitiesOf(this.device);
    this.size = this.device.size;
  }

  /** Stops reading requests; those in flight finish. */
  stop(): void {
    this.stopping = true;
    this.wakeSlot();
  }

  whenIdle(): Promise<void> {
    if (this.inFlight === 0) return Promise.resolve();
    return new Promise<void>((resolve) => this.idleWaiters.push(resolve));
  }

  /** The request loop; returns on NBD_CMD_DISC or stop(), throws on EOF or a protocol violation. */
  async run(): Promise<void> {
    const { maxInFlight, maxRequestBytes } = this.limits;
    for (;;) {
      while (this.inFlight >= maxInFlight && !this.stopping) await this.waitSlot();
      if (this.stopping) return;
      const h = this.reader.tryRead(C.REQUEST_HEADER_BYTES) ?? (await this.reader.read(C.REQUEST_HEADER_BYTES));
      const magic = h.readUInt32BE(0);
      if (magic !== C.REQUEST_MAGIC) {
        throw new ProtocolError(`bad request magic 0x${magic.toString(16).padStart(8, '0')}`);
      }
      const req: Request = {
        flags: h.readUInt16BE(4),
        type: h.readUInt16BE(6),
        cookieHi: h.readUInt32BE(8),
        cookieLo: h.readUInt32BE(12),
        offset: readU64(h, 16),
        length: h.readUInt32BE(24),
      };
      switch (req.type) {
        case C.CMD_DISC:
          return;
        case C.CMD_WRITE: {
          // The payload keeps the stream in sync, so it is consumed even when the write will be refused,
          // unless it is beyond what we ever accept.
          if (req.length > maxRequestBytes) {
            throw new ProtocolError(`NBD_CMD_WRITE payload of ${req.length} bytes exceeds the ${maxRequestBytes}-byte limit`);
          }
          if (!this.caps.write) {
            await this.reader.skip(req.length);
            this.dispatch(req, 0);
            break;
          }
          if (!(await this.reserve(req.length))) return;
          const payload = await this.reader.read(req.length);
          this.dispatch(req, req.length, payload);
          break;
        }
        default:
          this.dispatch(req, 0);
      }
    }
  }

  /** Waits until `cost` more bytes may be held (always once nothing is in flight); false when stopping. */
  private async reserve(cost: number): Promise<boolean> {
    while (this.inFlight > 0 && this.inFlightBytes + cost > this.limits.maxInFlightBytes && !this.stopping) await this.waitSlot();
    return !this.stopping;
  }

  private waitSlot(): Promise<void> {
    return new Promise<void>((resolve) => {
      this.slotWaiter = resolve;
    });
  }

  private wakeSlot(): void {
    const w = this.slotWaiter;
    this.slotWaiter = null;
    w?.();
  }

  private dispatch(req: Request, cost: number, payload?: Buffer): void {
    this.stats.requests++;
    if (req.type === C.CMD_READ) {
      this.stats.reads++;
      this.stats.bytesRead += req.length;
    } else if (req.type === C.CMD_WRITE) {
      this.stats.writes++;
      this.stats.bytesWritten += req.length;
    }
    this.inFlight++;
    this.inFlightBytes += cost;
    this.handle(req, payload)
      .catch((e) => {
        this.log(`internal error handling command ${req.type}: ${oneLine(e)}; closing connection`);
        this.abort();
      })
      .finally(() => {
        this.inFlight--;
        this.inFlightBytes -= cost;
        this.wakeSlot();
        if (this.inFlight === 0) {
          const ws = this.idleWaiters;
          this.idleWaiters = [];
          for (const w of ws) w();
        }
      });
  }

  private handle(req: Request, payload?: Buffer): Promise<void> {
    switch (req.type) {
      case C.CMD_READ:
        return this.cmdRead(req);
      case C.CMD_WRITE:
        return this.cmdWrite(req, payload);
      case C.CMD_TRIM:
        return this.cmdTrim(req);
      case C.CMD_WRITE_ZEROES:
        return this.cmdWriteZeroes(req);
      case C.CMD_FLUSH:
        return this.cmdFlush(req);
      case C.CMD_CACHE:
        return this.cmdCache(req);
      case C.CMD_BLOCK_STATUS:
        return this.cmdBlockStatus(req);
      default:
        return this.replies.error(req, C.EINVAL, `unknown command ${req.type}`);
    }
  }

  /**
   * Checks flags (FUA is accepted on every command, as the spec asks once SEND_FUA is advertised; on a
   * read-only export nothing is written, so it is tolerated there too) and the range. A range past the end
   * is EINVAL, or `pastEnd` (ENOSPC for writes, as the spec suggests).
   */
  private checkRequest(req: Request, allowedFlags: number, pastEnd = C.EINVAL): [number, string] | null {
    if (req.flags & ~(allowedFlags | C.CMD_FLAG_FUA)) return [C.EINVAL, 'unsupported command flags'];
    if (req.length === 0) return [C.EINVAL, 'zero-length request'];
    if (req.offset > this.size || req.length > this.size - req.offset) return [pastEnd, 'request beyond the end of the export'];
    return null;
  }

  // ---- Reads ----------------------------------------------------------------------------------------------

  private async cmdRead(req: Request): Promise<void> {
    const structured = this.replies.structured;
    const df = (req.flags & C.CMD_FLAG_DF) !== 0;
    const bad = this.checkRequest(req, structured ? C.CMD_FLAG_DF : 0);
    if (bad) return this.replies.error(req, bad[0], bad[1]);
    if (req.length > this.limits.maxRequestBytes) {
      // With structured replies the spec allows NBD_EOVERFLOW for reads we will not serve in one go; with
      // simple replies a read over the advertised maximum is a client error: NBD_EINVAL.
      return this.replies.error(req, structured ? C.EOVERFLOW : C.EINVAL, `read larger than ${this.limits.maxRequestBytes} bytes`);
    }
    if (structured && !df && req.length >= MIN_PLANNED_READ) {
      const segments = await this.readPlan(req.offset, req.length);
      if (segments.length > 1 || segments[0].zero || req.length > READ_PIECE) return this.readInPieces(req, segments);
    }

    // One piece, or a reply whose data must come unbroken (simple replies, DF): read whole, then sent.
    const { connection, whole } = this.budgets;
    const big = req.length > READ_PIECE;
    await connection.acquire(req.length);
    if (big) await whole.acquire(req.length);
    const release = once(() => {
      connection.release(req.length);
      if (big) whole.release(req.length);
    });
    if (!this.replies.usable) return release(); // the client is gone: nothing to read for
    let data: Buffer;
    try {
      data = await readExact(this.device, req.offset, req.length);
    } catch (e) {
      release();
      this.logReadError(req, req.offset, req.length, e);
      if (structured) return void (await this.replies.send(this.replies.errorOffsetChunk(req, C.REPLY_FLAG_DONE, req.offset, req.length, e)));
      return this.replies.error(req, errnoOf(e), messageForClient(e));
    }
    const sent = releasing(release, data);
    if (structured) await this.replies.send(this.replies.dataChunk(req, C.REPLY_FLAG_DONE, req.offset, data), sent);
    else await this.replies.simpleData(req, data, sent);
  }

  /**
   * A structured read with holes, or larger than a piece: holes as OFFSET_HOLE chunks; data in pieces, each
   * read once the connection's budget allows and sent as its own OFFSET_DATA (or ERROR_OFFSET) chunk as soon
   * as it is read; the last hole chunk (or an empty chunk) ends the reply. A client that stops reading holds
   * at most its budget.
   */
  private async readInPieces(req: Request, segments: Extent[]): Promise<void> {
    const budget = this.budgets.connection;
    const jobs: Promise<unknown>[] = [];
    // The last hole chunk is kept back to end the reply (DONE) once the data is out; without holes, an
    // empty chunk ends it.
    let lastHole: Extent | undefined;
    for (const s of segments) {
      if (s.zero) {
        if (lastHole) jobs.push(this.replies.send(this.replies.holeChunk(req, 0, lastHole.offset, lastHole.length)));
        lastHole = s;
        continue;
      }
      for (let at = s.offset, end = s.offset + s.length; at < end;) {
        const to = Math.min(end, (Math.floor(at / READ_PIECE) + 1) * READ_PIECE);
        jobs.push(this.readPiece(req, at, to - at, budget));
        at = to;
      }
    }
    await Promise.all(jobs);
    await this.replies.send(lastHole
      ? this.replies.holeChunk(req, C.REPLY_FLAG_DONE, lastHole.offset, lastHole.length)
      : this.replies.noneChunk(req, C.REPLY_FLAG_DONE));
  }

  /** One piece of a read in pieces: its budget, its device read, its chunk (data, or the error). */
  private async readPiece(req: Request, offset: number, length: number, budget: ByteBudget): Promise<void> {
    await budget.acquire(length);
    const release = once(() => budget.release(length));
    if (!this.replies.usable) return release(); // the client is gone: nothing to read for
    let data: Buffer;
    try {
      data = await readExact(this.device, offset, length);
    } catch (e) {
      release();
      this.logReadError(req, offset, length, e);
      await this.replies.send(this.replies.errorOffsetChunk(req, 0, offset, length, e));
      return;
    }
    await this.replies.send(this.replies.dataChunk(req, 0, offset, data), releasing(release, data));
  }

  /** Splits a read into data and hole segments using the device's zero runs (small holes become data). */
  private async readPlan(offset: number, length: number): Promise<Extent[]> {
    let raw: Extent[];
    try {
      raw = await this.device.extents(offset, length);
    } catch {
      // Extents are only an optimisation for reads; the read itself will report any real failure.
      return [{ offset, length, zero: false }];
    }
    const segs = normalizeExtents(raw, offset, length, this.size, HOLE_ALIGN);
    if (segs.length <= 1) return segs;
    const out: Extent[] = [];
    for (const s of segs) {
      const zero = s.zero && s.length >= MIN_HOLE_CHUNK;
      const last = out[out.length - 1];
      if (last && last.zero === zero) last.length += s.length;
      else out.push({ offset: s.offset, length: s.length, zero });
    }
    return out;
  }

  private logReadError(req: Request, offset: number, length: number, e: unknown): void {
    const at = failingOffset(e);
    this.log(
      `READ ${req.offset}+${req.length}: device read ${offset}+${length} failed` +
        `${at !== undefined ? ` at offset ${at}` : ''}: ${C.errnoName(errnoOf(e))}: ${oneLine(e)}`,
    );
  }

  // ---- Writes ---------------------------------------------------------------------------------------------

  private async cmdWrite(req: Request, payload: Buffer | undefined): Promise<void> {
    if (!this.caps.write || !payload) return this.replies.error(req, C.EPERM, 'export is read-only');
    const bad = this.checkRequest(req, 0, C.ENOSPC);
    if (bad) return this.replies.error(req, bad[0], bad[1]);
    return this.afterWrite(req, 'WRITE', (fua) => this.device.write!(req.offset, payload, { fua }));
  }

  private async cmdTrim(req: Request): Promise<void> {
    if (!this.caps.write) return this.replies.error(req, C.EPERM, 'export is read-only');
    if (!this.caps.trim) return this.replies.error(req, C.EINVAL, 'trim is not supported by this export');
    const bad = this.checkRequest(req, 0);
    if (bad) return this.replies.error(req, bad[0], bad[1]);
    return this.afterWrite(req, 'TRIM', (fua) => this.device.trim!(req.offset, req.length, { fua }));
  }

  private async cmdWriteZeroes(req: Request): Promise<void> {
    if (!this.caps.write) return this.replies.error(req, C.EPERM, 'export is read-only');
    const bad = this.checkRequest(req, C.CMD_FLAG_NO_HOLE | C.CMD_FLAG_FAST_ZERO, C.ENOSPC);
    if (bad) return this.replies.error(req, bad[0], bad[1]);
    const fast = (req.flags & C.CMD_FLAG_FAST_ZERO) !== 0;
    const noHole = (req.flags & C.CMD_FLAG_NO_HOLE) !== 0;
    // A fast zero the device cannot promise fails at once, untouched, as the spec asks.
    if (fast && !(this.caps.zero && this.caps.fastZero)) return this.replies.error(req, C.ENOTSUP, 'zeroing would not be faster than writing');
    return this.afterWrite(req, 'WRITE_ZEROES', (fua) =>
      this.caps.zero ? this.device.zero!(req.offset, req.length, { fua, noHole, fast }) : this.writeZeroes(req.offset, req.length, fua),
    fast);
  }

  /** WRITE_ZEROES on a device that has no zero(): zero buffers written piece by piece. */
  private async writeZeroes(offset: number, length: number, fua: boolean): Promise<void> {
    const zero = Buffer.alloc(Math.min(length, ZERO_WRITE_PIECE));
    for (let at = offset, end = offset + length; at < end; at += zero.length) {
      const n = Math.min(zero.length, end - at);
      await this.device.write!(at, n === zero.length ? zero : zero.subarray(0, n), { fua });
    }
  }

  /**
   * Runs a write-type command and replies. FUA is passed on when the device honours it, else emulated by a
   * flush after the command (a device without flush() is durable on every write).
   */
  private async afterWrite(req: Request, what: string, op: (fua: boolean) => Promise<void>, fastZero = false): Promise<void> {
    const fua = (req.flags & C.CMD_FLAG_FUA) !== 0;
    try {
      await op(fua && this.caps.fua);
      if (fua && !this.caps.fua && this.device.flush) await this.device.flush();
    } catch (e) {
      const errno = errnoOf(e, fastZero);
      if (errno !== C.ENOTSUP) this.log(`${what} ${req.offset}+${req.length} failed: ${C.errnoName(errno)}: ${oneLine(e)}`);
      return this.replies.error(req, errno, messageForClient(e));
    }
    return this.replies.ok(req);
  }

  private async cmdFlush(req: Request): Promise<void> {
    if (req.flags & ~C.CMD_FLAG_FUA) return this.replies.error(req, C.EINVAL, 'unsupported command flags');
    if (this.caps.write && this.device.flush) {
      try {
        await this.device.flush();
      } catch (e) {
        this.log(`FLUSH failed: ${oneLine(e)}`);
        return this.replies.error(req, errnoOf(e), messageForClient(e));
      }
    }
    return this.replies.ok(req);
  }

  // ---- Hints and metadata -----------------------------------------------------------------------------------

  private async cmdCache(req: Request): Promise<void> {
    const bad = this.checkRequest(req, 0);
    if (bad) return this.replies.error(req, bad[0], bad[1]);
    if (this.device.prefetch) {
      try {
        await this.device.prefetch(req.offset, req.length);
      } catch (e) {
        // A cache hint that fails changes nothing for later reads; report success as the spec permits.
        this.log(`CACHE ${req.offset}+${req.length}: prefetch failed: ${oneLine(e)}`);
      }
    }
    return this.replies.ok(req);
  }

  private async cmdBlockStatus(req: Request): Promise<void> {
    if (!this.negotiated.metaActive) return this.replies.error(req, C.EINVAL, 'no metadata context was negotiated');
    const bad = this.checkRequest(req, C.CMD_FLAG_REQ_ONE);
    if (bad) return this.replies.error(req, bad[0], bad[1]);
    let raw: Extent[];
    try {
      raw = await this.device.extents(req.offset, req.length);
    } catch (e) {
      this.log(`BLOCK_STATUS ${req.offset}+${req.length} failed: ${oneLine(e)}`);
      return this.replies.error(req, errnoOf(e), messageForClient(e));
    }
    // Clipped to the request, so every descriptor fits the 32-bit length field (the request length is 32-bit).
    let extents = normalizeExtents(raw, req.offset, req.length, this.size, HOLE_ALIGN);
    if (req.flags & C.CMD_FLAG_REQ_ONE) extents = extents.slice(0, 1);
    else if (extents.length > C.MAX_BLOCK_STATUS_DESCRIPTORS) extents = extents.slice(0, C.MAX_BLOCK_STATUS_DESCRIPTORS);
    return this.replies.blockStatus(req, BASE_ALLOCATION_ID, extents, (e) => (e.zero ? C.STATE_HOLE | C.STATE_ZERO : 0));
  }
}

/** Once a reply has left: its budget back, and its data buffer back to the pool when it came from there. */
function releasing(release: () => void, data: Buffer): () => void {
  return () => {
    release();
    replyBuffers.give(data);
  };
}

async function readExact(device: BlockDevice, offset: number, length: number): Promise<Buffer> {
  const b = await device.read(offset, length);
  if (!Buffer.isBuffer(b) || b.length < length) {
    throw new DeviceError(`device returned ${Buffer.isBuffer(b) ? b.length : 'no'} bytes instead of ${length}`, 'EIO', offset);
  }
  return b.length === length ? b : b.subarray(0, length);
}
