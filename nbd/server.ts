/**
 * A read-only NBD server (fixed newstyle handshake, simple and structured replies, base:allocation) serving
 * whatever `BlockDevice`s an `ExportCatalogue` hands it. It knows nothing about backups.
 *
 * Per connection, requests are parsed in a loop and handled concurrently; replies go out in completion order.
 * Memory per connection is bounded: at most `maxInFlightPerConnection` requests and
 * `maxInFlightBytesPerConnection` bytes of reads are in progress at once; beyond that the loop stops reading
 * and the socket is paused (TCP backpressure to the client). Replies wait for the socket's 'drain'.
 */
import * as net from 'node:net';
import { BlockDevice, DeviceError, ExportCatalogue, ExportInfo, Extent } from '../src/device/types';
import * as C from './constants';
import {
  ConnectionClosedError,
  EMPTY,
  ProtocolError,
  SocketReader,
  SocketWriter,
  readU64,
  utf8Truncate,
  writeU64,
} from './wire';

export interface NbdServerOptions {
  catalogue: ExportCatalogue;
  /** Only read-only serving exists; the flag documents it at the call site. */
  readOnly: true;
  /** One line per notable event (protocol violations, device errors). Default: stderr. */
  log?: (line: string) => void;
  /** Largest READ (and WRITE payload) accepted; advertised as the maximum payload. Default 32 MiB. */
  maxRequestBytes?: number;
  /** Requests handled concurrently per connection before the server stops reading. Default 32. */
  maxInFlightPerConnection?: number;
  /** Bytes of READs in progress per connection before the server stops reading. Default 2 × maxRequestBytes. */
  maxInFlightBytesPerConnection?: number;
  /** How long close() (or a graceful disconnect) waits for a connection to drain before destroying it. Default 10 s. */
  closeTimeoutMs?: number;
}

export type NbdListenOptions = { host?: string; port: number } | { path: string };
export type NbdAddress = { host: string; port: number; family: string } | { path: string };

/** Option payloads larger than this are taken as abuse and the connection is dropped. The largest legitimate
 * options are NBD_OPT_GO/INFO (4096-byte name + a few info requests) and the meta-context options (name +
 * a handful of queries of at most 4096 bytes each), far below this. */
export const MAX_OPTION_BYTES = 64 * 1024;
/** Preferred block size advertised in NBD_INFO_BLOCK_SIZE. */
export const PREFERRED_BLOCK_SIZE = 4096;
/** Zero runs shorter than this inside a structured READ are sent as data (a hole chunk saves nothing and would
 * split the device read). */
const MIN_HOLE_CHUNK = 4096;
/** Reads shorter than this are answered as one data chunk without asking the device for its zero runs: a
 * hole chunk would save the client almost nothing, and small random reads are where per-request work shows. */
const MIN_PLANNED_READ = 64 * 1024;
/** Replies with at most this much data are sent as one buffer (one small copy instead of a corked batch). */
const COALESCE_REPLY_BYTES = 16 * 1024;
/** Zero runs are reported to clients on this alignment (the spec asks for multiples of 512 where possible). */
const HOLE_ALIGN = 512;
/** Context ID we assign to base:allocation in NBD_OPT_SET_META_CONTEXT. */
const BASE_ALLOCATION_ID = 1;
/** Longest error message sent to a client (the spec's limit is 4096 bytes). */
const MAX_CLIENT_MESSAGE = 512;

const DEFAULT_MAX_REQUEST = 32 * 1024 * 1024;
const DEFAULT_MAX_IN_FLIGHT = 32;
const DEFAULT_CLOSE_TIMEOUT = 10_000;

interface Resolved {
  maxRequestBytes: number;
  maxInFlight: number;
  maxInFlightBytes: number;
  closeTimeoutMs: number;
}

export class NbdServer {
  private readonly catalogue: ExportCatalogue;
  private readonly log: (line: string) => void;
  private readonly limits: Resolved;
  private readonly server: net.Server;
  private readonly connections = new Set<NbdConnection>();
  private closing: Promise<void> | null = null;
  private listened = false;

  constructor(options: NbdServerOptions) {
    if (options.readOnly !== true) throw new TypeError('NbdServer only serves read-only exports (readOnly: true)');
    const maxRequestBytes = options.maxRequestBytes ?? DEFAULT_MAX_REQUEST;
    if (!Number.isInteger(maxRequestBytes) || maxRequestBytes < PREFERRED_BLOCK_SIZE || maxRequestBytes > 2 ** 30) {
      throw new RangeError(`maxRequestBytes must be an integer in [${PREFERRED_BLOCK_SIZE}, 2^30]`);
    }
    const maxInFlight = options.maxInFlightPerConnection ?? DEFAULT_MAX_IN_FLIGHT;
    if (!Number.isInteger(maxInFlight) || maxInFlight < 1) throw new RangeError('maxInFlightPerConnection must be ≥ 1');
    const maxInFlightBytes = options.maxInFlightBytesPerConnection ?? 2 * maxRequestBytes;
    if (!(maxInFlightBytes >= 1)) throw new RangeError('maxInFlightBytesPerConnection must be ≥ 1');
    this.catalogue = options.catalogue;
    this.log = options.log ?? ((line) => process.stderr.write(`${line}\n`));
    this.limits = {
      maxRequestBytes,
      maxInFlight,
      maxInFlightBytes,
      closeTimeoutMs: options.closeTimeoutMs ?? DEFAULT_CLOSE_TIMEOUT,
    };
    this.server = net.createServer({ allowHalfOpen: true, pauseOnConnect: false }, (socket) => this.accept(socket));
    this.server.on('error', (e) => this.log(`nbd: server error: ${oneLine(e)}`));
  }

  /** Starts listening (TCP defaults to 127.0.0.1; port 0 picks a free port). Resolves with the bound address. */
  listen(where: NbdListenOptions): Promise<NbdAddress> {
    if (this.closing) return Promise.reject(new Error('NbdServer is closed'));
    if (this.listened) return Promise.reject(new Error('NbdServer is already listening'));
    this.listened = true;
    return new Promise<NbdAddress>((resolve, reject) => {
      const onError = (e: Error): void => {
        this.listened = false;
        reject(e);
      };
      this.server.once('error', onError);
      const done = (): void => {
        this.server.off('error', onError);
        resolve(this.address()!);
      };
      if ('path' in where) this.server.listen({ path: where.path }, done);
      else this.server.listen({ host: where.host ?? '127.0.0.1', port: where.port }, done);
    });
  }

  /** The bound address, or undefined when not listening. */
  address(): NbdAddress | undefined {
    const a = this.server.address();
    if (a === null) return undefined;
    if (typeof a === 'string') return { path: a };
    return { host: a.address, port: a.port, family: a.family };
  }

  /** Open client connections (handshake or transmission). */
  get connectionCount(): number {
    return this.connections.size;
  }

  /**
   * Stops accepting, stops reading new requests, lets requests already in progress finish and their replies
   * drain (up to closeTimeoutMs, then connections are destroyed), closes connections and the devices they
   * opened. Idempotent.
   */
  close(): Promise<void> {
    if (!this.closing) {
      this.closing = (async () => {
        const stopped = new Promise<void>((resolve) => {
          if (this.server.listening) this.server.close(() => resolve());
          else resolve();
        });
        await Promise.all([...this.connections].map((c) => c.shutdown()));
        await stopped;
      })();
    }
    return this.closing;
  }

  private accept(socket: net.Socket): void {
    if (this.closing) {
      socket.destroy();
      return;
    }
    socket.setNoDelay(true);
    socket.setKeepAlive(true, 60_000);
    const conn = new NbdConnection(socket, this.catalogue, this.log, this.limits);
    this.connections.add(conn);
    conn
      .run()
      .catch((e) => this.log(`nbd: connection handler failed: ${oneLine(e)}`))
      .finally(() => this.connections.delete(conn));
  }
}

// ---------------------------------------------------------------------------------------------------------
// Helpers (exported for tests and for other front ends that need the same rules)

/**
 * The block sizes advertised for an export of `size` bytes.
 *
 * The device is byte-addressable, so the server itself accepts requests of any alignment. A minimum block size
 * of 512 is advertised when the export size is a multiple of 512, because clients may then use 512-byte
 * sectors without losing anything. The spec says the export size SHOULD be a multiple of an advertised minimum
 * block size "since otherwise the client would be unable to access the final few bytes" — a client that
 * requested NBD_INFO_BLOCK_SIZE MUST obey the minimum, so advertising 512 for an export of e.g. 10 MiB + 513
 * bytes would make the tail unreadable. For such sizes we advertise 1 (also the protocol's default minimum).
 * Preferred is 4096 (a power of two ≥ max(minimum, 512), as required); maximum is the request limit.
 */
export function blockSizesFor(size: number, maxRequestBytes: number): { minimum: number; preferred: number; maximum: number } {
  return { minimum: size % 512 === 0 ? 512 : 1, preferred: PREFERRED_BLOCK_SIZE, maximum: maxRequestBytes };
}

/**
 * Turns what a device reports for [offset, offset+length) into a sorted, gap-free, merged list clipped to that
 * range. Only zero runs are trusted: anything not covered by a zero run is data. Zero runs are shrunk inward
 * to `align` boundaries where they start or end inside the range (the export end counts as aligned), so
 * partially-zero sectors are reported as data.
 */
export function normalizeExtents(raw: readonly Extent[], offset: number, length: number, size: number, align: number): Extent[] {
  const end = offset + length;
  const out: Extent[] = [];
  const push = (o: number, l: number, zero: boolean): void => {
    if (l <= 0) return;
    const last = out[out.length - 1];
    if (last && last.zero === zero && last.offset + last.length === o) last.length += l;
    else out.push({ offset: o, length: l, zero });
  };
  let sorted = raw;
  for (let i = 1; i < raw.length; i++) {
    if (raw[i].offset < raw[i - 1].offset) {
      sorted = [...raw].sort((a, b) => a.offset - b.offset);
      break;
    }
  }
  let pos = offset;
  for (const e of sorted) {
    if (!e.zero || !(e.length > 0)) continue;
    // Boundaries at or beyond the request's own edges are not shrunk: devices usually clip extents to the
    // query, and the first/last descriptor of an unaligned query may be unaligned anyway.
    let a = e.offset <= pos ? pos : Math.ceil(e.offset / align) * align;
    let b = e.offset + e.length;
    if (b >= end) b = end;
    else if (b < size) b = Math.floor(b / align) * align;
    if (b <= a) continue;
    push(pos, a - pos, false);
    push(a, b - a, true);
    pos = b;
  }
  push(pos, end - pos, false);
  return out;
}

function errnoOf(e: unknown): number {
  if (e instanceof DeviceError || (e instanceof Error && e.name === 'DeviceError')) {
    switch ((e as DeviceError).errno) {
      case 'EPERM':
        return C.EPERM;
      case 'EINVAL':
        return C.EINVAL;
      case 'ENOSPC':
        return C.ENOSPC;
      // EIO, and ENOTSUP (the spec reserves NBD_ENOTSUP for fast-zero requests): an I/O failure for a reader.
      default:
        return C.EIO;
    }
  }
  return C.EIO;
}

function failingOffset(e: unknown): number | undefined {
  const off = (e as { offset?: unknown } | null)?.offset;
  return typeof off === 'number' && Number.isFinite(off) ? off : undefined;
}

function oneLine(e: unknown): string {
  const s = e instanceof Error ? e.message : String(e);
  return s.replace(/\s*[\r\n]+\s*/g, ' ').slice(0, 500);
}

function messageForClient(e: unknown): string {
  if (e instanceof DeviceError || (e instanceof Error && e.name === 'DeviceError')) return oneLine(e);
  return 'internal server error';
}

// ---------------------------------------------------------------------------------------------------------

interface Request {
  flags: number;
  type: number;
  cookieHi: number;
  cookieLo: number;
  offset: number;
  length: number;
}

interface OpenExport {
  name: string;
  device: BlockDevice;
  description: string;
}

type OptionOutcome = 'continue' | 'transmission' | 'abort';

class NbdConnection {
  private readonly reader: SocketReader;
  private readonly writer: SocketWriter;
  private readonly peer: string;
  private readonly socketClosed: Promise<void>;

  // Negotiated state
  private clientNoZeroes = false;
  private structured = false;
  /** Export name base:allocation was selected for by the last NBD_OPT_SET_META_CONTEXT, or null. */
  private metaExport: string | null = null;
  private metaActive = false;
  /** Export opened by NBD_OPT_INFO, kept for a following NBD_OPT_GO of the same name. */
  private pendingInfo: OpenExport | null = null;
  private current: OpenExport | null = null;
  private size = 0;
  private transmissionFlags = 0;

  // Request accounting
  private inFlight = 0;
  private inFlightBytes = 0;
  private slotWaiter: (() => void) | null = null;
  private idleWaiters: Array<() => void> = [];

  private stopping = false;
  private finished: Promise<void> | null = null;
  private lingerTimer: NodeJS.Timeout | null = null;
  private socketErrorLogged = false;

  constructor(
    private readonly socket: net.Socket,
    private readonly catalogue: ExportCatalogue,
    private readonly logLine: (line: string) => void,
    private readonly limits: Resolved,
  ) {
    this.peer = socket.remoteAddress ? `${socket.remoteAddress}:${socket.remotePort}` : 'local';
    this.reader = new SocketReader(socket);
    this.writer = new SocketWriter(socket);
    this.socketClosed = new Promise<void>((resolve) => socket.once('close', () => resolve()));
    socket.on('error', (e: NodeJS.ErrnoException) => {
      if (this.socketErrorLogged) return;
      this.socketErrorLogged = true;
      this.log(`socket error: ${e.code ?? oneLine(e)}`);
    });
  }

  private log(msg: string): void {
    const exp = this.current ? ` export "${this.current.name}"` : '';
    try {
      // Names and messages can come from the client: keep the line one line, free of control characters.
      this.logLine(`nbd ${this.peer}${exp}: ${msg}`.replace(/[\x00-\x1f\x7f]+/g, ' '));
    } catch {
      // A failing logger must not take the connection down.
    }
  }

  run(): Promise<void> {
    if (!this.finished) this.finished = this.runInner();
    return this.finished;
  }

  /** Server shutdown: stop reading, finish what is in flight, close. */
  shutdown(): Promise<void> {
    if (!this.stopping) {
      this.stopping = true;
      this.reader.cancel(new ConnectionClosedError('server shutting down'));
      this.wakeSlot();
    }
    this.startLinger();
    // Resolve when the connection is done, or once it has been force-closed even if a device call hangs.
    return Promise.race([this.run(), this.socketClosed.then(() => this.whenIdleOrTimeout())]);
  }

  private async runInner(): Promise<void> {
    let hard = false;
    try {
      if (await this.handshake()) await this.transmission();
    } catch (e) {
      if (e instanceof ConnectionClosedError) {
        // Peer went away or sent EOF, or we are shutting down: finish gracefully.
      } else if (e instanceof ProtocolError) {
        this.log(`${e.message}; closing connection`);
        hard = true;
      } else {
        this.log(`internal error: ${oneLine(e)}; closing connection`);
        hard = true;
      }
    }
    this.stopping = true;
    this.reader.cancel();
    if (hard) {
      this.socket.destroy();
    } else {
      await this.whenIdle();
      this.startLinger();
      if (!this.socket.destroyed) {
        // Flush what we wrote, then close both directions (the client must not send after NBD_CMD_DISC).
        this.socket.end(() => this.socket.destroy());
      }
    }
    await this.socketClosed;
    await this.whenIdle();
    if (this.lingerTimer) clearTimeout(this.lingerTimer);
    await this.closeDevice(this.current);
    await this.closeDevice(this.pendingInfo);
    this.current = null;
    this.pendingInfo = null;
  }

  private startLinger(): void {
    if (this.lingerTimer || this.socket.destroyed) return;
    this.lingerTimer = setTimeout(() => this.socket.destroy(), this.limits.closeTimeoutMs);
    this.lingerTimer.unref();
  }

  private async whenIdleOrTimeout(): Promise<void> {
    let timer: NodeJS.Timeout | undefined;
    await Promise.race([
      this.whenIdle(),
      new Promise<void>((resolve) => {
        timer = setTimeout(resolve, this.limits.closeTimeoutMs);
      }),
    ]);
    if (timer) clearTimeout(timer);
  }

  private async closeDevice(e: OpenExport | null): Promise<void> {
    if (!e?.device.close) return;
    try {
      await e.device.close();
    } catch (err) {
      this.log(`closing export "${e.name}" failed: ${oneLine(err)}`);
    }
  }

  // ---- Handshake ----------------------------------------------------------------------------------------

  /** Returns true when transmission phase was entered. */
  private async handshake(): Promise<boolean> {
    const greeting = Buffer.allocUnsafe(18);
    greeting.writeBigUInt64BE(C.NBD_MAGIC, 0);
    greeting.writeBigUInt64BE(C.IHAVEOPT, 8);
    greeting.writeUInt16BE(C.FLAG_FIXED_NEWSTYLE | C.FLAG_NO_ZEROES, 16);
    await this.writer.write([greeting]);

    const clientFlags = (await this.reader.read(4)).readUInt32BE(0);
    if ((clientFlags & ~(C.FLAG_C_FIXED_NEWSTYLE | C.FLAG_C_NO_ZEROES)) !== 0) {
      throw new ProtocolError(`unknown client flags 0x${clientFlags.toString(16)}`);
    }
    if ((clientFlags & C.FLAG_C_FIXED_NEWSTYLE) === 0) {
      throw new ProtocolError('client does not support fixed newstyle negotiation');
    }
    this.clientNoZeroes = (clientFlags & C.FLAG_C_NO_ZEROES) !== 0;

    for (;;) {
      const header = await this.reader.read(C.OPTION_HEADER_BYTES);
      if (header.readBigUInt64BE(0) !== C.IHAVEOPT) throw new ProtocolError('bad option magic');
      const option = header.readUInt32BE(8);
      const length = header.readUInt32BE(12);
      if (length > MAX_OPTION_BYTES) {
        throw new ProtocolError(`option ${option} carries ${length} bytes (limit ${MAX_OPTION_BYTES})`);
      }
      const data = await this.reader.read(length);
      const outcome = await this.handleOption(option, data);
      if (outcome === 'transmission') return true;
      if (outcome === 'abort') return false;
    }
  }

  private optionReply(option: number, type: number, payload: Buffer = EMPTY): Buffer[] {
    const h = Buffer.allocUnsafe(C.OPTION_REPLY_HEADER_BYTES);
    h.writeBigUInt64BE(C.OPTION_REPLY_MAGIC, 0);
    h.writeUInt32BE(option, 8);
    h.writeUInt32BE(type, 12);
    h.writeUInt32BE(payload.length, 16);
    return payload.length ? [h, payload] : [h];
  }

  private async sendOptionError(option: number, type: number, message: string): Promise<OptionOutcome> {
    await this.writer.write(this.optionReply(option, type, utf8Truncate(message, MAX_CLIENT_MESSAGE)));
    return 'continue';
  }

  private async handleOption(option: number, data: Buffer): Promise<OptionOutcome> {
    switch (option) {
      case C.OPT_EXPORT_NAME:
        return this.optExportName(data);
      case C.OPT_ABORT:
        await this.writer.write(this.optionReply(option, C.REP_ACK));
        return 'abort';
      case C.OPT_LIST:
        return this.optList(data);
      case C.OPT_INFO:
      case C.OPT_GO:
        return this.optInfoGo(option, data);
      case C.OPT_STRUCTURED_REPLY:
        if (data.length !== 0) return this.sendOptionError(option, C.REP_ERR_INVALID, 'NBD_OPT_STRUCTURED_REPLY takes no data');
        this.structured = true;
        await this.writer.write(this.optionReply(option, C.REP_ACK));
        return 'continue';
      case C.OPT_LIST_META_CONTEXT:
      case C.OPT_SET_META_CONTEXT:
        return this.optMetaContext(option, data);
      case C.OPT_STARTTLS:
        return this.sendOptionError(option, C.REP_ERR_UNSUP, 'TLS is not supported by this server');
      default:
        return this.sendOptionError(option, C.REP_ERR_UNSUP, `option ${option} is not supported`);
    }
  }

  private async openExport(name: string): Promise<OpenExport | undefined> {
    if (this.pendingInfo) {
      const p = this.pendingInfo;
      this.pendingInfo = null;
      if (p.name === name) return p;
      await this.closeDevice(p);
    }
    const opened = await this.catalogue.open(name);
    if (!opened) return undefined;
    return { name, device: opened.device, description: opened.description };
  }

  private enter(e: OpenExport): void {
    this.current = e;
    this.size = e.device.size;
    this.transmissionFlags = this.flagsFor();
    this.metaActive = this.structured && this.metaExport === e.name;
  }

  private flagsFor(): number {
    return (
      C.FLAG_HAS_FLAGS |
      C.FLAG_READ_ONLY |
      C.FLAG_SEND_FLUSH |
      C.FLAG_SEND_CACHE |
      C.FLAG_CAN_MULTI_CONN | // read-only: every connection sees the same immutable data
      (this.structured ? C.FLAG_SEND_DF : 0)
    );
  }

  private async optExportName(data: Buffer): Promise<OptionOutcome> {
    const name = data.toString('utf8');
    let e: OpenExport | undefined;
    try {
      e = await this.openExport(name);
    } catch (err) {
      throw new ProtocolError(`NBD_OPT_EXPORT_NAME "${name}": cannot open export: ${oneLine(err)}`);
    }
    // NBD_OPT_EXPORT_NAME cannot fail gracefully: the spec requires terminating the session.
    if (!e) throw new ProtocolError(`NBD_OPT_EXPORT_NAME for unknown export "${name}"`);
    this.enter(e);
    const reply = Buffer.alloc(this.clientNoZeroes ? 10 : 10 + 124);
    writeU64(reply, this.size, 0);
    reply.writeUInt16BE(this.transmissionFlags, 8);
    await this.writer.write([reply]);
    return 'transmission';
  }

  private async optList(data: Buffer): Promise<OptionOutcome> {
    if (data.length !== 0) return this.sendOptionError(C.OPT_LIST, C.REP_ERR_INVALID, 'NBD_OPT_LIST takes no data');
    let exports: ExportInfo[];
    try {
      exports = await this.catalogue.list();
    } catch (err) {
      this.log(`listing exports failed: ${oneLine(err)}`);
      return this.sendOptionError(C.OPT_LIST, C.REP_ERR_POLICY, 'cannot list exports');
    }
    const bufs: Buffer[] = [];
    for (const e of exports) {
      const name = Buffer.from(e.name, 'utf8');
      if (name.length > C.MAX_STRING_BYTES) continue; // not addressable by any client
      const desc = utf8Truncate(e.description ?? '', C.MAX_STRING_BYTES);
      const payload = Buffer.allocUnsafe(4 + name.length + desc.length);
      payload.writeUInt32BE(name.length, 0);
      name.copy(payload, 4);
      desc.copy(payload, 4 + name.length);
      bufs.push(...this.optionReply(C.OPT_LIST, C.REP_SERVER, payload));
    }
    bufs.push(...this.optionReply(C.OPT_LIST, C.REP_ACK));
    await this.writer.write(bufs);
    return 'continue';
  }

  private async optInfoGo(option: number, data: Buffer): Promise<OptionOutcome> {
    // 32-bit name length, name, 16-bit count, count × 16-bit info types.
    if (data.length < 6) return this.sendOptionError(option, C.REP_ERR_INVALID, 'option data too short');
    const nameLength = data.readUInt32BE(0);
    if (nameLength > data.length - 6) return this.sendOptionError(option, C.REP_ERR_INVALID, 'export name length exceeds option data');
    const name = data.toString('utf8', 4, 4 + nameLength);
    const count = data.readUInt16BE(4 + nameLength);
    if (data.length !== 6 + nameLength + 2 * count) {
      return this.sendOptionError(option, C.REP_ERR_INVALID, 'information request list does not match option length');
    }
    const wanted = new Set<number>();
    for (let i = 0; i < count; i++) wanted.add(data.readUInt16BE(6 + nameLength + 2 * i));

    let e: OpenExport | undefined;
    try {
      e = await this.openExport(name);
    } catch (err) {
      this.log(`opening export "${name}" failed: ${oneLine(err)}`);
      return this.sendOptionError(option, C.REP_ERR_UNKNOWN, `export "${name}" is not available`);
    }
    if (!e) return this.sendOptionError(option, C.REP_ERR_UNKNOWN, `unknown export "${name}"`);

    const size = e.device.size;
    const flags = this.flagsFor();
    const bufs: Buffer[] = [];
    const info = (type: number, body: Buffer): void => {
      const p = Buffer.allocUnsafe(2 + body.length);
      p.writeUInt16BE(type, 0);
      body.copy(p, 2);
      bufs.push(...this.optionReply(option, C.REP_INFO, p));
    };
    const exp = Buffer.allocUnsafe(10);
    writeU64(exp, size, 0);
    exp.writeUInt16BE(flags, 8);
    info(C.INFO_EXPORT, exp);
    if (wanted.has(C.INFO_NAME)) info(C.INFO_NAME, utf8Truncate(name, C.MAX_STRING_BYTES));
    if (wanted.has(C.INFO_DESCRIPTION) && e.description) info(C.INFO_DESCRIPTION, utf8Truncate(e.description, C.MAX_STRING_BYTES));
    // Sent whether or not requested: we advertise a non-default minimum (512) for sector-multiple sizes.
    const bs = blockSizesFor(size, this.limits.maxRequestBytes);
    const b = Buffer.allocUnsafe(12);
    b.writeUInt32BE(bs.minimum, 0);
    b.writeUInt32BE(bs.preferred, 4);
    b.writeUInt32BE(bs.maximum, 8);
    info(C.INFO_BLOCK_SIZE, b);
    bufs.push(...this.optionReply(option, C.REP_ACK));
    await this.writer.write(bufs);

    if (option === C.OPT_GO) {
      this.enter(e);
      return 'transmission';
    }
    this.pendingInfo = e; // reused if NBD_OPT_GO for the same name follows
    return 'continue';
  }

  private async optMetaContext(option: number, data: Buffer): Promise<OptionOutcome> {
    const set = option === C.OPT_SET_META_CONTEXT;
    if (set) this.metaExport = null; // replaced even when the option fails
    // 32-bit name length, name, 32-bit query count, queries (32-bit length + string).
    const invalid = (why: string): Promise<OptionOutcome> => this.sendOptionError(option, C.REP_ERR_INVALID, why);
    if (data.length < 8) return invalid('option data too short');
    const nameLength = data.readUInt32BE(0);
    if (nameLength > data.length - 8) return invalid('export name length exceeds option data');
    const name = data.toString('utf8', 4, 4 + nameLength);
    const count = data.readUInt32BE(4 + nameLength);
    let pos = 8 + nameLength;
    const queries: string[] = [];
    for (let i = 0; i < count; i++) {
      if (pos + 4 > data.length) return invalid('query list exceeds option data');
      const ql = data.readUInt32BE(pos);
      if (ql > data.length - pos - 4) return invalid('query length exceeds option data');
      queries.push(data.toString('utf8', pos + 4, pos + 4 + ql));
      pos += 4 + ql;
    }
    if (pos !== data.length) return invalid('trailing bytes after queries');
    if (set && !this.structured) return invalid('structured replies must be negotiated first');

    let match: boolean;
    if (set) match = queries.includes(C.META_BASE_ALLOCATION);
    else match = count === 0 || queries.some((q) => q === 'base:' || q === C.META_BASE_ALLOCATION);

    const bufs: Buffer[] = [];
    if (match) {
      const ctxName = Buffer.from(C.META_BASE_ALLOCATION, 'utf8');
      const p = Buffer.allocUnsafe(4 + ctxName.length);
      p.writeUInt32BE(set ? BASE_ALLOCATION_ID : 0, 0); // IDs in LIST replies are reserved: 0
      ctxName.copy(p, 4);
      bufs.push(...this.optionReply(option, C.REP_META_CONTEXT, p));
      if (set) this.metaExport = name;
    }
    bufs.push(...this.optionReply(option, C.REP_ACK));
    await this.writer.write(bufs);
    return 'continue';
  }

  // ---- Transmission -------------------------------------------------------------------------------------

  private async transmission(): Promise<void> {
    const { maxInFlight, maxInFlightBytes, maxRequestBytes } = this.limits;
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
        case C.CMD_WRITE:
          // Keep the stream in sync by consuming the payload, unless it is beyond what we ever accept.
          if (req.length > maxRequestBytes) {
            throw new ProtocolError(`NBD_CMD_WRITE payload of ${req.length} bytes exceeds the ${maxRequestBytes}-byte limit`);
          }
          await this.reader.skip(req.length);
          this.dispatch(req, 0);
          break;
        case C.CMD_READ: {
          const cost = Math.min(req.length, maxRequestBytes);
          while (this.inFlight > 0 && this.inFlightBytes + cost > maxInFlightBytes && !this.stopping) await this.waitSlot();
          if (this.stopping) return;
          this.dispatch(req, cost);
          break;
        }
        default:
          this.dispatch(req, 0);
      }
    }
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

  private whenIdle(): Promise<void> {
    if (this.inFlight === 0) return Promise.resolve();
    return new Promise<void>((resolve) => this.idleWaiters.push(resolve));
  }

  private dispatch(req: Request, cost: number): void {
    this.inFlight++;
    this.inFlightBytes += cost;
    this.handle(req)
      .catch((e) => {
        this.log(`internal error handling command ${req.type}: ${oneLine(e)}; closing connection`);
        this.socket.destroy();
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

  private async handle(req: Request): Promise<void> {
    switch (req.type) {
      case C.CMD_READ:
        return this.cmdRead(req);
      case C.CMD_WRITE:
      case C.CMD_TRIM:
      case C.CMD_WRITE_ZEROES:
        return this.replyError(req, C.EPERM, 'export is read-only');
      case C.CMD_FLUSH:
        if (req.flags & ~C.CMD_FLAG_FUA) return this.replyError(req, C.EINVAL, 'unsupported command flags');
        return this.replyOk(req);
      case C.CMD_CACHE:
        return this.cmdCache(req);
      case C.CMD_BLOCK_STATUS:
        return this.cmdBlockStatus(req);
      default:
        return this.replyError(req, C.EINVAL, `unknown command ${req.type}`);
    }
  }

  /** Checks flags (FUA is tolerated everywhere: nothing is ever written) and the range. */
  private checkRequest(req: Request, allowedFlags: number): [number, string] | null {
    if (req.flags & ~(allowedFlags | C.CMD_FLAG_FUA)) return [C.EINVAL, 'unsupported command flags'];
    if (req.length === 0) return [C.EINVAL, 'zero-length request'];
    if (req.offset > this.size || req.length > this.size - req.offset) return [C.EINVAL, 'request beyond the end of the export'];
    return null;
  }

  private async cmdRead(req: Request): Promise<void> {
    const bad = this.checkRequest(req, this.structured ? C.CMD_FLAG_DF : 0);
    if (bad) return this.replyError(req, bad[0], bad[1]);
    if (req.length > this.limits.maxRequestBytes) {
      // With structured replies the spec allows NBD_EOVERFLOW for reads we will not serve in one go; with
      // simple replies a read over the advertised maximum is a client error: NBD_EINVAL.
      return this.replyError(req, this.structured ? C.EOVERFLOW : C.EINVAL, `read larger than ${this.limits.maxRequestBytes} bytes`);
    }
    const device = this.current!.device;
    if (!this.structured) {
      let data: Buffer;
      try {
        data = await readExact(device, req.offset, req.length);
      } catch (e) {
        this.logReadError(req, req.offset, req.length, e);
        return this.replyError(req, errnoOf(e), messageForClient(e));
      }
      await this.writer.write(joinSmall(this.simpleHeader(req, 0), data));
      return;
    }

    if ((req.flags & C.CMD_FLAG_DF) !== 0 || req.length < MIN_PLANNED_READ) return this.readOneChunk(req, device);

    // Structured: holes as OFFSET_HOLE chunks, data segments read concurrently, one DONE at the end.
    const segments = await this.readPlan(req.offset, req.length);
    const results = await Promise.allSettled(
      segments.map((s) => (s.zero ? Promise.resolve(EMPTY) : readExact(device, s.offset, s.length))),
    );
    const bufs: Buffer[] = [];
    for (let i = 0; i < segments.length; i++) {
      const s = segments[i];
      const r = results[i];
      const last = i === segments.length - 1;
      const flags = last ? C.REPLY_FLAG_DONE : 0;
      if (s.zero) {
        const h = this.chunkHeader(req, flags, C.REPLY_TYPE_OFFSET_HOLE, 12, 12);
        writeU64(h, s.offset, 20);
        h.writeUInt32BE(s.length, 28);
        bufs.push(h);
      } else if (r.status === 'fulfilled') {
        const h = this.chunkHeader(req, flags, C.REPLY_TYPE_OFFSET_DATA, 8 + s.length, 8);
        writeU64(h, s.offset, 20);
        bufs.push(h, r.value);
      } else {
        this.logReadError(req, s.offset, s.length, r.reason);
        bufs.push(...this.errorOffsetChunk(req, flags, s.offset, s.length, r.reason));
      }
    }
    await this.writer.write(bufs);
  }

  /** A structured read answered as one OFFSET_DATA chunk (or one error chunk): the small-read fast path. */
  private async readOneChunk(req: Request, device: BlockDevice): Promise<void> {
    let data: Buffer;
    try {
      data = await readExact(device, req.offset, req.length);
    } catch (e) {
      this.logReadError(req, req.offset, req.length, e);
      await this.writer.write(this.errorOffsetChunk(req, C.REPLY_FLAG_DONE, req.offset, req.length, e));
      return;
    }
    const h = this.chunkHeader(req, C.REPLY_FLAG_DONE, C.REPLY_TYPE_OFFSET_DATA, 8 + req.length, 8);
    writeU64(h, req.offset, 20);
    await this.writer.write(joinSmall(h, data));
  }

  /** An NBD_REPLY_TYPE_ERROR_OFFSET chunk for a failed read of [offset, offset+length). */
  private errorOffsetChunk(req: Request, flags: number, offset: number, length: number, e: unknown): Buffer[] {
    let at = failingOffset(e);
    if (at === undefined || at < offset || at >= offset + length) at = offset;
    const msg = utf8Truncate(messageForClient(e), MAX_CLIENT_MESSAGE);
    const h = this.chunkHeader(req, flags, C.REPLY_TYPE_ERROR_OFFSET, 14 + msg.length, 6);
    h.writeUInt32BE(errnoOf(e), 20);
    h.writeUInt16BE(msg.length, 24);
    const tail = Buffer.allocUnsafe(8);
    writeU64(tail, at, 0);
    return [h, msg, tail];
  }

  /** Splits a read into data and hole segments using the device's zero runs (small holes become data). */
  private async readPlan(offset: number, length: number): Promise<Extent[]> {
    let raw: Extent[];
    try {
      raw = await this.current!.device.extents(offset, length);
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

  private async cmdCache(req: Request): Promise<void> {
    const bad = this.checkRequest(req, 0);
    if (bad) return this.replyError(req, bad[0], bad[1]);
    const device = this.current!.device;
    if (device.prefetch) {
      try {
        await device.prefetch(req.offset, req.length);
      } catch (e) {
        // A cache hint that fails changes nothing for later reads; report success as the spec permits.
        this.log(`CACHE ${req.offset}+${req.length}: prefetch failed: ${oneLine(e)}`);
      }
    }
    return this.replyOk(req);
  }

  private async cmdBlockStatus(req: Request): Promise<void> {
    if (!this.metaActive) return this.replyError(req, C.EINVAL, 'no metadata context was negotiated');
    const bad = this.checkRequest(req, C.CMD_FLAG_REQ_ONE);
    if (bad) return this.replyError(req, bad[0], bad[1]);
    let raw: Extent[];
    try {
      raw = await this.current!.device.extents(req.offset, req.length);
    } catch (e) {
      this.log(`BLOCK_STATUS ${req.offset}+${req.length} failed: ${oneLine(e)}`);
      return this.replyError(req, errnoOf(e), messageForClient(e));
    }
    // Clipped to the request, so every descriptor fits the 32-bit length field (the request length is 32-bit).
    let extents = normalizeExtents(raw, req.offset, req.length, this.size, HOLE_ALIGN);
    if (req.flags & C.CMD_FLAG_REQ_ONE) extents = extents.slice(0, 1);
    else if (extents.length > C.MAX_BLOCK_STATUS_DESCRIPTORS) extents = extents.slice(0, C.MAX_BLOCK_STATUS_DESCRIPTORS);
    const payloadLength = 4 + 8 * extents.length;
    const buf = Buffer.allocUnsafe(C.STRUCTURED_REPLY_HEADER_BYTES + payloadLength);
    this.writeChunkHeader(buf, req, C.REPLY_FLAG_DONE, C.REPLY_TYPE_BLOCK_STATUS, payloadLength);
    buf.writeUInt32BE(BASE_ALLOCATION_ID, 20);
    let p = 24;
    for (const e of extents) {
      buf.writeUInt32BE(e.length, p);
      buf.writeUInt32BE(e.zero ? C.STATE_HOLE | C.STATE_ZERO : 0, p + 4);
      p += 8;
    }
    await this.writer.write([buf]);
  }

  // ---- Replies ------------------------------------------------------------------------------------------

  private simpleHeader(req: Request, error: number): Buffer {
    const h = Buffer.allocUnsafe(C.SIMPLE_REPLY_HEADER_BYTES);
    h.writeUInt32BE(C.SIMPLE_REPLY_MAGIC, 0);
    h.writeUInt32BE(error, 4);
    h.writeUInt32BE(req.cookieHi, 8);
    h.writeUInt32BE(req.cookieLo, 12);
    return h;
  }

  private writeChunkHeader(h: Buffer, req: Request, flags: number, type: number, length: number): void {
    h.writeUInt32BE(C.STRUCTURED_REPLY_MAGIC, 0);
    h.writeUInt16BE(flags, 4);
    h.writeUInt16BE(type, 6);
    h.writeUInt32BE(req.cookieHi, 8);
    h.writeUInt32BE(req.cookieLo, 12);
    h.writeUInt32BE(length, 16);
  }

  /** A chunk header followed by `extra` bytes of fixed payload fields for the caller to fill. */
  private chunkHeader(req: Request, flags: number, type: number, length: number, extra: number): Buffer {
    const h = Buffer.allocUnsafe(C.STRUCTURED_REPLY_HEADER_BYTES + extra);
    this.writeChunkHeader(h, req, flags, type, length);
    return h;
  }

  private async replyOk(req: Request): Promise<void> {
    // A simple reply is allowed for any command but READ even with structured replies negotiated.
    await this.writer.write([this.simpleHeader(req, 0)]);
  }

  private async replyError(req: Request, errno: number, message: string): Promise<void> {
    if (!this.structured) {
      await this.writer.write([this.simpleHeader(req, errno)]);
      return;
    }
    // Structured replies were negotiated: errors go as an NBD_REPLY_TYPE_ERROR chunk with a message
    // (mandatory for READ, preferred by the spec for everything else).
    const msg = utf8Truncate(message, MAX_CLIENT_MESSAGE);
    const h = this.chunkHeader(req, C.REPLY_FLAG_DONE, C.REPLY_TYPE_ERROR, 6 + msg.length, 6);
    h.writeUInt32BE(errno, 20);
    h.writeUInt16BE(msg.length, 24);
    await this.writer.write([h, msg]);
  }

  private logReadError(req: Request, offset: number, length: number, e: unknown): void {
    const at = failingOffset(e);
    this.log(
      `READ ${req.offset}+${req.length}: device read ${offset}+${length} failed` +
        `${at !== undefined ? ` at offset ${at}` : ''}: ${C.errnoName(errnoOf(e))}: ${oneLine(e)}`,
    );
  }
}

/** [header, data] as one buffer when the data is small: one socket write instead of a corked batch. */
function joinSmall(header: Buffer, data: Buffer): Buffer[] {
  if (data.length > COALESCE_REPLY_BYTES) return [header, data];
  const b = Buffer.allocUnsafe(header.length + data.length);
  header.copy(b, 0);
  data.copy(b, header.length);
  return [b];
}

async function readExact(device: BlockDevice, offset: number, length: number): Promise<Buffer> {
  const b = await device.read(offset, length);
  if (!Buffer.isBuffer(b) || b.length < length) {
    throw new DeviceError(`device returned ${Buffer.isBuffer(b) ? b.length : 'no'} bytes instead of ${length}`, 'EIO', offset);
  }
  return b.length === length ? b : b.subarray(0, length);
}
