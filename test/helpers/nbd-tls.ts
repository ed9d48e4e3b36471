/**
 * TLS material for NBD tests, made with GnuTLS's own tools as a user would: a psktool key file, and an X.509
 * CA with server and client certificates (certtool), laid out the way qemu, nbdkit and libnbd read them.
 */
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';

export interface Pki {
  /** psktool file with identity "alice" (libnbd: tls-psk-file=FILE, username alice). */
  pskFile: string;
  /** A directory holding keys.psk, for qemu's tls-creds-psk (dir=..., username=alice). */
  pskDir: string;
  /** The same identity with another key. */
  wrongPskFile: string;
  /** ca-cert.pem, server-cert.pem, server-key.pem (the server's --tls-certificates). */
  serverDir: string;
  /** ca-cert.pem only: a client that checks the server, without a certificate of its own. */
  caOnlyDir: string;
  /** ca-cert.pem, client-cert.pem, client-key.pem signed by the CA. */
  clientDir: string;
  /** The CA of the server, but a client certificate signed by another CA. */
  strangerDir: string;
}

function certtool(args: string[]): void {
  execFileSync('certtool', args, { stdio: ['ignore', 'ignore', 'pipe'] });
}

function ca(dir: string, name: string): { cert: string; key: string } {
  const key = path.join(dir, `${name}-key.pem`);
  const cert = path.join(dir, `${name}-cert.pem`);
  const info = path.join(dir, `${name}.info`);
  fs.writeFileSync(info, `cn = ${name}\nca\ncert_signing_key\nexpiration_days = 2\n`);
  certtool(['--generate-privkey', '--outfile', key]);
  certtool(['--generate-self-signed', '--load-privkey', key, '--template', info, '--outfile', cert]);
  return { cert, key };
}

function signed(dir: string, issuer: { cert: string; key: string }, role: 'server' | 'client', outDir: string): void {
  const info = path.join(dir, `${role}-${path.basename(outDir)}.info`);
  fs.writeFileSync(info, role === 'server'
    ? 'organization = backy test\ncn = localhost\ndns_name = localhost\nip_address = 127.0.0.1\ntls_www_server\nencryption_key\nsigning_key\nexpiration_days = 2\n'
    : 'organization = backy test\ncn = backy-client\ntls_www_client\nencryption_key\nsigning_key\nexpiration_days = 2\n');
  const key = path.join(outDir, `${role}-key.pem`);
  certtool(['--generate-privkey', '--outfile', key]);
  certtool(['--generate-certificate', '--load-ca-certificate', issuer.cert, '--load-ca-privkey', issuer.key,
    '--load-privkey', key, '--template', info, '--outfile', path.join(outDir, `${role}-cert.pem`)]);
}

export function makePki(dir: string): Pki {
  fs.mkdirSync(dir, { recursive: true });
  const sub = (n: string): string => {
    const d = path.join(dir, n);
    fs.mkdirSync(d, { recursive: true });
    return d;
  };
  const pskDir = sub('psk');
  const pskFile = path.join(pskDir, 'keys.psk');
  execFileSync('psktool', ['-u', 'alice', '-p', pskFile], { stdio: 'ignore' });
  const wrongPskFile = path.join(sub('wrong-psk'), 'keys.psk');
  execFileSync('psktool', ['-u', 'alice', '-p', wrongPskFile], { stdio: 'ignore' });

  const authority = ca(sub('ca'), 'ca');
  const other = ca(sub('other-ca'), 'other');
  const serverDir = sub('server');
  const caOnlyDir = sub('ca-only');
  const clientDir = sub('client');
  const strangerDir = sub('stranger');
  for (const d of [serverDir, caOnlyDir, clientDir, strangerDir]) fs.copyFileSync(authority.cert, path.join(d, 'ca-cert.pem'));
  signed(dir, authority, 'server', serverDir);
  signed(dir, authority, 'client', clientDir);
  signed(dir, other, 'client', strangerDir);
  return { pskFile, pskDir, wrongPskFile, serverDir, caOnlyDir, clientDir, strangerDir };
}
