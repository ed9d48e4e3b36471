import * as fs from 'node:fs';
import * as net from 'node:net';
import { NbdAddress, NbdListenOptions, NbdServer } from '../../nbd/server';
import type { NbdTlsOptions } from '../../nbd/tls';
import { formatBytes } from '../config/size';
import { FailureLog } from '../device/failure-log';
import { PassThroughDevice } from '../device/pass-through';
import type { BlockDevice, ExportCatalogue, ExportInfo } from '../device/types';
import { ConfigError, errorLine } from '../util/errors';
import { log } from '../util/log';
import { VersionCatalogue } from './catalogue';
import { OverlayCatalogue, useOverlays } from './writable-exports';
import type { Overlay } from './overlays';
import type { Repository } from './repository';

export interface NbdServiceOptions {
  listen: NbdListenOptions;
  /** -r was given: every export read-only (cannot be combined with `writable`). */
  readOnly: boolean;
  /** -w: writable exports, each `UID[:OVERLAY_NAME]` or the name of an existing overlay (see overlays.ts). */
  writable?: string[];
  /** How long a stop waits for requests in flight before it drops connections. */
  stopTimeoutMs?: number;
  /** TLS offered or required (STARTTLS). */
  tls?: NbdTlsOptions;
  maxConnections?: number;
  handshakeTimeoutMs?: number;
  replyTimeoutMs?: number;
  /**
   * Serve these exports instead of the repository's versions (a live restore serves its target); `describe`
   * says what they are in the start line.
   */
  catalogue?: ExportCatalogue & Required<Pick<ExportCatalogue, 'exists'>>;
  describe?: string;
}

/** `nbd://host:port` or `nbd+unix:///?socket=path` (nbds... with TLS): what to tell the user to connect to. */
export function describeAddress(a: NbdAddress, tls = false): string {
  const s = tls ? 's' : '';
  if ('path' in a) return `nbd${s}+unix:///?socket=${a.path}`;
  return `nbd${s}://${a.host.includes(':') ? `[${a.host}]` : a.host}:${a.port}`;
}

/**
 * Every version of a repository served as a read-only NBD export, all connections sharing the repository's
 * one block cache. Start with `start`, stop with `stop` (stops accepting, lets requests in flight finish).
 */
export class NbdService {
  private constructor(
    private readonly repo: Repository,
    private readonly server: NbdServer,
    readonly address: NbdAddress,
    private readonly socketPath?: string,
    private readonly overlays: Overlay[] = [],
  ) {}

  static async start(repo: Repository, opts: NbdServiceOptions): Promise<NbdService> {
    const overlays = opts.writable?.length ? await useOverlays(repo, opts.writable, 'a writable NBD export') : [];
    const versions = new VersionCatalogue(repo);
    const catalogue = new LoggingCatalogue(opts.catalogue ?? (overlays.length ? new OverlayCatalogue(versions, overlays) : versions));
    let starting = true;
    let server: NbdServer;
    try {
      server = new NbdServer({
        catalogue,
        // Versions are read-only devices anyway; this makes sure nothing else is writable without -w.
        readOnly: !opts.catalogue && overlays.length === 0,
        tls: opts.tls,
        maxConnections: opts.maxConnections,
        handshakeTimeoutMs: opts.handshakeTimeoutMs,
        replyTimeoutMs: opts.replyTimeoutMs,
        // A failed listen is reported once, by the error thrown below, not also as a server error line.
        log: (line) => (starting && /^nbd: server error:/.test(line) ? undefined : serverLog(line)),
        debug: (line) => log.debug(line),
        closeTimeoutMs: opts.stopTimeoutMs ?? 5000,
      });
    } catch (e) {
      for (const o of overlays) await o.release().catch(() => undefined);
      // An unusable certificate or key (OpenSSL says why).
      throw new ConfigError(`cannot set up TLS: ${errorLine(e)}`);
    }
    if ('path' in opts.listen) await removeStaleSocket(opts.listen.path);
    let address: NbdAddress;
    try {
      address = await server.listen(opts.listen);
    } catch (e) {
      await server.close().catch(() => undefined);
      for (const o of overlays) await o.release().catch(() => undefined);
      const where = 'path' in opts.listen ? opts.listen.path : `${opts.listen.host ?? '127.0.0.1'}:${opts.listen.port}`;
      throw new ConfigError(`cannot listen on ${where}: ${listenError(e)}`);
    } finally {
      starting = false;
    }
    const tlsNote = opts.tls ? (opts.tls.mode === 'require' ? ', TLS required' : ', TLS offered') : '';
    let what = opts.describe ?? '';
    if (!opts.catalogue) {
      const count = (await repo.meta.listVersions()).length;
      const writable = overlays.length ? ` and ${overlays.length} writable export${overlays.length === 1 ? '' : 's'} (${overlays.map((o) => o.name).join(', ')})` : '';
      what = `${count} version${count === 1 ? '' : 's'} read-only${writable}`;
    }
    const notes = [...(opts.catalogue ? [] : [`block cache ${formatBytes(repo.cfg.cacheSize)}`]), ...(tlsNote ? [tlsNote.slice(2)] : [])];
    log.info(`serving ${what} on ${describeAddress(address, opts.tls?.mode === 'require')}` +
      `${notes.length ? ` (${notes.join(', ')})` : ''}; stop with SIGTERM or Ctrl-C`);
    return new NbdService(repo, server, address, 'path' in opts.listen ? opts.listen.path : undefined, overlays);
  }

  get connections(): number {
    return this.server.connectionCount;
  }

  async stop(): Promise<void> {
    await this.server.close();
    // Every export is closed now (its overlay flushed): the overlays may be used by others again.
    for (const o of this.overlays.splice(0)) await o.release().catch((e) => log.warn(`overlay ${o.name}: ${errorLine(e)}`));
    if (this.socketPath) fs.rmSync(this.socketPath, { force: true });
    const c = this.repo.cache();
    log.debug(`block cache: ${c.hits} hits, ${c.misses} misses, ${formatBytes(c.size)} cached`);
  }
}

/**
 * Runs the service until SIGTERM or SIGINT, then stops it: no new connections, requests in flight finish (or
 * fail when the stop timeout passes), and the promise resolves so the command exits 0. A second signal
 * exits at once.
 */
export async function serveUntilSignal(repo: Repository, opts: NbdServiceOptions): Promise<void> {
  // Listening for signals first: one that arrives while the server starts stops it as soon as it is up.
  const signalled = new Promise<NodeJS.Signals>((resolve) => {
    const on = (signal: NodeJS.Signals): void => {
      process.off('SIGTERM', on);
      process.off('SIGINT', on);
      process.once('SIGTERM', forceExit);
      process.once('SIGINT', forceExit);
      resolve(signal);
    };
    process.on('SIGTERM', on);
    process.on('SIGINT', on);
  });
  const service = await NbdService.start(repo, opts);
  const signal = await signalled;
  log.info(`${signal}: stopping the NBD server (${service.connections} connection${service.connections === 1 ? '' : 's'} open)`);
  await service.stop();
  log.info('NBD server stopped');
}

function forceExit(): void {
  log.warn('second signal: exiting without waiting for requests in flight');
  process.exit(0);
}

/**
 * The protocol layer's lines. Failed reads are logged (once per block, at error level) by the version device,
 * so the server's own line about the same request only goes to the debug log; bad clients are warnings.
 */
function serverLog(line: string): void {
  // A client that reconnects in a loop to send garbage, or reads a bad block again and again, must not flood
  // the log: lines that differ only in the peer's address and in numbers are repeated once per interval,
  // with a count.
  const key = line.replace(/^nbd \S+/, 'nbd').replace(/\d+/g, '#');
  if (/: (READ \d+\+\d+: device read|CACHE \d+\+\d+: prefetch failed)/.test(line)) serverDebug.report(key, line);
  else serverWarnings.report(key, line);
}

const serverWarnings = new FailureLog((line) => log.warn(line));
const serverDebug = new FailureLog((line) => log.debug(line));

/** "address already in use (EADDRINUSE)" rather than Node's "listen EADDRINUSE: address already in use ::1:80". */
function listenError(e: unknown): string {
  const err = e as NodeJS.ErrnoException;
  if (!err?.code || typeof err.message !== 'string') return errorLine(e);
  const what = err.message.replace(/^\w+ [A-Z0-9_]+: /, '').replace(/ \S+$/, '');
  return `${what} (${err.code})`;
}

/** A socket file left by a server that died is removed; one with a live server behind it is an error. */
async function removeStaleSocket(file: string): Promise<void> {
  let st: fs.Stats;
  try {
    st = fs.lstatSync(file);
  } catch {
    return;
  }
  if (!st.isSocket()) throw new ConfigError(`cannot listen on ${file}: it exists and is not a socket`);
  const alive = await new Promise<boolean>((resolve) => {
    const c = net.connect({ path: file }, () => {
      c.destroy();
      resolve(true);
    });
    c.on('error', () => resolve(false));
  });
  if (alive) throw new ConfigError(`cannot listen on ${file}: another server is listening there`);
  fs.rmSync(file, { force: true });
}

/** Logs, at debug level, every export a connection opens and closes (one line each). */
class LoggingCatalogue implements ExportCatalogue {
  private seq = 0;

  constructor(private readonly inner: ExportCatalogue & Required<Pick<ExportCatalogue, 'exists'>>) {}

  list(): Promise<ExportInfo[]> {
    return this.inner.list();
  }

  exists(name: string): Promise<boolean> {
    return this.inner.exists(name);
  }

  async open(name: string): Promise<{ device: BlockDevice; description: string } | undefined> {
    const e = await this.inner.open(name);
    if (!e) {
      log.debug(`nbd: no export "${name.slice(0, 100)}"`);
      return undefined;
    }
    const n = ++this.seq;
    log.debug(`nbd: export #${n} opened version ${name} (${e.description})`);
    return { device: new ObservedDevice(e.device, n, name), description: e.description };
  }
}

/** Counts what was read through one open export, for its closing log line. Adds no promise to the read path. */
export class ObservedDevice extends PassThroughDevice {
  private reads = 0;
  private bytes = 0;
  private readonly opened = Date.now();

  constructor(next: BlockDevice, private readonly n: number, private readonly name: string) {
    super(next);
  }

  override read(offset: number, length: number): Promise<Buffer> {
    this.reads++;
    this.bytes += length;
    return this.next.read(offset, length);
  }

  override async close(): Promise<void> {
    try {
      await this.next.close?.();
    } finally {
      const secs = (Date.now() - this.opened) / 1000;
      log.debug(`nbd: export #${this.n} closed version ${this.name} after ${secs.toFixed(1)} s: ${this.reads} reads, ${formatBytes(this.bytes)}`);
    }
  }
}
