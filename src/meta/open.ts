import { sqlitePath } from '../config/config';
import { ConfigError } from '../util/errors';
import { maskEngineUrl } from './pg-errors';
import type { MetaStore } from './types';

/** The metadata store for an engine URL (sqlite:////path or postgresql://...). */
export function createMetaStore(engine: string, opts: { poolSize?: number } = {}): MetaStore {
  const file = sqlitePath(engine);
  if (file) {
    // Each engine's code is loaded only when used: SQLite users never need pg's, PostgreSQL users never load
    // SQLite's native module (either costs a command's start tens of milliseconds).
    // eslint-disable-next-line @typescript-eslint/no-require-imports
    const { SqliteMetaStore } = require('./sqlite') as typeof import('./sqlite');
    return new SqliteMetaStore(file);
  }
  if (engine.startsWith('postgresql://')) {
    // eslint-disable-next-line @typescript-eslint/no-require-imports
    const { PostgresMetaStore } = require('./postgres') as typeof import('./postgres');
    return new PostgresMetaStore(engine, opts);
  }
  throw new ConfigError(`unsupported [MetaBackend] engine ${maskEngineUrl(engine)}`);
}
