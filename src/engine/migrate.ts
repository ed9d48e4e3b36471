import * as path from 'node:path';
import { createMetaStore } from '../meta/open';
import { maskEngineUrl } from '../meta/pg-errors';
import { COPIED_TABLES, openTables } from '../meta/pg-transfer';
import { BackyError, UsageError } from '../util/errors';
import { log } from '../util/log';
import { LOCKS, Repository } from './repository';

export interface MigrateResult {
  /** rows copied per table */
  rows: Record<string, number>;
  to: string;
}

/** The engine URL as the configuration would spell it: sqlite:////absolute/path or postgresql://... */
export function normaliseEngineUrl(url: string): string {
  const u = url.trim();
  if (/^postgres(ql)?(\+\w+)?:\/\//.test(u)) return u.replace(/^postgres(ql)?(\+\w+)?:/, 'postgresql:');
  if (u.startsWith('sqlite:///') && u.length > 'sqlite:///'.length) return `sqlite:///${path.resolve(u.slice('sqlite:///'.length))}`;
  throw new UsageError(`--to expects sqlite:////absolute/path or postgresql://user:password@host:port/db, got ${maskEngineUrl(u)}`);
}

/**
 * Copies the repository's metadata (settings, versions, tags, block maps, blobs, statistics; not locks) into
 * another, empty database, on the same or the other engine. Blobs in storage are not touched: ids, uids,
 * checksums and map chunks are copied unchanged, so every version restores identically from the copy.
 * The source is read in one snapshot while no backup, removal, scrub or cleanup runs; the destination is
 * written in one transaction, so an interrupted copy leaves it empty and the command can simply be rerun.
 */
export async function migrateMetadata(repo: Repository, to: string): Promise<MigrateResult> {
  const from = repo.cfg.metaEngine;
  const dest = normaliseEngineUrl(to);
  if (dest === from) throw new UsageError('--to names the engine this repository already uses');
  await repo.lock('db-migrate', 'db-migrate', [LOCKS.anyBackup, LOCKS.cleanup, LOCKS.fullCleanup, 'version:*']);

  const target = createMetaStore(dest, { poolSize: 1 });
  try {
    if (!(await target.initdb())) await target.open();
  } finally {
    await target.close();
  }

  const reader = openTables(from, 'read');
  const writer = openTables(dest, 'write');
  const rows: Record<string, number> = {};
  try {
    const there = await writer.contents();
    if (there) throw new BackyError(`destination ${maskEngineUrl(dest)} is not empty (${there}): db-migrate only copies into an empty database`);
    await writer.begin();
    for (const { name, order } of COPIED_TABLES) {
      rows[name] = 0;
      for await (const page of reader.rows(name, order)) {
        await writer.insert(name, page);
        rows[name] += page.length;
      }
    }
    await writer.setIdHighWater(await reader.idHighWater());
    await writer.commit();
  } finally {
    await reader.close();
    await writer.close();
  }
  log.info(`copied the metadata to ${maskEngineUrl(dest)}: ${rows.versions} versions, ${rows.block_maps} block map chunks, ` +
    `${rows.blobs} blobs, ${rows.tags} tags, ${rows.stats} statistics rows, ${rows.settings} settings. ` +
    `To use it, set [MetaBackend] engine = ${maskEngineUrl(dest)}`);
  return { rows, to: maskEngineUrl(dest) };
}
