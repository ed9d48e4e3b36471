/**
 * SocketWriter under backpressure, over a real TCP connection on 127.0.0.1 whose reader stops reading: 64
 * replies of 256 KiB written at once (what an NBD connection holds with nbdcopy's 64 requests in flight) must
 * arrive whole and in the order they were written, the socket must never hold much more than QUEUE_LIMIT in
 * this process, and each writer must wait about once: waking every waiter at each 'drain' (all but one going
 * back to sleep) made the NBD server's most garbage.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as net from 'node:net';
import { QUEUE_LIMIT, SocketWriter } from '../nbd/wire';

const WRITERS = 64;
const SIZE = 256 * 1024;

/** A connected pair on 127.0.0.1: `client` is written to, `server` is the far end (paused). */
async function pair(): Promise<{ client: net.Socket; server: net.Socket; close: () => void }> {
  const listener = net.createServer();
  await new Promise<void>((resolve) => listener.listen(0, '127.0.0.1', resolve));
  const accepted = new Promise<net.Socket>((resolve) => listener.once('connection', resolve));
  const client = net.connect({ host: '127.0.0.1', port: (listener.address() as net.AddressInfo).port });
  await new Promise<void>((resolve, reject) => {
    client.once('connect', resolve);
    client.once('error', reject);
  });
  const server = await accepted;
  server.pause();
  listener.close();
  return { client, server, close: () => { client.destroy(); server.destroy(); } };
}

function message(i: number): Buffer {
  const b = Buffer.alloc(SIZE, i & 0xff);
  b.writeUInt32BE(i, 0);
  return b;
}

test('64 writers on a socket whose reader stopped: each waits about once, the queue stays bounded, order and bytes are kept', async () => {
  const { client, server, close } = await pair();
  try {
    const writer = new SocketWriter(client);
    let largestQueue = 0;
    const writes = Array.from({ length: WRITERS }, (_, i) => writer.write([message(i)]).then((ok) => {
      largestQueue = Math.max(largestQueue, client.writableLength);
      return ok;
    }));
    // The reader starts once the kernel's buffers are full and writers are waiting.
    await new Promise((r) => setTimeout(r, 200));
    const waitingBefore = writer.waits;
    assert.ok(waitingBefore > 0, 'writers waited for room (the race under test happened)');
    const received: Buffer[] = [];
    let bytes = 0;
    const all = new Promise<void>((resolve) => {
      server.on('data', (d: Buffer) => {
        received.push(d);
        bytes += d.length;
        if (bytes >= WRITERS * SIZE) resolve();
      });
    });
    server.resume();
    assert.deepEqual(await Promise.all(writes), Array(WRITERS).fill(true));
    await all;
    const stream = Buffer.concat(received);
    assert.equal(stream.length, WRITERS * SIZE);
    for (let i = 0; i < WRITERS; i++) {
      const m = stream.subarray(i * SIZE, (i + 1) * SIZE);
      assert.equal(m.readUInt32BE(0), i, `message ${i} arrived in its place`);
      assert.ok(m.subarray(4).every((x) => x === (i & 0xff)), `message ${i} intact`);
    }
    assert.ok(writer.waits <= 2 * WRITERS, `${writer.waits} waits for ${WRITERS} writers`);
    assert.ok(largestQueue <= QUEUE_LIMIT + SIZE, `the socket held ${largestQueue} bytes in this process`);
  } finally {
    close();
  }
});
