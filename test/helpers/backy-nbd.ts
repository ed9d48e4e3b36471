/**
 * Test and benchmark plumbing for `backy nbd`: the server as a child process (bound to 127.0.0.1 on a free
 * port, which it prints), and versions made straight through the metadata API (a 1 TiB sparse version
 * without reading 1 TiB of zeroes).
 */
import { ChildProcess, spawn } from 'node:child_process';
import * as fs from 'node:fs';
import { randomUUID } from 'node:crypto';
import { BACKY } from './cli';
import { loadConfig } from '../../src/config/config';
import { allocBlock } from '../../src/codec/codec';
import { Repository } from '../../src/engine/repository';
import { blockCount } from '../../src/meta/block-map';
import type { BlockEntry } from '../../src/meta/types';
import { blobKey } from '../../src/storage/types';

export interface BackyNbd {
  child: ChildProcess;
  pid: number;
  port: number;
  uri(exportName: string): string;
  /** Everything the server wrote on stderr so far. */
  stderr(): string;
  /** Resolves with the exit code (or 128 + signal number when killed). */
  exited: Promise<number>;
  /** SIGTERM, then SIGKILL after `ms`; resolves with the exit code. Safe to call twice. */
  stop(ms?: number): Promise<number>;
}

/** Starts `backy -c CFG [-v] nbd -p 0 ARGS` and waits for the address it prints. */
export async function startBackyNbd(cfg: string, args: string[] = [], opts: { verbose?: boolean; env?: NodeJS.ProcessEnv; nodeArgs?: string[] } = {}): Promise<BackyNbd> {
  const child = spawn(process.execPath, [...(opts.nodeArgs ?? []), BACKY, '-c', cfg, ...(opts.verbose === false ? [] : ['-v']), 'nbd', '-p', '0', ...args], {
    stdio: ['ignore', 'ignore', 'pipe'],
    env: { ...process.env, ...opts.env },
  });
  let err = '';
  // Safety net: a test process that ends without stopping its server (a crash, a forgotten stop) takes it along.
  const reap = (): void => {
    child.kill('SIGKILL');
  };
  process.once('exit', reap);
  const exited = new Promise<number>((resolve) => {
    child.on('exit', (code, signal) => {
      process.off('exit', reap);
      resolve(code ?? 128 + (signal === 'SIGKILL' ? 9 : signal === 'SIGTERM' ? 15 : 1));
    });
  });
  const port = await new Promise<number>((resolve, reject) => {
    const timer = setTimeout(() => fail(new Error(`backy nbd printed no address within 30 s: ${err}`)), 30_000);
    const fail = (e: Error) => {
      clearTimeout(timer);
      child.kill('SIGKILL');
      reject(e);
    };
    child.stderr!.on('data', (d: Buffer) => {
      err += d.toString();
      const m = /nbds?:\/\/127\.0\.0\.1:(\d+)/.exec(err);
      if (m) {
        clearTimeout(timer);
        resolve(Number(m[1]));
      }
    });
    void exited.then((code) => fail(new Error(`backy nbd exited ${code} before listening: ${err}`)));
  });
  let stopping: Promise<number> | undefined;
  return {
    child,
    pid: child.pid!,
    port,
    uri: (name) => `nbd://127.0.0.1:${port}/${name}`,
    stderr: () => err,
    exited,
    stop(ms = 15_000) {
      stopping ??= (async () => {
        if (child.exitCode === null && child.signalCode === null) child.kill('SIGTERM');
        const t = setTimeout(() => child.kill('SIGKILL'), ms);
        const code = await exited;
        clearTimeout(t);
        return code;
      })();
      return stopping;
    },
  };
}

/** Peak resident set size of a process (VmHWM), in bytes. */
export function peakRss(pid: number): number {
  const m = /VmHWM:\s+(\d+) kB/.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'));
  return m ? Number(m[1]) * 1024 : 0;
}

/**
 * Bytes a process holds in shared-memory files it has open (the block cache keeps its blocks in an unlinked
 * file in /dev/shm, which RSS does not count): the allocated size of every /dev/shm file among its fds.
 */
export function sharedMemoryBytes(pid: number): number {
  let total = 0;
  for (const fd of fs.readdirSync(`/proc/${pid}/fd`)) {
    try {
      if (!fs.readlinkSync(`/proc/${pid}/fd/${fd}`).startsWith('/dev/shm/')) continue;
      total += fs.statSync(`/proc/${pid}/fd/${fd}`).blocks * 512;
    } catch {
      // closed meanwhile
    }
  }
  return total;
}

/**
 * Creates a complete, valid version of `size` bytes directly through the repository API: every block a hole
 * except `data` (block index → contents, at most one block each), stored encrypted like a backup would.
 * Returns its uid. The repository must not be in use by a writer.
 */
export async function makeSparseVersion(cfgFile: string, name: string, size: number, data: Map<number, Buffer>): Promise<string> {
  const repo = await Repository.open(loadConfig(cfgFile));
  try {
    const bs = repo.cfg.blockSize;
    const blocks = blockCount(size, bs);
    const uid = randomUUID();
    const v = await repo.meta.createVersion({ uid, name, snapshotName: '', date: Date.now(), size, blockSize: bs, expire: null, baseUid: null, tags: [] });
    const session = `test-${process.pid}`;
    const batch = 65536;
    for (let from = 0; from < blocks; from += batch) {
      const entries: BlockEntry[] = [];
      for (let i = from; i < Math.min(blocks, from + batch); i++) if (!data.has(i)) entries.push({ index: i, zero: true });
      await repo.meta.recordBlocks(v.id, session, entries);
    }
    for (const [index, content] of data) {
      const len = Math.min(bs, size - index * bs);
      if (content.length !== len) throw new Error(`block ${index} must be ${len} bytes`);
      const buf = allocBlock(bs);
      content.copy(buf);
      const scan = await repo.codec.scan(buf, len);
      const [r] = await repo.meta.recordBlocks(v.id, session, [{ index, checksum: scan.sum!, size: len }]);
      if (r.upload) {
        const enc = await repo.codec.encode(scan.buf, len, scan.sum!);
        await repo.store.put(blobKey(r.uid), enc.blob);
        await repo.meta.markUploaded([{ id: r.blobId, storedSize: enc.blob.length }]);
      }
    }
    await repo.meta.updateVersion(v.id, { complete: true, valid: true });
    return uid;
  } finally {
    await repo.close();
  }
}
