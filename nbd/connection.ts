/**
 * One client connection: negotiation, then transmission, then an orderly close (requests in flight finish,
 * replies drain, the export is released). Protocol violations and internal errors drop the connection at
 * once; a server shutdown stops reading and lets what is in flight finish, up to `closeTimeoutMs`.
 */
import type * as net from 'node:net';
import { oneLine } from './errors';
import type { OpenExport, SharedExports } from './exports';
import { Handshake, Wire } from './handshake';
import { Replies } from './replies';
import { Transmission, TransmissionLimits } from './transmission';
import { ConnectionClosedError, ProtocolError, SocketReader, SocketWriter } from './wire';

export interface ConnectionLimits extends TransmissionLimits {
  /** How long a shutdown (or a graceful disconnect) waits for the connection to drain before destroying it. */
  closeTimeoutMs: number;
}

export class NbdConnection {
  private readonly wire: Wire;
  private readonly peer: string;
  private readonly socketClosed: Promise<void>;
  private handshake: Handshake | null = null;
  private transmission: Transmission | null = null;
  private current: OpenExport | null = null;

  private stopping = false;
  private finished: Promise<void> | null = null;
  private lingerTimer: NodeJS.Timeout | null = null;
  private socketErrorLogged = false;
  private readonly opened = Date.now();

  constructor(
    private readonly socket: net.Socket,
    private readonly exports: SharedExports,
    private readonly logLine: (line: string) => void,
    private readonly limits: ConnectionLimits,
    /** Routine events (a connection's closing line). */
    private readonly debugLine: (line: string) => void = () => undefined,
  ) {
    this.peer = socket.remoteAddress ? `${socket.remoteAddress}:${socket.remotePort}` : 'local';
    this.wire = { reader: new SocketReader(socket), writer: new SocketWriter(socket) };
    this.socketClosed = new Promise<void>((resolve) => socket.once('close', () => resolve()));
    socket.on('error', (e: NodeJS.ErrnoException) => {
      if (this.socketErrorLogged) return;
      this.socketErrorLogged = true;
      this.log(`socket error: ${e.code ?? oneLine(e)}`);
    });
  }

  private log(msg: string, to = this.logLine): void {
    const exp = this.current ? ` export "${this.current.name}"` : '';
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
      this.handshake = new Handshake(this.wire, this.exports, this.limits.maxRequestBytes, (m) => this.log(m));
      const chosen = await this.handshake.run();
      if (chosen) {
        this.current = chosen.export;
        this.transmission = new Transmission(
          this.wire.reader,
          new Replies(this.wire.writer, chosen.structured),
          chosen,
          this.limits,
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
