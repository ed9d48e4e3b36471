import * as http from 'node:http';
import * as https from 'node:https';
import { createHash } from 'node:crypto';
import { S3Client } from '@aws-sdk/client-s3';
import type { S3Config } from '../config/config';
import { ConfigError } from '../util/errors';
import { log } from '../util/log';

/** The endpoint URL to use (scheme from use_ssl when the configuration gives none), or undefined for AWS. */
export function endpointOf(cfg: S3Config): URL | undefined {
  if (!cfg.endpointUrl) return undefined;
  const text = /^[a-z][a-z0-9+.-]*:\/\//i.test(cfg.endpointUrl) ? cfg.endpointUrl : `${cfg.useSsl ? 'https' : 'http'}://${cfg.endpointUrl}`;
  let url: URL;
  try {
    url = new URL(text);
  } catch {
    throw new ConfigError(`invalid [DataBackend] endpoint_url: expected a URL such as https://s3.example.com or http://127.0.0.1:9000`);
  }
  if (url.protocol !== 'http:' && url.protocol !== 'https:') {
    throw new ConfigError(`invalid [DataBackend] endpoint_url: the scheme must be http or https, not ${url.protocol.slice(0, -1)}`);
  }
  if (url.username || url.password) {
    throw new ConfigError('invalid [DataBackend] endpoint_url: put credentials in aws_access_key_id / aws_secret_access_key, not in the URL');
  }
  return url;
}

/** "s3://bucket/prefix/ at https://host:port" for logs and errors. */
export function describeS3(cfg: S3Config, endpoint: URL | undefined): string {
  const where = endpoint ? `${endpoint.protocol}//${endpoint.host}${endpoint.pathname === '/' ? '' : endpoint.pathname}` : `AWS ${cfg.regionName}`;
  return `s3://${cfg.bucketName}/${cfg.prefix} at ${where}`;
}

/** The SDK's own log: failed commands are logged by the retry loop already (once, without request
 * details); its warnings (socket pool exhausted, odd responses) are worth a debug line. */
const quietLogger = {
  debug: () => undefined,
  info: () => undefined,
  warn: (...a: unknown[]) => {
    const text = a.filter((x): x is string => typeof x === 'string').join(' ').split('\n')[0];
    if (text) log.debug(`S3 client: ${text}`);
  },
  error: () => undefined,
};

export interface S3ClientParts {
  client: S3Client;
  endpoint: URL | undefined;
}

/**
 * An S3 client set up for backy: its own retries off (storage/retry.ts does them, bounded and logged),
 * checksums only where the API demands them (S3-compatible servers often lack the newer ones), connect and
 * idle timeouts, and one keep-alive agent with a socket for every request that may run at once.
 */
export function createS3Client(cfg: S3Config, sockets: number): S3ClientParts {
  if (!!cfg.accessKeyId !== !!cfg.secretAccessKey) {
    throw new ConfigError(`[DataBackend] ${cfg.accessKeyId ? 'aws_access_key_id is set but aws_secret_access_key is not' : 'aws_secret_access_key is set but aws_access_key_id is not'}`);
  }
  // The SDK warns on stderr, in several lines, that its 2027 releases will need Node 22. backy supports
  // Node 20 and pins the SDK; the warning would only break the one-line error contract.
  process.env.AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED ??= 'true';
  const endpoint = endpointOf(cfg);
  const useHttps = endpoint ? endpoint.protocol === 'https:' : cfg.useSsl;
  const agentOptions = { keepAlive: true, maxSockets: sockets, maxFreeSockets: sockets };
  const client = new S3Client({
    region: cfg.regionName,
    endpoint: endpoint?.toString(),
    tls: useHttps,
    forcePathStyle: cfg.addressingStyle === 'path',
    credentials: cfg.accessKeyId && cfg.secretAccessKey ? { accessKeyId: cfg.accessKeyId, secretAccessKey: cfg.secretAccessKey } : undefined,
    maxAttempts: 1,
    requestChecksumCalculation: 'WHEN_REQUIRED',
    responseChecksumValidation: 'WHEN_REQUIRED',
    // Blobs are at most one block: waiting for "100 Continue" would only add a round trip to every PUT.
    expectContinueHeader: false,
    logger: quietLogger,
    requestHandler: {
      connectionTimeout: cfg.connectTimeoutMs,
      socketTimeout: cfg.readTimeoutMs,
      httpAgent: useHttps ? undefined : new http.Agent(agentOptions),
      httpsAgent: useHttps ? new https.Agent(agentOptions) : undefined,
      logger: quietLogger,
    },
  });
  addContentMd5ToDeletes(client);
  return { client, endpoint };
}

/**
 * DeleteObjects must carry a body checksum. With checksums "when required" the SDK sends only the newer
 * x-amz-checksum-* header, which Ceph RGW, older MinIO and other S3-compatible servers do not know; they
 * insist on Content-MD5. AWS accepts both, so always add it.
 */
function addContentMd5ToDeletes(client: S3Client): void {
  client.middlewareStack.add((next, context) => async (args) => {
    const req = args.request as { headers?: Record<string, string>; body?: unknown } | undefined;
    if (context.commandName === 'DeleteObjectsCommand' && req?.headers && (typeof req.body === 'string' || Buffer.isBuffer(req.body))) {
      const has = Object.keys(req.headers).some((h) => h.toLowerCase() === 'content-md5');
      if (!has) req.headers['content-md5'] = createHash('md5').update(req.body as string | Buffer).digest('base64');
    }
    return next(args);
  }, { step: 'build', name: 'backyDeleteContentMd5' });
}
