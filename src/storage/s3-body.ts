import { Readable } from 'node:stream';

/** A body that ended before its Content-Length: the connection was lost mid-transfer (retried). */
function truncated(got: number, want: number): Error {
  return Object.assign(new Error(`response body ended after ${got} of ${want} bytes`), { code: 'ERR_STREAM_PREMATURE_CLOSE' });
}

/**
 * Reads a GetObject body into one Buffer. With the length known up front (always, from S3) the buffer is
 * allocated once and filled as chunks arrive: no list of 64 KiB chunks kept alive and no second copy, which
 * matters with many block-sized reads in flight.
 */
export async function readBody(body: unknown, contentLength: number | undefined, into?: Buffer): Promise<Buffer> {
  if (!(body instanceof Readable)) {
    // Not a Node stream (another runtime's HTTP handler): the SDK's own collector.
    const bytes = await (body as { transformToByteArray(): Promise<Uint8Array> }).transformToByteArray();
    const buf = Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    if (contentLength !== undefined && buf.length !== contentLength) throw truncated(buf.length, contentLength);
    return buf;
  }
  if (contentLength === undefined) {
    const chunks: Buffer[] = [];
    for await (const chunk of body) chunks.push(chunk as Buffer);
    return Buffer.concat(chunks);
  }
  // Into the caller's buffer when it is large enough (restore and the read path reuse a few buffers).
  const out = into && into.length >= contentLength ? into.subarray(0, contentLength) : Buffer.allocUnsafe(contentLength);
  let filled = 0;
  try {
    for await (const chunk of body) {
      const c = chunk as Buffer;
      if (filled + c.length > contentLength) throw new Error(`response body longer than its Content-Length ${contentLength}`);
      c.copy(out, filled);
      filled += c.length;
    }
  } finally {
    if (filled !== contentLength) body.destroy();
  }
  if (filled !== contentLength) throw truncated(filled, contentLength);
  return out;
}
