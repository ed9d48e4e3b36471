import { createHash, randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { run } from './fuse-mount';

/**
 * Disk images with real filesystems for file-level recovery tests, built without root: mke2fs -d fills an
 * ext4 filesystem from a directory, `-E offset=` places it inside a disk image, and the MBR is written here.
 */

/** A directory tree of `count` small files: text and binary, nested, some with spaces in their names. */
export function makeSourceTree(dir: string, count: number, seed = 1): void {
  let x = seed;
  const next = () => (x = (x * 1103515245 + 12345) >>> 0);
  for (let i = 0; i < count; i++) {
    const sub = path.join(dir, `d${i % 7}`, i % 3 ? `sub ${i % 5}` : '');
    fs.mkdirSync(sub, { recursive: true });
    const size = next() % 20_000;
    const body = i % 2 ? randomBytes(size) : Buffer.from(`file ${i}\n`.repeat(Math.ceil(size / 8) + 1));
    fs.writeFileSync(path.join(sub, i % 4 ? `f${i}.bin` : `note ${i}.txt`), body);
  }
  fs.writeFileSync(path.join(dir, 'empty'), '');
}

/** sha256 of every regular file under `dir`, by path relative to it. */
export function hashTree(dir: string): Map<string, string> {
  const out = new Map<string, string>();
  for (const e of fs.readdirSync(dir, { recursive: true, withFileTypes: true })) {
    if (!e.isFile()) continue;
    const full = path.join(e.parentPath, e.name);
    out.set(path.relative(dir, full), createHash('sha256').update(fs.readFileSync(full)).digest('hex'));
  }
  return out;
}

/** Parses `sha256sum` output (run with relative paths) into the same map. */
export function parseSha256sum(text: string): Map<string, string> {
  const out = new Map<string, string>();
  for (const line of text.split('\n')) {
    const m = /^([0-9a-f]{64}) [ *](.*)$/.exec(line);
    if (m) out.set(m[2].replace(/^\.\//, ''), m[1]);
  }
  return out;
}

/** An ext4 filesystem of `bytes` filled from `src`, written into `image` at `offset` (file created or grown). */
export async function mkext4(image: string, src: string, bytes: number, offset = 0, label = 'backy-test'): Promise<void> {
  if (!fs.existsSync(image)) fs.writeFileSync(image, '');
  if (fs.statSync(image).size < offset + bytes) fs.truncateSync(image, offset + bytes);
  const args = ['-q', '-F', '-t', 'ext4', '-L', label, '-d', src, ...(offset ? ['-E', `offset=${offset}`] : []), image, `${bytes / 1024}k`];
  const r = await run('mke2fs', args);
  if (r.code !== 0) throw new Error(`mke2fs ${args.join(' ')}: ${r.stderr}`);
}

export interface MbrPartition {
  startSector: number;
  sectors: number;
  type: number;
}

/** Writes a classic MBR partition table (LBA only; Linux ignores the CHS fields). */
export function writeMbr(image: string, parts: MbrPartition[]): void {
  const mbr = Buffer.alloc(512);
  mbr.writeUInt32LE(0x0badcafe, 440); // disk signature
  parts.forEach((p, i) => {
    const e = 446 + 16 * i;
    mbr[e + 4] = p.type;
    mbr.writeUInt32LE(p.startSector, e + 8);
    mbr.writeUInt32LE(p.sectors, e + 12);
  });
  mbr[510] = 0x55;
  mbr[511] = 0xaa;
  const fd = fs.openSync(image, 'r+');
  try {
    fs.writeSync(fd, mbr, 0, 512, 0);
  } finally {
    fs.closeSync(fd);
  }
}
