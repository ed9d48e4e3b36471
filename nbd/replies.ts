/**
 * Writing transmission-phase replies (nbdkit's protocol.c send_* half): simple replies, and structured reply
 * chunks when they were negotiated. Builders return buffers so a multi-chunk reply goes out as one message;
 * `send` writes them with the socket's backpressure.
 */
import type { Extent } from '../src/device/types';
import * as C from './constants';
import { errnoOf, failingOffset, MAX_CLIENT_MESSAGE, messageForClient } from './errors';
import { SocketWriter, utf8Truncate, writeU64 } from './wire';

/** What a reply needs to know of its request. */
export interface Cookie {
  cookieHi: number;
  cookieLo: number;
}

/** Replies with at most this much data are sent as one buffer (one small copy instead of a corked batch). */
const COALESCE_REPLY_BYTES = 16 * 1024;

export class Replies {
  constructor(
    private readonly writer: SocketWriter,
    /** NBD_OPT_STRUCTURED_REPLY was negotiated. */
    readonly structured: boolean,
  ) {}

  /** False once the connection can no longer take replies. */
  get usable(): boolean {
    return this.writer.usable;
  }

  /**
   * Writes one whole message; false when the socket is gone (the reply is dropped). `flushed` is called once
   * its bytes have left the process (or were dropped).
   */
  send(bufs: readonly Buffer[], flushed?: () => void): Promise<boolean> {
    return this.writer.write(bufs, flushed);
  }

  simpleHeader(req: Cookie, error: number): Buffer {
    const h = Buffer.allocUnsafe(C.SIMPLE_REPLY_HEADER_BYTES);
    h.writeUInt32BE(C.SIMPLE_REPLY_MAGIC, 0);
    h.writeUInt32BE(error, 4);
    h.writeUInt32BE(req.cookieHi, 8);
    h.writeUInt32BE(req.cookieLo, 12);
    return h;
  }

  /** A successful simple reply, with the data of a READ. */
  async simpleData(req: Cookie, data: Buffer, flushed?: () => void): Promise<void> {
    await this.send(joinSmall(this.simpleHeader(req, 0), data), flushed);
  }

  /** Success without data: a simple reply is allowed for any command but READ even with structured replies. */
  async ok(req: Cookie): Promise<void> {
    await this.send([this.simpleHeader(req, 0)]);
  }

  /** A failed command: a simple reply, or an NBD_REPLY_TYPE_ERROR chunk with a message when structured. */
  async error(req: Cookie, errno: number, message: string): Promise<void> {
    if (!this.structured) {
      await this.send([this.simpleHeader(req, errno)]);
      return;
    }
    // Structured replies were negotiated: mandatory for READ, preferred by the spec for everything else.
    const msg = utf8Truncate(message, MAX_CLIENT_MESSAGE);
    const h = this.chunkHeader(req, C.REPLY_FLAG_DONE, C.REPLY_TYPE_ERROR, 6 + msg.length, 6);
    h.writeUInt32BE(errno, 20);
    h.writeUInt16BE(msg.length, 24);
    await this.send([h, msg]);
  }

  /** An NBD_REPLY_TYPE_OFFSET_DATA chunk. */
  dataChunk(req: Cookie, flags: number, offset: number, data: Buffer): Buffer[] {
    const h = this.chunkHeader(req, flags, C.REPLY_TYPE_OFFSET_DATA, 8 + data.length, 8);
    writeU64(h, offset, 20);
    return joinSmall(h, data);
  }

  /** An NBD_REPLY_TYPE_NONE chunk: the end of a reply whose other chunks were sent on their own. */
  noneChunk(req: Cookie, flags: number): Buffer[] {
    return [this.chunkHeader(req, flags, C.REPLY_TYPE_NONE, 0, 0)];
  }

  /** An NBD_REPLY_TYPE_OFFSET_HOLE chunk. */
  holeChunk(req: Cookie, flags: number, offset: number, length: number): Buffer[] {
    const h = this.chunkHeader(req, flags, C.REPLY_TYPE_OFFSET_HOLE, 12, 12);
    writeU64(h, offset, 20);
    h.writeUInt32BE(length, 28);
    return [h];
  }

  /** An NBD_REPLY_TYPE_ERROR_OFFSET chunk for a failed read of [offset, offset+length). */
  errorOffsetChunk(req: Cookie, flags: number, offset: number, length: number, e: unknown): Buffer[] {
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

  /** An NBD_REPLY_TYPE_BLOCK_STATUS chunk (the last one) for one metadata context. */
  async blockStatus(req: Cookie, contextId: number, extents: readonly Extent[], stateOf: (e: Extent) => number): Promise<void> {
    const payloadLength = 4 + 8 * extents.length;
    const buf = Buffer.allocUnsafe(C.STRUCTURED_REPLY_HEADER_BYTES + payloadLength);
    writeChunkHeader(buf, req, C.REPLY_FLAG_DONE, C.REPLY_TYPE_BLOCK_STATUS, payloadLength);
    buf.writeUInt32BE(contextId, 20);
    let p = 24;
    for (const e of extents) {
      buf.writeUInt32BE(e.length, p);
      buf.writeUInt32BE(stateOf(e), p + 4);
      p += 8;
    }
    await this.send([buf]);
  }

  /** A chunk header followed by `extra` bytes of fixed payload fields for the caller to fill. */
  private chunkHeader(req: Cookie, flags: number, type: number, length: number, extra: number): Buffer {
    const h = Buffer.allocUnsafe(C.STRUCTURED_REPLY_HEADER_BYTES + extra);
    writeChunkHeader(h, req, flags, type, length);
    return h;
  }
}

function writeChunkHeader(h: Buffer, req: Cookie, flags: number, type: number, length: number): void {
  h.writeUInt32BE(C.STRUCTURED_REPLY_MAGIC, 0);
  h.writeUInt16BE(flags, 4);
  h.writeUInt16BE(type, 6);
  h.writeUInt32BE(req.cookieHi, 8);
  h.writeUInt32BE(req.cookieLo, 12);
  h.writeUInt32BE(length, 16);
}

/** [header, data] as one buffer when the data is small: one socket write instead of a corked batch. */
function joinSmall(header: Buffer, data: Buffer): Buffer[] {
  if (data.length > COALESCE_REPLY_BYTES) return [header, data];
  const b = Buffer.allocUnsafe(header.length + data.length);
  header.copy(b, 0);
  data.copy(b, header.length);
  return [b];
}
