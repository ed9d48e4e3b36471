import { DatabaseError } from '../util/errors';

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
  /**
   * The repository marker (stores whose emptiness can be an accident: a directory whose filesystem is not
   * mounted). undefined when there is none.
   */
  readMarker?(): Promise<string | undefined>;
  /** Writes the marker atomically (durably, like a blob). */
  writeMarker?(text: string): Promise<void>;
  close(): Promise<void>;
}

/**
 * How blobs of one kind are named in storage: which uids are valid, and the key a uid is stored under. A uid
 * read from the database is checked against its naming before any storage call, so a uid planted in a
 * shared database (`../../etc/passwd`) can never become a path or key outside the blob tree. backy's own
 * naming is registered here; foreign ones (backy2's `ab/cd/<uid>.blob`) are registered by the code that
 * brings such blobs in, and blobs say which naming they use.
 */
export interface BlobNaming {
  readonly name: string;
  /** A whole uid of this naming (anchored). */
  readonly uid: RegExp;
  key(uid: string): string;
  /** The uid stored under `key`, or undefined when the key is not one of this naming. */
  uidOfKey(key: string): string | undefined;
}

/** A uid in the database that is not a uid of its naming: refused before it reaches storage. */
export class InvalidBlobUidError extends DatabaseError {
  constructor(readonly uid: string, naming: string) {
    super(`the database holds an invalid ${naming} blob uid ${JSON.stringify(uid.slice(0, 80))}: refusing to use it as a storage key`);
  }
}

/** backy's blobs: 32 random hex digits, under two levels of shard directories (`ab/cd/<uid>`) so no
 * directory or prefix grows too large. */
export const BACKY_NAMING: BlobNaming = {
  name: 'backy',
  uid: /^[0-9a-f]{32}$/,
  key: (uid) => `${uid.slice(0, 2)}/${uid.slice(2, 4)}/${uid}`,
  uidOfKey(key) {
    const m = /^([0-9a-f]{2})\/([0-9a-f]{2})\/([0-9a-f]{32})$/.exec(key);
    return m && m[3].startsWith(m[1] + m[2]) ? m[3] : undefined;
  },
};

const namings = new Map<string, BlobNaming>([[BACKY_NAMING.name, BACKY_NAMING]]);

/** Makes another naming known (foreign blob formats). */
export function registerBlobNaming(n: BlobNaming): void {
  namings.set(n.name, n);
}

/** Storage key of a blob uid, after checking the uid is one of `naming` (backy's own by default). */
export function blobKey(uid: string, naming = BACKY_NAMING.name): string {
  const n = namings.get(naming);
  if (!n) throw new DatabaseError(`unknown blob naming "${naming.slice(0, 40)}"`);
  if (typeof uid !== 'string' || !n.uid.test(uid)) throw new InvalidBlobUidError(String(uid), n.name);
  return n.key(uid);
}

/** The uid back from a storage key (any registered naming), or undefined when the key is not a blob key. */
export function uidFromKey(key: string): string | undefined {
  for (const n of namings.values()) {
    const uid = n.uidOfKey(key);
    if (uid !== undefined) return uid;
  }
  return undefined;
}
