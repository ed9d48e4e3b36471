import * as http from 'node:http';
import type { AddressInfo } from 'node:net';

/**
 * What the proxy does to a request it picks:
 * - `reset`: closes the connection before the request reaches the server;
 * - `lost-reply`: the server handles the request, then the connection closes before (or in the middle of)
 *   the response, so the client cannot know whether it happened (and a GET body arrives truncated);
 * - `500` / `503`: answers InternalError / SlowDown without asking the server;
 * - `delay`: holds the request `delayMs` before passing it on (longer than the client's timeout: a timeout);
 * - `html-404`: a 404 web page, as from a misconfigured proxy in front of the server (not a transient fault,
 *   so not in ALL_FAULTS).
 */
export type FaultKind = 'reset' | 'lost-reply' | '500' | '503' | 'delay' | 'html-404';
export const ALL_FAULTS: FaultKind[] = ['reset', 'lost-reply', '500', '503', 'delay'];

export interface FaultProxyOptions {
  /** Upstream server, http://127.0.0.1:PORT */
  target: string;
  /** Share of eligible requests that get a fault, 0..1. Can be changed later through `proxy.rate`. */
  rate?: number;
  kinds?: FaultKind[];
  delayMs?: number;
  /** Which requests are eligible (default: all). */
  eligible?: (req: http.IncomingMessage) => boolean;
}

export interface FaultProxy {
  endpoint: string;
  port: number;
  rate: number;
  kinds: FaultKind[];
  /** Faults for the next eligible requests, in order, before `rate` applies again (deterministic tests). */
  script: FaultKind[];
  /** How long `delay` holds a request. */
  delayMs: number;
  eligible: (req: http.IncomingMessage) => boolean;
  /** Requests seen, passed on, and faults injected by kind. */
  stats: { requests: number; forwarded: number } & Record<FaultKind, number>;
  /** Every request's method, path, headers and the status the client got (none when the reply was lost). */
  seen: SeenRequest[];
  close(): Promise<void>;
}

export interface SeenRequest {
  method: string;
  url: string;
  headers: http.IncomingHttpHeaders;
  fault?: FaultKind;
  status?: number;
}

const HOP_BY_HOP = new Set(['connection', 'keep-alive', 'proxy-connection', 'transfer-encoding', 'upgrade', 'expect', 'te', 'trailer']);

function endToEnd(h: http.IncomingHttpHeaders): http.OutgoingHttpHeaders {
  const out: http.OutgoingHttpHeaders = {};
  for (const [k, v] of Object.entries(h)) if (!HOP_BY_HOP.has(k) && v !== undefined) out[k] = v;
  return out;
}

function s3ErrorBody(code: string, message: string): string {
  return `<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>${code}</Code><Message>${message}</Message><RequestId>fault-proxy</RequestId></Error>`;
}

/** An HTTP reverse proxy on 127.0.0.1 in front of an S3 server that injects faults into a share of requests. */
export async function startFaultProxy(opts: FaultProxyOptions): Promise<FaultProxy> {
  const upstream = new URL(opts.target);
  const agent = new http.Agent({ keepAlive: true, maxSockets: 64 });
  const sockets = new Set<import('node:net').Socket>();
  const proxy: FaultProxy = {
    endpoint: '',
    port: 0,
    rate: opts.rate ?? 0,
    kinds: opts.kinds ?? ALL_FAULTS,
    script: [],
    delayMs: opts.delayMs ?? 2000,
    eligible: opts.eligible ?? (() => true),
    stats: { requests: 0, forwarded: 0, reset: 0, 'lost-reply': 0, '500': 0, '503': 0, delay: 0, 'html-404': 0 },
    seen: [],
    close: async () => undefined,
  };

  const forward = (req: http.IncomingMessage, res: http.ServerResponse, seen: SeenRequest, loseReply: boolean): void => {
    const up = http.request({
      host: upstream.hostname, port: upstream.port, method: req.method, path: req.url, headers: endToEnd(req.headers), agent,
    }, (ures) => {
      if (!loseReply) {
        seen.status = ures.statusCode;
        res.writeHead(ures.statusCode ?? 502, endToEnd(ures.headers));
        ures.pipe(res);
        proxy.stats.forwarded++;
        return;
      }
      const chunks: Buffer[] = [];
      ures.on('data', (c: Buffer) => chunks.push(c));
      ures.on('end', () => {
        const body = Buffer.concat(chunks);
        if (body.length > 1) {
          // Headers promise the whole body; half of it arrives, then the connection is gone.
          res.writeHead(ures.statusCode ?? 502, { ...endToEnd(ures.headers), 'content-length': body.length });
          res.write(body.subarray(0, body.length >> 1), () => res.socket?.destroy());
        } else {
          res.socket?.destroy();
        }
      });
    });
    up.on('error', () => res.socket?.destroy());
    req.on('error', () => up.destroy());
    req.on('close', () => { if (!req.complete) up.destroy(); });
    req.pipe(up);
  };

  const server = http.createServer((req, res) => {
    proxy.stats.requests++;
    const seen: SeenRequest = { method: req.method ?? '', url: req.url ?? '', headers: req.headers };
    proxy.seen.push(seen);
    if (proxy.seen.length > 10_000) proxy.seen.splice(0, 5_000);
    res.on('error', () => undefined);
    let fault: FaultKind | undefined;
    if (proxy.eligible(req)) {
      fault = proxy.script.shift();
      if (!fault && Math.random() < proxy.rate) fault = proxy.kinds[Math.floor(Math.random() * proxy.kinds.length)];
    }
    if (fault) {
      proxy.stats[fault]++;
      seen.fault = fault;
    }
    switch (fault) {
      case undefined:
        return forward(req, res, seen, false);
      case 'lost-reply':
        return forward(req, res, seen, true);
      case 'delay':
        // A client that timed out meanwhile has gone: nothing to pass on.
        setTimeout(() => (req.socket.destroyed ? undefined : forward(req, res, seen, false)), proxy.delayMs);
        return;
      case 'reset':
        req.socket.destroy();
        return;
      case 'html-404': {
        req.resume();
        req.on('end', () => {
          seen.status = 404;
          const body = '<html><body>Not Found</body></html>';
          res.writeHead(404, { 'content-type': 'text/html', 'content-length': body.length });
          res.end(body);
        });
        return;
      }
      case '500':
      case '503': {
        // Read the request first, as a real server would, so the client is not cut off mid-upload.
        req.resume();
        req.on('end', () => {
          const body = fault === '500'
            ? s3ErrorBody('InternalError', 'We encountered an internal error. Please try again.')
            : s3ErrorBody('SlowDown', 'Please reduce your request rate.');
          seen.status = Number(fault);
          res.writeHead(Number(fault), { 'content-type': 'application/xml', 'content-length': Buffer.byteLength(body) });
          res.end(req.method === 'HEAD' ? undefined : body);
        });
        return;
      }
    }
  });
  server.on('connection', (s) => {
    sockets.add(s);
    s.on('close', () => sockets.delete(s));
  });
  server.on('clientError', (_e, s) => s.destroy());
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => resolve());
  });
  proxy.port = (server.address() as AddressInfo).port;
  proxy.endpoint = `http://127.0.0.1:${proxy.port}`;
  proxy.close = () => new Promise<void>((resolve) => {
    for (const s of sockets) s.destroy();
    agent.destroy();
    server.close(() => resolve());
  });
  return proxy;
}
