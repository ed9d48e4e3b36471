import { fmtDate } from '../cli/output';
import type { VersionRow } from '../meta/types';
import { escapeName } from './escape';

/** The small read-only files next to each image, one value per file, newline-terminated (for `cat` and scripts). */
export const INFO_FILES = ['uid', 'name', 'snapshot', 'date', 'tags', 'valid'] as const;
export type InfoFile = (typeof INFO_FILES)[number];

export function isInfoFile(name: string): name is InfoFile {
  return (INFO_FILES as readonly string[]).includes(name);
}

export function infoContent(v: VersionRow, file: InfoFile): Buffer {
  const value = {
    uid: v.uid,
    name: v.name,
    snapshot: v.snapshotName,
    date: fmtDate(v.date),
    tags: v.tags.join(','),
    // 1/0 as `backy ls -m` prints it.
    valid: v.valid ? '1' : '0',
  }[file];
  return Buffer.from(`${value}\n`, 'utf8');
}

/** The image file's name in a version directory. */
export function imageFileName(v: VersionRow): string {
  return escapeName(v.name, '.img');
}
