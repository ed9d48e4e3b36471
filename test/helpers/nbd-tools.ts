/**
 * Test plumbing for the NBD server: running the Debian NBD clients asynchronously (the server lives in the
 * test process, so nothing may block the event loop), and a raw-socket peer for malformed-input tests.
 */
import { execFile } from 'node:child_process';
import * as net from 'node:net';
import { SocketReader } from '../../nbd/wire';

export interface RunResult {
  code: number;
  stdout: string;
  stderr: string;
}

/** Runs a program; never rejects for a non-zero exit (only if it cannot be started or times out). */
export function run(cmd: string, args: string[], options: { timeoutMs?: number; env?: NodeJS.ProcessEnv } = {}): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    execFile(
      cmd,
      args,
      { maxBuffer: 64 * 1024 * 1024, timeout: options.timeoutMs ?? 30_000, env: options.env ?? process.env },
      (error, stdout, stderr) => {
        if (error && typeof (error as NodeJS.ErrnoException).code === 'string') return reject(error);
        if (error && error.killed) return reject(new Error(`${cmd} timed out: ${stderr}`));
        resolve({ code: error ? Number((error as { code?: number }).code ?? 1) : 0, stdout, stderr });
      },
    );
  });
}

/** nbdsh runs `python3 -m nbd`; make sure the system python (which has the nbd module) is found first. */
export const NBDSH_ENV: NodeJS.ProcessEnv = { ...process.env, PATH: `/usr/bin:${process.env.PATH ?? ''}` };

let nbdshOk: Promise<boolean> | undefined;
export function nbdshAvailable(): Promise<boolean> {
  nbdshOk ??= run('nbdsh', ['-c', 'import nbd'], { env: NBDSH_ENV }).then(
    (r) => r.code === 0,
    () => false,
  );
  return nbdshOk;
}

/** A hand-driven NBD client for feeding the server bad input. */
export class RawPeer {
  readonly reader: SocketReader;
  readonly closed: Promise<void>;
  private isClosed = false;

  private constructor(readonly socket: net.Socket) {
    this.reader = new SocketReader(socket, 64 * 1024 * 1024);
    socket.on('error', () => undefined);
    this.closed = new Promise((resolve) =>
      socket.once('close', () => {
        this.isClosed = true;
        resolve();
      }),
    );
  }

  static connect(port: number): Promise<RawPeer> {
    return new Promise((resolve, reject) => {
      const s = net.connect({ host: '127.0.0.1', port }, () => {
        s.off('error', reject);
        resolve(new RawPeer(s));
      });
      s.once('error', reject);
    });
  }

  get isSocketClosed(): boolean {
    return this.isClosed;
  }

  write(...bufs: Buffer[]): void {
    for (const b of bufs) this.socket.write(b);
  }

  /** Resolves true if the server closed the connection within `ms`. */
  async closedWithin(ms: number): Promise<boolean> {
    let t: NodeJS.Timeout | undefined;
    const r = await Promise.race([this.closed.then(() => true), new Promise<boolean>((res) => (t = setTimeout(() => res(false), ms)))]);
    clearTimeout(t);
    return r;
  }

  destroy(): void {
    this.socket.destroy();
  }

  /** Reads the greeting and sends client flags. */
  async greet(clientFlags = 3): Promise<number> {
    const g = await this.reader.read(18);
    const f = Buffer.alloc(4);
    f.writeUInt32BE(clientFlags >>> 0);
    this.write(f);
    return g.readUInt16BE(16);
  }

  sendOption(option: number, data: Buffer = Buffer.alloc(0), magic = 0x49484156454f5054n, length = data.length): void {
    const h = Buffer.alloc(16);
    h.writeBigUInt64BE(magic, 0);
    h.writeUInt32BE(option, 8);
    h.writeUInt32BE(length >>> 0, 12);
    this.write(h, data);
  }

  async readOptionReply(): Promise<{ option: number; type: number; data: Buffer }> {
    const h = await this.reader.read(20);
    if (h.readBigUInt64BE(0) !== 0x3e889045565a9n) throw new Error('bad option reply magic');
    const len = h.readUInt32BE(16);
    return { option: h.readUInt32BE(8), type: h.readUInt32BE(12), data: Buffer.from(await this.reader.read(len)) };
  }

  /** Reads option replies up to and including the final one (ACK or error). */
  async readOptionReplies(): Promise<Array<{ option: number; type: number; data: Buffer }>> {
    const out = [];
    for (;;) {
      const r = await this.readOptionReply();
      out.push(r);
      if (r.type === 1 || r.type >= 0x80000000) return out;
    }
  }

  /** NBD_OPT_GO for `name` (optionally after NBD_OPT_STRUCTURED_REPLY and base:allocation). */
  async go(name: string, options: { structured?: boolean; meta?: boolean } = {}): Promise<{ size: number; flags: number }> {
    if (options.structured) {
      this.sendOption(8);
      const r = await this.readOptionReply();
      if (r.type !== 1) throw new Error('structured replies refused');
    }
    if (options.meta) {
      this.sendOption(10, metaContextPayload(name, ['base:allocation']));
      await this.readOptionReplies();
    }
    const n = Buffer.from(name);
    const p = Buffer.alloc(4 + n.length + 2);
    p.writeUInt32BE(n.length, 0);
    n.copy(p, 4);
    this.sendOption(7, p);
    let size = -1;
    let flags = 0;
    for (const r of await this.readOptionReplies()) {
      if (r.type === 3 && r.data.readUInt16BE(0) === 0) {
        size = Number(r.data.readBigUInt64BE(2));
        flags = r.data.readUInt16BE(10);
      } else if (r.type !== 1 && r.type !== 3) throw new Error(`GO failed: 0x${r.type.toString(16)} ${r.data}`);
    }
    return { size, flags };
  }

  sendRequest(type: number, offset: number, length: number, options: { flags?: number; cookie?: bigint; magic?: number; payload?: Buffer } = {}): void {
    const h = Buffer.alloc(28);
    h.writeUInt32BE(options.magic ?? 0x25609513, 0);
    h.writeUInt16BE(options.flags ?? 0, 4);
    h.writeUInt16BE(type, 6);
    h.writeBigUInt64BE(options.cookie ?? 1n, 8);
    h.writeBigUInt64BE(BigInt(offset), 16);
    h.writeUInt32BE(length >>> 0, 24);
    this.write(h);
    if (options.payload) this.write(options.payload);
  }

  /** Reads one simple reply; with `dataLength`, also its payload when error is 0. */
  async readSimpleReply(dataLength = 0): Promise<{ error: number; cookie: bigint; data: Buffer }> {
    const h = await this.reader.read(16);
    if (h.readUInt32BE(0) !== 0x67446698) throw new Error(`expected simple reply, magic 0x${h.readUInt32BE(0).toString(16)}`);
    const error = h.readUInt32BE(4);
    const data = error === 0 && dataLength ? Buffer.from(await this.reader.read(dataLength)) : Buffer.alloc(0);
    return { error, cookie: h.readBigUInt64BE(8), data };
  }

  /** Reads structured chunks (a simple reply is returned as a pseudo-chunk) until one has the DONE flag. */
  async readStructuredReply(): Promise<Array<{ flags: number; type: number; cookie: bigint; data: Buffer; simpleError?: number }>> {
    const out = [];
    for (;;) {
      const m = await this.reader.read(4);
      const magic = m.readUInt32BE(0);
      if (magic === 0x67446698) {
        const r = await this.reader.read(12);
        out.push({ flags: 1, type: -1, cookie: r.readBigUInt64BE(4), data: Buffer.alloc(0), simpleError: r.readUInt32BE(0) });
        return out;
      }
      if (magic !== 0x668e33ef) throw new Error(`bad reply magic 0x${magic.toString(16)}`);
      const h = await this.reader.read(16);
      const len = h.readUInt32BE(12);
      const c = { flags: h.readUInt16BE(0), type: h.readUInt16BE(2), cookie: h.readBigUInt64BE(4), data: Buffer.from(await this.reader.read(len)) };
      out.push(c);
      if (c.flags & 1) return out;
    }
  }
}

export function metaContextPayload(name: string, queries: string[]): Buffer {
  const n = Buffer.from(name);
  const qs = queries.map((q) => Buffer.from(q));
  const p = Buffer.alloc(8 + n.length + qs.reduce((s, q) => s + 4 + q.length, 0));
  p.writeUInt32BE(n.length, 0);
  n.copy(p, 4);
  p.writeUInt32BE(qs.length, 4 + n.length);
  let pos = 8 + n.length;
  for (const q of qs) {
    p.writeUInt32BE(q.length, pos);
    q.copy(p, pos + 4);
    pos += 4 + q.length;
  }
  return p;
}

/** Polls `cond` until true or `ms` elapse. */
export async function waitFor(cond: () => boolean, ms = 5000): Promise<boolean> {
  const end = Date.now() + ms;
  while (Date.now() < end) {
    if (cond()) return true;
    await new Promise((r) => setTimeout(r, 10));
  }
  return cond();
}
