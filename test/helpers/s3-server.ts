import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { spawn } from 'node:child_process';
import { configFromText } from '../../src/config/config';
import { S3Store } from '../../src/storage/s3';

/** s3rver's built-in account. */
export const S3RVER_KEY = 'S3RVER';
export const S3RVER_SECRET = 'S3RVER';

export interface S3Server {
  /** http://127.0.0.1:PORT */
  endpoint: string;
  port: number;
  pid: number;
  /** Where s3rver keeps the buckets (removed by stop()). */
  dir: string;
  bucket: string;
  /** The `[DataBackend]` lines that point backy at this server (add `prefix`, `max_retries`... as needed). */
  config(extra?: Record<string, string | number>): string;
  /** A client of its own on the bucket (under `prefix`), to look at or change objects behind backy's back.
   * Close it after use. */
  store(prefix?: string, extra?: Record<string, string | number>): S3Store;
  stop(): Promise<void>;
}

/**
 * Runs s3rver (from node_modules) in a child process on 127.0.0.1 and a free port, with `bucket` created.
 * The child reads its stdin and exits when that closes, so it dies with the test process even when the
 * test process is killed and never gets to call stop().
 */
export async function startS3Server(opts: { bucket?: string; extraBuckets?: string[] } = {}): Promise<S3Server> {
  const bucket = opts.bucket ?? 'backy';
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'backy-s3rver-'));
  const script = `
    const S3rver = require(${JSON.stringify(require.resolve('s3rver'))});
    const buckets = ${JSON.stringify([bucket, ...(opts.extraBuckets ?? [])])};
    process.stdin.on('end', () => process.exit(0));
    process.stdin.on('error', () => process.exit(0));
    process.stdin.resume();
    new S3rver({ address: '127.0.0.1', port: 0, silent: true, directory: ${JSON.stringify(dir)},
                 configureBuckets: buckets.map((name) => ({ name, configs: [] })) })
      .run()
      .then(({ port }) => process.stdout.write('LISTENING ' + port + '\\n'))
      .catch((e) => { process.stderr.write(String(e && e.stack || e) + '\\n'); process.exit(1); });
  `;
  // s3rver encrypts ListObjectsV2 continuation tokens with DES, which OpenSSL 3 only has in its legacy
  // provider: without it every listing longer than one page fails with a 500.
  const child = spawn(process.execPath, ['--openssl-legacy-provider', '-e', script], { stdio: ['pipe', 'pipe', 'pipe'] });
  let stderr = '';
  child.stderr.on('data', (d) => (stderr += d));
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  let port: number;
  try {
    port = await new Promise<number>((resolve, reject) => {
      let out = '';
      const timer = setTimeout(() => reject(new Error(`s3rver did not start within 20 s: ${stderr}`)), 20_000);
      child.stdout.on('data', (d) => {
        out += d;
        const m = /LISTENING (\d+)/.exec(out);
        if (m) {
          clearTimeout(timer);
          resolve(Number(m[1]));
        }
      });
      child.once('exit', (code) => {
        clearTimeout(timer);
        reject(new Error(`s3rver exited with ${code}: ${stderr}`));
      });
    });
  } catch (e) {
    child.kill('SIGKILL');
    await exited;
    fs.rmSync(dir, { recursive: true, force: true });
    throw e;
  }
  child.stdout.resume();
  const endpoint = `http://127.0.0.1:${port}`;
  let stopped: Promise<void> | undefined;
  const config = (extra: Record<string, string | number> = {}): string => {
    const lines = [
      '[DataBackend]', 'type = s3', `endpoint_url = ${endpoint}`, `bucket_name = ${bucket}`,
      `aws_access_key_id = ${S3RVER_KEY}`, `aws_secret_access_key = ${S3RVER_SECRET}`, 'addressing_style = path',
    ];
    for (const [k, v] of Object.entries(extra)) lines.push(`${k} = ${v}`);
    return lines.join('\n');
  };
  return {
    endpoint, port, pid: child.pid!, dir, bucket, config,
    store(prefix = '', extra = {}) {
      const cfg = configFromText(`[DEFAULTS]\nencryption = none\n${config({ prefix, ...extra })}`);
      return new S3Store(cfg.data.s3, { reads: 8, writes: 8, retry: { baseDelayMs: 5, maxDelayMs: 50 } });
    },
    stop() {
      stopped ??= (async () => {
        if (child.exitCode === null && child.signalCode === null) {
          process.kill(child.pid!, 'SIGTERM');
          const t = setTimeout(() => { try { process.kill(child.pid!, 'SIGKILL'); } catch { /* gone */ } }, 5000);
          await exited;
          clearTimeout(t);
        }
        fs.rmSync(dir, { recursive: true, force: true });
      })();
      return stopped;
    },
  };
}
