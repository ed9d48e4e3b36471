import { IoError } from '../util/errors';
import type { NbdConnectAddress } from '../../nbd/client';
import { NBD_DEFAULT_PORT } from '../../nbd/constants';
import { IoUrl, percentDecode } from './url';

/** What an NBD URI says (doc/uri.md of the NBD project). */
export interface NbdUrl {
  address: NbdConnectAddress;
  exportName: string;
  /** nbds:// or nbds+unix://: TLS or nothing */
  tls: boolean;
  /** userinfo: the PSK identity (or X.509 user) */
  username?: string;
  tlsType?: 'psk' | 'x509';
  /** name the server certificate must carry (default: the host) */
  tlsHostname?: string;
  /** false: do not verify the server's certificate (tls-verify-peer=0) */
  tlsVerifyPeer: boolean;
  /** libnbd's query parameters for the credential files */
  tlsPskFile?: string;
  tlsCertificates?: string;
}

const SCHEMES = new Set(['nbd', 'nbds', 'nbd+unix', 'nbds+unix']);

/**
 * Parses nbd://HOST[:PORT]/EXPORT, nbds://..., nbd+unix:///EXPORT?socket=PATH and nbds+unix://. The export name
 * is the path without its leading "/", percent escapes decoded; query parameters the client does not know
 * are an error (the URI spec asks clients to diagnose them).
 */
export function parseNbdUrl(u: IoUrl): NbdUrl {
  if (!SCHEMES.has(u.scheme)) throw new IoError(`${u.url}: not an NBD URI`);
  const unix = u.scheme.endsWith('+unix');
  const tls = u.scheme.startsWith('nbds');
  let rest = u.rest;
  let query = '';
  const hash = rest.indexOf('#');
  if (hash >= 0) rest = rest.slice(0, hash);
  const q = rest.indexOf('?');
  if (q >= 0) {
    query = rest.slice(q + 1);
    rest = rest.slice(0, q);
  }
  const slash = rest.indexOf('/');
  let authority = slash < 0 ? rest : rest.slice(0, slash);
  const exportName = percentDecode(slash < 0 ? '' : rest.slice(slash + 1), u.url);
  let username: string | undefined;
  const at = authority.lastIndexOf('@');
  if (at >= 0) {
    username = percentDecode(authority.slice(0, at), u.url);
    authority = authority.slice(at + 1);
  }

  const params = new Map<string, string>();
  for (const part of query ? query.split('&') : []) {
    const eq = part.indexOf('=');
    const key = percentDecode(eq < 0 ? part : part.slice(0, eq), u.url);
    if (params.has(key)) throw new IoError(`${u.url}: query parameter ${key} given twice`);
    params.set(key, percentDecode(eq < 0 ? '' : part.slice(eq + 1), u.url));
  }
  const known = new Set(['socket', 'tls-type', 'tls-hostname', 'tls-verify-peer', 'tls-psk-file', 'tls-certificates', 'tls-username']);
  for (const k of params.keys()) {
    if (!known.has(k)) throw new IoError(`${u.url}: unknown query parameter "${k}" (known: ${[...known].join(', ')})`);
    if (k.startsWith('tls-') && !tls) throw new IoError(`${u.url}: ${k} needs a TLS URI (nbds:// or nbds+unix://)`);
  }
  if (params.has('tls-username')) username = params.get('tls-username');

  let address: NbdConnectAddress;
  if (unix) {
    if (authority) throw new IoError(`${u.url}: a Unix socket URI has no host (write ${u.scheme}:///EXPORT?socket=PATH)`);
    const socket = params.get('socket');
    if (!socket) throw new IoError(`${u.url}: ${u.scheme}:// needs ?socket=PATH`);
    address = { path: socket };
  } else {
    if (params.has('socket')) throw new IoError(`${u.url}: socket= is for ${u.scheme}+unix:// URIs`);
    const m = /^(\[[^\]]*\]|[^:]*)(?::(\d*))?$/.exec(authority);
    if (!m) throw new IoError(`${u.url}: cannot read host and port`);
    const host = percentDecode(m[1].replace(/^\[(.*)\]$/, '$1'), u.url) || 'localhost';
    const port = m[2] ? Number(m[2]) : NBD_DEFAULT_PORT;
    if (!Number.isInteger(port) || port < 1 || port > 65535) throw new IoError(`${u.url}: bad port "${m[2]}"`);
    address = { host, port };
  }

  const type = params.get('tls-type');
  if (type !== undefined && type !== 'psk' && type !== 'x509') {
    throw new IoError(`${u.url}: tls-type=${type} is not supported (psk or x509)`);
  }
  const verify = params.get('tls-verify-peer');
  if (verify !== undefined && verify !== '0' && verify !== '1') throw new IoError(`${u.url}: tls-verify-peer must be 0 or 1`);
  return {
    address,
    exportName,
    tls,
    username,
    tlsType: type as NbdUrl['tlsType'],
    tlsHostname: params.get('tls-hostname'),
    tlsVerifyPeer: verify !== '0',
    tlsPskFile: params.get('tls-psk-file'),
    tlsCertificates: params.get('tls-certificates'),
  };
}

/** host:port or the socket path, for messages. */
export function describeAddress(a: NbdConnectAddress): string {
  if ('path' in a) return a.path;
  const h = a.host ?? 'localhost';
  return `${h.includes(':') ? `[${h}]` : h}:${a.port ?? NBD_DEFAULT_PORT}`;
}
