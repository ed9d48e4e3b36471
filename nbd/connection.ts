/**
 * One client connection: negotiation, then transmission, then an orderly close (requests in flight finish,
 * replies drain, the export is released). Protocol violations and internal errors drop the connection at
 * once; a server shutdown stops reading and lets what is in flight finish, up to `closeTimeoutMs`.
 */
import type * as net from 'node:net';
import type * as tls from 'node:tls';
import { oneLine, quoteName } from './errors';
import type { OpenExport, SharedExports } from './exports';
import { Handshake, HandshakeTls, Wire } from './handshake';
import { Replies } from './replies';
import { NbdTlsOptions, startTls } from './tls';
import { Transmission, TransmissionLimits } from './transmission';
import { ByteBudget } from './budget';
import { ConnectionClosedError, ProtocolError, SocketReader, SocketWriter } from './wire';

export interface ConnectionLimits extends TransmissionLimits {
  /** How long a shutdown (or a graceful disconnect) waits for the connection to drain before destroying it. */
  closeTimeoutMs: number;
  /** A client that has not entered transmission within this time is dropped. */
  handshakeTimeoutMs: number;
  /** A client that leaves replies unread for this long is dropped. */
  replyTimeoutMs: number;
  /** Bytes of read replies one connection may have in preparation or queued. */
  maxReplyBytes: number;
  /** Shared by all connections: replies that must be read whole (see ReplyBudgets). */
  whole: ByteBudget;
}

/** TLS as the server offers it: options and the secure context built from them once. */
export interface ServerTls {
  mode: NbdTlsOptions['mode'];
  options: tls.TlsOptions;
}

export class NbdConnection {
  private readonly wire: Wire;
  private readonly peer: string;
  /** The socket spoken over: the accepted one, or the TLS session over it after STARTTLS. */
  private socket: net.Socket;
  private readonly socketClosed: Promise<void>;
  private markClosed: () => void = () => undefined;
  private handshake: Handshake | null = null;
  private transmission: Transmission | null = null;
  private current: OpenExport | null = null;

  private stopping = false;
  private finished: Promise<void> | null = null;
  private lingerTimer: NodeJS.Timeout | null = null;
  private socketErrorLogged = false;
  private readonly opened = Date.now();

  constructor(
    socket: net.Socket,
    private readonly exports: SharedExports,
    private readonly logLine: (line: string) => void,
    private readonly limits: ConnectionLimits,
    /** Routine events (a connection's closing line). */
    private readonly debugLine: (line: string) => void = () => undefined,
    private readonly tls?: ServerTls,
  ) {
    this.socket = socket;
    this.peer = socket.remoteAddress ? `${socket.remoteAddress}:${socket.remotePort}` : 'local';
    this.wire = { reader: new SocketReader(socket), writer: this.writerFor(socket) };
    this.socketClosed = new Promise<void>((resolve) => (this.markClosed = resolve));
    this.watch(socket);
    this.handshakeTimer = setTimeout(() => {
      this.log(`no export chosen within ${this.limits.handshakeTimeoutMs / 1000} s; closing connection`);
      this.socket.destroy();
    }, this.limits.handshakeTimeoutMs);
    this.handshakeTimer.unref();
  }

  private handshakeTimer: NodeJS.Timeout | null;

  private writerFor(socket: net.Socket): SocketWriter {
    const timeoutMs = this.limits.replyTimeoutMs;
    return new SocketWriter(socket, {
      unpinQueued: true,
      stall: {
        timeoutMs,
        onStall: () => {
          this.log(`replies unread for ${timeoutMs / 1000} s; closing connection`);
          this.socket.destroy();
        },
      },
    });
  }

  private watch(socket: net.Socket): void {
    socket.once('close', () => this.markClosed());
    socket.on('error', (e: NodeJS.ErrnoException) => {
      if (this.socketErrorLogged) return;
      this.socketErrorLogged = true;
      this.log(`socket error: ${e.code ?? oneLine(e)}`);
    });
  }

  /** STARTTLS was acknowledged: the rest of the session goes over TLS on the same socket. */
  private async upgrade(): Promise<void> {
    const t = this.tls!;
    const early = this.wire.reader.detach();
    this.wire.writer.detach();
    // The client must wait for the ACK before its TLS hello; bytes before that would be plain-text injection.
    if (early.length) throw new ProtocolError('data sent before the TLS handshake');
    const secure = await startTls(this.socket, t.options, this.limits.handshakeTimeoutMs);
    this.socket = secure;
    this.watch(secure);
    this.wire.reader = new SocketReader(secure);
    this.wire.writer = this.writerFor(secure);
    if (this.stopping) this.wire.reader.cancel(new ConnectionClosedError('server shutting down'));
  }

  private log(msg: string, to = this.logLine): void {
    const exp = this.current ? ` export ${quoteName(this.current.name)}` : '';
    try {
      // Names and messages can come from the client: keep the line one line, free of control characters.
      to(`nbd ${this.peer}${exp}: ${msg}`.replace(/[\x00-\x1f\x7f]+/g, ' '));
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
      this.wire.reader.cancel(new ConnectionClosedError('server shutting down'));
      this.transmission?.stop();
    }
    this.startLinger();
    // Resolve when the connection is done, or once it has been force-closed even if a device call hangs.
    return Promise.race([this.run(), this.socketClosed.then(() => this.whenIdleOrTimeout())]);
  }

  private async runInner(): Promise<void> {
    let hard = false;
    try {
      const tlsOffer: HandshakeTls | undefined = this.tls ? { mode: this.tls.mode, upgrade: () => this.upgrade() } : undefined;
      this.handshake = new Handshake(this.wire, this.exports, this.limits.maxRequestBytes, (m) => this.log(m), tlsOffer);
      const chosen = await this.handshake.run();
      this.clearHandshakeTimer();
      if (chosen) {
        this.current = chosen.export;
        this.transmission = new Transmission(
          this.wire.reader,
          new Replies(this.wire.writer, chosen.structured),
          chosen,
          this.limits,
          { connection: new ByteBudget(this.limits.maxReplyBytes), whole: this.limits.whole },
          (m) => this.log(m),
          () => this.socket.destroy(),
        );
        if (this.stopping) this.transmission.stop();
        await this.transmission.run();
      }
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
    this.clearHandshakeTimer();
    this.stopping = true;
    this.wire.reader.cancel();
    this.transmission?.stop();
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
    if (this.transmission) {
      const t = this.transmission.stats;
      const secs = ((Date.now() - this.opened) / 1000).toFixed(1);
      this.log(`connection closed after ${secs} s: ${t.requests} requests, ${t.reads} reads of ${t.bytesRead} bytes, ${t.writes} writes of ${t.bytesWritten} bytes`, this.debugLine);
    }
    const pending = this.handshake?.takePending();
    if (pending) await this.exports.release(pending);
    if (this.current) await this.exports.release(this.current);
    this.current = null;
  }

  private clearHandshakeTimer(): void {
    if (this.handshakeTimer) clearTimeout(this.handshakeTimer);
    this.handshakeTimer = null;
  }

  private whenIdle(): Promise<void> {
    return this.transmission ? this.transmission.whenIdle() : Promise.resolve();
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
}
