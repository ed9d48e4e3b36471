/**
 * An NBD server (fixed newstyle handshake, simple and structured replies, base:allocation) serving whatever
 * `BlockDevice`s an `ExportCatalogue` hands it. It knows nothing about backups. Each export is one device
 * shared by all its connections; what the device can do (write, trim, zero, flush, FUA) decides the flags
 * clients see. Negotiation is in handshake.ts, the request loop in transmission.ts, reply writing in
 * replies.ts.
 */
import * as fs from 'node:fs';
import * as net from 'node:net';
import type { ExportCatalogue } from '../src/device/types';
import { NbdConnection, ConnectionLimits, ServerTls } from './connection';
import { ByteBudget } from './budget';
import { oneLine } from './errors';
import { SharedExports } from './exports';
import { PREFERRED_BLOCK_SIZE } from './handshake';
import { NbdTlsOptions, serverOptions } from './tls';

export { normalizeExtents } from './extents';
export { blockSizesFor, MAX_OPTION_BYTES, PREFERRED_BLOCK_SIZE, transmissionFlags } from './handshake';
export { loadCertificateDir, parsePskFile } from './tls';
export type { NbdTlsOptions, TlsMode } from './tls';

export interface NbdServerOptions {
  catalogue: ExportCatalogue;
  /** TLS (NBD_OPT_STARTTLS) offered or required; none by default. */
  tls?: NbdTlsOptions;
  /** Serve every export read-only, whatever its device can do. */
  readOnly?: boolean;
  /** One line per notable event (protocol violations, device errors). Default: stderr. */
  log?: (line: string) => void;
  /** Routine events (each connection's closing line with what it read and wrote). Default: none. */
  debug?: (line: string) => void;
  /** Largest READ (and WRITE payload) accepted; advertised as the maximum payload. Default 32 MiB. */
  maxRequestBytes?: number;
  /** Requests handled concurrently per connection before the server stops reading. Default 32. */
  maxInFlightPerConnection?: number;
  /** Bytes of WRITE payloads held per connection before the server stops reading. Default 2 × maxRequestBytes. */
  maxInFlightBytesPerConnection?: number;
  /**
   * Bytes of read replies per connection from the device read until they have left the process (queued for a
   * client that reads slowly included). Reads larger than a piece (1 MiB) are served piece by piece within
   * it. Default 8 MiB.
   */
  maxReplyBytesPerConnection?: number;
  /**
   * Bytes of replies that must be read whole before they are sent (simple replies and DF reads larger than a
   * piece), all connections together. Default 256 MiB.
   */
  maxWholeReplyBytes?: number;
  /** Connections served at once; more are refused (closed at once). Default 256. */
  maxConnections?: number;
  /** A client that has not chosen an export within this time (TLS included) is dropped. Default 10 s. */
  handshakeTimeoutMs?: number;
  /** A client that leaves replies unread this long is dropped, freeing what they hold. Default 60 s. */
  replyTimeoutMs?: number;
  /** How long close() (or a graceful disconnect) waits for a connection to drain before destroying it. Default 10 s. */
  closeTimeoutMs?: number;
}

export type NbdListenOptions = { host?: string; port: number } | { path: string };
export type NbdAddress = { host: string; port: number; family: string } | { path: string };

const DEFAULT_MAX_REQUEST = 32 * 1024 * 1024;
const DEFAULT_MAX_IN_FLIGHT = 32;
const DEFAULT_CLOSE_TIMEOUT = 10_000;
const DEFAULT_MAX_REPLY_BYTES = 8 * 1024 * 1024;
const DEFAULT_MAX_WHOLE_REPLY_BYTES = 256 * 1024 * 1024;
const DEFAULT_MAX_CONNECTIONS = 256;
const DEFAULT_HANDSHAKE_TIMEOUT = 10_000;
const DEFAULT_REPLY_TIMEOUT = 60_000;
/** The connection limit is logged at most this often (a client may retry in a loop). */
const LIMIT_LOG_INTERVAL = 10_000;

export class NbdServer {
  private readonly exports: SharedExports;
  private readonly log: (line: string) => void;
  private readonly debug: (line: string) => void;
  private readonly limits: ConnectionLimits;
  private readonly tls?: ServerTls;
  private readonly server: net.Server;
  /** Open connections, each with the promise of its end (the connection forgotten). */
  private readonly connections = new Map<NbdConnection, Promise<void>>();
  private closing: Promise<void> | null = null;
  private listened = false;
  private readonly maxConnections: number;
  /** Connections refused for the limit since the last line about it, and when that line was written. */
  private refused = { count: 0, loggedAt: 0 };

  constructor(options: NbdServerOptions) {
    const maxRequestBytes = options.maxRequestBytes ?? DEFAULT_MAX_REQUEST;
    if (!Number.isInteger(maxRequestBytes) || maxRequestBytes < PREFERRED_BLOCK_SIZE || maxRequestBytes > 2 ** 30) {
      throw new RangeError(`maxRequestBytes must be an integer in [${PREFERRED_BLOCK_SIZE}, 2^30]`);
    }
    const maxInFlight = options.maxInFlightPerConnection ?? DEFAULT_MAX_IN_FLIGHT;
    if (!Number.isInteger(maxInFlight) || maxInFlight < 1) throw new RangeError('maxInFlightPerConnection must be ≥ 1');
    const maxInFlightBytes = options.maxInFlightBytesPerConnection ?? 2 * maxRequestBytes;
    if (!(maxInFlightBytes >= 1)) throw new RangeError('maxInFlightBytesPerConnection must be ≥ 1');
    this.log = options.log ?? ((line) => process.stderr.write(`${line}\n`));
    this.debug = options.debug ?? (() => undefined);
    this.exports = new SharedExports(options.catalogue, (line) => this.log(`nbd: ${line}`), { readOnly: !!options.readOnly });
    this.maxConnections = positive(options.maxConnections ?? DEFAULT_MAX_CONNECTIONS, 'maxConnections');
    this.limits = {
      maxRequestBytes,
      maxInFlight,
      maxInFlightBytes,
      closeTimeoutMs: options.closeTimeoutMs ?? DEFAULT_CLOSE_TIMEOUT,
      handshakeTimeoutMs: positive(options.handshakeTimeoutMs ?? DEFAULT_HANDSHAKE_TIMEOUT, 'handshakeTimeoutMs'),
      replyTimeoutMs: positive(options.replyTimeoutMs ?? DEFAULT_REPLY_TIMEOUT, 'replyTimeoutMs'),
      maxReplyBytes: positive(options.maxReplyBytesPerConnection ?? DEFAULT_MAX_REPLY_BYTES, 'maxReplyBytesPerConnection'),
      whole: new ByteBudget(positive(options.maxWholeReplyBytes ?? DEFAULT_MAX_WHOLE_REPLY_BYTES, 'maxWholeReplyBytes')),
    };
    if (options.tls) {
      if (!options.tls.psk && !options.tls.cert) throw new TypeError('TLS needs a certificate and key, or pre-shared keys');
      this.tls = { mode: options.tls.mode, options: serverOptions(options.tls) };
    }
    this.server = net.createServer({ allowHalfOpen: true, pauseOnConnect: false }, (socket) => this.accept(socket));
    this.server.on('error', (e) => this.log(`nbd: server error: ${oneLine(e)}`));
  }

  /**
   * Starts listening (TCP defaults to 127.0.0.1; port 0 picks a free port; a Unix socket is made mode 0600).
   * Resolves with the bound address.
   */
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
      if ('path' in where) {
        // The socket file is created mode 0600 (only its owner may connect): the umask applies at bind, which
        // happens within listen(); the chmod after it covers a bind done elsewhere (a cluster primary).
        const umask = process.umask(0o177);
        try {
          this.server.listen({ path: where.path }, () => {
            try {
              fs.chmodSync(where.path, 0o600);
            } catch (e) {
              this.log(`nbd: cannot chmod ${where.path}: ${oneLine(e)}`);
            }
            done();
          });
        } finally {
          process.umask(umask);
        }
      } else {
        this.server.listen({ host: where.host ?? '127.0.0.1', port: where.port }, done);
      }
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

  /** Connections accepted since the start. */
  accepted = 0;

  /** Exports open now (each one device, shared by its connections). */
  get openExports(): number {
    return this.exports.openCount;
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
        const open = [...this.connections];
        await Promise.all(open.map(([c]) => c.shutdown()));
        // Shutdown resolves once a connection's socket is gone even if a device call hangs; its own end (the
        // export released, the connection forgotten) follows at once unless something hangs: wait for it a
        // little, so close() leaves nothing behind in the normal case.
        let timer: NodeJS.Timeout | undefined;
        await Promise.race([
          Promise.all(open.map(([, ended]) => ended)),
          new Promise<void>((resolve) => (timer = setTimeout(resolve, this.limits.closeTimeoutMs))),
        ]);
        clearTimeout(timer);
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
    if (this.connections.size >= this.maxConnections) {
      socket.destroy();
      this.refused.count++;
      const now = Date.now();
      if (now - this.refused.loggedAt >= LIMIT_LOG_INTERVAL) {
        this.log(`nbd: ${this.maxConnections} connections open, the limit: refused ${this.refused.count} connection${this.refused.count === 1 ? '' : 's'}`);
        this.refused = { count: 0, loggedAt: now };
      }
      return;
    }
    this.accepted++;
    socket.setNoDelay(true);
    socket.setKeepAlive(true, 60_000);
    const conn = new NbdConnection(socket, this.exports, this.log, this.limits, this.debug, this.tls);
    const ended = conn
      .run()
      .catch((e) => this.log(`nbd: connection handler failed: ${oneLine(e)}`))
      .finally(() => this.connections.delete(conn));
    this.connections.set(conn, ended);
  }
}

function positive(n: number, name: string): number {
  if (!(n > 0) || !Number.isFinite(n)) throw new RangeError(`${name} must be a positive number`);
  return n;
}
