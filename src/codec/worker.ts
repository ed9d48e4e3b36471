import { parentPort, workerData } from 'node:worker_threads';
import { BlobFormatError, checksum, CodecOptions, decodeBlob, encodeBlob, isZero } from './blob-format';
import { ownArrayBuffer, transferable } from './transfer';
import { decodeBacky2Blob } from './backy2-blob';
import { SlabTarget, writeAllAt } from '../device/shm-slab';

/**
 * CPU work off the main thread: zero detection, hashing, compression, encryption and their inverse.
 * Buffers arrive and leave as transferred ArrayBuffers, so a 4 MiB block is never copied between threads.
 */
export type WorkerRequest =
  | { id: number; op: 'scan'; buf: ArrayBuffer; len: number }
  | { id: number; op: 'encode'; buf: ArrayBuffer; len: number; sum: Uint8Array; out?: ArrayBuffer; outOffset?: number; outLength?: number }
  | { id: number; op: 'decode'; blob: ArrayBuffer; blobOffset?: number; len: number; sum: Uint8Array; size: number; out?: ArrayBuffer; outOffset?: number; recompute: boolean; format?: number; keyInfo?: Uint8Array; store?: SlabTarget };

/**
 * Where a block decoded for the cache's shared-memory file is decoded first, when the caller sends no buffer of
 * its own: one per worker, reused, so its memory is touched once. Memory a process touches for the first time
 * is dear on some VMs (16 µs a page on the benchmark's), and the callers' spare buffers were 4 MiB each.
 */
let storeScratch: Buffer | undefined;

function storeScratchOf(size: number): Buffer {
  if (!storeScratch || storeScratch.length < size) storeScratch = Buffer.allocUnsafeSlow(size);
  return storeScratch;
}

/** Writes a decoded block into the block cache's slot `t` instead of sending it back; false when it cannot. */
function storeAt(t: SlabTarget, data: Buffer): boolean {
  if (data.length > t.capacity) return false;
  try {
    writeAllAt(t.fd, data, t.position);
    return true;
  } catch {
    return false;
  }
}

export type WorkerReply =
  | { id: number; op: 'scan'; zero: boolean; sum?: Uint8Array; buf: ArrayBuffer }
  | { id: number; op: 'encode'; blob: ArrayBuffer; offset?: number; len: number; buf: ArrayBuffer }
  | { id: number; op: 'decode'; data?: ArrayBuffer; offset?: number; len: number; error?: string; out?: ArrayBuffer; blob: ArrayBuffer; stored?: boolean };

export interface WorkerInit {
  keyHex?: string;
  /** keys other blobs' data keys are wrapped with (imported backy2 repositories), by id, hex */
  keks?: Record<string, string>;
  compression: 'zstd' | 'none';
  compressionLevel: number;
  hashFunction: string;
}

/** workerData of a worker started before its command read its configuration (see early-workers.ts). */
export interface DeferredInit {
  deferred: true;
}

/** The first message such a worker gets. */
export interface InitMessage {
  op: 'init';
  init: WorkerInit;
}

function serve(init: WorkerInit, port: NonNullable<typeof parentPort>): void {
  const opts: CodecOptions = {
    key: init.keyHex ? Buffer.from(init.keyHex, 'hex') : undefined,
    compression: init.compression,
    compressionLevel: init.compressionLevel,
    hashFunction: init.hashFunction,
  };
  const keks = new Map(Object.entries(init.keks ?? {}).map(([id, hex]) => [Number(id), Buffer.from(hex, 'hex')]));
  const keyOf = (kek: number) => (kek === 0 ? opts.key : keks.get(kek));
  port.on('message', (req: WorkerRequest) => {
    switch (req.op) {
      case 'scan': {
        const data = Buffer.from(req.buf, 0, req.len);
        if (isZero(data)) {
          port.postMessage({ id: req.id, op: 'scan', zero: true, buf: req.buf } satisfies WorkerReply, transferable([req.buf]));
        } else {
          const sum = checksum(opts.hashFunction, data);
          port.postMessage({ id: req.id, op: 'scan', zero: false, sum: new Uint8Array(sum), buf: req.buf } satisfies WorkerReply, transferable([req.buf]));
        }
        break;
      }
      case 'encode': {
        const data = Buffer.from(req.buf, 0, req.len);
        const out = req.out ? Buffer.from(req.out, req.outOffset ?? 0, req.outLength) : undefined;
        const blob = encodeBlob(data, Buffer.from(req.sum), opts, out);
        // Written into the caller's buffer: hand it back as it is (no copy), saying where the blob starts.
        const inOut = req.out !== undefined && blob.buffer === req.out;
        const ab = inOut ? req.out! : ownArrayBuffer(blob);
        const transfer = [ab, req.buf];
        if (req.out && ab !== req.out) transfer.push(req.out);
        port.postMessage({ id: req.id, op: 'encode', blob: ab, offset: inOut ? blob.byteOffset : 0, len: blob.length, buf: req.buf } satisfies WorkerReply, transferable(transfer));
        break;
      }
      case 'decode': {
        // The blob's memory goes back too, so the caller can read the next blob into it.
        const outAt = req.outOffset ?? 0;
        const out = req.out ? Buffer.from(req.out, outAt) : req.store ? storeScratchOf(req.size) : undefined;
        let reply: WorkerReply;
        const transfer: ArrayBuffer[] = [req.blob];
        try {
          const blob = Buffer.from(req.blob, req.blobOffset ?? 0, req.len);
          const data = req.format
            ? decodeBacky2Blob(blob, Buffer.from(req.sum), req.size, { format: req.format, keyInfo: req.keyInfo ? Buffer.from(req.keyInfo) : null, keys: keyOf, hashFunction: opts.hashFunction }, out, req.recompute)
            : decodeBlob(blob, Buffer.from(req.sum), req.size, opts, out, req.recompute);
          if (req.store && storeAt(req.store, data)) {
            // Written where the cache keeps it: only the memory goes back, for the next decode.
            reply = { id: req.id, op: 'decode', len: data.length, out: req.out, blob: req.blob, stored: true };
            if (req.out) transfer.push(req.out);
          } else if (req.out && data.buffer === req.out && data.byteOffset === outAt) {
            reply = { id: req.id, op: 'decode', data: req.out, offset: outAt, len: data.length, blob: req.blob };
            transfer.push(req.out);
          } else if (data.buffer === req.blob || data.buffer === storeScratch?.buffer) {
            // Unencrypted, uncompressed: the data is part of the blob buffer; or it is in this worker's
            // scratch (not stored after all: the file is full). Copy it out.
            const ab = new ArrayBuffer(data.length);
            new Uint8Array(ab).set(data);
            reply = { id: req.id, op: 'decode', data: ab, len: data.length, out: req.out, blob: req.blob };
            transfer.push(ab);
            if (req.out) transfer.push(req.out);
          } else {
            const ab = ownArrayBuffer(data);
            reply = { id: req.id, op: 'decode', data: ab, len: data.length, out: req.out, blob: req.blob };
            transfer.push(ab);
            if (req.out && ab !== req.out) transfer.push(req.out);
          }
        } catch (e) {
          const msg = e instanceof BlobFormatError ? e.message : `decode failed: ${(e as Error).message}`;
          reply = { id: req.id, op: 'decode', len: 0, error: msg, out: req.out, blob: req.blob };
          if (req.out) transfer.push(req.out);
        }
        port.postMessage(reply, transferable(transfer));
        break;
      }
    }
  });
}

if (parentPort) {
  const port = parentPort;
  const data = workerData as WorkerInit | DeferredInit;
  // Started early: the modules above are loaded by now; the settings (and keys) come as the first message.
  if ('deferred' in data) port.once('message', (m: InitMessage) => serve(m.init, port));
  else serve(data, port);
}
