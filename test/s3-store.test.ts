/**
 * S3Store against a real S3 server (s3rver in a child process), with the fault proxy between them where the
 * test needs to see or break requests: paging, batching, retries and their limits, timeouts, error mapping.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { configFromText } from '../src/config/config';
import { S3Store } from '../src/storage/s3';
import { backoffMs, DEFAULT_RETRY } from '../src/storage/retry';
import { blobKey } from '../src/storage/types';
import { BlobNotFoundError, StorageError } from '../src/util/errors';
import { startS3Server, S3Server, S3RVER_KEY, S3RVER_SECRET } from './helpers/s3-server';
import { FaultProxy, startFaultProxy } from './helpers/fault-proxy';
import { freePort } from './helpers/net';

function storeFor(endpoint: string, extra: Record<string, string | number> = {}, bucket = 'backy'): S3Store {
  const lines = ['[DEFAULTS]', 'encryption = none', '[DataBackend]', 'type = s3', `endpoint_url = ${endpoint}`,
    `bucket_name = ${bucket}`, `aws_access_key_id = ${S3RVER_KEY}`, `aws_secret_access_key = ${S3RVER_SECRET}`];
  for (const [k, v] of Object.entries(extra)) lines.push(`${k} = ${v}`);
  const cfg = configFromText(lines.join('\n'));
  // Short backoff: these tests count attempts, they do not need to wait like a throttled client would.
  return new S3Store(cfg.data.s3, { reads: 8, writes: 8, retry: { baseDelayMs: 5, maxDelayMs: 50 } });
}

const newKey = () => blobKey(randomBytes(16).toString('hex'));

async function listAll(store: S3Store): Promise<{ keys: string[]; pages: number[] }> {
  const keys: string[] = [];
  const pages: number[] = [];
  for await (const page of store.list()) {
    pages.push(page.length);
    keys.push(...page.map((o) => o.key));
  }
  return { keys, pages };
}


let s3: S3Server;
let proxy: FaultProxy;

before(async () => {
  s3 = await startS3Server();
  proxy = await startFaultProxy({ target: s3.endpoint });
});
after(async () => {
  await proxy?.close();
  await s3?.stop();
});

describe('S3Store', () => {
  test('put, get, exact bytes; prefix keeps repositories apart', async () => {
    const a = storeFor(s3.endpoint, { prefix: 'one' });
    const b = storeFor(s3.endpoint, { prefix: 'two/' });
    try {
      const key = newKey();
      const data = randomBytes(300_001);
      await a.put(key, data);
      assert.deepEqual(await a.get(key), data);
      await assert.rejects(b.get(key), BlobNotFoundError);
      assert.deepEqual((await listAll(b)).keys, []);
      assert.deepEqual((await listAll(a)).keys, [key]);
      await a.delete([key]);
    } finally {
      await a.close();
      await b.close();
    }
  });

  test('list pages through thousands of keys, 1000 at most per page, only blob keys under the prefix', async () => {
    const store = storeFor(proxy.endpoint, { prefix: 'many' });
    const other = storeFor(s3.endpoint, { prefix: 'other' });
    const root = storeFor(s3.endpoint);
    try {
      const keys = Array.from({ length: 2345 }, newKey);
      const blob = Buffer.from('x');
      for (let i = 0; i < keys.length; i += 64) await Promise.all(keys.slice(i, i + 64).map((k) => store.put(k, blob)));
      await store.put('README', blob); // not a blob key: never reported, so cleanup --full leaves it alone
      await store.put('ab/cd/not-a-uid', blob);
      await other.put(newKey(), blob); // another repository's blob in the same bucket
      proxy.seen.length = 0;
      const { keys: listed, pages } = await listAll(store);
      assert.deepEqual(listed.sort(), [...keys].sort());
      assert.ok(pages.length >= 3 && pages.every((n) => n <= 1000), `pages ${pages}`);
      const lists = proxy.seen.filter((r) => r.method === 'GET' && r.url.includes('list-type=2'));
      assert.equal(lists.length, 3);
      assert.ok(lists.every((r) => r.url.includes('max-keys=1000') && r.url.includes('prefix=many%2F')));
      // The bucket root sees neither: "many/ab/cd/uid" is not a blob key of a repository without prefix.
      assert.deepEqual((await listAll(root)).keys, []);

      proxy.seen.length = 0;
      await store.delete([...keys, newKey()]); // a key that does not exist is no error
      // s3rver deletes the keys of one request in parallel and then removes emptied directories without
      // care, so some requests fail with a 500 and are retried: count the ones that succeeded.
      const deletes = proxy.seen.filter((r) => r.method === 'POST' && r.url.includes('delete'));
      assert.equal(deletes.filter((r) => r.status === 200).length, 3, 'DeleteObjects in batches of 1000');
      assert.ok(deletes.every((r) => typeof r.headers['content-md5'] === 'string'), 'Content-MD5 on every DeleteObjects');
      assert.deepEqual((await listAll(store)).keys, []);
      assert.equal((await listAll(other)).keys.length, 1);
      await store.delete(['README', 'ab/cd/not-a-uid']);
    } finally {
      await store.close();
      await other.close();
      await root.close();
    }
  });

  test('storage_class is sent with every PUT', async () => {
    const store = storeFor(proxy.endpoint, { storage_class: 'REDUCED_REDUNDANCY' });
    try {
      const key = newKey();
      proxy.seen.length = 0;
      await store.put(key, Buffer.from('cold'));
      assert.equal(proxy.seen[0].headers['x-amz-storage-class'], 'REDUCED_REDUNDANCY');
      assert.equal((await store.get(key)).toString(), 'cold');
      await store.delete([key]);
    } finally {
      await store.close();
    }
  });

  test('a missing object is BlobNotFoundError at once, never retried', async () => {
    const store = storeFor(proxy.endpoint, { max_retries: 5 });
    try {
      const key = newKey();
      proxy.seen.length = 0;
      await assert.rejects(store.get(key), (e: unknown) => e instanceof BlobNotFoundError && e.key === key);
      assert.equal(proxy.seen.filter((r) => r.method === 'GET').length, 1);
    } finally {
      await store.close();
    }
  });

  test('a 404 that is not S3\'s NoSuchKey is a storage error, not a missing blob', async () => {
    const store = storeFor(proxy.endpoint);
    try {
      const key = newKey();
      await store.put(key, Buffer.from('here'));
      proxy.script = ['html-404'];
      await assert.rejects(store.get(key), (e: unknown) => {
        assert.ok(e instanceof StorageError && !(e instanceof BlobNotFoundError), String(e));
        assert.match(e.message, new RegExp(`^cannot read blob ${key} from s3://backy/ at .*: HTTP 404`));
        return true;
      });
      assert.equal((await store.get(key)).toString(), 'here');
      await store.delete([key]);
    } finally {
      proxy.script = [];
      await store.close();
    }
  });

  test('every kind of fault is retried and the data arrives intact', async () => {
    const store = storeFor(proxy.endpoint, { max_retries: 5, read_timeout: 1 });
    proxy.delayMs = 1500;
    try {
      const key = newKey();
      const data = randomBytes(1_000_003);
      proxy.eligible = (r) => r.method === 'PUT';
      proxy.script = ['reset', '503', 'lost-reply', '500', 'delay'];
      await store.put(key, data);
      assert.equal(proxy.script.length, 0);
      proxy.eligible = (r) => r.method === 'GET';
      proxy.script = ['lost-reply', 'reset', '500', 'delay', '503'];
      const started = Date.now();
      assert.deepEqual(await store.get(key), data, 'a truncated body must never be returned');
      assert.ok(Date.now() - started >= 1000, 'the delayed request timed out after read_timeout');
      assert.equal(proxy.script.length, 0);
      proxy.eligible = (r) => r.method === 'POST';
      proxy.script = ['503', 'lost-reply'];
      await store.delete([key]);
      proxy.eligible = () => true;
      await assert.rejects(store.get(key), BlobNotFoundError);
    } finally {
      proxy.eligible = () => true;
      proxy.script = [];
      await store.close();
    }
  });

  test('after max_retries the error names the operation and the object', async () => {
    const store = storeFor(proxy.endpoint, { max_retries: 2 });
    try {
      const key = newKey();
      proxy.seen.length = 0;
      proxy.script = ['503', '503', '503'];
      await assert.rejects(store.put(key, Buffer.from('data')), (e: unknown) => {
        assert.ok(e instanceof StorageError);
        assert.match(e.message, new RegExp(`^cannot store blob ${key} in s3://backy/ at ${proxy.endpoint}: HTTP 503 SlowDown \\(gave up after 3 attempts\\)$`));
        return true;
      });
      assert.equal(proxy.seen.length, 3);
      proxy.script = ['500', '500', '500'];
      await assert.rejects(store.get(key), /^StorageError: cannot read blob .* HTTP 500 InternalError \(gave up after 3 attempts\)/);
    } finally {
      proxy.script = [];
      await store.close();
    }
  });

  test('check: an endpoint that answers with failures gets five attempts, not three', async () => {
    const store = storeFor(proxy.endpoint, { max_retries: 6 });
    try {
      proxy.eligible = (r) => r.method === 'HEAD';
      proxy.seen.length = 0;
      proxy.script = ['503', 'reset', '500', 'lost-reply'];
      await store.check();
      assert.equal(proxy.script.length, 0, 'all four failures were served');
      assert.equal(proxy.seen.length, 5);
      proxy.script = ['503', '500', '503', '500', '503', '500'];
      await assert.rejects(store.check(), /^StorageError: cannot access s3:\/\/backy\/ at .*: HTTP 50\d .*\(gave up after 5 attempts\)$/);
      assert.equal(proxy.script.length, 1);
    } finally {
      proxy.eligible = () => true;
      proxy.script = [];
      await store.close();
    }
  });

  test('check: bad credentials, missing bucket, unreachable endpoint, each one line without secrets', async () => {
    const secret = 'Very-Secret-Value-42';
    const bad = new S3Store(configFromText(['[DEFAULTS]', 'encryption = none', '[DataBackend]', 'type = s3',
      `endpoint_url = ${s3.endpoint}`, 'bucket_name = backy', 'aws_access_key_id = NOTAKEY', `aws_secret_access_key = ${secret}`].join('\n')).data.s3,
    { reads: 1, writes: 1 });
    const nobucket = storeFor(s3.endpoint, {}, 'no-such-bucket');
    const port = await freePort();
    const unreachable = storeFor(`http://127.0.0.1:${port}`, { max_retries: 6 });
    try {
      await assert.rejects(bad.check(), (e: unknown) => {
        assert.ok(e instanceof StorageError);
        assert.match(e.message, /^S3 access denied to bucket "backy" at http:\/\/127\.0\.0\.1:\d+: HTTP 403/);
        assert.ok(!e.message.includes(secret) && !e.message.includes('NOTAKEY') && !e.message.includes('\n'));
        return true;
      });
      await assert.rejects(nobucket.check(), /^StorageError: S3 bucket "no-such-bucket" does not exist at http/);
      await nobucket.check().catch(() => undefined);
      const started = Date.now();
      await assert.rejects(unreachable.check(), /^StorageError: cannot access s3:\/\/backy\/ at http:\/\/127\.0\.0\.1:\d+: connection refused \(gave up after 3 attempts\)$/);
      assert.ok(Date.now() - started < 5000, 'check gives up after a few quick retries, whatever max_retries says');
      // Data operations keep the full max_retries.
      await assert.rejects(unreachable.put(newKey(), Buffer.from('x')), /gave up after 7 attempts/);
    } finally {
      await bad.close();
      await nobucket.close();
      await unreachable.close();
    }
  });

  test('endpoint without a scheme takes it from use_ssl', async () => {
    const store = storeFor(s3.endpoint.replace('http://', ''), { use_ssl: 'false' });
    try {
      assert.equal(store.description, `s3://backy/ at ${s3.endpoint}`);
      await store.check();
    } finally {
      await store.close();
    }
  });
});

describe('backoff', () => {
  test('grows exponentially, capped, jittered within [step/2, step]', () => {
    const p = DEFAULT_RETRY;
    for (let n = 1; n <= 12; n++) {
      const step = Math.min(p.maxDelayMs, p.baseDelayMs * 2 ** (n - 1));
      assert.equal(backoffMs(p, n, () => 0), step / 2);
      assert.equal(backoffMs(p, n, () => 0.999999), step / 2 + 0.999999 * step / 2);
    }
    assert.equal(backoffMs(p, 30, () => 1), p.maxDelayMs);
  });
});
