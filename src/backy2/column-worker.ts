import { parentPort, workerData } from 'node:worker_threads';
import Database from 'better-sqlite3';

/** The worker of block-column.ts: its own read-only connection, one scan per request, rows sent back as bytes. */
if (parentPort) {
  const port = parentPort;
  const { file, sql } = workerData as { file: string; sql: string };
  let st: Database.Statement | undefined;
  let openError: string | undefined;
  try {
    const db = new Database(file, { readonly: true, fileMustExist: true });
    db.defaultSafeIntegers(false);
    // Not memory-mapped: a page fault per 4 KiB page costs more than SQLite's read into its small cache (on the
    // benchmark's 13 GiB database, 47 s and 2.5 GiB RSS mapped vs 37 s and 0.5 GiB read).
    db.pragma('mmap_size = 0');
    st = db.prepare(sql);
  } catch (e) {
    openError = (e as Error).message;
  }
  port.on('message', (m: { id: number; uid: string }) => {
    if (!st) {
      port.postMessage({ id: m.id, error: openError });
      return;
    }
    try {
      const r = st.get(m.uid) as Record<string, unknown>;
      const rows = typeof r.rows === 'string' ? Buffer.from(r.rows, 'latin1') : Buffer.isBuffer(r.rows) ? r.rows : undefined;
      // Handed over, not copied, when the buffer is all its memory (better-sqlite3's blobs are).
      const whole = rows && rows.byteOffset === 0 && rows.length === rows.buffer.byteLength;
      const ab = rows ? (whole ? rows.buffer : rows.buffer.slice(rows.byteOffset, rows.byteOffset + rows.length)) : undefined;
      port.postMessage({ id: m.id, scan: { ...r, rows: ab ?? null } }, ab ? [ab as ArrayBuffer] : []);
    } catch (e) {
      port.postMessage({ id: m.id, error: (e as Error).message });
    }
  });
}
