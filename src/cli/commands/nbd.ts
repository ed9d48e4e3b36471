import * as fs from 'node:fs';
import { InvalidArgumentError } from 'commander';
import type { Command } from 'commander';
import type { Register } from './index';
import { ConfigError, UsageError } from '../../util/errors';
import type { NbdTlsOptions } from '../../../nbd/tls';
import type { NbdServiceOptions } from '../../engine/nbd-service';

function port(text: string): number {
  if (!/^\d{1,5}$/.test(text) || Number(text) > 65535) throw new InvalidArgumentError('expected a port number from 0 to 65535 (0: any free port)');
  return Number(text);
}

function count(text: string): number {
  if (!/^\d{1,6}$/.test(text) || Number(text) < 1) throw new InvalidArgumentError('expected a whole number of at least 1');
  return Number(text);
}

function seconds(text: string): number {
  if (!/^\d+(\.\d+)?$/.test(text) || Number(text) <= 0 || Number(text) > 86400) throw new InvalidArgumentError('expected seconds, more than 0 and at most 86400');
  return Number(text);
}

function tlsMode(text: string): 'off' | 'on' | 'require' {
  if (text !== 'off' && text !== 'on' && text !== 'require') throw new InvalidArgumentError('expected off, on or require');
  return text;
}

export interface ServerOptions {
  address?: string;
  port?: number;
  socket?: string;
  readOnly?: boolean;
  writable?: string[];
  tls?: 'off' | 'on' | 'require';
  tlsPsk?: string;
  tlsCertificates?: string;
  tlsVerifyPeer?: boolean;
  insecure?: boolean;
  maxConnections?: number;
  handshakeTimeout?: number;
  replyTimeout?: number;
}

/** An address only this machine can reach. */
export function isLoopback(host: string): boolean {
  const h = host.toLowerCase().replace(/^\[|\]$/g, '');
  return h === 'localhost' || h === '::1' || /^127(\.\d{1,3}){3}$/.test(h) || /^::ffff:127(\.\d{1,3}){3}$/.test(h);
}

/** The TLS settings the options ask for (undefined: no TLS), files read and checked. */
async function tlsFrom(o: ServerOptions): Promise<NbdTlsOptions | undefined> {
  const creds = o.tlsPsk !== undefined || o.tlsCertificates !== undefined;
  if (o.tlsPsk !== undefined && o.tlsCertificates !== undefined) throw new UsageError('--tls-psk and --tls-certificates cannot be combined: choose one');
  if (o.tlsVerifyPeer && o.tlsCertificates === undefined) throw new UsageError('--tls-verify-peer needs --tls-certificates');
  // Keys or certificates without --tls mean TLS is wanted: required, as qemu-nbd does with --tls-creds.
  const mode = o.tls ?? (creds ? 'require' : 'off');
  if (mode === 'off') {
    if (creds) throw new UsageError('--tls off cannot be combined with --tls-psk or --tls-certificates');
    return undefined;
  }
  if (!creds) throw new UsageError(`--tls ${mode} needs --tls-psk FILE or --tls-certificates DIR`);
  const tls = await import('../../../nbd/tls');
  try {
    if (o.tlsPsk !== undefined) return { mode, psk: tls.parsePskFile(fs.readFileSync(o.tlsPsk, 'utf8'), o.tlsPsk) };
    return { mode, ...tls.loadCertificateDir(o.tlsCertificates!, !!o.tlsVerifyPeer) };
  } catch (e) {
    const err = e as NodeJS.ErrnoException;
    const what = err.code === 'ENOENT' ? 'does not exist' : err.message;
    throw new ConfigError(err.code && err.path ? `${err.path}: ${what}` : what);
  }
}

/**
 * The options of an NBD server (listen address, TLS, limits), for `backy nbd` and `backy restore --live`.
 * `tlsFiles: false` leaves out --tls-psk and --tls-certificates (a command that has them already).
 */
export function addServerOptions(cmd: Command, opts: { tlsFiles?: boolean } = {}): Command {
  // Defaults are applied by serverSettings, not by commander, so that -a/-p together with --socket can be refused.
  cmd
    .option('-a, --address <addr>', 'address to listen on (default 127.0.0.1; any other than loopback needs --tls require or --insecure)')
    .option('-p, --port <port>', 'TCP port (default 10809; 0 picks a free port, printed at start)', port)
    .option('--socket <path>', 'listen on this Unix socket instead of TCP (created mode 0600: only this user may connect)')
    .option('--tls <mode>', 'off | on (offered to clients) | require (clients must use TLS); default: require when keys or certificates are given, else off', tlsMode);
  if (opts.tlsFiles !== false) {
    cmd
      .option('--tls-psk <file>', 'TLS with pre-shared keys: a psktool key file ("identity:hexkey" lines); clients need one of its keys')
      .option('--tls-certificates <dir>', 'TLS with X.509: DIR/server-cert.pem, DIR/server-key.pem (and DIR/ca-cert.pem), as qemu-nbd and nbdkit use them');
  }
  return cmd
    .option('--tls-verify-peer', 'with --tls-certificates: clients must present a certificate signed by DIR/ca-cert.pem')
    .option('--insecure', 'allow listening on a non-loopback address without --tls require (anyone who reaches it reads what is served)')
    .option('--max-connections <n>', 'connections served at once; more are refused (default 256)', count)
    .option('--handshake-timeout <seconds>', 'a client that has not chosen an export within this time is dropped (default 10)', seconds)
    .option('--reply-timeout <seconds>', 'a client that does not read its replies for this long is dropped (default 60)', seconds);
}

/** What the server options ask for, checked (usage errors, TLS files read). */
export async function serverSettings(o: ServerOptions): Promise<Pick<NbdServiceOptions, 'listen' | 'tls' | 'maxConnections' | 'handshakeTimeoutMs' | 'replyTimeoutMs'>> {
  if (o.socket !== undefined && (o.address !== undefined || o.port !== undefined)) throw new UsageError('--socket cannot be combined with -a or -p');
  if (o.socket === '') throw new UsageError('--socket needs a path');
  if (o.address === '') throw new UsageError('-a needs an address');
  const tls = await tlsFrom(o);
  const host = o.address ?? '127.0.0.1';
  if (o.socket === undefined && !isLoopback(host) && tls?.mode !== 'require' && !o.insecure) {
    throw new UsageError(`refusing to listen on ${host} without --tls require: anyone who can reach it could read what is served (use TLS, or --insecure if the network is trusted)`);
  }
  return {
    listen: o.socket ? { path: o.socket } : { host, port: o.port ?? 10809 },
    tls,
    maxConnections: o.maxConnections,
    handshakeTimeoutMs: o.handshakeTimeout === undefined ? undefined : o.handshakeTimeout * 1000,
    replyTimeoutMs: o.replyTimeout === undefined ? undefined : o.replyTimeout * 1000,
  };
}

export const register: Register = (program, wrap) => {
  const cmd = program.command('nbd')
    .description('serve every version as a read-only NBD export named by its uid, and writable overlays (-w) (until SIGTERM or Ctrl-C)');
  addServerOptions(cmd)
    .option('-r, --read-only', 'every export read-only (the default without -w)')
    .option('-w, --writable <uid[:overlay]>', 'also serve a writable export of version UID: writes go to a copy-on-write overlay named OVERLAY '
      + '(default UID-rw, the export name) in overlay_dir, kept until "backy overlay rm"; an existing overlay may be named alone; repeatable',
    (v: string, prev: string[] = []) => [...prev, v])
    .action(wrap(async (ctx, o: ServerOptions) => {
      if (o.readOnly && o.writable?.length) throw new UsageError('-r and -w exclude each other');
      const settings = await serverSettings(o);
      const repo = await ctx.repository();
      const { serveUntilSignal } = await import('../../engine/nbd-service');
      await serveUntilSignal(repo, { ...settings, readOnly: !!o.readOnly, writable: o.writable });
    }));
};
