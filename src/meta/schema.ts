/**
 * The relational schema, shared by SQLite and PostgreSQL. `{blob}` and `{autoid}` are replaced per engine
 * (BLOB/BYTEA, INTEGER PRIMARY KEY AUTOINCREMENT/BIGSERIAL). Ids are never reused: block maps refer to blobs
 * by id.
 */
export const SCHEMA_VERSION = 2;

export const SCHEMA_V1 = [
  `CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL)`,
  `CREATE TABLE versions (
    id {autoid},
    uid TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    snapshot_name TEXT NOT NULL DEFAULT '',
    date BIGINT NOT NULL,
    size BIGINT NOT NULL,
    block_size INTEGER NOT NULL,
    valid SMALLINT NOT NULL DEFAULT 0,
    complete SMALLINT NOT NULL DEFAULT 0,
    protected SMALLINT NOT NULL DEFAULT 0,
    expire BIGINT,
    base_uid TEXT
  )`,
  `CREATE INDEX versions_by_name ON versions (name, date)`,
  `CREATE TABLE tags (
    version_id BIGINT NOT NULL REFERENCES versions (id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    PRIMARY KEY (version_id, name)
  )`,
  `CREATE TABLE block_maps (
    version_id BIGINT NOT NULL REFERENCES versions (id) ON DELETE CASCADE,
    chunk INTEGER NOT NULL,
    data {blob} NOT NULL,
    PRIMARY KEY (version_id, chunk)
  )`,
  `CREATE TABLE blobs (
    id {autoid},
    uid TEXT NOT NULL UNIQUE,
    checksum {blob} NOT NULL,
    size INTEGER NOT NULL,
    stored_size INTEGER NOT NULL DEFAULT 0,
    state SMALLINT NOT NULL,
    owner TEXT,
    created BIGINT NOT NULL,
    unref_since BIGINT
  )`,
  // One live blob per checksum; a blob being deleted may coexist with its replacement.
  `CREATE UNIQUE INDEX blobs_by_checksum ON blobs (checksum) WHERE state <> 3`,
  `CREATE INDEX blobs_deleting ON blobs (id) WHERE state = 3`,
  `CREATE TABLE stats (
    id {autoid},
    date BIGINT NOT NULL,
    version_uid TEXT NOT NULL,
    version_name TEXT NOT NULL,
    version_size_bytes BIGINT NOT NULL,
    version_size_blocks BIGINT NOT NULL,
    bytes_read BIGINT NOT NULL,
    blocks_read BIGINT NOT NULL,
    bytes_written BIGINT NOT NULL,
    blocks_written BIGINT NOT NULL,
    bytes_dedup BIGINT NOT NULL,
    blocks_dedup BIGINT NOT NULL,
    bytes_sparse BIGINT NOT NULL,
    blocks_sparse BIGINT NOT NULL,
    duration_seconds DOUBLE PRECISION NOT NULL
  )`,
  `CREATE INDEX stats_by_uid ON stats (version_uid)`,
  `CREATE TABLE locks (
    name TEXT PRIMARY KEY,
    session TEXT NOT NULL,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    pid_start TEXT NOT NULL,
    what TEXT NOT NULL,
    since BIGINT NOT NULL
  )`,
];

/** Later schema versions: MIGRATIONS[n] takes the schema from version n+1 to n+2. */
export const MIGRATIONS: string[][] = [
  // 2: each complete version's block map as counts of distinct chunk contents (map-summary.ts), for du.
  [`CREATE TABLE map_summaries (
    version_id BIGINT PRIMARY KEY REFERENCES versions (id) ON DELETE CASCADE,
    data {blob} NOT NULL
  )`],
];

/** A statement of SCHEMA_V1 or MIGRATIONS with the engine's types in place of `{autoid}` and `{blob}`. */
export function engineDdl(statement: string, engine: 'sqlite' | 'postgresql'): string {
  return engine === 'sqlite'
    ? statement.replace(/\{autoid\}/g, 'INTEGER PRIMARY KEY AUTOINCREMENT').replace(/\{blob\}/g, 'BLOB')
    : statement.replace(/\{autoid\}/g, 'BIGSERIAL PRIMARY KEY').replace(/\{blob\}/g, 'BYTEA');
}

/** What initdb creates: the first schema and every migration, in order. */
export const SCHEMA_ALL = [...SCHEMA_V1, ...MIGRATIONS.flat()];
