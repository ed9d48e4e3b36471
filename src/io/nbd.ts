/**
 * nbd://, nbds://, nbd+unix:// and nbds+unix:// sources and targets over nbd/client.ts: several connections
 * when the server allows multi-conn, many requests in flight, base:allocation to skip holes (sources) and to
 * find out whether a target still reads as zeroes, QEMU dirty bitmaps as changed ranges.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { NbdClient, NbdClientOptions, NbdClientTls, NbdError } from '../../nbd/client';
import * as C from '../../nbd/constants';
import { parsePskFile } from '../../nbd/tls';
import { zeroes } from '../device/version-device';
import { errorLine, IoError } from '../util/errors';
import { log } from '../util/log';
import type { SchemeOpener } from './registry';
import type { ChangedRange, Source, SourceOptions, Target, TargetOptions, TlsFiles } from './types';
import type { IoUrl } from './url';
import { describeAddress, NbdUrl, parseNbdUrl } from './nbd-url';

/** Connections to open when the server allows several (CAN_MULTI_CONN). */
const CONNECTIONS = 4;
/**
 * Requests in flight per connection (each at most 256 KiB, see nbd/client.ts). More only queue up in the
 * server: qemu-nbd answers 8-16 mid-sized requests per connection fastest.
 */
const REQUESTS_PER_CONNECTION = 8;
/** Blocks a backup reads at once / a restore writes at once: enough to keep every request slot busy. */
const IN_FLIGHT = 8;

/** Several connections to one export, used round-robin by load (fewest requests in flight). */
class Connections {
  readonly all: NbdClient[];
  private closed = false;
  private extra: Promise<void> = Promise.resolve();

  constructor(readonly first: NbdClient) {
    this.all = [first];
  }

  /** Opens more connections in the background; requests use each as soon as it is ready. */
  grow(connect: () => Promise<NbdClient>, want: number): void {
    const add = async () => {
      for (let i = 1; i < want && !this.closed; i++) {
        let c: NbdClient;
        try {
          c = await connect();
        } catch (e) {
          log.debug(`extra NBD connection not opened: ${errorLine(e)}`);
          return;
        }
        if (this.closed || c.size !== this.first.size) {
          await c.close().catch(() => undefined);
          return;
        }
        this.all.push(c);
      }
    };
    this.extra = add();
  }

  pick(): NbdClient {
    let best = this.all[0];
    for (const c of this.all) if (c.inFlight < best.inFlight) best = c;
    return best;
  }

  async close(): Promise<void> {
    this.closed = true;
    await this.extra;
    await Promise.all(this.all.map((c) => c.close().catch(() => undefined)));
  }
}

/** Reads the TLS credential files the URI or the options name. */
function tlsCredentials(n: NbdUrl, files: TlsFiles | undefined, url: string): NbdClientTls | undefined {
  if (!n.tls) {
    if (files?.pskFile || files?.certificatesDir) throw new IoError(`${url}: TLS options need a TLS URI (nbds:// or nbds+unix://)`);
    return undefined;
  }
  const pskFile = n.tlsPskFile ?? files?.pskFile;
  const certDir = n.tlsCertificates ?? files?.certificatesDir;
  const type = n.tlsType ?? (pskFile ? 'psk' : certDir ? 'x509' : undefined);
  if (!type) throw new IoError(`${url}: TLS needs credentials: --tls-psk FILE or --tls-certificates DIR`);
  const read = (file: string, needed: boolean): Buffer | undefined => {
    try {
      return fs.readFileSync(file);
    } catch (e) {
      if (!needed && (e as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
      throw new IoError(`cannot read ${file}: ${(e as NodeJS.ErrnoException).code === 'ENOENT' ? 'no such file' : errorLine(e)}`);
    }
  };
  if (type === 'psk') {
    if (!pskFile) throw new IoError(`${url}: tls-type=psk needs --tls-psk FILE`);
    let keys: Map<string, Buffer>;
    try {
      keys = parsePskFile(read(pskFile, true)!.toString('utf8'), pskFile);
    } catch (e) {
      throw new IoError(errorLine(e));
    }
    const identity = n.username ?? keys.keys().next().value!;
    const key = keys.get(identity);
    if (!key) throw new IoError(`${pskFile} has no key for identity "${identity}"`);
    return { psk: { identity, key }, hostname: n.tlsHostname };
  }
  if (!certDir) throw new IoError(`${url}: tls-type=x509 needs --tls-certificates DIR`);
  return {
    ca: read(path.join(certDir, 'ca-cert.pem'), n.tlsVerifyPeer),
    cert: read(path.join(certDir, 'client-cert.pem'), false),
    key: read(path.join(certDir, 'client-key.pem'), false),
    hostname: n.tlsHostname,
    verifyPeer: n.tlsVerifyPeer,
  };
}

/** Opens the first connection (and more in the background when the server allows multi-conn). */
async function connect(u: IoUrl, what: 'source' | 'target', tlsFiles: TlsFiles | undefined, extra: Partial<NbdClientOptions> = {}): Promise<{ n: NbdUrl; conns: Connections }> {
  const n = parseNbdUrl(u);
  const tls = tlsCredentials(n, tlsFiles, u.url);
  const base: NbdClientOptions = { exportName: n.exportName, tls, maxInFlight: REQUESTS_PER_CONNECTION };
  let first: NbdClient;
  try {
    first = await NbdClient.connect(n.address, { ...base, ...extra });
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    const why = code === 'ECONNREFUSED' || code === 'ENOENT' ? `nothing listens at ${describeAddress(n.address)}` : errorLine(e);
    throw new IoError(`cannot open NBD ${what} ${u.url}: ${why}`);
  }
  const conns = new Connections(first);
  if (first.can.multiConn) conns.grow(() => NbdClient.connect(n.address, { ...base, blockStatus: false }), CONNECTIONS);
  return { n, conns };
}

function nbdFailure(url: string, what: string, offset: number, e: unknown): IoError {
  if (e instanceof IoError) return e;
  return new IoError(`cannot ${what} ${url} at offset ${offset}: ${errorLine(e)}`);
}

async function openNbdSource(u: IoUrl, opts: SourceOptions): Promise<Source> {
  const bitmapContext = opts.bitmap !== undefined ? C.META_QEMU_DIRTY_BITMAP_PREFIX + opts.bitmap : undefined;
  const { conns } = await connect(u, 'source', opts.tls, { metaContexts: bitmapContext ? [bitmapContext] : [] });
  const first = conns.first;
  try {
    if (bitmapContext) {
      if (!first.structuredReplies) throw new IoError(`NBD server of ${u.url} does not support structured replies, which reading a dirty bitmap needs`);
      if (first.metaContextRefusal) throw new IoError(`NBD server of ${u.url} does not support metadata contexts (${first.metaContextRefusal}), which reading a dirty bitmap needs`);
      if (!first.contexts.has(bitmapContext)) {
        throw new IoError(`NBD server of ${u.url} has no dirty bitmap "${opts.bitmap}" (no metadata context ${bitmapContext}; export it with qemu-nbd -B ${opts.bitmap}, or block-export-add/nbd-server-add with bitmaps)`);
      }
    }
  } catch (e) {
    await conns.close();
    throw e;
  }
  const size = first.size;
  const source: Source = {
    url: u.url,
    size,
    parallelReads: IN_FLIGHT,
    get bytesRead() {
      return conns.all.reduce((n, c) => n + c.bytesRead, 0);
    },
    async read(buf, offset, length) {
      if (offset + length > size) throw new IoError(`source ${u.url} ended at offset ${size}, expected ${offset + length} bytes`);
      try {
        await conns.pick().readInto(buf.subarray(0, length), offset);
      } catch (e) {
        throw nbdFailure(u.url, 'read', offset, e);
      }
    },
    close: () => conns.close(),
  };
  if (first.hasBlockStatus) {
    source.extents = async (offset, length) => {
      try {
        return await first.extents(offset, length);
      } catch (e) {
        throw nbdFailure(u.url, 'get the allocation map of', offset, e);
      }
    };
  }
  if (bitmapContext) {
    source.changedRanges = async () => {
      let runs;
      try {
        runs = await first.statusOf(bitmapContext, 0, size);
      } catch (e) {
        throw nbdFailure(u.url, `read dirty bitmap ${opts.bitmap} of`, 0, e);
      }
      const out: ChangedRange[] = [];
      for (const r of runs) if (r.flags & C.STATE_DIRTY) out.push({ offset: r.offset, length: r.length, exists: true });
      return out;
    };
  }
  return source;
}

/** Whether the whole export reads as zeroes (stops at the first data run); undefined when it cannot tell. */
async function readsAsZeroes(c: NbdClient): Promise<boolean | undefined> {
  if (!c.hasBlockStatus) return undefined;
  for (let pos = 0; pos < c.size;) {
    const ask = Math.min(c.size - pos, 1 << 30);
    const got = await c.blockStatus(pos, ask);
    for (const e of got) {
      if (!e.zero) return false;
      pos += e.length;
    }
  }
  return true;
}

async function openNbdTarget(u: IoUrl, opts: TargetOptions): Promise<Target> {
  const { conns } = await connect(u, 'target', opts.tls);
  const first = conns.first;
  let zeroed: boolean | undefined;
  try {
    if (first.readOnly) throw new IoError(`NBD target ${u.url} is read-only`);
    if (first.size < opts.size) throw new IoError(`NBD target ${u.url} has ${first.size} bytes, the version needs ${opts.size}`);
    try {
      zeroed = await readsAsZeroes(first);
    } catch (e) {
      throw nbdFailure(u.url, 'get the allocation map of', 0, e);
    }
    if (!opts.force && !opts.existing && zeroed !== true) {
      throw new IoError(zeroed === false
        ? `NBD target ${u.url} holds data; use -f to overwrite it`
        : `NBD target ${u.url} may hold data (the server reports no allocation map); use -f to overwrite it`);
    }
  } catch (e) {
    await conns.close();
    throw e;
  }
  const can = first.can;
  // FAST_ZERO first: a server that cannot zero cheaply says so at once, and is then asked to zero anyway
  // (it still writes the zeroes itself, sparing the network).
  let fastZero = can.fastZero;
  const zero = async (offset: number, length: number) => {
    if (!can.zero) {
      const step = 4 * 1024 * 1024;
      const parts: Promise<void>[] = [];
      for (let o = offset; o < offset + length; o += step) parts.push(conns.pick().write(o, zeroes(Math.min(step, offset + length - o))));
      await Promise.all(parts);
      return;
    }
    if (fastZero) {
      try {
        await conns.pick().writeZeroes(offset, length, { fast: true });
        return;
      } catch (e) {
        if (!(e instanceof NbdError && e.nbdErrno === C.ENOTSUP)) throw e;
        fastZero = false;
      }
    }
    // No NO_HOLE flag: the server may punch a hole (a qcow2 keeps no clusters for zeroes).
    await conns.pick().writeZeroes(offset, length);
  };
  return {
    url: u.url,
    size: first.size,
    zeroed: zeroed === true,
    parallelWrites: IN_FLIGHT,
    async write(buf, offset) {
      try {
        await conns.pick().write(offset, buf);
      } catch (e) {
        throw nbdFailure(u.url, 'write', offset, e);
      }
    },
    async read(buf, offset) {
      try {
        await conns.pick().readInto(buf, offset);
      } catch (e) {
        throw nbdFailure(u.url, 'read', offset, e);
      }
    },
    async zero(offset, length) {
      try {
        await zero(offset, length);
      } catch (e) {
        throw nbdFailure(u.url, 'zero', offset, e);
      }
    },
    async flush() {
      if (!can.flush) return; // the server writes through: nothing is cached to flush
      try {
        // With multi-conn one flush covers every connection; flushing each is as cheap and needs no trust.
        await Promise.all(conns.all.map((c) => c.flush()));
      } catch (e) {
        throw nbdFailure(u.url, 'flush', 0, e);
      }
    },
    close: () => conns.close(),
  };
}

export const nbdOpener: SchemeOpener = {
  openSource: openNbdSource,
  openTarget: openNbdTarget,
};
