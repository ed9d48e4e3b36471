import {
  DeleteObjectsCommand, GetObjectCommand, HeadBucketCommand, ListObjectsV2Command, PutObjectCommand, S3Client,
  type StorageClass,
} from '@aws-sdk/client-s3';
import type { S3Config } from '../config/config';
import { BlobNotFoundError, StorageError } from '../util/errors';
import { log } from '../util/log';
import { Semaphore } from '../util/semaphore';
import { DEFAULT_RETRY, RetryPolicy, Verdict, withRetry } from './retry';
import { createS3Client, describeS3 } from './s3-client';
import { readBody } from './s3-body';
import { classifyS3Error, S3Failure } from './s3-errors';
import { type BlobStore, type StoredObject } from './types';
import { uidOfKey } from './blob-keys';

/** S3's own limits for one DeleteObjects request and one ListObjectsV2 page. */
const DELETE_BATCH = 1000;
const LIST_PAGE = 1000;
/** The start-of-command check gives up sooner than data operations: an unreachable endpoint (connection
 * refused, unknown host) should fail in seconds, not after minutes of backoff. An endpoint that answers
 * but fails now and then gets a few more tries: on a network that loses one request in seven, three
 * attempts would still stop one command in 300 at its start. */
const CHECK_RETRIES = 4;
const CHECK_UNREACHABLE_RETRIES = 2;

/** Some keys of a DeleteObjects request were not deleted. */
class PartialDeleteError extends Error {
  constructor(readonly failures: { key: string; code: string }[]) {
    super(`${failures.length} objects not deleted, first ${failures[0].key}: ${failures[0].code}`);
  }
}

/**
 * Blobs as objects in an S3-compatible bucket: `<prefix><ab>/<cd>/<uid>`. The two hex shard levels spread
 * keys evenly over the key space, which S3 partitions by prefix, so no partition becomes a hot spot.
 * A PUT is atomic, so there are never partial objects to clean up.
 */
export class S3Store implements BlobStore {
  readonly description: string;
  private readonly client: S3Client;
  private readonly bucket: string;
  private readonly prefix: string;
  private readonly policy: RetryPolicy;
  private readonly endpointText: string;

  constructor(private readonly cfg: S3Config, opts: { reads: number; writes: number; retry?: Partial<RetryPolicy> }) {
    const parts = createS3Client(cfg, opts.reads + opts.writes + cfg.simultaneousRemovals + 2);
    this.client = parts.client;
    this.bucket = cfg.bucketName;
    this.prefix = cfg.prefix;
    this.description = describeS3(cfg, parts.endpoint);
    this.endpointText = parts.endpoint ? `${parts.endpoint.protocol}//${parts.endpoint.host}` : `AWS region ${cfg.regionName}`;
    this.policy = { ...DEFAULT_RETRY, maxRetries: cfg.maxRetries, ...opts.retry };
  }

  private objectKey(key: string): string {
    return this.prefix + key;
  }

  async check(): Promise<void> {
    const policy = { ...this.policy, maxRetries: Math.min(this.policy.maxRetries, CHECK_RETRIES), maxUnreachableRetries: CHECK_UNREACHABLE_RETRIES };
    await this.retrying(`access ${this.description}`, policy,
      // HEAD has no body to name the error: a 404 there can only mean the bucket.
      (f) => this.bucketFailure(f.status === 404 ? { ...f, kind: 'no-bucket' } : f),
      () => this.client.send(new HeadBucketCommand({ Bucket: this.bucket })));
  }

  async put(key: string, data: Buffer): Promise<void> {
    await this.retrying(`store blob ${key} in ${this.description}`, this.policy,
      (f) => this.bucketFailure(f) ?? new StorageError(`cannot store blob ${key} in ${this.description}: ${f.reason}`),
      () => this.client.send(new PutObjectCommand({
        Bucket: this.bucket,
        Key: this.objectKey(key),
        Body: data,
        ContentLength: data.length,
        StorageClass: this.cfg.storageClass as StorageClass | undefined,
      })));
  }

  get(key: string): Promise<Buffer> {
    return this.getInto(key);
  }

  async getInto(key: string, into?: Buffer): Promise<Buffer> {
    return this.retrying(`read blob ${key} from ${this.description}`, this.policy,
      (f) => (f.kind === 'not-found' ? new BlobNotFoundError(key) : undefined) ??
        this.bucketFailure(f) ?? new StorageError(`cannot read blob ${key} from ${this.description}: ${f.reason}`),
      async () => {
        const r = await this.client.send(new GetObjectCommand({ Bucket: this.bucket, Key: this.objectKey(key) }));
        if (!r.Body) throw Object.assign(new Error('response without a body'), { code: 'ERR_STREAM_PREMATURE_CLOSE' });
        // Reading the body belongs to the attempt: a connection lost halfway is retried like any other.
        return readBody(r.Body, r.ContentLength, into);
      });
  }

  async delete(keys: string[]): Promise<void> {
    if (!keys.length) return;
    const removers = new Semaphore(this.cfg.simultaneousRemovals);
    const batches: string[][] = [];
    for (let i = 0; i < keys.length; i += DELETE_BATCH) batches.push(keys.slice(i, i + DELETE_BATCH));
    const results = await Promise.allSettled(batches.map((b) => removers.use(() => this.deleteBatch(b))));
    const failed = results.find((r): r is PromiseRejectedResult => r.status === 'rejected');
    if (failed) throw failed.reason;
  }

  private async deleteBatch(keys: string[]): Promise<void> {
    let remaining = keys;
    await this.retrying(`delete ${keys.length} objects (${keys[0]}${keys.length > 1 ? ' …' : ''}) from ${this.description}`, this.policy,
      (f) => this.bucketFailure(f) ?? new StorageError(`cannot delete objects from ${this.description}: ${f.reason}`),
      async () => {
        const r = await this.client.send(new DeleteObjectsCommand({
          Bucket: this.bucket,
          Delete: { Objects: remaining.map((k) => ({ Key: this.objectKey(k) })), Quiet: true },
        }));
        // A key that is already gone is what we wanted; anything else failed for that key alone.
        const failures = (r.Errors ?? []).filter((e) => e.Code !== 'NoSuchKey')
          .map((e) => ({ key: (e.Key ?? '').slice(this.prefix.length), code: e.Code ?? 'unknown error' }));
        if (!failures.length) return;
        const failedKeys = new Set(failures.map((f) => f.key));
        remaining = remaining.filter((k) => failedKeys.has(k));
        throw new PartialDeleteError(failures);
      },
      (e) => {
        if (!(e instanceof PartialDeleteError)) return undefined;
        const worst = e.failures.find((f) => classifyS3Error({ name: f.code }).kind !== 'transient');
        if (worst) return { retry: false, error: new StorageError(`cannot delete ${worst.key} from ${this.description}: ${worst.code}`) };
        return { retry: true, reason: e.message };
      });
  }

  /** Every blob key under the prefix, a ListObjectsV2 page (up to 1000 keys) at a time. Other objects in the
   * bucket are never reported, so a full cleanup cannot touch what is not backy's. */
  async *list(): AsyncIterable<StoredObject[]> {
    let token: string | undefined;
    do {
      const r = await this.retrying(`list ${this.description}`, this.policy,
        (f) => this.bucketFailure(f) ?? new StorageError(`cannot list ${this.description}: ${f.reason}`),
        () => this.client.send(new ListObjectsV2Command({
          Bucket: this.bucket, Prefix: this.prefix || undefined, MaxKeys: LIST_PAGE, ContinuationToken: token,
        })));
      const page: StoredObject[] = [];
      for (const o of r.Contents ?? []) {
        const key = o.Key?.slice(this.prefix.length);
        if (!key || !o.Key!.startsWith(this.prefix) || !uidOfKey(key)) continue;
        page.push({ key, size: o.Size ?? 0, mtime: o.LastModified?.getTime() ?? 0 });
      }
      if (page.length) yield page;
      token = r.IsTruncated ? r.NextContinuationToken : undefined;
    } while (token);
  }

  async *listUnder(prefix: string): AsyncIterable<StoredObject[]> {
    let token: string | undefined;
    do {
      const r = await this.retrying(`list ${this.description}${prefix}`, this.policy,
        (f) => this.bucketFailure(f) ?? new StorageError(`cannot list ${this.description}: ${f.reason}`),
        () => this.client.send(new ListObjectsV2Command({
          Bucket: this.bucket, Prefix: this.prefix + prefix, MaxKeys: LIST_PAGE, ContinuationToken: token,
        })));
      const page: StoredObject[] = [];
      for (const o of r.Contents ?? []) {
        if (!o.Key?.startsWith(this.prefix + prefix)) continue;
        page.push({ key: o.Key.slice(this.prefix.length), size: o.Size ?? 0, mtime: o.LastModified?.getTime() ?? 0 });
      }
      if (page.length) yield page;
      token = r.IsTruncated ? r.NextContinuationToken : undefined;
    } while (token);
  }

  async close(): Promise<void> {
    this.client.destroy();
  }

  /** The final error for failures that concern the bucket or the account rather than one object. */
  private bucketFailure(f: S3Failure): StorageError | undefined {
    if (f.kind === 'no-bucket') {
      return new StorageError(`S3 bucket "${this.bucket}" does not exist at ${this.endpointText} (create it, or correct bucket_name)`);
    }
    if (f.kind === 'no-credentials') return new StorageError(`cannot access S3 bucket "${this.bucket}" at ${this.endpointText}: ${f.reason}`);
    if (f.kind === 'denied') {
      return new StorageError(`S3 access denied to bucket "${this.bucket}" at ${this.endpointText}: ${f.reason}` +
        (f.reason.includes('clock') ? '' : ' (check aws_access_key_id, aws_secret_access_key and the bucket\'s permissions)'));
    }
    return undefined;
  }

  /**
   * withRetry with S3's failure classes: transient and unreachable are retried; for the rest `final` gives
   * the error to throw (or undefined for a generic one). `special` may judge errors of backy's own first.
   */
  private retrying<T>(what: string, policy: RetryPolicy, final: (f: S3Failure) => Error | undefined, fn: () => Promise<T>,
    special?: (e: unknown) => Verdict | undefined): Promise<T> {
    const judge = (e: unknown): Verdict => {
      const s = special?.(e);
      if (s) return s;
      const f = classifyS3Error(e);
      if (f.kind === 'transient') return { retry: true, reason: f.reason };
      if (f.kind === 'unreachable') return { retry: true, reason: f.reason, maxRetries: policy.maxUnreachableRetries };
      return { retry: false, error: final(f) ?? new StorageError(`cannot ${what}: ${f.reason}`) };
    };
    return withRetry(what, policy, judge, fn, (reason, n, ms) => {
      log.debug(`S3: ${what}: ${reason}; retry ${n} of ${policy.maxRetries} in ${Math.round(ms)} ms`);
    });
  }
}
