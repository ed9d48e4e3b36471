import type { Config } from '../config/config';
import { FileStore } from './file';
import { LimitedStore } from './limited';
import type { BlobStore } from './types';

/** The data backend of the configuration, wrapped with its concurrency and bandwidth limits. */
export function createBlobStore(cfg: Config): BlobStore {
  let inner: BlobStore;
  if (cfg.data.type === 'file') inner = new FileStore(cfg.data.path, cfg.data.fsync);
  else {
    // Loaded only when used: file-backend users never load the AWS SDK.
    // eslint-disable-next-line @typescript-eslint/no-require-imports
    const { S3Store } = require('./s3') as typeof import('./s3');
    inner = new S3Store(cfg.data.s3, { reads: cfg.data.simultaneousReads, writes: cfg.data.simultaneousWrites });
  }
  return new LimitedStore(inner, {
    reads: cfg.data.simultaneousReads,
    writes: cfg.data.simultaneousWrites,
    bandwidthRead: cfg.data.bandwidthRead,
    bandwidthWrite: cfg.data.bandwidthWrite,
  });
}
