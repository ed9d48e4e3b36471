/**
 * An NBD server (fixed newstyle handshake, simple and structured replies, base:allocation) serving whatever
 * `BlockDevice`s an `ExportCatalogue` hands it. It knows nothing about backups. Each export is one device
 * shared by all its connections; what the device can do (write, trim, zero, flush, FUA) decides the flags
 * clients see. Negotiation is in handshake.ts, the request loop in transmission.ts, reply writing in
 * replies.ts.
 */
import * as net from 'node:net';
import type { ExportCatalogue } from '../src/device/types';
import { NbdConnection, ConnectionLimits } from './connection';
import { oneLine } from './errors';
import { SharedExports } from './exports';
import { PREFERRED_BLOCK_SIZE } from './handshake';

export { normalizeExtents } from './extents';
export { blockSizesFor, MAX_OPTION_BYTES, PREFERRED_BLOCK_SIZE, transmissionFlags } from './handshake';

export interface NbdServerOptions {
  catalogue: ExportCatalogue;
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
  /** Bytes of READs and WRITE payloads in progress per connection before the server stops reading.
   * Default 2 × maxRequestBytes. */
  maxInFlightBytesPerConnection?: number;
  /** How long close() (or a graceful disconnect) waits for a connection to drain before destroying it. Default 10 s. */
  closeTimeoutMs?: number;
}

export type NbdListenOptions = { host?: string; port: number } | { path: string };
export type NbdAddress = { host: string; port: number; family: string } | { path: string };

const DEFAULT_MAX_REQUEST = 32 * 1024 * 1024;
const DEFAULT_MAX_IN_FLIGHT = 32;
const DEFAULT_CLOSE_TIMEOUT = 10_000;

export class NbdServer {
  private readonly exports: SharedExports;
  private readonly log: (line: string) => void;
  private readonly debug: (line: string) => void;
  private readonly limits: ConnectionLimits;
  private readonly server: net.Server;
  private readonly connections = new Set<NbdConnection>();
  private closing: Promise<void> | null = null;
  private listened = false;

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
    this.accepted++;
    socket.setNoDelay(true);
    socket.setKeepAlive(true, 60_000);
    const conn = new NbdConnection(socket, this.exports, this.log, this.limits, this.debug);
    this.connections.add(conn);
    conn
      .run()
      .catch((e) => this.log(`nbd: connection handler failed: ${oneLine(e)}`))
      .finally(() => this.connections.delete(conn));
  }
}
