/**
 * Fixed newstyle negotiation (nbdkit's protocol-handshake-newstyle.c): the greeting, the client's flags, and
 * option haggling until the client picks an export (NBD_OPT_GO / NBD_OPT_EXPORT_NAME) or aborts.
 */
import { capabilitiesOf } from '../src/device/types';
import * as C from './constants';
import { MAX_CLIENT_MESSAGE, oneLine, quoteName } from './errors';
import type { OpenExport, SharedExports } from './exports';
import { tlsErrorLine } from './tls';
import { EMPTY, ProtocolError, SocketReader, SocketWriter, utf8Truncate, writeU64 } from './wire';

/** Option payloads larger than this are taken as abuse and the connection is dropped. The largest legitimate
 * options are NBD_OPT_GO/INFO (4096-byte name + a few info requests) and the meta-context options (name +
 * a handful of queries of at most 4096 bytes each), far below this. */
export const MAX_OPTION_BYTES = 64 * 1024;
/** Preferred block size advertised in NBD_INFO_BLOCK_SIZE. */
export const PREFERRED_BLOCK_SIZE = 4096;
/** Context ID we assign to base:allocation in NBD_OPT_SET_META_CONTEXT. */
export const BASE_ALLOCATION_ID = 1;

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
 * The transmission flags of an export, from what its device can do: read-only unless it writes; FUA when it
 * honours FUA or can flush after a write; write-zeroes whenever it writes (emulated with writes when the
 * device cannot zero, and then fast-zero requests fail at once as the spec allows); multi-conn since every
 * connection shares the one device (unless the device says otherwise). Flush is always accepted: a read-only
 * device has nothing to flush and a writable one without flush() is durable on every write.
 */
export function transmissionFlags(e: OpenExport, structured: boolean): number {
  const caps = capabilitiesOf(e.device);
  let f = C.FLAG_HAS_FLAGS | C.FLAG_SEND_FLUSH;
  if (caps.write) {
    f |= C.FLAG_SEND_FUA | C.FLAG_SEND_WRITE_ZEROES | C.FLAG_SEND_FAST_ZERO;
    if (caps.trim) f |= C.FLAG_SEND_TRIM;
  } else {
    f |= C.FLAG_READ_ONLY;
  }
  if (caps.multiConn) f |= C.FLAG_CAN_MULTI_CONN;
  // Prefetching is only a hint; without it NBD_CMD_CACHE is answered at once, which the spec allows.
  f |= C.FLAG_SEND_CACHE;
  if (structured) f |= C.FLAG_SEND_DF;
  return f;
}

/** The byte stream of a connection. STARTTLS replaces it with the encrypted one. */
export interface Wire {
  reader: SocketReader;
  writer: SocketWriter;
}

/** TLS as the connection offers it: the mode, and how to switch the wire to TLS (after the ACK was sent). */
export interface HandshakeTls {
  mode: 'on' | 'require';
  upgrade(): Promise<void>;
}

/** What negotiation ended with. */
export interface Negotiated {
  export: OpenExport;
  /** TLS was negotiated. */
  secure: boolean;
  structured: boolean;
  /** base:allocation was selected for this export. */
  metaActive: boolean;
  flags: number;
}

type OptionOutcome = 'continue' | 'transmission' | 'abort';

export class Handshake {
  private clientNoZeroes = false;
  private structured = false;
  /** Export name base:allocation was selected for by the last NBD_OPT_SET_META_CONTEXT, or null. */
  private metaExport: string | null = null;
  /** Export opened by NBD_OPT_INFO, kept for a following NBD_OPT_GO of the same name. */
  private pendingInfo: OpenExport | null = null;
  private chosen: Negotiated | null = null;
  private secure = false;

  constructor(
    private readonly wire: Wire,
    private readonly exports: SharedExports,
    private readonly maxRequestBytes: number,
    private readonly log: (msg: string) => void,
    private readonly tls?: HandshakeTls,
  ) {}

  /** Negotiates; resolves with the chosen export, or null when the client aborted. */
  async run(): Promise<Negotiated | null> {
    const greeting = Buffer.allocUnsafe(18);
    greeting.writeBigUInt64BE(C.NBD_MAGIC, 0);
    greeting.writeBigUInt64BE(C.IHAVEOPT, 8);
    greeting.writeUInt16BE(C.FLAG_FIXED_NEWSTYLE | C.FLAG_NO_ZEROES, 16);
    await this.wire.writer.write([greeting]);

    const clientFlags = (await this.wire.reader.read(4)).readUInt32BE(0);
    if ((clientFlags & ~(C.FLAG_C_FIXED_NEWSTYLE | C.FLAG_C_NO_ZEROES)) !== 0) {
      throw new ProtocolError(`unknown client flags 0x${clientFlags.toString(16)}`);
    }
    if ((clientFlags & C.FLAG_C_FIXED_NEWSTYLE) === 0) {
      throw new ProtocolError('client does not support fixed newstyle negotiation');
    }
    this.clientNoZeroes = (clientFlags & C.FLAG_C_NO_ZEROES) !== 0;

    for (;;) {
      const header = await this.wire.reader.read(C.OPTION_HEADER_BYTES);
      if (header.readBigUInt64BE(0) !== C.IHAVEOPT) throw new ProtocolError('bad option magic');
      const option = header.readUInt32BE(8);
      const length = header.readUInt32BE(12);
      if (length > MAX_OPTION_BYTES) {
        throw new ProtocolError(`option ${option} carries ${length} bytes (limit ${MAX_OPTION_BYTES})`);
      }
      const data = await this.wire.reader.read(length);
      const outcome = await this.handleOption(option, data);
      if (outcome === 'transmission') return this.chosen;
      if (outcome === 'abort') return null;
    }
  }

  /** The export opened by NBD_OPT_INFO and not taken by NBD_OPT_GO: the connection releases it. */
  takePending(): OpenExport | null {
    const p = this.pendingInfo;
    this.pendingInfo = null;
    return p;
  }

  private write(bufs: Buffer[]): Promise<boolean> {
    return this.wire.writer.write(bufs);
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
    await this.write(this.optionReply(option, type, utf8Truncate(message, MAX_CLIENT_MESSAGE)));
    return 'continue';
  }

  private async handleOption(option: number, data: Buffer): Promise<OptionOutcome> {
    if (this.tls?.mode === 'require' && !this.secure && option !== C.OPT_STARTTLS && option !== C.OPT_ABORT) {
      // FORCEDTLS: NBD_OPT_EXPORT_NAME cannot be answered with an error, so the session ends.
      if (option === C.OPT_EXPORT_NAME) throw new ProtocolError('NBD_OPT_EXPORT_NAME without TLS, which this server requires');
      return this.sendOptionError(option, C.REP_ERR_TLS_REQD, 'this server requires TLS (NBD_OPT_STARTTLS)');
    }
    switch (option) {
      case C.OPT_EXPORT_NAME:
        return this.optExportName(data);
      case C.OPT_ABORT:
        await this.write(this.optionReply(option, C.REP_ACK));
        return 'abort';
      case C.OPT_LIST:
        return this.optList(data);
      case C.OPT_INFO:
      case C.OPT_GO:
        return this.optInfoGo(option, data);
      case C.OPT_STRUCTURED_REPLY:
        if (data.length !== 0) return this.sendOptionError(option, C.REP_ERR_INVALID, 'NBD_OPT_STRUCTURED_REPLY takes no data');
        this.structured = true;
        await this.write(this.optionReply(option, C.REP_ACK));
        return 'continue';
      case C.OPT_LIST_META_CONTEXT:
      case C.OPT_SET_META_CONTEXT:
        return this.optMetaContext(option, data);
      case C.OPT_STARTTLS:
        return this.optStartTls(data);
      default:
        return this.sendOptionError(option, C.REP_ERR_UNSUP, `option ${option} is not supported`);
    }
  }

  private async optStartTls(data: Buffer): Promise<OptionOutcome> {
    const option = C.OPT_STARTTLS;
    if (!this.tls) return this.sendOptionError(option, C.REP_ERR_UNSUP, 'TLS is not enabled on this server');
    if (this.secure) return this.sendOptionError(option, C.REP_ERR_INVALID, 'TLS is already active');
    if (data.length !== 0) return this.sendOptionError(option, C.REP_ERR_INVALID, 'NBD_OPT_STARTTLS takes no data');
    await this.write(this.optionReply(option, C.REP_ACK));
    try {
      await this.tls.upgrade();
    } catch (e) {
      // Too late to go on in plain text: the spec says the session ends.
      throw new ProtocolError(`TLS handshake failed: ${oneLine(tlsErrorLine(e))}`);
    }
    this.secure = true;
    // Nothing negotiated in plain text survives the upgrade (the spec; a man in the middle could have sent it).
    this.structured = false;
    this.metaExport = null;
    const p = this.takePending();
    if (p) await this.exports.release(p);
    return 'continue';
  }

  private async openExport(name: string): Promise<OpenExport | undefined> {
    if (this.pendingInfo) {
      const p = this.pendingInfo;
      this.pendingInfo = null;
      if (p.name === name) return p;
      await this.exports.release(p);
    }
    return this.exports.acquire(name);
  }

  private enter(e: OpenExport): void {
    this.chosen = {
      export: e,
      secure: this.secure,
      structured: this.structured,
      metaActive: this.structured && this.metaExport === e.name,
      flags: transmissionFlags(e, this.structured),
    };
  }

  private async optExportName(data: Buffer): Promise<OptionOutcome> {
    const name = data.toString('utf8');
    let e: OpenExport | undefined;
    try {
      e = await this.openExport(name);
    } catch (err) {
      throw new ProtocolError(`NBD_OPT_EXPORT_NAME ${quoteName(name)}: cannot open export: ${oneLine(err)}`);
    }
    // NBD_OPT_EXPORT_NAME cannot fail gracefully: the spec requires terminating the session.
    if (!e) throw new ProtocolError(`NBD_OPT_EXPORT_NAME for unknown export ${quoteName(name)}`);
    this.enter(e);
    const reply = Buffer.alloc(this.clientNoZeroes ? 10 : 10 + 124);
    writeU64(reply, e.device.size, 0);
    reply.writeUInt16BE(this.chosen!.flags, 8);
    await this.write([reply]);
    return 'transmission';
  }

  private async optList(data: Buffer): Promise<OptionOutcome> {
    if (data.length !== 0) return this.sendOptionError(C.OPT_LIST, C.REP_ERR_INVALID, 'NBD_OPT_LIST takes no data');
    let exports;
    try {
      exports = await this.exports.list();
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
    await this.write(bufs);
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
      this.log(`opening export ${quoteName(name)} failed: ${oneLine(err)}`);
      return this.sendOptionError(option, C.REP_ERR_UNKNOWN, `export "${name}" is not available`);
    }
    if (!e) return this.sendOptionError(option, C.REP_ERR_UNKNOWN, `unknown export "${name}"`);

    const size = e.device.size;
    const flags = transmissionFlags(e, this.structured);
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
    const bs = blockSizesFor(size, this.maxRequestBytes);
    const b = Buffer.allocUnsafe(12);
    b.writeUInt32BE(bs.minimum, 0);
    b.writeUInt32BE(bs.preferred, 4);
    b.writeUInt32BE(bs.maximum, 8);
    info(C.INFO_BLOCK_SIZE, b);
    bufs.push(...this.optionReply(option, C.REP_ACK));
    await this.write(bufs);

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
    await this.write(bufs);
    return 'continue';
  }
}
