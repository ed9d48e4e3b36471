/**
 * The statements undoing schema 3 (foreign blob formats, metadata in storage: src/meta/schema.ts), so a test
 * can turn a current database back into an older schema and watch the migrations run again.
 */
export function undoSchema3(engine: 'sqlite' | 'postgresql'): string[] {
  const common = [
    `DROP TABLE block_dates`,
    `DROP TABLE meta_removed`,
    `DROP INDEX blobs_foreign_by_checksum`,
    `DROP INDEX blobs_by_meta_pack`,
    `DROP INDEX versions_meta_dirty`,
    `DROP INDEX blobs_by_checksum`,
    `ALTER TABLE blobs DROP COLUMN format`,
    `ALTER TABLE blobs DROP COLUMN key_info`,
    `ALTER TABLE blobs DROP COLUMN meta_pack`,
    `ALTER TABLE blobs DROP COLUMN meta_index`,
    `ALTER TABLE versions DROP COLUMN meta_gen`,
    `ALTER TABLE versions DROP COLUMN meta_synced`,
    `CREATE UNIQUE INDEX blobs_by_checksum ON blobs (checksum) WHERE state <> 3`,
  ];
  const triggers = engine === 'sqlite'
    ? ['versions_meta_changed', 'tags_added', 'tags_removed', 'versions_removed'].map((t) => `DROP TRIGGER ${t}`)
    : [`DROP TRIGGER versions_meta_changed ON versions`, `DROP TRIGGER tags_changed ON tags`, `DROP TRIGGER versions_removed ON versions`,
      `DROP FUNCTION backy_version_changed`, `DROP FUNCTION backy_tags_changed`, `DROP FUNCTION backy_version_removed`];
  return [...triggers, ...common];
}
