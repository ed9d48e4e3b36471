import { sqlitePath } from '../config/config';
import { ConfigError } from '../util/errors';
import { maskEngineUrl } from './pg-errors';
import { SqliteMetaStore } from './sqlite';
import type { MetaStore } from './types';

/** The metadata store for an engine URL (sqlite:////path or postgresql://...). */
export function createMetaStore(engine: string, opts: { poolSize?: number } = {}): MetaStore {
  const file = sqlitePath(engine);
  if (file) return new SqliteMetaStore(file);
  if (engine.startsWith('postgresql://')) {
    // Loaded only when used, so SQLite users never need pg's connection code.
    // eslint-disable-next-line @typescript-eslint/no-require-imports
    const { PostgresMetaStore } = require('./postgres') as typeof import('./postgres');
    return new PostgresMetaStore(engine, opts);
  }
  throw new ConfigError(`unsupported [MetaBackend] engine ${maskEngineUrl(engine)}`);
}
