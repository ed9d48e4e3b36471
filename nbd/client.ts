/**
 * A small promise-based NBD client: fixed newstyle handshake, NBD_OPT_GO (falling back to
 * NBD_OPT_EXPORT_NAME), structured replies, block status for base:allocation and any other metadata context
 * (qemu:dirty-bitmap:NAME), writes, zeroes, trims and flushes, several requests in flight.
 *
 * `NbdClient` is itself a read-only `BlockDevice`, so an `nbd://` source can be read like any other device.
 * Failures of a command reject with `NbdError` (a `DeviceError` carrying the NBD error number and, for
 * structured read errors, the failing offset).
 */
import * as net from 'node:net';
import * as tls from 'node:tls';
import { BlockDevice, DeviceError, ExportInfo, Extent } from '../src/device/types';
import * as C from './constants';
import { ConnectionClosedError, DirectReceive, EMPTY, ProtocolError, SocketReader, SocketWriter, readU64, writeU64 } from './wire';

export type NbdConnectAddress = { host?: string; port?: number } | { path: string };

export interface NbdClientOptions {
  /** Export to open; default "" (the server's default export). */
  exportName?: string;
  /** Negotiate structured replies (default true). */
  structuredReplies?: boolean;
  /** Negotiate base:allocation for extents() (default true; needs structured replies). */
  blockStatus?: boolean;
  /** More metadata contexts to ask for (e.g. qemu:dirty-bitmap:NAME); see `contexts` for what was granted. */
  metaContexts?: string[];
  /** Handshake timeout in ms (default 30 s). */
  timeoutMs?: number;
  /** Upgrade to TLS with NBD_OPT_STARTTLS before anything else; fail if the server cannot. */
  tls?: NbdClientTls;
  /** Requests sent and not yet answered, at most (more wait their turn); default unlimited. */
  maxInFlight?: number;
}

/** TLS credentials of a client: a pre-shared key, or X.509 (CA to verify the server, optional client certificate). */
export interface NbdClientTls {
  psk?: { identity: string; key: Buffer };
  ca?: Buffer;
  cert?: Buffer;
  key?: Buffer;
  /** Name the server's certificate must carry (none: the chain is verified, the name is not). */
  hostname?: string;
  /** false: accept any server certificate (tls-verify-peer=0) */
  verifyPeer?: boolean;
}

export interface NbdBlockSizes {
  minimum: number;
  preferred: number;
  maximum: number;
}

/** An error reply from the server (or a transport failure, with errno EIO). */
export class NbdError extends DeviceError {
  constructor(
    message: string,
    /** NBD error number (C.EIO, C.EINVAL, ...). */
    readonly nbdErrno: number,
    offset?: number,
  ) {
    super(message, toDeviceErrno(nbdErrno), offset);
    this.name = 'NbdError';
  }
}

function toDeviceErrno(errno: number): DeviceError['errno'] {
  switch (errno) {
    case C.EPERM:
      return 'EPERM';
    case C.EINVAL:
    case C.EOVERFLOW:
      return 'EINVAL';
    case C.ENOSPC:
      return 'ENOSPC';
    case C.ENOTSUP:
      return 'ENOTSUP';
    default:
      return 'EIO';
  }
}

/** Parts of an option reply. */
interface OptionReply {
  option: number;
  type: number;
  data: Buffer;
}

interface Pending {
  type: number;
  offset: number;
  length: number;
  /** Read target (READ only). */
  buffer?: Buffer;
  /** Bytes of the read covered by data/hole chunks so far. */
  covered: number;
  extents?: Extent[];
  /** BLOCK_STATUS: descriptors by metadata context id. */
  statuses?: Map<number, BlockStatusDescriptor[]>;
  /** READ into a caller's buffer (`buffer` preset): data is copied there, never replaced. */
  into?: boolean;
  onStatus?: (statuses: Map<number, BlockStatusDescriptor[]>) => void;
  error?: NbdError;
  resolve: (v: Buffer | Extent[] | undefined) => void;
  reject: (e: Error) => void;
}

const MAX_OPTION_REPLY = 16 * 1024 * 1024;

/** One block status descriptor: a run and its flags in one metadata context. */
export interface BlockStatusDescriptor {
  offset: number;
  length: number;
  flags: number;
}

/** What the server answered to NBD_OPT_SET_META_CONTEXT. */
export interface MetaContextResult {
  /** context name → id, for each context the server granted */
  granted: Map<string, number>;
  /** set when the server refused the option itself (e.g. NBD_REP_ERR_UNSUP: no metadata contexts at all) */
  refused?: string;
}

/** Largest WRITE_ZEROES / TRIM / BLOCK_STATUS length asked in one request (32-bit field; stay well inside). */
const MAX_RANGE_REQUEST = 1 << 30;
/**
 * Payload of one READ or WRITE of readInto()/write(): servers answer several mid-sized requests faster than
 * one large one (qemu-nbd serves 256 KiB requests several times faster than 4 MiB ones).
 */
const DATA_REQUEST = 256 * 1024;

export class NbdClient implements BlockDevice {
  readonly size: number;
  readonly exportName: string;
  readonly description: string;
  readonly transmissionFlags: number;
  readonly blockSizes: NbdBlockSizes;
  readonly structuredReplies: boolean;
  /** True when base:allocation was negotiated (extents() then asks the server). */
  readonly hasBlockStatus: boolean;

  private readonly pending = new Map<number, Pending>();
  private idleWaiters: Array<() => void> = [];
  private nextCookie = 1;
  private closed: Error | null = null;
  private readonly done: Promise<void>;

  private constructor(
    private readonly socket: net.Socket | tls.TLSSocket,
    private readonly reader: SocketReader,
    private readonly writer: SocketWriter,
    info: {
      size: number;
      exportName: string;
      description: string;
      flags: number;
      blockSizes: NbdBlockSizes;
      structured: boolean;
      meta: MetaContextResult;
      maxInFlight?: number;
    },
  ) {
    this.maxInFlight = info.maxInFlight ?? Infinity;
    this.size = info.size;
    this.exportName = info.exportName;
    this.description = info.description;
    this.transmissionFlags = info.flags;
    this.blockSizes = info.blockSizes;
    this.structuredReplies = info.structured;
    this.contexts = info.meta.granted;
    this.metaContextRefusal = info.meta.refused;
    this.metaContextId = info.meta.granted.get(C.META_BASE_ALLOCATION) ?? null;
    this.hasBlockStatus = this.metaContextId !== null;
    this.done = this.replyLoop();
  }

  private readonly metaContextId: number | null;
  /** Metadata contexts the server granted (name → id). */
  readonly contexts: ReadonlyMap<string, number>;
  /** Why the server refused NBD_OPT_SET_META_CONTEXT altogether, if it did. */
  readonly metaContextRefusal: string | undefined;
  /** Bytes of data received in READ replies (holes not counted). */
  bytesRead = 0;
  /** Of those, how many the kernel wrote straight into readInto() buffers (plain sockets only). */
  get bytesInPlace(): number {
    return this.reader.bytesInPlace;
  }
  private readonly maxInFlight: number;
  /** Requests holding one of the maxInFlight slots (sent, or about to be). */
  private active = 0;
  private readonly slotWaiters: Array<() => void> = [];

  get readOnly(): boolean {
    return (this.transmissionFlags & C.FLAG_READ_ONLY) !== 0;
  }

  private has(flag: number): boolean {
    return (this.transmissionFlags & flag) !== 0;
  }

  /** What the export allows, from its transmission flags. */
  get can(): { flush: boolean; fua: boolean; trim: boolean; zero: boolean; fastZero: boolean; multiConn: boolean; cache: boolean } {
    return {
      flush: this.has(C.FLAG_SEND_FLUSH),
      fua: this.has(C.FLAG_SEND_FUA),
      trim: this.has(C.FLAG_SEND_TRIM),
      zero: this.has(C.FLAG_SEND_WRITE_ZEROES),
      fastZero: this.has(C.FLAG_SEND_FAST_ZERO),
      multiConn: this.has(C.FLAG_CAN_MULTI_CONN),
      cache: this.has(C.FLAG_SEND_CACHE),
    };
  }

  /** Connects and opens an export. */
  static async connect(address: NbdConnectAddress, options: NbdClientOptions = {}): Promise<NbdClient> {
    // TLS takes the plain socket's handle over, which a socket reading through onread cannot hand on.
    const direct = options.tls ? undefined : new DirectReceive();
    const raw = await openSocket(address, options.timeoutMs ?? 30_000, direct);
    let socket: net.Socket = raw;
    let reader = new SocketReader(socket, undefined, direct);
    let writer = new SocketWriter(socket, { coalesce: true });
    const timer = setTimeout(() => socket.destroy(new Error('NBD handshake timed out')), options.timeoutMs ?? 30_000);
    try {
      const exportName = options.exportName ?? '';
      const noZeroes = await greet(reader, writer);
      if (options.tls) {
        await sendOption(writer, C.OPT_STARTTLS, EMPTY);
        const r = await readOptionReply(reader, C.OPT_STARTTLS);
        if (r.type !== C.REP_ACK) {
          throw new NbdError(`NBD server does not offer TLS (NBD_OPT_STARTTLS: ${repName(r.type)}${r.data.length ? `: ${r.data.toString('utf8')}` : ''})`, C.EPERM);
        }
        socket = await startClientTls(raw, options.tls, 'host' in address ? address.host : undefined);
        reader = new SocketReader(socket);
        writer = new SocketWriter(socket, { coalesce: true });
      }
      let structured = false;
      const meta: MetaContextResult = { granted: new Map() };
      if (options.structuredReplies !== false) {
        await sendOption(writer, C.OPT_STRUCTURED_REPLY, EMPTY);
        const r = await readOptionReply(reader, C.OPT_STRUCTURED_REPLY);
        if (r.type === C.REP_ERR_TLS_REQD) throw tlsRequired(exportName);
        structured = r.type === C.REP_ACK;
      }
      const queries = [...(options.blockStatus !== false ? [C.META_BASE_ALLOCATION] : []), ...(options.metaContexts ?? [])];
      if (structured && queries.length) {
        const name = Buffer.from(exportName, 'utf8');
        const qs = queries.map((q) => Buffer.from(q, 'utf8'));
        const p = Buffer.allocUnsafe(8 + name.length + qs.reduce((n, q) => n + 4 + q.length, 0));
        p.writeUInt32BE(name.length, 0);
        name.copy(p, 4);
        p.writeUInt32BE(qs.length, 4 + name.length);
        let at = 8 + name.length;
        for (const q of qs) {
          p.writeUInt32BE(q.length, at);
          q.copy(p, at + 4);
          at += 4 + q.length;
        }
        await sendOption(writer, C.OPT_SET_META_CONTEXT, p);
        for (;;) {
          const r = await readOptionReply(reader, C.OPT_SET_META_CONTEXT);
          if (r.type === C.REP_META_CONTEXT && r.data.length >= 4) {
            meta.granted.set(r.data.toString('utf8', 4), r.data.readUInt32BE(0));
          } else {
            if (C.isReplyError(r.type)) meta.refused = `${repName(r.type)}${r.data.length ? `: ${r.data.toString('utf8')}` : ''}`;
            break; // ACK or error: either way, done
          }
        }
      }

      // NBD_OPT_GO with NBD_INFO_DESCRIPTION and NBD_INFO_BLOCK_SIZE (we honour the constraints we get).
      const name = Buffer.from(exportName, 'utf8');
      const go = Buffer.allocUnsafe(4 + name.length + 2 + 4);
      go.writeUInt32BE(name.length, 0);
      name.copy(go, 4);
      go.writeUInt16BE(2, 4 + name.length);
      go.writeUInt16BE(C.INFO_DESCRIPTION, 6 + name.length);
      go.writeUInt16BE(C.INFO_BLOCK_SIZE, 8 + name.length);
      await sendOption(writer, C.OPT_GO, go);
      let size = -1;
      let flags = 0;
      let description = '';
      let blockSizes: NbdBlockSizes = { minimum: 1, preferred: 4096, maximum: 32 * 1024 * 1024 };
      for (;;) {
        const r = await readOptionReply(reader, C.OPT_GO);
        if (r.type === C.REP_INFO && r.data.length >= 2) {
          const t = r.data.readUInt16BE(0);
          if (t === C.INFO_EXPORT && r.data.length === 12) {
            size = readU64(r.data, 2);
            flags = r.data.readUInt16BE(10);
          } else if (t === C.INFO_DESCRIPTION) {
            description = r.data.toString('utf8', 2);
          } else if (t === C.INFO_BLOCK_SIZE && r.data.length === 14) {
            blockSizes = { minimum: r.data.readUInt32BE(2), preferred: r.data.readUInt32BE(6), maximum: r.data.readUInt32BE(10) };
          }
        } else if (r.type === C.REP_ACK) {
          break;
        } else if (r.type === C.REP_ERR_UNSUP) {
          // Old server: NBD_OPT_EXPORT_NAME cannot report errors; an unknown export closes the connection.
          await sendOption(writer, C.OPT_EXPORT_NAME, name);
          const reply = await reader.read(noZeroes ? 10 : 134);
          size = readU64(reply, 0);
          flags = reply.readUInt16BE(8);
          break;
        } else if (r.type === C.REP_ERR_TLS_REQD) {
          throw tlsRequired(exportName);
        } else if (C.isReplyError(r.type)) {
          throw new NbdError(
            `NBD server refused export "${exportName}": ${repName(r.type)}${r.data.length ? `: ${r.data.toString('utf8')}` : ''}`,
            r.type === C.REP_ERR_UNKNOWN ? C.EINVAL : C.EIO,
          );
        }
      }
      if (size < 0 || !Number.isFinite(size)) throw new ProtocolError('server did not send NBD_INFO_EXPORT');
      if (blockSizes.minimum < 1 || blockSizes.maximum < blockSizes.minimum) throw new ProtocolError('bad NBD_INFO_BLOCK_SIZE');
      clearTimeout(timer);
      return new NbdClient(socket, reader, writer, {
        size,
        exportName,
        description,
        flags,
        blockSizes,
        structured,
        meta,
        maxInFlight: options.maxInFlight,
      });
    } catch (e) {
      clearTimeout(timer);
      socket.destroy();
      raw.destroy();
      // TLS 1.3 servers check a client certificate after the client thinks the handshake is done: a refusal
      // then looks like a connection closed at the first option.
      if (options.tls && socket !== raw && e instanceof ConnectionClosedError) {
        throw new NbdError('NBD server closed the connection right after the TLS handshake (did it refuse the client certificate or key?)', C.EPERM);
      }
      throw e;
    }
  }

  /** Lists the server's exports (NBD_OPT_LIST), then aborts the session. */
  static async list(address: NbdConnectAddress, timeoutMs = 30_000): Promise<ExportInfo[]> {
    const socket = await openSocket(address, timeoutMs);
    const reader = new SocketReader(socket);
    const writer = new SocketWriter(socket);
    const timer = setTimeout(() => socket.destroy(new Error('NBD handshake timed out')), timeoutMs);
    try {
      await greet(reader, writer);
      await sendOption(writer, C.OPT_LIST, EMPTY);
      const out: ExportInfo[] = [];
      for (;;) {
        const r = await readOptionReply(reader, C.OPT_LIST);
        if (r.type === C.REP_SERVER && r.data.length >= 4) {
          const n = r.data.readUInt32BE(0);
          if (n > r.data.length - 4) throw new ProtocolError('bad NBD_REP_SERVER');
          out.push({ name: r.data.toString('utf8', 4, 4 + n), description: r.data.toString('utf8', 4 + n) });
        } else if (r.type === C.REP_ACK) {
          break;
        } else if (C.isReplyError(r.type)) {
          throw new NbdError(`NBD_OPT_LIST failed: ${repName(r.type)}: ${r.data.toString('utf8')}`, C.EIO);
        }
      }
      await sendOption(writer, C.OPT_ABORT, EMPTY);
      await readOptionReply(reader, C.OPT_ABORT).catch(() => undefined);
      return out;
    } finally {
      clearTimeout(timer);
      socket.destroy();
    }
  }

  // ---- BlockDevice ----------------------------------------------------------------------------------------

  /** Largest payload in one request: a multiple of max(minimum, 4 KiB) within the server's maximum (and `limit`). */
  private payloadStep(limit = 32 * 1024 * 1024): number {
    const { minimum, maximum } = this.blockSizes;
    const cap = Math.min(maximum, limit);
    const unit = Math.max(minimum, 4096) <= cap ? Math.max(minimum, 4096) : minimum;
    return Math.max(unit, Math.floor(cap / unit) * unit);
  }

  /** Reads exactly `length` bytes, splitting into requests the server accepts and aligning to its minimum. */
  async read(offset: number, length: number): Promise<Buffer> {
    this.checkRange(offset, length);
    if (length === 0) return Buffer.alloc(0);
    const { minimum } = this.blockSizes;
    const start = offset - (offset % minimum);
    const end = Math.min(this.size, Math.ceil((offset + length) / minimum) * minimum);
    const step = this.payloadStep();
    let whole: Buffer;
    if (end - start <= step) {
      whole = await this.command(C.CMD_READ, 0, start, end - start) as Buffer;
    } else {
      const parts: Promise<Buffer>[] = [];
      for (let o = start; o < end; o += step) parts.push(this.command(C.CMD_READ, 0, o, Math.min(step, end - o)) as Promise<Buffer>);
      whole = Buffer.concat(await Promise.all(parts));
    }
    return start === offset && whole.length === length ? whole : whole.subarray(offset - start, offset - start + length);
  }

  /**
   * Reads exactly `buf.length` bytes at `offset` into `buf` (data arrives straight into it when the request
   * is aligned to the server's minimum block size).
   */
  async readInto(buf: Buffer, offset: number): Promise<void> {
    const length = buf.length;
    this.checkRange(offset, length);
    if (length === 0) return;
    const { minimum } = this.blockSizes;
    if (offset % minimum !== 0 || (length % minimum !== 0 && offset + length !== this.size)) {
      (await this.read(offset, length)).copy(buf);
      return;
    }
    const step = this.payloadStep(DATA_REQUEST);
    const parts: Promise<unknown>[] = [];
    for (let o = 0; o < length; o += step) {
      parts.push(this.command(C.CMD_READ, 0, offset + o, Math.min(step, length - o), undefined, buf.subarray(o, Math.min(length, o + step))));
    }
    await Promise.all(parts);
  }

  /** Writes `data` at `offset` (split into requests the server accepts). */
  async write(offset: number, data: Buffer, opts: { fua?: boolean } = {}): Promise<void> {
    this.checkRange(offset, data.length);
    const flags = opts.fua && this.can.fua ? C.CMD_FLAG_FUA : 0;
    const step = this.payloadStep(DATA_REQUEST);
    const parts: Promise<unknown>[] = [];
    for (let o = 0; o < data.length; o += step) {
      const piece = data.subarray(o, Math.min(data.length, o + step));
      parts.push(this.command(C.CMD_WRITE, flags, offset + o, piece.length, piece));
    }
    await Promise.all(parts);
  }

  /**
   * NBD_CMD_WRITE_ZEROES. Without `noHole` the server may punch a hole (a qcow2 stays sparse); with `fast`
   * (NBD_CMD_FLAG_FAST_ZERO) it fails at once with ENOTSUP unless zeroing is cheap.
   */
  async writeZeroes(offset: number, length: number, opts: { noHole?: boolean; fast?: boolean; fua?: boolean } = {}): Promise<void> {
    this.checkRange(offset, length);
    const flags = (opts.noHole ? C.CMD_FLAG_NO_HOLE : 0) | (opts.fast ? C.CMD_FLAG_FAST_ZERO : 0) | (opts.fua && this.can.fua ? C.CMD_FLAG_FUA : 0);
    await this.ranged(C.CMD_WRITE_ZEROES, flags, offset, length);
  }

  /** NBD_CMD_TRIM: the range is no longer needed (its content is unspecified afterwards). */
  async trim(offset: number, length: number): Promise<void> {
    this.checkRange(offset, length);
    await this.ranged(C.CMD_TRIM, 0, offset, length);
  }

  /** A request without payload over a long range, in pieces aligned to the server's minimum block size. */
  private async ranged(type: number, flags: number, offset: number, length: number): Promise<void> {
    const { minimum } = this.blockSizes;
    const step = Math.max(minimum, Math.floor(MAX_RANGE_REQUEST / minimum) * minimum);
    const parts: Promise<unknown>[] = [];
    for (let o = 0; o < length; o += step) parts.push(this.command(type, flags, offset + o, Math.min(step, length - o)));
    await Promise.all(parts);
  }

  /** Zero and data runs covering [offset, offset+length) from base:allocation (all data if not negotiated). */
  async extents(offset: number, length: number): Promise<Extent[]> {
    this.checkRange(offset, length);
    if (length === 0) return [];
    if (!this.hasBlockStatus) return [{ offset, length, zero: false }];
    const end = offset + length;
    const out: Extent[] = [];
    let pos = offset;
    while (pos < end) {
      const ask = Math.min(end - pos, MAX_RANGE_REQUEST); // 32-bit length field; stay well inside it
      const got = await this.blockStatus(pos, ask);
      for (const e of got) {
        if (pos >= end) break;
        const l = Math.min(e.length, end - pos);
        const last = out[out.length - 1];
        if (last && last.zero === e.zero) last.length += l;
        else out.push({ offset: pos, length: l, zero: e.zero });
        pos += l;
      }
    }
    return out;
  }

  /** NBD_CMD_CACHE. */
  async prefetch(offset: number, length: number): Promise<void> {
    this.checkRange(offset, length);
    if (length === 0) return;
    await this.command(C.CMD_CACHE, 0, offset, length);
  }

  /** Soft disconnect (NBD_CMD_DISC once the replies in flight have arrived), then close. */
  async close(): Promise<void> {
    if (!this.closed) {
      await this.whenIdle();
      if (!this.closed) {
        this.closed = new ConnectionClosedError('client closed');
        await this.writer.write([this.requestHeader(C.CMD_DISC, 0, 0, 0, 0)]);
        this.socket.end();
      }
    }
    await this.done;
    this.socket.destroy();
  }

  /** Requests sent and not yet answered. */
  get inFlight(): number {
    return this.pending.size;
  }

  private whenIdle(): Promise<void> {
    if (this.pending.size === 0) return Promise.resolve();
    return new Promise((resolve) => this.idleWaiters.push(resolve));
  }

  private settle(cookie: number): void {
    if (this.pending.delete(cookie)) this.releaseSlot();
    if (this.pending.size === 0 && this.idleWaiters.length) {
      const ws = this.idleWaiters;
      this.idleWaiters = [];
      for (const w of ws) w();
    }
  }

  // ---- Raw commands ---------------------------------------------------------------------------------------

  /** One NBD_CMD_BLOCK_STATUS request; descriptors as returned (starting at `offset`). */
  async blockStatus(offset: number, length: number, options: { reqOne?: boolean } = {}): Promise<Extent[]> {
    if (!this.hasBlockStatus) throw new NbdError('base:allocation was not negotiated', C.EINVAL);
    return (await this.command(C.CMD_BLOCK_STATUS, options.reqOne ? C.CMD_FLAG_REQ_ONE : 0, offset, length)) as Extent[];
  }

  /**
   * The runs and flags of metadata context `context` over [offset, offset+length), asking as often as the
   * server needs (it may answer a request for less than was asked).
   */
  async statusOf(context: string, offset: number, length: number): Promise<BlockStatusDescriptor[]> {
    this.checkRange(offset, length);
    const id = this.contexts.get(context);
    if (id === undefined) throw new NbdError(`metadata context ${context} was not negotiated`, C.EINVAL);
    const end = offset + length;
    const out: BlockStatusDescriptor[] = [];
    let pos = offset;
    while (pos < end) {
      const ask = Math.min(end - pos, MAX_RANGE_REQUEST);
      await this.command(C.CMD_BLOCK_STATUS, 0, pos, ask, undefined, undefined, (statuses) => {
        const got = statuses.get(id);
        if (!got?.length) throw new NbdError(`no block status descriptors for ${context}`, C.EIO);
        for (const d of got) {
          if (pos >= end) break;
          const l = Math.min(d.length, end - pos);
          const last = out[out.length - 1];
          if (last && last.flags === d.flags && last.offset + last.length === pos) last.length += l;
          else out.push({ offset: pos, length: l, flags: d.flags });
          pos += l;
        }
      });
    }
    return out;
  }

  async flush(): Promise<void> {
    await this.command(C.CMD_FLUSH, 0, 0, 0);
  }

  /**
   * Sends any request as is (no client-side checks; for tests and diagnostics). Resolves with the read data
   * (READ), the extents (BLOCK_STATUS) or undefined; rejects with NbdError on an error reply.
   */
  command(
    type: number,
    flags: number,
    offset: number,
    length: number,
    payload?: Buffer,
    /** READ: receive the data into this buffer (exactly `length` bytes) */
    into?: Buffer,
    /** BLOCK_STATUS: gets the descriptors of every context before the promise settles */
    onStatus?: (statuses: Map<number, BlockStatusDescriptor[]>) => void,
  ): Promise<Buffer | Extent[] | undefined> {
    if (this.active < this.maxInFlight) {
      this.active++;
      return this.send(type, flags, offset, length, payload, into, onStatus);
    }
    // The slot is handed over by the request that frees it (see releaseSlot).
    return new Promise<void>((r) => this.slotWaiters.push(r)).then(() => this.send(type, flags, offset, length, payload, into, onStatus));
  }

  private releaseSlot(): void {
    const next = this.slotWaiters.shift();
    if (next) next();
    else this.active--;
  }

  private send(
    type: number,
    flags: number,
    offset: number,
    length: number,
    payload: Buffer | undefined,
    into: Buffer | undefined,
    onStatus: ((statuses: Map<number, BlockStatusDescriptor[]>) => void) | undefined,
  ): Promise<Buffer | Extent[] | undefined> {
    if (this.closed) {
      this.releaseSlot();
      const why = this.closed instanceof ConnectionClosedError && this.closed.message === 'client closed' ? 'NBD connection closed' : `NBD connection lost: ${this.closed.message}`;
      return Promise.reject(new NbdError(why, C.EIO));
    }
    let cookie = this.nextCookie;
    while (this.pending.has(cookie)) cookie = (cookie + 1) >>> 0 || 1;
    this.nextCookie = (cookie + 1) >>> 0 || 1;
    return new Promise((resolve, reject) => {
      const p: Pending = { type, offset, length, covered: 0, resolve, reject, buffer: into, into: !!into, onStatus };
      this.pending.set(cookie, p);
      const h = this.requestHeader(type, flags, cookie, offset, length);
      void this.writer.write(payload ? [h, payload] : [h]);
    });
  }

  private requestHeader(type: number, flags: number, cookie: number, offset: number, length: number): Buffer {
    const h = Buffer.allocUnsafe(C.REQUEST_HEADER_BYTES);
    h.writeUInt32BE(C.REQUEST_MAGIC, 0);
    h.writeUInt16BE(flags, 4);
    h.writeUInt16BE(type, 6);
    h.writeUInt32BE(0, 8);
    h.writeUInt32BE(cookie, 12);
    writeU64(h, offset, 16);
    h.writeUInt32BE(length, 24);
    return h;
  }

  private checkRange(offset: number, length: number): void {
    if (!Number.isInteger(offset) || !Number.isInteger(length) || offset < 0 || length < 0 || offset + length > this.size) {
      throw new NbdError(`range ${offset}+${length} outside export of ${this.size} bytes`, C.EINVAL);
    }
  }

  // ---- Replies --------------------------------------------------------------------------------------------

  private async replyLoop(): Promise<void> {
    try {
      for (;;) {
        const magicBuf = this.reader.tryRead(4) ?? (await this.reader.read(4));
        const magic = magicBuf.readUInt32BE(0);
        if (magic === C.SIMPLE_REPLY_MAGIC) await this.simpleReply();
        else if (magic === C.STRUCTURED_REPLY_MAGIC) await this.structuredChunk();
        else throw new ProtocolError(`bad reply magic 0x${magic.toString(16)}`);
      }
    } catch (e) {
      const err = e instanceof Error ? e : new Error(String(e));
      if (!this.closed) this.closed = err;
      if (!(e instanceof ConnectionClosedError)) this.socket.destroy();
      const lost = [...this.pending.keys()];
      for (const cookie of lost) {
        const p = this.pending.get(cookie)!;
        this.settle(cookie);
        p.reject(new NbdError(`NBD connection lost: ${err.message}`, C.EIO));
      }
    }
  }

  private take(cookieHi: number, cookie: number): Pending {
    const p = cookieHi === 0 ? this.pending.get(cookie) : undefined;
    if (!p) throw new ProtocolError(`reply for unknown cookie ${cookieHi}:${cookie}`);
    return p;
  }

  private async simpleReply(): Promise<void> {
    const h = this.reader.tryRead(12) ?? (await this.reader.read(12));
    const error = h.readUInt32BE(0);
    const cookie = h.readUInt32BE(8);
    const p = this.take(h.readUInt32BE(4), cookie);
    if (error !== 0) {
      this.settle(cookie);
      p.reject(new NbdError(`NBD command ${p.type} at ${p.offset}+${p.length} failed: ${C.errnoName(error)}`, error));
      return;
    }
    // Settle only after the payload arrived, so a connection lost meanwhile still rejects this request.
    let data: Buffer | undefined;
    if (p.type === C.CMD_READ && p.into) {
      await this.reader.readInto(p.buffer!);
      data = p.buffer;
    } else if (p.type === C.CMD_READ) {
      data = await this.reader.read(p.length);
    }
    if (data) this.bytesRead += data.length;
    this.settle(cookie);
    p.resolve(data);
  }

  private async structuredChunk(): Promise<void> {
    const h = this.reader.tryRead(16) ?? (await this.reader.read(16));
    const flags = h.readUInt16BE(0);
    const type = h.readUInt16BE(2);
    const cookie = h.readUInt32BE(8);
    const length = h.readUInt32BE(12);
    const p = this.take(h.readUInt32BE(4), cookie);
    if (length > 64 * 1024 * 1024 + 64) throw new ProtocolError(`structured chunk of ${length} bytes`);
    const end = p.offset + p.length;
    if (type === C.REPLY_TYPE_OFFSET_DATA && p.into && p.type === C.CMD_READ && length >= 9) {
      // Straight into the caller's buffer: no intermediate copy of the data.
      const o = readU64(this.reader.tryRead(8) ?? (await this.reader.read(8)), 0);
      const l = length - 8;
      if (o < p.offset || o + l > end) throw new ProtocolError('data chunk outside the request');
      await this.reader.readInto(p.buffer!.subarray(o - p.offset, o - p.offset + l));
      p.covered += l;
      this.bytesRead += l;
      if (flags & C.REPLY_FLAG_DONE) this.finish(cookie, p);
      return;
    }
    const data = await this.reader.read(length);
    switch (type) {
      case C.REPLY_TYPE_NONE:
        if (length !== 0) throw new ProtocolError('NBD_REPLY_TYPE_NONE with payload');
        break;
      case C.REPLY_TYPE_OFFSET_DATA: {
        if (p.type !== C.CMD_READ || length < 9) throw new ProtocolError('unexpected NBD_REPLY_TYPE_OFFSET_DATA');
        const o = readU64(data, 0);
        const l = length - 8;
        if (o < p.offset || o + l > end) throw new ProtocolError('data chunk outside the request');
        if (!p.buffer && o === p.offset && l === p.length) p.buffer = data.subarray(8); // whole read: no copy
        else {
          p.buffer ??= Buffer.alloc(p.length);
          data.copy(p.buffer, o - p.offset, 8);
        }
        p.covered += l;
        this.bytesRead += l;
        break;
      }
      case C.REPLY_TYPE_OFFSET_HOLE: {
        if (p.type !== C.CMD_READ || length !== 12) throw new ProtocolError('unexpected NBD_REPLY_TYPE_OFFSET_HOLE');
        const o = readU64(data, 0);
        const l = data.readUInt32BE(8);
        if (l === 0 || o < p.offset || o + l > end) throw new ProtocolError('hole chunk outside the request');
        if (p.into) p.buffer!.fill(0, o - p.offset, o - p.offset + l);
        else p.buffer ??= Buffer.alloc(p.length); // zero-filled: holes need no copy
        p.covered += l;
        break;
      }
      case C.REPLY_TYPE_BLOCK_STATUS: {
        if (p.type !== C.CMD_BLOCK_STATUS || length < 12 || (length - 4) % 8 !== 0) throw new ProtocolError('bad NBD_REPLY_TYPE_BLOCK_STATUS');
        const id = data.readUInt32BE(0);
        const descriptors: BlockStatusDescriptor[] = [];
        let pos = p.offset;
        for (let i = 4; i < length; i += 8) {
          const l = data.readUInt32BE(i);
          const status = data.readUInt32BE(i + 4);
          if (l === 0) throw new ProtocolError('zero-length block status descriptor');
          descriptors.push({ offset: pos, length: l, flags: status });
          pos += l;
        }
        (p.statuses ??= new Map()).set(id, descriptors);
        if (id === this.metaContextId) p.extents = descriptors.map((d) => ({ offset: d.offset, length: d.length, zero: (d.flags & C.STATE_ZERO) !== 0 }));
        break;
      }
      default:
        if (C.isErrorChunk(type)) {
          if (length < 6) throw new ProtocolError('short error chunk');
          const errno = data.readUInt32BE(0) || C.EIO;
          const ml = data.readUInt16BE(4);
          if (ml > length - 6) throw new ProtocolError('error message longer than its chunk');
          const msg = data.toString('utf8', 6, 6 + ml);
          let at: number | undefined;
          if (type === C.REPLY_TYPE_ERROR_OFFSET) {
            if (length !== 14 + ml) throw new ProtocolError('bad NBD_REPLY_TYPE_ERROR_OFFSET');
            at = readU64(data, 6 + ml);
          }
          if (!p.error) {
            p.error = new NbdError(
              `NBD command ${p.type} at ${p.offset}+${p.length} failed: ${C.errnoName(errno)}${at !== undefined ? ` at offset ${at}` : ''}${msg ? `: ${msg}` : ''}`,
              errno,
              at,
            );
          }
        } else {
          throw new ProtocolError(`unknown structured reply type ${type}`);
        }
    }
    if (flags & C.REPLY_FLAG_DONE) this.finish(cookie, p);
  }

  /** The last chunk of a structured reply arrived: settle the request. */
  private finish(cookie: number, p: Pending): void {
    this.settle(cookie);
    if (p.error) p.reject(p.error);
    else if (p.type === C.CMD_READ) {
      if (p.covered !== p.length) p.reject(new NbdError(`server sent ${p.covered} of ${p.length} bytes`, C.EIO));
      else p.resolve(p.buffer ?? Buffer.alloc(0));
    } else if (p.type === C.CMD_BLOCK_STATUS && p.onStatus) {
      try {
        p.onStatus(p.statuses ?? new Map());
        p.resolve(undefined);
      } catch (e) {
        p.reject(e as Error);
      }
    } else if (p.type === C.CMD_BLOCK_STATUS) {
      if (!p.extents?.length) p.reject(new NbdError('no block status descriptors for base:allocation', C.EIO));
      else p.resolve(p.extents);
    } else p.resolve(undefined);
  }
}

// ---- Handshake helpers ----------------------------------------------------------------------------------

function openSocket(address: NbdConnectAddress, timeoutMs: number, direct?: DirectReceive): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    const onread = direct?.onread;
    const socket =
      'path' in address
        ? net.connect({ path: address.path, onread })
        : net.connect({ host: address.host ?? '127.0.0.1', port: address.port ?? C.NBD_DEFAULT_PORT, onread });
    const timer = setTimeout(() => socket.destroy(new Error('NBD connect timed out')), timeoutMs);
    socket.once('connect', () => {
      clearTimeout(timer);
      socket.off('error', reject);
      socket.setNoDelay(true);
      // Errors after connecting surface as 'close' to the reader; keep them from being unhandled.
      socket.on('error', () => undefined);
      resolve(socket);
    });
    socket.once('error', (e) => {
      clearTimeout(timer);
      reject(e);
    });
  });
}

/**
 * The client side of TLS on a socket after NBD_OPT_STARTTLS was acknowledged. The plain socket's reader
 * stops getting data: the TLS layer takes the socket's handle over.
 */
function startClientTls(socket: net.Socket, o: NbdClientTls, host: string | undefined): Promise<tls.TLSSocket> {
  return new Promise((resolve, reject) => {
    const name = o.hostname ?? (host && net.isIP(host) === 0 ? host : undefined);
    const verify = o.verifyPeer !== false && !o.psk;
    const t = tls.connect({
      socket,
      minVersion: 'TLSv1.2',
      ...(o.psk
        ? {
            // PSK suites of TLS 1.2 and TLS 1.3's own suites (PSK with (EC)DHE there).
            ciphers: 'ECDHE-PSK-CHACHA20-POLY1305:ECDHE-PSK-AES256-CBC-SHA384:DHE-PSK-AES256-GCM-SHA384:PSK-AES256-GCM-SHA384:PSK-AES128-GCM-SHA256:TLS_AES_256_GCM_SHA384:TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256',
            pskCallback: () => ({ psk: o.psk!.key, identity: o.psk!.identity }),
            checkServerIdentity: () => undefined,
          }
        : {
            ca: o.ca,
            cert: o.cert,
            key: o.key,
            rejectUnauthorized: verify,
            ...(name && net.isIP(name) === 0 ? { servername: name } : {}),
            checkServerIdentity: (h: string, cert: tls.PeerCertificate) => (verify && name ? tls.checkServerIdentity(name, cert) : undefined),
          }),
    });
    const fail = (e: Error) => reject(new NbdError(`TLS handshake with the NBD server failed: ${(e as { reason?: string }).reason ?? e.message}`, C.EPERM));
    t.once('error', fail);
    t.once('secureConnect', () => {
      t.off('error', fail);
      t.setNoDelay(true);
      t.on('error', () => undefined); // surfaces as 'close' to the reader
      resolve(t);
    });
  });
}

/** Reads the greeting, sends client flags; returns whether NO_ZEROES is in use. */
async function greet(reader: SocketReader, writer: SocketWriter): Promise<boolean> {
  const g = await reader.read(18);
  if (g.readBigUInt64BE(0) !== C.NBD_MAGIC) throw new ProtocolError('not an NBD server');
  if (g.readBigUInt64BE(8) !== C.IHAVEOPT) throw new ProtocolError('oldstyle NBD servers are not supported');
  const hflags = g.readUInt16BE(16);
  if ((hflags & C.FLAG_FIXED_NEWSTYLE) === 0) throw new ProtocolError('server does not support fixed newstyle negotiation');
  const noZeroes = (hflags & C.FLAG_NO_ZEROES) !== 0;
  const cf = Buffer.allocUnsafe(4);
  cf.writeUInt32BE(C.FLAG_C_FIXED_NEWSTYLE | (noZeroes ? C.FLAG_C_NO_ZEROES : 0), 0);
  await writer.write([cf]);
  return noZeroes;
}

async function sendOption(writer: SocketWriter, option: number, data: Buffer): Promise<void> {
  const h = Buffer.allocUnsafe(C.OPTION_HEADER_BYTES);
  h.writeBigUInt64BE(C.IHAVEOPT, 0);
  h.writeUInt32BE(option, 8);
  h.writeUInt32BE(data.length, 12);
  await writer.write(data.length ? [h, data] : [h]);
}

async function readOptionReply(reader: SocketReader, option: number): Promise<OptionReply> {
  const h = await reader.read(C.OPTION_REPLY_HEADER_BYTES);
  if (h.readBigUInt64BE(0) !== C.OPTION_REPLY_MAGIC) throw new ProtocolError('bad option reply magic');
  const opt = h.readUInt32BE(8);
  const type = h.readUInt32BE(12);
  const length = h.readUInt32BE(16);
  if (opt !== option) throw new ProtocolError(`reply for option ${opt}, expected ${option}`);
  if (length > MAX_OPTION_REPLY) throw new ProtocolError(`option reply of ${length} bytes`);
  return { option: opt, type, data: await reader.read(length) };
}

function tlsRequired(exportName: string): NbdError {
  return new NbdError(`NBD server requires TLS for export "${exportName}" (use nbds:// with TLS credentials)`, C.EPERM);
}

function repName(type: number): string {
  const names: Record<number, string> = {
    [C.REP_ERR_UNSUP]: 'NBD_REP_ERR_UNSUP',
    [C.REP_ERR_POLICY]: 'NBD_REP_ERR_POLICY',
    [C.REP_ERR_INVALID]: 'NBD_REP_ERR_INVALID',
    [C.REP_ERR_PLATFORM]: 'NBD_REP_ERR_PLATFORM',
    [C.REP_ERR_TLS_REQD]: 'NBD_REP_ERR_TLS_REQD',
    [C.REP_ERR_UNKNOWN]: 'NBD_REP_ERR_UNKNOWN',
    [C.REP_ERR_SHUTDOWN]: 'NBD_REP_ERR_SHUTDOWN',
    [C.REP_ERR_BLOCK_SIZE_REQD]: 'NBD_REP_ERR_BLOCK_SIZE_REQD',
    [C.REP_ERR_TOO_BIG]: 'NBD_REP_ERR_TOO_BIG',
  };
  return names[type] ?? `reply type 0x${type.toString(16)}`;
}

/** Parses `nbd://host[:port]/export` and `nbd+unix:///export?socket=/path`. */
export function parseNbdUri(uri: string): { address: NbdConnectAddress; exportName: string } {
  const u = new URL(uri);
  const exportName = decodeURIComponent(u.pathname.replace(/^\//, ''));
  if (u.protocol === 'nbd:') {
    const host = u.hostname.replace(/^\[(.*)\]$/, '$1') || '127.0.0.1';
    return { address: { host, port: u.port ? Number(u.port) : C.NBD_DEFAULT_PORT }, exportName };
  }
  if (u.protocol === 'nbd+unix:') {
    const path = u.searchParams.get('socket');
    if (!path) throw new Error(`${uri}: nbd+unix URI needs ?socket=`);
    return { address: { path }, exportName };
  }
  throw new Error(`${uri}: not an nbd:// or nbd+unix:// URI`);
}
