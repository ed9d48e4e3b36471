import { parentPort, workerData } from 'node:worker_threads';
import { BlobFormatError, checksum, CodecOptions, decodeBlob, encodeBlob, isZero } from './blob-format';

/**
 * CPU work off the main thread: zero detection, hashing, compression, encryption and their inverse.
 * Buffers arrive and leave as transferred ArrayBuffers, so a 4 MiB block is never copied between threads.
 */
export type WorkerRequest =
  | { id: number; op: 'scan'; buf: ArrayBuffer; len: number }
  | { id: number; op: 'encode'; buf: ArrayBuffer; len: number; sum: Uint8Array }
  | { id: number; op: 'decode'; blob: ArrayBuffer; len: number; sum: Uint8Array; size: number };

export type WorkerReply =
  | { id: number; op: 'scan'; zero: boolean; sum?: Uint8Array; buf: ArrayBuffer }
  | { id: number; op: 'encode'; blob: ArrayBuffer; len: number; buf: ArrayBuffer }
  | { id: number; op: 'decode'; data?: ArrayBuffer; len: number; error?: string };

export interface WorkerInit {
  keyHex?: string;
  compression: 'zstd' | 'none';
  compressionLevel: number;
  hashFunction: string;
}

/** The ArrayBuffer behind `b` if `b` owns all of it (transferable without side effects), else a copy. */
function own(b: Buffer): ArrayBuffer {
  if (b.byteOffset === 0 && b.byteLength === b.buffer.byteLength && b.buffer instanceof ArrayBuffer) return b.buffer;
  const copy = new ArrayBuffer(b.length);
  new Uint8Array(copy).set(b);
  return copy;
}

if (parentPort) {
  const init = workerData as WorkerInit;
  const opts: CodecOptions = {
    key: init.keyHex ? Buffer.from(init.keyHex, 'hex') : undefined,
    compression: init.compression,
    compressionLevel: init.compressionLevel,
    hashFunction: init.hashFunction,
  };
  const port = parentPort;
  port.on('message', (req: WorkerRequest) => {
    switch (req.op) {
      case 'scan': {
        const data = Buffer.from(req.buf, 0, req.len);
        if (isZero(data)) {
          port.postMessage({ id: req.id, op: 'scan', zero: true, buf: req.buf } satisfies WorkerReply, [req.buf]);
        } else {
          const sum = checksum(opts.hashFunction, data);
          port.postMessage({ id: req.id, op: 'scan', zero: false, sum: new Uint8Array(sum), buf: req.buf } satisfies WorkerReply, [req.buf]);
        }
        break;
      }
      case 'encode': {
        const data = Buffer.from(req.buf, 0, req.len);
        const blob = encodeBlob(data, Buffer.from(req.sum), opts);
        const ab = own(blob);
        port.postMessage({ id: req.id, op: 'encode', blob: ab, len: blob.length, buf: req.buf } satisfies WorkerReply, [ab, req.buf]);
        break;
      }
      case 'decode': {
        try {
          const data = decodeBlob(Buffer.from(req.blob, 0, req.len), Buffer.from(req.sum), req.size, opts);
          const ab = own(data);
          port.postMessage({ id: req.id, op: 'decode', data: ab, len: data.length } satisfies WorkerReply, [ab]);
        } catch (e) {
          const msg = e instanceof BlobFormatError ? e.message : `decode failed: ${(e as Error).message}`;
          port.postMessage({ id: req.id, op: 'decode', len: 0, error: msg } satisfies WorkerReply);
        }
        break;
      }
    }
  });
}
