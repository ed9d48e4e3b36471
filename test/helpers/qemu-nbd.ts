/**
 * Real QEMU tools for tests: qemu-img / qemu-io run asynchronously, qemu-nbd (or nbdkit) as a server that
 * stops with the test, and a TCP proxy that counts the bytes a client receives and can cut every connection.
 */
import * as fs from 'node:fs';
import * as net from 'node:net';
import { ChildProcess, execFile, spawn } from 'node:child_process';
import { freePort } from './net';

export function sh(cmd: string, args: string[], timeoutMs = 120_000): Promise<string> {
  return new Promise((resolve, reject) => {
    execFile(cmd, args, { maxBuffer: 64 * 1024 * 1024, timeout: timeoutMs }, (err, stdout, stderr) => {
      if (err) reject(new Error(`${cmd} ${args.join(' ')}: ${stderr || err.message}`));
      else resolve(stdout);
    });
  });
}

export interface Server {
  /** the URI to give backy */
  uri: string;
  child: ChildProcess;
  stop(signal?: NodeJS.Signals): Promise<void>;
}

async function waitConnectable(addr: { path: string } | { port: number }, child: ChildProcess, stderr: () => string): Promise<void> {
  for (let i = 0; i < 800; i++) {
    if (child.exitCode !== null) throw new Error(`server exited with ${child.exitCode}: ${stderr()}`);
    if ('path' in addr && !fs.existsSync(addr.path)) {
      await new Promise((r) => setTimeout(r, 25));
      continue;
    }
    const ok = await new Promise<boolean>((resolve) => {
      const c = 'path' in addr ? net.connect({ path: addr.path }) : net.connect({ host: '127.0.0.1', port: addr.port });
      c.once('connect', () => {
        c.destroy();
        resolve(true);
      });
      c.once('error', () => resolve(false));
    });
    if (ok) return;
    await new Promise((r) => setTimeout(r, 25));
  }
  throw new Error(`server never listened: ${stderr()}`);
}

function startServer(cmd: string, args: string[], addr: { path: string } | { port: number }, uri: string): Promise<Server> {
  const child = spawn(cmd, args, { stdio: ['ignore', 'ignore', 'pipe'] });
  let err = '';
  child.stderr!.on('data', (d) => (err += d));
  const exited = new Promise<void>((r) => child.once('exit', () => r()));
  const server: Server = {
    uri,
    child,
    async stop(signal = 'SIGTERM') {
      if (child.exitCode === null && child.signalCode === null) child.kill(signal);
      await exited;
    },
  };
  return waitConnectable(addr, child, () => err).then(() => server, async (e) => {
    await server.stop('SIGKILL');
    throw e;
  });
}

/**
 * qemu-nbd serving `image` (persistent, `-e` connections) on a Unix socket, or on 127.0.0.1 when `tcp`.
 * `extra`: more qemu-nbd options (-r, -B NAME, --tls-creds ...).
 */
export async function qemuNbd(image: string, opts: { socket?: string; tcp?: boolean; extra?: string[]; format?: string; connections?: number; scheme?: string } = {}): Promise<Server> {
  const common = ['-t', '-e', String(opts.connections ?? 8), '-f', opts.format ?? 'qcow2', ...(opts.extra ?? [])];
  const scheme = opts.scheme ?? 'nbd';
  if (opts.tcp) {
    const port = await freePort();
    return startServer('qemu-nbd', [...common, '-b', '127.0.0.1', '-p', String(port), image], { port }, `${scheme}://127.0.0.1:${port}/`);
  }
  const socket = opts.socket ?? `${image}.sock`;
  fs.rmSync(socket, { force: true });
  return startServer('qemu-nbd', [...common, '-k', socket, image], { path: socket }, `${scheme}+unix:///?socket=${socket}`);
}

/** nbdkit with a plugin on 127.0.0.1 (`args`: options, plugin and its parameters). */
export async function nbdkit(args: string[]): Promise<Server> {
  const port = await freePort();
  return startServer('nbdkit', ['-f', '-i', '127.0.0.1', '-p', String(port), ...args], { port }, `nbd://127.0.0.1:${port}/`);
}

export interface CountingProxy {
  port: number;
  /** bytes sent from the server to clients */
  down: number;
  /** connections accepted */
  connections: number;
  /** called with the running total of `down` as data passes */
  onDown?: (total: number) => void;
  /** cuts every connection (new ones are still accepted) */
  cut(): void;
  close(): Promise<void>;
}

/** A TCP proxy on 127.0.0.1 in front of `upstream`, counting what the server sends. */
export async function countingProxy(upstream: { path: string } | { port: number }): Promise<CountingProxy> {
  const sockets = new Set<net.Socket>();
  const proxy: CountingProxy = {
    port: 0,
    down: 0,
    connections: 0,
    cut() {
      for (const s of sockets) s.destroy();
      sockets.clear();
    },
    close: () =>
      new Promise<void>((resolve) => {
        proxy.cut();
        server.close(() => resolve());
      }),
  };
  const server = net.createServer((client) => {
    proxy.connections++;
    const up = 'path' in upstream ? net.connect({ path: upstream.path }) : net.connect({ host: '127.0.0.1', port: upstream.port });
    sockets.add(client);
    sockets.add(up);
    const end = () => {
      client.destroy();
      up.destroy();
      sockets.delete(client);
      sockets.delete(up);
    };
    client.on('error', end).on('close', end);
    up.on('error', end).on('close', end);
    up.on('data', (d: Buffer) => {
      proxy.down += d.length;
      proxy.onDown?.(proxy.down);
    });
    client.pipe(up);
    up.pipe(client);
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', () => resolve()));
  proxy.port = (server.address() as net.AddressInfo).port;
  return proxy;
}

/** `qemu-img info --output=json` */
export async function imageInfo(image: string): Promise<{ 'virtual-size': number; 'actual-size': number; format: string }> {
  return JSON.parse(await sh('qemu-img', ['info', '--output=json', image]));
}
