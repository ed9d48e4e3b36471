import { csvRows } from '../backy2/csv';
import { BACKY_SIGNATURE } from '../backy2/dump';
import { parseBacky2Date } from '../backy2/layout';
import { makeKeyInfo, unwrapDataKey } from '../codec/backy2-blob';
import { digestLength } from '../codec/hashes';
import { encodeBlockDates } from '../meta/block-dates';
import { blockCount } from '../meta/block-map';
import { BlobFormat, IMPORT_HOLE, IMPORT_PENDING, ImportBlob, ImportVersion } from '../meta/types';
import { isBacky2Uid } from '../storage/blob-keys';
import { BackyError, ExitCode, WrongKeyError } from '../util/errors';
import { log } from '../util/log';
import type { Repository } from './repository';
import { entriesOf } from '../meta/version-record';

/** The column counts of backy2's dump formats: version line, block lines. */
const BACKY2_FORMATS: Record<string, { version: number; block: number }> = {
  'backy2 Version 2.1 metadata dump': { version: 6, block: 7 },
  'backy2 Version 2.2 metadata dump': { version: 8, block: 7 },
  'backy2 Version 2.10 metadata dump': { version: 9, block: 7 },
  'backy2 Version 2.12 metadata dump': { version: 9, block: 10 },
};

class DumpError extends BackyError {
  constructor(message: string) { super(message, ExitCode.IMPORT_VALUE); }
}

export interface DumpImportOptions {
  /** the key backy2's data keys in the dump are wrapped with, when it is not this repository's */
  backy2Key?: Buffer;
}

/**
 * `import FILE`: adds the version of a metadata dump, backy2's (formats 2.1 to 2.12) or backy's own. Like
 * backy2's import it does not look into storage: the blobs are expected where the repository keeps them (a
 * dump of an imported backy2 repository, or of this repository). A version that exists is refused (exit 22),
 * an unknown format too (exit 23). backy2's data keys are re-wrapped with this repository's key.
 */
export async function importDump(repo: Repository, text: string, opts: DumpImportOptions = {}): Promise<{ uid: string; valid: boolean }> {
  const rows = csvRows(text.replace(/^\uFEFF/, ''));
  let lineNo = 1;
  const next = (): string[] | undefined => {
    const r = rows.next();
    lineNo++;
    return r.done ? undefined : r.value;
  };
  let sig: string[] | undefined;
  try {
    sig = rows.next().value ?? undefined;
  } catch (e) {
    throw new DumpError(`not a metadata dump: ${(e as Error).message}`);
  }
  const signature = sig?.[0] ?? '';
  const parsed = signature === BACKY_SIGNATURE ? parseBacky(next, lineNo) : BACKY2_FORMATS[signature] ? parseBacky2(next, BACKY2_FORMATS[signature], repo, opts) : undefined;
  if (!parsed) throw new DumpError(`unknown dump signature "${signature.slice(0, 60)}": backy imports backy2's dumps (2.1 to 2.12) and its own`);
  const p = await guard(() => parsed, () => lineNo);
  if (await repo.meta.getVersion(p.version.uid)) {
    throw new BackyError(`version ${p.version.uid} already exists and cannot be imported`, ExitCode.IMPORT_KEY);
  }
  const sumLen = (digestLength(repo.cfg.hashFunction) ?? 0);
  if (p.blobs.some((b) => b.checksum.length !== sumLen)) throw new DumpError(`the dump's checksums are not ${repo.cfg.hashFunction} checksums, this repository's hash function`);
  await repo.meta.importVersion(p.version, entriesOf(p.map), p.blobs, { blockDates: p.blockDates });
  if (!p.version.valid) log.warn(`version ${p.version.uid} imported as invalid`);
  log.info(`imported version ${p.version.uid} (${p.version.name}) from a ${signature.startsWith('backy2') ? 'backy2' : 'backy'} dump`);
  return { uid: p.version.uid, valid: p.version.valid };
}

interface Parsed {
  version: ImportVersion;
  blobs: ImportBlob[];
  map: Int32Array;
  blockDates?: Buffer;
}

async function guard<T>(fn: () => Promise<T>, line: () => number): Promise<T> {
  try {
    return await fn();
  } catch (e) {
    if (e instanceof BackyError) throw e;
    throw new DumpError(`malformed dump near line ${line()}: ${(e as Error).message}`);
  }
}

function int(text: string, what: string): number {
  if (!/^-?\d+$/.test(text)) throw new Error(`${what} "${text.slice(0, 40)}" is not a number`);
  return Number(text);
}

function hexOf(text: string, bytes: number, what: string): Buffer {
  if (text.length !== bytes * 2 || !/^[0-9a-fA-F]*$/.test(text)) throw new Error(`${what} is not ${bytes} bytes of hex`);
  return Buffer.from(text, 'hex');
}

/** Blocks collected in order, with a blob table of first use. */
class MapBuilder {
  readonly blobs: ImportBlob[] = [];
  private index = new Map<string, number>();
  readonly map: Int32Array;

  constructor(readonly blocks: number) {
    this.map = new Int32Array(blocks).fill(IMPORT_PENDING);
  }

  put(id: number, blob: ImportBlob | undefined): void {
    if (!Number.isInteger(id) || id < 0 || id >= this.blocks) throw new Error(`block id ${id} is outside the version`);
    if (!blob) {
      this.map[id] = IMPORT_HOLE;
      return;
    }
    let k = this.index.get(blob.uid);
    if (k === undefined) {
      k = this.blobs.length;
      this.index.set(blob.uid, k);
      this.blobs.push(blob);
    } else if (blob.bad) this.blobs[k].bad = true;
    this.map[id] = k;
  }
}

async function parseBacky2(next: () => string[] | undefined, cols: { version: number; block: number }, repo: Repository, opts: DumpImportOptions): Promise<Parsed> {
  const vr = next();
  if (!vr || vr.length !== cols.version) throw new Error(`the version line has ${vr?.length ?? 0} fields, expected ${cols.version}`);
  const has = cols.version >= 8;
  const [uid, date, name] = vr;
  const snapshotName = has ? vr[3] : '';
  const at = has ? 4 : 3;
  const blocks = int(vr[at], 'size');
  const sizeBytes = int(vr[at + 1], 'size_bytes');
  const valid = vr[at + 2] === '1';
  const prot = has && vr[at + 3] === '1';
  const expire = cols.version >= 9 && vr[8] ? parseBacky2Date(vr[8]) : null;
  if (!/^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$/.test(uid)) throw new Error(`version uid "${uid.slice(0, 40)}" is not usable`);

  const raw: string[][] = [];
  for (let r = next(); r; r = next()) {
    if (r.length !== cols.block) throw new Error(`a block line has ${r.length} fields, expected ${cols.block}`);
    if (r[1] !== uid) throw new Error(`a block line of version ${r[1].slice(0, 40)} in the dump of ${uid}`);
    raw.push(r);
  }
  // The dump does not say the block size: a full block does, else the configuration.
  const sizes = raw.map((r) => int(r[5] || '0', 'block size'));
  const blockSize = blocks > 1 ? Math.max(...sizes, 0) || repo.cfg.blockSize : repo.cfg.blockSize;
  if (blockCount(sizeBytes, blockSize) !== blocks) throw new Error(`${blocks} blocks of ${blockSize} bytes do not make ${sizeBytes} bytes`);

  const key = repo.cfg.encryptionKey;
  const b2key = opts.backy2Key ?? key;
  const sumLen = (digestLength(repo.cfg.hashFunction) ?? 0);
  const mb = new MapBuilder(blocks);
  const dates = new Float64Array(blocks).fill(NaN);
  let kek: number | undefined;
  const date0 = parseBacky2Date(date);
  for (const r of raw) {
    const [buid, , idText, bdate, checksum, sizeText, validText] = r;
    const id = int(idText, 'block id');
    const bd = parseBacky2Date(bdate);
    if (id >= 0 && id < blocks) dates[id] = bd;
    if (!buid) {
      mb.put(id, undefined);
      continue;
    }
    if (!isBacky2Uid(buid)) throw new Error(`block ${id} names blob "${buid.slice(0, 40)}", not a backy2 blob uid`);
    const size = int(sizeText, 'block size');
    if (size !== Math.min(blockSize, sizeBytes - id * blockSize)) throw new Error(`block ${id} has size ${size}`);
    const enc = cols.block >= 10 ? int(r[7] || '0', 'enc_version') : 0;
    let format = BlobFormat.Backy2Plain;
    let keyInfo: Buffer | null = null;
    if (enc === 1) {
      format = BlobFormat.Backy2Aes;
      if (!key || !b2key) throw new BackyError('the dump has encrypted blocks but this repository has no encryption_key', ExitCode.CONFIG);
      const wrapped = hexOf(r[8], 40, `the data key of block ${id}`);
      if (kek === undefined) {
        // The first encrypted block proves the key, before anything is added.
        try {
          unwrapDataKey(b2key, wrapped);
        } catch {
          throw new WrongKeyError(`the data keys in this dump are not wrapped with ${opts.backy2Key ? 'the given backy2 key' : 'this repository\'s key'} (block ${id}); give backy2's configuration with --backy2-config`);
        }
        kek = await repo.registerKek(b2key);
      }
      const nonce = r[9] && r[9] !== '\\x' ? hexOf(r[9], 16, `the nonce of block ${id}`) : undefined;
      keyInfo = makeKeyInfo(kek, wrapped, nonce);
    } else if (enc !== 0) {
      throw new Error(`block ${id} has encryption version ${enc}`);
    }
    mb.put(id, { uid: buid, checksum: hexOf(checksum, sumLen, `the checksum of block ${id}`), size, format, keyInfo, storedSize: 0, bad: validText !== '1' });
  }
  const complete = raw.length === blocks;
  const version: ImportVersion = {
    uid, name, snapshotName, date: date0, size: sizeBytes, blockSize, expire, baseUid: null, tags: [],
    valid: valid && complete && !mb.blobs.some((b) => b.bad), complete, protected: prot,
  };
  return { version, blobs: mb.blobs, map: mb.map, blockDates: encodeBlockDates(date0, dates) };
}

async function parseBacky(next: () => string[] | undefined, _line: number): Promise<Parsed> {
  const vr = next();
  if (!vr || vr.length !== 12) throw new Error(`the version line has ${vr?.length ?? 0} fields, expected 12`);
  const [uid, date, name, snapshotName, sizeText, bsText, valid, complete, prot, expire, baseUid, tags] = vr;
  if (!/^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$/.test(uid)) throw new Error(`version uid "${uid.slice(0, 40)}" is not usable`);
  const size = int(sizeText, 'size');
  const blockSize = int(bsText, 'block size');
  const blocks = blockCount(size, blockSize);
  const mb = new MapBuilder(blocks);
  for (let r = next(); r; r = next()) {
    if (r.length !== 6) throw new Error(`a block line has ${r.length} fields, expected 6`);
    const [buid, idText, checksum, bsize, formatText, keyHex] = r;
    const id = int(idText, 'block id');
    if (!buid) {
      mb.put(id, undefined);
      continue;
    }
    const format = int(formatText, 'format') as BlobFormat;
    const ok = format === BlobFormat.Backy ? /^[0-9a-f]{32}$/.test(buid) : (format === BlobFormat.Backy2Plain || format === BlobFormat.Backy2Aes) && isBacky2Uid(buid);
    if (!ok) throw new Error(`block ${id}: blob "${buid.slice(0, 40)}" of format ${format} is not valid`);
    if (!/^[0-9a-fA-F]*$/.test(keyHex) || !/^[0-9a-fA-F]+$/.test(checksum)) throw new Error(`block ${id}: malformed hex`);
    mb.put(id, { uid: buid, checksum: Buffer.from(checksum, 'hex'), size: int(bsize, 'block size'), format, keyInfo: keyHex ? Buffer.from(keyHex, 'hex') : null, storedSize: 0, bad: false });
  }
  const version: ImportVersion = {
    uid, name, snapshotName, date: int(date, 'date'), size, blockSize, expire: expire ? int(expire, 'expire') : null,
    baseUid: baseUid || null, tags: tags ? tags.split(',') : [], valid: valid === '1', complete: complete === '1', protected: prot === '1',
  };
  if (mb.map.includes(IMPORT_PENDING) && version.complete) version.valid = false;
  return { version, blobs: mb.blobs, map: mb.map };
}
