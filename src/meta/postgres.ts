import { DatabaseError } from '../util/errors';
import type { MetaStore } from './types';

/** Placeholder until the PostgreSQL store lands: a clear error instead of a crash. */
export class PostgresMetaStore {
  constructor(engine: string, _opts: { poolSize?: number }) {
    void engine;
    throw new DatabaseError('the PostgreSQL metadata backend is not available in this build');
  }
}
export const asMetaStore = (s: PostgresMetaStore): MetaStore => s as unknown as MetaStore;
