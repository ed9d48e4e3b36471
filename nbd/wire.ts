/**
 * Byte-stream helpers shared by the NBD server and client: an exact-length reader over a socket with bounded
 * buffering (it pauses the socket when nobody consumes), and a message writer that respects socket
 * backpressure and writes a header and its payload together without copying the payload.
 */
import type { Socket } from 'node:net';

/** The peer went away, sent EOF, or the reader was cancelled. Not a protocol violation. */
export class ConnectionClosedError extends Error {
  constructor(message = 'connection closed') {
    super(message);
    this.name = 'ConnectionClosedError';
  }
}

/** The peer broke the protocol; the connection should be dropped. */
export class ProtocolError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'ProtocolError';
  }
}

export const EMPTY = Buffer.alloc(0);

export class SocketReader {
  private readonly chunks: Buffer[] = [];
  /** Bytes of chunks[0] already consumed. */
  private head = 0;
  private buffered = 0;
  private waiter: { need: number; resolve: () => void; reject: (e: Error) => void } | null = null;
  private failure: Error | null = null;
  /** Data still buffered stays readable after EOF; after cancel() it does not. */
  private discarded = false;
  private paused = false;

  private readonly onDataBound = (chunk: Buffer): void => this.onData(chunk);
  private readonly onEnd = (): void => this.fail(new ConnectionClosedError('connection closed by peer'), false);
  private readonly onClose = (): void => this.fail(new ConnectionClosedError('connection closed'), false);

  /** A readInto() whose bytes the kernel copies straight into its buffer (direct receive only). */
  private into: { dst: Buffer; at: number; resolve: () => void; reject: (e: Error) => void } | null = null;
  /** The region of `into.dst` last handed to the socket as its next read buffer. */
  private handedOut: Buffer | null = null;

  /**
   * `direct`: the socket was made with `onread` through this DirectReceive (no 'data' events; the kernel
   * writes into a reused scratch buffer, or straight into the buffer of a waiting readInto()).
   */
  constructor(
    private readonly socket: Socket,
    private readonly highWater = 256 * 1024,
    private readonly direct?: DirectReceive,
  ) {
    if (direct) direct.attach(this);
    else socket.on('data', this.onDataBound);
    socket.on('end', this.onEnd);
    socket.on('close', this.onClose);
  }

  /**
   * Stops reading from the socket (before it is handed to TLS, say) and returns what was received but not
   * consumed. Pending reads fail; the reader is unusable afterwards.
   */
  detach(): Buffer {
    if (this.direct) throw new Error('SocketReader: a direct-receive socket cannot be handed over');
    this.socket.off('data', this.onDataBound);
    this.socket.off('end', this.onEnd);
    this.socket.off('close', this.onClose);
    const rest = this.discarded ? EMPTY : Buffer.concat(this.chunks).subarray(this.head);
    this.discarded = true;
    this.chunks.length = 0;
    this.head = 0;
    this.buffered = 0;
    this.fail(new ConnectionClosedError('reader detached'), false);
    // Whoever takes the socket over reads it: undo a pause of ours.
    if (this.paused) {
      this.paused = false;
      this.socket.resume();
    }
    return rest;
  }

  /** Direct receive: bytes the kernel wrote straight into readInto() buffers. */
  get bytesInPlace(): number {
    return this.direct?.inPlace ?? 0;
  }

  get bufferedBytes(): number {
    return this.buffered;
  }

  /** Stops reading: pending and future reads fail with `error`, buffered data is dropped. */
  cancel(error: Error = new ConnectionClosedError('reader cancelled')): void {
    this.fail(error, true);
  }

  /** Returns `n` bytes if they are already buffered, else null (no promise, for hot paths). */
  tryRead(n: number): Buffer | null {
    if (this.discarded || this.buffered < n) return null;
    return this.take(n);
  }

  /** Resolves with exactly `n` bytes; rejects with ConnectionClosedError if the stream ends first. */
  async read(n: number): Promise<Buffer> {
    if (n === 0) return EMPTY;
    if (!this.discarded && this.buffered >= n) return this.take(n);
    await this.waitFor(n);
    return this.take(n);
  }

  /** Consumes and drops `n` bytes as they arrive, without buffering them all. */
  async skip(n: number): Promise<void> {
    while (n > 0) {
      if (this.discarded || this.buffered === 0) await this.waitFor(1);
      const k = Math.min(n, this.buffered);
      this.drop(k);
      n -= k;
    }
  }

  /**
   * Fills `dst` with the next `dst.length` bytes, copying each piece as it arrives: one copy, and nothing
   * held back until the whole length is there (a client reading large replies into its own buffers).
   */
  async readInto(dst: Buffer): Promise<void> {
    let at = 0;
    if (this.direct) {
      if (!this.discarded && this.buffered > 0) {
        at = Math.min(dst.length, this.buffered);
        this.drop(at, dst, 0);
      }
      if (at === dst.length) return;
      if (this.failure) throw this.failure;
      if (this.waiter || this.into) throw new Error('SocketReader: concurrent reads are not supported');
      return new Promise<void>((resolve, reject) => {
        this.into = { dst, at, resolve, reject };
        if (this.paused) {
          this.paused = false;
          this.socket.resume();
        }
      });
    }
    while (at < dst.length) {
      if (this.discarded || this.buffered === 0) await this.waitFor(1);
      const k = Math.min(dst.length - at, this.buffered);
      this.drop(k, dst, at);
      at += k;
    }
  }

  private waitFor(n: number): Promise<void> {
    if (this.failure && (this.discarded || this.buffered < n)) return Promise.reject(this.failure);
    if (this.waiter) return Promise.reject(new Error('SocketReader: concurrent reads are not supported'));
    return new Promise<void>((resolve, reject) => {
      this.waiter = { need: n, resolve, reject };
      if (this.paused) {
        this.paused = false;
        this.socket.resume();
      }
    });
  }

  /**
   * Direct receive: where the socket's next read should land. The rest of a waiting readInto()'s buffer
   * when it is worth a read of its own, else null (the scratch buffer).
   */
  directTarget(minimum: number): Buffer | null {
    const w = this.into;
    if (!w || this.discarded || w.dst.length - w.at < minimum) return null;
    this.handedOut = w.dst.subarray(w.at);
    return this.handedOut;
  }

  /**
   * Direct receive: `n` bytes arrived in `buf` (a region from directTarget(), or the scratch buffer, which is
   * reused at once: whatever is kept of it is copied). Returns false when the socket should stop reading.
   */
  received(n: number, buf: Buffer): boolean {
    if (this.discarded) return false;
    const w = this.into;
    if (buf === this.handedOut) {
      this.handedOut = null;
      this.direct!.inPlace += n;
      // Landed in place; only a readInto() that was failed meanwhile is not waiting for it any more.
      if (w && buf.buffer === w.dst.buffer && buf.byteOffset === w.dst.byteOffset + w.at) this.advanceInto(w, n);
      return true;
    }
    let from = 0;
    if (w) {
      from = Math.min(n, w.dst.length - w.at);
      buf.copy(w.dst, w.at, 0, from);
      this.advanceInto(w, from);
    }
    if (from < n) this.onData(Buffer.from(buf.subarray(from, n)));
    return !this.paused;
  }

  private advanceInto(w: NonNullable<SocketReader['into']>, n: number): void {
    w.at += n;
    if (w.at === w.dst.length) {
      this.into = null;
      w.resolve();
    }
  }

  private onData(chunk: Buffer): void {
    if (this.discarded) return;
    this.chunks.push(chunk);
    this.buffered += chunk.length;
    const w = this.waiter;
    if (w && this.buffered >= w.need) {
      this.waiter = null;
      w.resolve();
    }
    if (this.buffered >= this.highWater && !this.paused && !(this.waiter && this.waiter.need > this.buffered)) {
      this.paused = true;
      this.socket.pause();
    }
  }

  private fail(error: Error, discard: boolean): void {
    if (discard && !this.discarded) {
      this.discarded = true;
      this.chunks.length = 0;
      this.head = 0;
      this.buffered = 0;
      if (!this.socket.destroyed) this.socket.pause();
    }
    if (!this.failure) this.failure = error;
    const i = this.into;
    if (i) {
      this.into = null;
      i.reject(this.failure);
    }
    const w = this.waiter;
    if (w && (this.discarded || this.buffered < w.need)) {
      this.waiter = null;
      w.reject(this.failure);
    }
  }

  private take(n: number): Buffer {
    const first = this.chunks[0];
    let out: Buffer;
    if (first.length - this.head >= n) {
      out = first.subarray(this.head, this.head + n);
      this.head += n;
      if (this.head === first.length) {
        this.chunks.shift();
        this.head = 0;
      }
    } else {
      out = Buffer.allocUnsafe(n);
      let filled = 0;
      while (filled < n) {
        const c = this.chunks[0];
        const k = Math.min(c.length - this.head, n - filled);
        c.copy(out, filled, this.head, this.head + k);
        filled += k;
        this.head += k;
        if (this.head === c.length) {
          this.chunks.shift();
          this.head = 0;
        }
      }
    }
    this.buffered -= n;
    this.maybeResume();
    return out;
  }

  /** Consumes `n` buffered bytes; with `into`, copies them there (at `at`) first. */
  private drop(n: number, into?: Buffer, at = 0): void {
    while (n > 0) {
      const c = this.chunks[0];
      const k = Math.min(c.length - this.head, n);
      if (into) {
        c.copy(into, at, this.head, this.head + k);
        at += k;
      }
      this.head += k;
      n -= k;
      this.buffered -= k;
      if (this.head === c.length) {
        this.chunks.shift();
        this.head = 0;
      }
    }
    this.maybeResume();
  }

  private maybeResume(): void {
    if (this.paused && !this.discarded && this.buffered < this.highWater / 2) {
      this.paused = false;
      this.socket.resume();
    }
  }
}

/**
 * Receiving through net.Socket's `onread` (plain sockets only; a TLS socket cannot take it): no buffer is
 * allocated per read, and the bulk of a READ reply's data is read by the kernel straight into the caller's
 * buffer. net asks for the next read's buffer right after delivering the previous one, before the reader has
 * parsed it; so the first read or two of each reply land in the scratch buffer and are copied from there.
 */
export class DirectReceive {
  private reader: SocketReader | null = null;
  private readonly scratch: Buffer;
  /** Bytes that arrived before a reader was attached. */
  private early: Buffer[] = [];
  /** Bytes the kernel wrote straight into readInto() buffers (the rest went through the scratch buffer). */
  inPlace = 0;
  readonly onread: { buffer: () => Uint8Array; callback: (n: number, buf: Uint8Array) => boolean };

  /** `minimumDirect`: a readInto() with fewer bytes to go reads through the scratch buffer (fewer syscalls). */
  constructor(scratchBytes = 16 * 1024, private readonly minimumDirect = 16 * 1024) {
    this.scratch = Buffer.allocUnsafe(scratchBytes);
    this.onread = {
      buffer: () => this.reader?.directTarget(this.minimumDirect) ?? this.scratch,
      callback: (n, buf) => this.deliver(n, buf as Buffer),
    };
  }

  attach(reader: SocketReader): void {
    if (this.reader) throw new Error('DirectReceive: already attached');
    this.reader = reader;
    const early = this.early;
    this.early = [];
    for (const b of early) reader.received(b.length, b);
  }

  private deliver(n: number, buf: Buffer): boolean {
    if (this.reader) return this.reader.received(n, buf);
    this.early.push(Buffer.from(buf.subarray(0, n)));
    return true;
  }
}

/**
 * Bytes a socket may hold queued in this process before writers wait: a few replies. A connection's replies
 * in flight are bounded by its read budget anyway; this only decides when a writer waits for the kernel.
 */
export const QUEUE_LIMIT = 1024 * 1024;

/**
 * Writes whole messages (a header and optional payload buffers) to a socket. Each message is written in one
 * synchronous corked batch, so messages never interleave. While the socket holds QUEUE_LIMIT bytes or more
 * not yet taken by the kernel, writers wait in order and are let through one at a time as it drains. A write
 * to a closed socket is silently dropped (returns false).
 *
 * Why not wait on Node's 'drain' (writableNeedDrain): its mark is 16 KiB, so every reply of 256 KiB set it
 * even when the kernel took all of it at once; each writer then waited a tick for 'drain', and every waiter
 * was woken by it and all but one went back to waiting. With 64 replies queued on a connection that was most
 * of the NBD server's garbage (a cold nbdcopy of 2 GiB allocated 33 of 122 MB there, and the old generation
 * collected 26 times).
 */
export class SocketWriter {
  private closed = false;
  /** Writers waiting for room, first come first served. */
  private waiters: Array<() => void> = [];
  /** How many times a writer went to sleep for room (each waiting writer once, unless another filled it first). */
  waits = 0;

  private readonly onDrain = (): void => {
    this.clearStall();
    this.wakeNext();
  };
  private readonly onClose = (): void => {
    this.closed = true;
    this.clearStall();
    this.wakeAll();
  };

  private clearStall(): void {
    if (this.stallTimer) clearTimeout(this.stallTimer);
    this.stallTimer = null;
  }

  private watchStall(): void {
    const stall = this.opts.stall;
    if (!stall || this.stallTimer || !this.socket.writableNeedDrain) return;
    const { timeoutMs, onStall } = stall;
    this.stallTimer = setTimeout(() => {
      this.stallTimer = null;
      if (!this.closed && this.socket.writableNeedDrain) onStall();
    }, timeoutMs);
    this.stallTimer.unref();
  }

  private stallTimer: NodeJS.Timeout | null = null;

  /**
   * `stall`: when written data waits longer than `timeoutMs` for the peer to read it (the socket does not
   * drain), `onStall` is called (a server drops such a client instead of holding its replies forever).
   */
  constructor(
    private readonly socket: Socket,
    private readonly opts: {
      stall?: { timeoutMs: number; onStall: () => void };
      /**
       * A buffer that will wait in the socket's queue (the peer reads slowly) is copied when it is a small view
       * of a much larger one (a block of a cache): queued, it would keep the whole block alive after eviction.
       */
      unpinQueued?: boolean;
      /**
       * Messages written in one tick leave in one batch (a client sending many requests at once: one
       * syscall instead of one per request header).
       */
      coalesce?: boolean;
    } = {},
  ) {
    socket.on('drain', this.onDrain);
    socket.on('close', this.onClose);
  }

  /** Stops writing to the socket (before it is handed to TLS); later writes are dropped. */
  detach(): void {
    this.socket.off('drain', this.onDrain);
    this.socket.off('close', this.onClose);
    this.onClose();
  }

  get usable(): boolean {
    return !this.closed && !this.socket.destroyed && this.socket.writable;
  }

  /**
   * Writes one message. `flushed` is called once its bytes have left this process (handed to the kernel),
   * or at once when the message is dropped; a socket destroyed meanwhile calls it too.
   */
  async write(bufs: readonly Buffer[], flushed?: () => void): Promise<boolean> {
    // A writer that finds others waiting queues behind them, so that a steady stream of new replies cannot
    // keep an old one waiting.
    if (this.usable && (this.waiters.length > 0 || this.full)) {
      this.waits++;
      await new Promise<void>((resolve) => this.waiters.push(resolve));
      // Woken, but a writer that was not waiting filled the socket first: wait again, first in line.
      while (this.usable && this.full) {
        this.waits++;
        await new Promise<void>((resolve) => this.waiters.unshift(resolve));
      }
    }
    if (!this.usable) {
      flushed?.();
      this.wakeNext();
      return false;
    }
    const cb = flushed ? () => flushed() : undefined;
    if (this.opts.coalesce && !this.corked) {
      this.corked = true;
      this.socket.cork();
      process.nextTick(this.uncork);
    }
    if (this.opts.unpinQueued && this.socket.writableLength > 0) bufs = bufs.map(unpin);
    if (bufs.length === 1) {
      this.socket.write(bufs[0], cb);
    } else {
      this.socket.cork();
      let last = bufs.length - 1;
      while (last > 0 && bufs[last].length === 0) last--;
      for (let i = 0; i <= last; i++) if (bufs[i].length > 0 || i === last) this.socket.write(bufs[i], i === last ? cb : undefined);
      this.socket.uncork();
    }
    this.watchStall();
    this.wakeNext();
    return true;
  }

  /** The socket holds as much as a writer may queue: wait for it to drain. */
  private get full(): boolean {
    return this.socket.writableLength >= QUEUE_LIMIT;
  }

  private corked = false;
  private readonly uncork = (): void => {
    this.corked = false;
    this.socket.uncork();
  };

  /** Lets the first waiting writer go, when there is room (or the socket is gone: it then drops its message). */
  private wakeNext(): void {
    if (this.waiters.length === 0 || (this.usable && this.full)) return;
    this.waiters.shift()!();
  }

  private wakeAll(): void {
    const ws = this.waiters;
    this.waiters = [];
    for (const w of ws) w();
  }
}

/** A copy of `b` when it is a view of a buffer more than twice its size, else `b`. */
function unpin(b: Buffer): Buffer {
  return b.length > 0 && b.buffer.byteLength > 2 * b.length ? Buffer.from(b) : b;
}

/** Truncates a string to at most `maxBytes` of UTF-8 without splitting a character. */
export function utf8Truncate(s: string, maxBytes: number): Buffer {
  const b = Buffer.from(s, 'utf8');
  if (b.length <= maxBytes) return b;
  let end = maxBytes;
  // Back off over continuation bytes (10xxxxxx) so we cut at a character boundary.
  while (end > 0 && (b[end] & 0xc0) === 0x80) end--;
  return b.subarray(0, end);
}

/** A 64-bit unsigned big-endian value as a JS number, or Infinity if it exceeds 2^53 - 1. */
export function readU64(buf: Buffer, at: number): number {
  const hi = buf.readUInt32BE(at);
  const lo = buf.readUInt32BE(at + 4);
  return hi < 0x200000 ? hi * 0x100000000 + lo : Infinity;
}

export function writeU64(buf: Buffer, value: number, at: number): void {
  buf.writeUInt32BE(Math.floor(value / 0x100000000), at);
  buf.writeUInt32BE(value >>> 0, at + 4);
}
