/**
 * Throughput check (not part of the test suite): `nbdcopy nbd://… null:` from NbdServer serving a 1 GiB
 * in-memory buffer, against `nbdkit file` serving the same bytes from a (page-cached) file. Both on 127.0.0.1.
 *
 *   node dist/test/helpers/nbd-bench.js [sizeMiB] [rounds]
 */
import { spawn } from 'node:child_process';
import { randomFillSync } from 'node:crypto';
import { rm, writeFile } from 'node:fs/promises';
import * as os from 'node:os';
import * as path from 'node:path';
import { NbdServer } from '../../nbd/server';
import { MemoryCatalogue, MemoryDevice } from './nbd-memdev';
import { run } from './nbd-tools';
import { freePort, waitPort } from './net';

const MiB = 1024 * 1024;



async function copyRate(uri: string, size: number, rounds: number, extra: string[] = []): Promise<number> {
  let best = 0;
  for (let i = 0; i < rounds; i++) {
    const t0 = process.hrtime.bigint();
    const r = await run('nbdcopy', [...extra, uri, 'null:'], { timeoutMs: 300_000 });
    const secs = Number(process.hrtime.bigint() - t0) / 1e9;
    if (r.code !== 0) throw new Error(`nbdcopy failed: ${r.stderr}`);
    best = Math.max(best, size / secs);
  }
  return best;
}

async function main(): Promise<void> {
  const size = Number(process.argv[2] ?? 1024) * MiB;
  const rounds = Number(process.argv[3] ?? 3);
  const data = Buffer.allocUnsafe(size);
  randomFillSync(data);
  const file = path.join(os.tmpdir(), `nbd-bench-${process.pid}.img`);
  await writeFile(file, data);

  const server = new NbdServer({
    catalogue: new MemoryCatalogue(new Map([['bench', { device: new MemoryDevice(data), description: 'bench' }]])),
    readOnly: true,
  });
  const addr = await server.listen({ port: 0 });
  const port = 'port' in addr ? addr.port : 0;
  const kitPort = await freePort();
  const kit = spawn('nbdkit', ['-f', '-r', '-i', '127.0.0.1', '-p', String(kitPort), 'file', file], { stdio: 'ignore' });
  try {
    await waitPort(kitPort);
    const gib = (bps: number): string => `${(bps / 1024 ** 3).toFixed(2)} GiB/s`;
    for (const extra of [[], ['--connections=1']]) {
      const ours = await copyRate(`nbd://127.0.0.1:${port}/bench`, size, rounds, extra);
      const theirs = await copyRate(`nbd://127.0.0.1:${kitPort}/`, size, rounds, extra);
      console.log(`nbdcopy ${extra.join(' ') || '(defaults)'} of ${size / MiB} MiB: NbdServer ${gib(ours)}, nbdkit file ${gib(theirs)}`);
    }
  } finally {
    kit.kill();
    await server.close();
    await rm(file, { force: true });
  }
}

main().catch((e) => {
  console.error(e);
  process.exitCode = 1;
});
