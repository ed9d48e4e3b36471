/**
 * Where blobs live. Keys are opaque strings chosen by the caller (shard prefix and a random uid); values are
 * whole encoded blobs. Implementations: file.ts (a directory, e.g. an NFS mount), s3.ts.
 */
export interface StoredObject {
  key: string;
  size: number;
  /** Last modification, ms since the epoch. */
  mtime: number;
}

export interface BlobStore {
  /** Human-readable description for logs (never containing credentials). */
  readonly description: string;
  /** Stores the blob atomically: a crash never leaves a partial blob under the final key. */
  put(key: string, data: Buffer): Promise<void>;
  /** The whole blob; throws BlobNotFoundError when the key does not exist, StorageError for other failures. */
  get(key: string): Promise<Buffer>;
  /** Like get, but reads into `into` when the blob fits (returning a view of it), so callers can reuse memory. */
  getInto?(key: string, into: Buffer): Promise<Buffer>;
  /** Deletes keys; keys that do not exist are not an error. */
  delete(keys: string[]): Promise<void>;
  /** Every stored key, page by page (never all keys in memory at once). Leftovers of interrupted writes are
   * included with `partial: true` so a full cleanup can remove them. */
  list(): AsyncIterable<(StoredObject & { partial?: boolean })[]>;
  /** Every object whose key starts with `prefix` (metadata objects such as "meta/versions/"), page by page;
   * leftovers of interrupted writes are not included. */
  listUnder(prefix: string): AsyncIterable<StoredObject[]>;
  /** Checks the store is reachable and usable (directory exists, bucket reachable). */
  check(): Promise<void>;
  close(): Promise<void>;
}

/** Storage key of a blob uid: two levels of shard directories so no directory or prefix grows too large. */
export function blobKey(uid: string): string {
  return `${uid.slice(0, 2)}/${uid.slice(2, 4)}/${uid}`;
}

/** The uid back from a storage key, or undefined when the key is not a blob key. */
export function uidFromKey(key: string): string | undefined {
  const m = /^([0-9a-f]{2})\/([0-9a-f]{2})\/([0-9a-f]{32})$/.exec(key);
  return m && m[3].startsWith(m[1] + m[2]) ? m[3] : undefined;
}
