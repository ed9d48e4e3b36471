/**
 * The relational schema, shared by SQLite and PostgreSQL. `{blob}` and `{autoid}` are replaced per engine
 * (BLOB/BYTEA, INTEGER PRIMARY KEY AUTOINCREMENT/BIGSERIAL). Ids are never reused: block maps refer to blobs
 * by id.
 */

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

/** A migration statement: the same SQL for both engines, or statements per engine (triggers differ). */
export type MigrationStep = string | { sqlite: string[]; postgresql: string[] };

/** Later schema versions: MIGRATIONS[n] takes the schema from version n+1 to n+2. */
export const MIGRATIONS: MigrationStep[][] = [
  // 2: each complete version's block map as counts of distinct chunk contents (map-summary.ts), for du.
  [`CREATE TABLE map_summaries (
    version_id BIGINT PRIMARY KEY REFERENCES versions (id) ON DELETE CASCADE,
    data {blob} NOT NULL
  )`],
  // 3: blobs in foreign formats (backy2's, read in place after an import), several of which may hold the
  // same content (backy2's writers raced); backy2's per-block dates of imported versions (for byte-exact
  // exports); and what the metadata in storage needs: a generation per version, bumped by triggers whenever
  // anything its object holds changes, the uids of removed versions whose objects must go, and the pack
  // holding each blob's details.
  [
    `ALTER TABLE blobs ADD COLUMN format SMALLINT NOT NULL DEFAULT 0`,
    `ALTER TABLE blobs ADD COLUMN key_info {blob}`,
    `DROP INDEX blobs_by_checksum`,
    `CREATE UNIQUE INDEX blobs_by_checksum ON blobs (checksum) WHERE state <> 3 AND format = 0`,
    `CREATE INDEX blobs_foreign_by_checksum ON blobs (checksum) WHERE format <> 0`,
    `CREATE TABLE block_dates (
      version_id BIGINT PRIMARY KEY REFERENCES versions (id) ON DELETE CASCADE,
      data {blob} NOT NULL
    )`,
    `ALTER TABLE versions ADD COLUMN meta_gen BIGINT NOT NULL DEFAULT 1`,
    `ALTER TABLE versions ADD COLUMN meta_synced BIGINT NOT NULL DEFAULT 0`,
    `CREATE INDEX versions_meta_dirty ON versions (id) WHERE meta_gen <> meta_synced`,
    `CREATE TABLE meta_removed (uid TEXT PRIMARY KEY)`,
    // Which metadata pack in storage holds a blob's details (uid, checksum, size, format, key), and where.
    `ALTER TABLE blobs ADD COLUMN meta_pack TEXT`,
    `ALTER TABLE blobs ADD COLUMN meta_index INTEGER`,
    `CREATE INDEX blobs_by_meta_pack ON blobs (meta_pack) WHERE meta_pack IS NOT NULL`,
    {
      sqlite: [
        `CREATE TRIGGER versions_meta_changed AFTER UPDATE ON versions
          WHEN OLD.name IS NOT NEW.name OR OLD.snapshot_name IS NOT NEW.snapshot_name OR OLD.date IS NOT NEW.date
            OR OLD.size IS NOT NEW.size OR OLD.valid IS NOT NEW.valid OR OLD.complete IS NOT NEW.complete
            OR OLD.protected IS NOT NEW.protected OR OLD.expire IS NOT NEW.expire
          BEGIN UPDATE versions SET meta_gen = meta_gen + 1 WHERE id = NEW.id; END`,
        `CREATE TRIGGER tags_added AFTER INSERT ON tags
          BEGIN UPDATE versions SET meta_gen = meta_gen + 1 WHERE id = NEW.version_id; END`,
        `CREATE TRIGGER tags_removed AFTER DELETE ON tags
          BEGIN UPDATE versions SET meta_gen = meta_gen + 1 WHERE id = OLD.version_id; END`,
        `CREATE TRIGGER versions_removed AFTER DELETE ON versions
          BEGIN INSERT OR IGNORE INTO meta_removed (uid) VALUES (OLD.uid); END`,
      ],
      postgresql: [
        `CREATE FUNCTION backy_version_changed() RETURNS trigger LANGUAGE plpgsql AS $$
          BEGIN NEW.meta_gen := OLD.meta_gen + 1; RETURN NEW; END $$`,
        `CREATE TRIGGER versions_meta_changed BEFORE UPDATE ON versions FOR EACH ROW
          WHEN (OLD.name IS DISTINCT FROM NEW.name OR OLD.snapshot_name IS DISTINCT FROM NEW.snapshot_name
            OR OLD.date IS DISTINCT FROM NEW.date OR OLD.size IS DISTINCT FROM NEW.size
            OR OLD.valid IS DISTINCT FROM NEW.valid OR OLD.complete IS DISTINCT FROM NEW.complete
            OR OLD.protected IS DISTINCT FROM NEW.protected OR OLD.expire IS DISTINCT FROM NEW.expire)
          EXECUTE FUNCTION backy_version_changed()`,
        `CREATE FUNCTION backy_tags_changed() RETURNS trigger LANGUAGE plpgsql AS $$
          BEGIN
            UPDATE versions SET meta_gen = meta_gen + 1
              WHERE id = CASE WHEN TG_OP = 'DELETE' THEN OLD.version_id ELSE NEW.version_id END;
            RETURN NULL;
          END $$`,
        `CREATE TRIGGER tags_changed AFTER INSERT OR DELETE ON tags FOR EACH ROW EXECUTE FUNCTION backy_tags_changed()`,
        `CREATE FUNCTION backy_version_removed() RETURNS trigger LANGUAGE plpgsql AS $$
          BEGIN INSERT INTO meta_removed (uid) VALUES (OLD.uid) ON CONFLICT DO NOTHING; RETURN NULL; END $$`,
        `CREATE TRIGGER versions_removed AFTER DELETE ON versions FOR EACH ROW EXECUTE FUNCTION backy_version_removed()`,
      ],
    },
  ],
  // 4: SQLite: what du reads of every blob (id, size, stored size) as a covering index, a fraction of the table
  // to scan (that scan was most of du on 400,000 blobs). PostgreSQL reads them on a connection of its own,
  // beside the summaries; an index-only scan there would also depend on the visibility map, so nothing changes.
  [{ sqlite: [`CREATE INDEX blobs_sizes ON blobs (id, size, stored_size, state) WHERE state <> 3`], postgresql: [] }],
];

export const SCHEMA_VERSION = 1 + MIGRATIONS.length;

/** A statement of SCHEMA_V1 or MIGRATIONS with the engine's types in place of `{autoid}` and `{blob}`. */
export function engineDdl(statement: string, engine: 'sqlite' | 'postgresql'): string {
  return engine === 'sqlite'
    ? statement.replace(/\{autoid\}/g, 'INTEGER PRIMARY KEY AUTOINCREMENT').replace(/\{blob\}/g, 'BLOB')
    : statement.replace(/\{autoid\}/g, 'BIGSERIAL PRIMARY KEY').replace(/\{blob\}/g, 'BYTEA');
}

/** The statements of a schema step for one engine, types in place. */
export function engineSql(step: MigrationStep, engine: 'sqlite' | 'postgresql'): string[] {
  return (typeof step === 'string' ? [step] : step[engine]).map((sql) => engineDdl(sql, engine));
}

/** What initdb creates: the first schema and every migration, in order. */
export function fullSchema(engine: 'sqlite' | 'postgresql'): string[] {
  return [...SCHEMA_V1, ...MIGRATIONS.flat()].flatMap((s) => engineSql(s, engine));
}

/** The statements taking a database from schema version `from` to SCHEMA_VERSION. */
export function migrationsFrom(from: number, engine: 'sqlite' | 'postgresql'): string[] {
  return MIGRATIONS.slice(Math.max(0, from - 1)).flat().flatMap((s) => engineSql(s, engine));
}
