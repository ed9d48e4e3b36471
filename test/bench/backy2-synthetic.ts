import * as fs from 'node:fs';
import * as path from 'node:path';
import { createCipheriv, createHash } from 'node:crypto';
import Database from 'better-sqlite3';
import { FIXTURES } from '../helpers/backy2-fixture';

/**
 * A backy2 2.13 repository's metadata as backy2 would have written it for `versions` daily backups of one
 * image of `blocks` 4 MiB blocks (SQLite, the fixture's own schema, one row per block per version): a tenth of
 * the blocks sparse, each version changing `changed` blocks of the one before (so versions share blobs),
 * blobs encrypted (version 1) with data keys really wrapped with `keyHex`, and block rows dated as a backup
 * writing 25 blocks a second would date them. No blob is written: an import in place reads none.
 * Made once and kept (it takes a few minutes and gigabytes); `file` is returned.
 */
export function syntheticBacky2(dir: string, opts: { versions: number; blocks: number; changed: number; keyHex: string }): string {
  const file = path.join(dir, `backy2-${opts.versions}x${opts.blocks}-${opts.changed}.sqlite`);
  if (fs.existsSync(file)) return file;
  fs.mkdirSync(dir, { recursive: true });
  const tmp = `${file}.tmp`;
  fs.rmSync(tmp, { force: true });
  const db = new Database(tmp);
  db.pragma('journal_mode = OFF');
  db.pragma('synchronous = OFF');
  const fixture = new Database(path.join(FIXTURES, 'R1/backy.sqlite'), { readonly: true });
  const ddl = (fixture.prepare(`SELECT sql FROM sqlite_master WHERE sql IS NOT NULL`).all() as { sql: string }[]).map((r) => r.sql);
  fixture.close();
  // Tables first, indexes after the rows (much faster), as a long-lived backy2 database would have them.
  for (const s of ddl.filter((x) => x.startsWith('CREATE TABLE'))) db.exec(s);
  db.prepare(`INSERT INTO alembic_version VALUES ('30349b678801')`).run();
  const master = Buffer.from(opts.keyHex, 'hex');
  const BASE57 = '23456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz';
  let serial = 0;
  type Blob = { uid: string; checksum: string; envkey: string; nonce: string };
  const newBlob = (): Blob => {
    const n = ++serial;
    const h = createHash('sha512').update(`blob ${n}`).digest();
    let s = '';
    for (let i = 0; i < 22; i++) s += BASE57[h[i] % 57];
    const uid = createHash('md5').update(s).digest('hex').slice(0, 10) + s;
    const w = createCipheriv('id-aes256-wrap', master, Buffer.from('A6A6A6A6A6A6A6A6', 'hex'));
    const envkey = Buffer.concat([w.update(h.subarray(0, 32)), w.final()]).toString('hex');
    return { uid, checksum: h.toString('hex'), envkey, nonce: h.subarray(32, 48).toString('hex') };
  };
  const current: (Blob | null)[] = Array.from({ length: opts.blocks }, (_, i) => (i % 10 === 9 ? null : newBlob()));
  const insVersion = db.prepare(`INSERT INTO versions (uid, date, expire, name, snapshot_name, size, size_bytes, valid, protected) VALUES (?, ?, ?, 'vm', ?, ?, ?, 1, 0)`);
  const insTag = db.prepare(`INSERT INTO tags (version_uid, name) VALUES (?, ?)`);
  const insBlock = db.prepare(`INSERT INTO blocks (uid, version_uid, id, date, checksum, size, valid, enc_version, enc_envkey, enc_nonce) VALUES (?, ?, ?, ?, ?, 4194304, 1, ?, ?, ?)`);
  const fmt = (ms: number) => new Date(ms).toISOString().replace('T', ' ').replace('Z', '000');
  const day0 = Date.UTC(2023, 0, 1, 2, 0, 0);
  let pick = 1;
  for (let v = 0; v < opts.versions; v++) {
    db.transaction(() => {
      if (v > 0) {
        for (let k = 0; k < opts.changed; k++) {
          pick = (pick * 1103515245 + 12345) % 2147483648;
          const i = pick % opts.blocks;
          if (current[i]) current[i] = newBlob();
        }
      }
      const uid = createHash('md5').update(`version ${v}`).digest('hex').replace(/^(.{8})(.{4})(.{4})(.{4})(.{12})$/, '$1-$2-$3-$4-$5');
      const date = day0 + v * 86_400_000;
      insVersion.run(uid, fmt(date), fmt(date + 30 * 86_400_000), `snap-${v}`, opts.blocks, opts.blocks * 4194304);
      insTag.run(uid, 'b_daily');
      if (v % 7 === 0) insTag.run(uid, 'b_weekly');
      for (let i = 0; i < opts.blocks; i++) {
        const b = current[i];
        const at = fmt(date + 50 + Math.floor(i / 25) * 1000 + (i % 25) * 40);
        if (b) insBlock.run(b.uid, uid, i, at, b.checksum, 1, b.envkey, b.nonce);
        else insBlock.run(null, uid, i, at, null, 0, null, null);
      }
    })();
  }
  for (const s of ddl.filter((x) => x.startsWith('CREATE INDEX'))) db.exec(s);
  db.close();
  fs.renameSync(tmp, file);
  return file;
}
