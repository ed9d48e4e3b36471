import type { VersionRow } from '../meta/types';
import { imageFileName, infoContent, INFO_FILES, isInfoFile } from './info-files';
import type { VersionList } from './version-list';

/** What a path of the mount is. Everything is read-only; directories list their entries on demand. */
export type Node =
  | { kind: 'dir'; mtime: number; list(): Promise<string[]> }
  | { kind: 'image'; version: VersionRow }
  | { kind: 'info'; content: Buffer; mtime: number };

export interface Tree {
  resolve(path: string): Promise<Node | undefined>;
}

function components(path: string): string[] {
  return path.split('/').filter((c) => c !== '');
}

function dir(mtime: number, list: () => Promise<string[]> | string[]): Node {
  return { kind: 'dir', mtime, list: async () => list() };
}

/** A version's directory: the image plus its info files. */
function versionDir(v: VersionRow, list: VersionList, extra: () => string[] = () => []): Node {
  return dir(list.changed(v), () => [imageFileName(v), ...INFO_FILES, ...extra()]);
}

function versionChild(v: VersionRow, name: string, list: VersionList): Node | undefined {
  if (name === imageFileName(v)) return { kind: 'image', version: v };
  if (isInfoFile(name)) return { kind: 'info', content: infoContent(v, name), mtime: list.changed(v) };
  return undefined;
}

/**
 * `backy mount UID DIR`: the root is the version's directory. It keeps showing the version if the version is
 * removed while mounted (open images then read what storage still has, or fail with EIO), and can hold
 * empty directories where partitions of the image get mounted.
 */
export class SingleVersionTree implements Tree {
  private mountDirs: string[] = [];

  constructor(private readonly list: VersionList, private version: VersionRow) {}

  addMountDir(name: string): void {
    if (!this.mountDirs.includes(name)) this.mountDirs.push(name);
  }

  removeMountDir(name: string): void {
    this.mountDirs = this.mountDirs.filter((d) => d !== name);
  }

  /** The version's current row (tags, validity), or the last one seen once it is gone. */
  private async current(): Promise<VersionRow> {
    const v = await this.list.get(this.version.uid);
    if (v) this.version = v;
    return this.version;
  }

  async resolve(path: string): Promise<Node | undefined> {
    const parts = components(path);
    const v = await this.current();
    if (parts.length === 0) return versionDir(v, this.list, () => this.mountDirs);
    if (parts.length === 1 && this.mountDirs.includes(parts[0])) return dir(v.date, () => []);
    return parts.length === 1 ? versionChild(v, parts[0], this.list) : undefined;
  }
}

/**
 * `backy mount DIR`: every version, as `by_version_uid/<uid>/` and `by_name/<escaped name>/<uid>/`, listed
 * from the database (cached for a second).
 */
export class AllVersionsTree implements Tree {
  private readonly mountedAt = Date.now();

  constructor(private readonly list: VersionList) {}

  async resolve(path: string): Promise<Node | undefined> {
    const [top, a, b, c, ...rest] = components(path);
    if (rest.length) return undefined;
    const list = this.list;
    if (top === undefined) return dir(this.mountedAt, () => ['by_version_uid', 'by_name']);
    if (top === 'by_version_uid') {
      if (a === undefined) return dir(this.mountedAt, () => list.uids());
      const v = await list.get(a);
      if (!v) return undefined;
      if (b === undefined) return versionDir(v, list);
      return c === undefined ? versionChild(v, b, list) : undefined;
    }
    if (top === 'by_name') {
      if (a === undefined) return dir(this.mountedAt, () => list.names());
      const versions = await list.withEscapedName(a);
      if (!versions.length) return undefined;
      if (b === undefined) return dir(Math.max(...versions.map((v) => v.date)), async () => (await list.withEscapedName(a)).map((v) => v.uid));
      const v = versions.find((x) => x.uid === b);
      if (!v) return undefined;
      if (c === undefined) return versionDir(v, list);
      return versionChild(v, c, list);
    }
    return undefined;
  }
}
