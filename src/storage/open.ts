import type { Config } from '../config/config';
import { StorageError } from '../util/errors';
import { FileStore } from './file';
import { LimitedStore } from './limited';
import type { BlobStore } from './types';

/** The data backend of the configuration, wrapped with its concurrency and bandwidth limits. */
export function createBlobStore(cfg: Config): BlobStore {
  let inner: BlobStore;
  if (cfg.data.type === 'file') inner = new FileStore(cfg.data.path, cfg.data.fsync);
  else {
    try {
      // eslint-disable-next-line @typescript-eslint/no-require-imports
      const { S3Store } = require('./s3') as { S3Store: new (c: Config['data']['s3'], o: { reads: number; writes: number }) => BlobStore };
      inner = new S3Store(cfg.data.s3, { reads: cfg.data.simultaneousReads, writes: cfg.data.simultaneousWrites });
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'MODULE_NOT_FOUND') throw new StorageError('the S3 data backend is not available in this build');
      throw e;
    }
  }
  return new LimitedStore(inner, {
    reads: cfg.data.simultaneousReads,
    writes: cfg.data.simultaneousWrites,
    bandwidthRead: cfg.data.bandwidthRead,
    bandwidthWrite: cfg.data.bandwidthWrite,
  });
}
