/**
 * TLS for the NBD server (NBD_OPT_STARTTLS): X.509 certificates or pre-shared keys, set up the way qemu-nbd
 * and nbdkit take them, so the same files serve all three: a directory with ca-cert.pem, server-cert.pem and
 * server-key.pem, or a psktool key file ("identity:hexkey" lines).
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import type * as net from 'node:net';
import * as tls from 'node:tls';

export type TlsMode = 'off' | 'on' | 'require';

export interface NbdTlsOptions {
  /** 'on': clients may upgrade (plain clients are served too); 'require': nothing but STARTTLS before TLS. */
  mode: 'on' | 'require';
  /** X.509: PEM certificate chain and key of the server. */
  cert?: Buffer;
  key?: Buffer;
  /** CA certificates (PEM): with verifyPeer, clients must present a certificate signed by one of them. */
  ca?: Buffer;
  verifyPeer?: boolean;
  /** PSK: key by identity (a client proves it knows the key of the identity it names). */
  psk?: Map<string, Buffer>;
}

/** TLS 1.3 suites, then TLS 1.2 suites with forward secrecy (ECDHE), PSK ones included for PSK clients. */
const CIPHERS = [
  'TLS_AES_256_GCM_SHA384', 'TLS_CHACHA20_POLY1305_SHA256', 'TLS_AES_128_GCM_SHA256',
  'ECDHE-RSA-AES256-GCM-SHA384', 'ECDHE-ECDSA-AES256-GCM-SHA384', 'ECDHE-RSA-AES128-GCM-SHA256', 'ECDHE-ECDSA-AES128-GCM-SHA256',
  'ECDHE-RSA-CHACHA20-POLY1305', 'ECDHE-ECDSA-CHACHA20-POLY1305',
  'ECDHE-PSK-CHACHA20-POLY1305', 'ECDHE-PSK-AES256-CBC-SHA384', 'ECDHE-PSK-AES128-CBC-SHA256',
  'DHE-PSK-AES256-GCM-SHA384', 'DHE-PSK-AES128-GCM-SHA256', 'PSK-AES256-GCM-SHA384', 'PSK-AES128-GCM-SHA256',
].join(':');

/** Reads a psktool key file: one "identity:hexkey" per line. Throws an Error naming the line on bad input. */
export function parsePskFile(text: string, file = 'PSK file'): Map<string, Buffer> {
  const keys = new Map<string, Buffer>();
  text.split('\n').forEach((raw, i) => {
    const line = raw.replace(/\r$/, '');
    if (!line.trim() || line.startsWith('#')) return;
    const at = line.lastIndexOf(':');
    const id = line.slice(0, at);
    const hex = line.slice(at + 1);
    if (at <= 0 || !/^([0-9a-fA-F]{2})+$/.test(hex)) throw new Error(`${file}, line ${i + 1}: expected "identity:hexkey" (as psktool writes)`);
    keys.set(id, Buffer.from(hex, 'hex'));
  });
  if (keys.size === 0) throw new Error(`${file} holds no keys`);
  return keys;
}

/** "peer did not return a certificate" rather than OpenSSL's whole error string with file and line. */
export function tlsErrorLine(e: unknown): string {
  const r = (e as { reason?: unknown } | null)?.reason;
  if (typeof r === 'string' && r) return r;
  return e instanceof Error ? e.message : String(e);
}

/** Loads the qemu/nbdkit certificate directory. ca-cert.pem is needed only to verify clients. */
export function loadCertificateDir(dir: string, verifyPeer: boolean): Pick<NbdTlsOptions, 'cert' | 'key' | 'ca' | 'verifyPeer'> {
  const read = (name: string, needed: boolean): Buffer | undefined => {
    const file = path.join(dir, name);
    try {
      return fs.readFileSync(file);
    } catch (e) {
      if (!needed && (e as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
      throw new Error(`${file}: ${(e as NodeJS.ErrnoException).code === 'ENOENT' ? 'missing' : (e as Error).message}`);
    }
  };
  const cert = read('server-cert.pem', true)!;
  const key = read('server-key.pem', true)!;
  const ca = read('ca-cert.pem', verifyPeer);
  return { cert, key, ca, verifyPeer };
}

/** The options of a TLS server; throws (with OpenSSL's reason) when the certificate or key is unusable. */
export function serverOptions(o: NbdTlsOptions): tls.TlsOptions {
  const psk = o.psk;
  const opts: tls.TlsOptions = {
    minVersion: 'TLSv1.2',
    ciphers: CIPHERS,
    ...(o.cert ? { cert: o.cert, key: o.key } : {}),
    ...(o.ca ? { ca: o.ca } : {}),
    requestCert: !!o.verifyPeer,
    rejectUnauthorized: !!o.verifyPeer,
    ...(psk ? { pskCallback: (_s: tls.TLSSocket, identity: string) => psk.get(identity) ?? null } : {}),
  };
  tls.createSecureContext(opts); // fail now, at start, rather than at the first client
  return opts;
}

/**
 * Runs the server side of a TLS handshake on an accepted socket and resolves with the TLS session. The socket
 * is handed to a tls.Server made for this handshake (the documented way to inject a connection), which
 * checks a client certificate when one is asked for; the verdict is enforced here, so that every failure
 * ends in a rejection. Rejects on any handshake failure or after `timeoutMs`.
 */
export function startTls(socket: net.Socket, options: tls.TlsOptions, timeoutMs: number): Promise<tls.TLSSocket> {
  const server = tls.createServer({ ...options, rejectUnauthorized: false, handshakeTimeout: timeoutMs });
  return new Promise((resolve, reject) => {
    server.once('secureConnection', (t: tls.TLSSocket) => {
      if (options.requestCert && !t.authorized) {
        t.destroy();
        reject(new Error(`client certificate refused: ${t.authorizationError ?? 'none given'}`));
        return;
      }
      resolve(t);
    });
    server.once('tlsClientError', (e: Error, t: tls.TLSSocket) => {
      t.destroy();
      reject(e);
    });
    // A client that gives up during the handshake without an alert only half-closes: with half-open sockets
    // allowed (the plain server allows them), nothing would ever report it.
    socket.allowHalfOpen = false;
    server.emit('connection', socket);
  });
}
