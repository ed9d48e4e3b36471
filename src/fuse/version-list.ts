import type { MetaStore, VersionRow } from '../meta/types';
import { escapeName } from './escape';

interface Snapshot {
  at: number;
  byUid: Map<string, VersionRow>;
  /** escaped name → versions of that name */
  byName: Map<string, VersionRow[]>;
}

/**
 * The versions as the mount shows them: listed from the database at most once per `ttlMs`, so `ls` and path
 * lookups stay cheap while versions added or removed elsewhere appear within about a second. Also remembers
 * when a version's descriptive fields last changed, which becomes the mtime of its info files (the kernel
 * keeps their cached pages only while size and mtime are unchanged).
 */
export class VersionList {
  private snap: Snapshot | undefined;
  private refreshing: Promise<Snapshot> | undefined;
  private changedAt = new Map<string, { signature: string; at: number }>();

  /** `only`: follow just this version (a single-version mount need not list the whole repository). */
  constructor(private readonly meta: MetaStore, private readonly opts: { only?: string; ttlMs?: number } = {}, private readonly now = () => Date.now()) {}

  private async current(): Promise<Snapshot> {
    if (this.snap && this.now() - this.snap.at < (this.opts.ttlMs ?? 1000)) return this.snap;
    if (!this.refreshing) {
      this.refreshing = this.load().finally(() => (this.refreshing = undefined));
    }
    return this.refreshing;
  }

  private async load(): Promise<Snapshot> {
    const only = this.opts.only;
    const rows = only === undefined ? await this.meta.listVersions() : [await this.meta.getVersion(only)].filter((v): v is VersionRow => !!v);
    const at = this.now();
    const byUid = new Map<string, VersionRow>();
    const byName = new Map<string, VersionRow[]>();
    for (const v of rows) {
      byUid.set(v.uid, v);
      const key = escapeName(v.name);
      const list = byName.get(key);
      if (list) list.push(v);
      else byName.set(key, [v]);
      const signature = JSON.stringify([v.name, v.snapshotName, v.date, v.tags, v.valid, v.protected, v.expire]);
      const prev = this.changedAt.get(v.uid);
      if (!prev) this.changedAt.set(v.uid, { signature, at: v.date });
      else if (prev.signature !== signature) this.changedAt.set(v.uid, { signature, at });
    }
    for (const uid of this.changedAt.keys()) if (!byUid.has(uid)) this.changedAt.delete(uid);
    this.snap = { at, byUid, byName };
    return this.snap;
  }

  async uids(): Promise<string[]> {
    return [...(await this.current()).byUid.keys()];
  }

  async get(uid: string): Promise<VersionRow | undefined> {
    return (await this.current()).byUid.get(uid);
  }

  /** Escaped names, one per distinct version name. */
  async names(): Promise<string[]> {
    return [...(await this.current()).byName.keys()];
  }

  async withEscapedName(escaped: string): Promise<VersionRow[]> {
    return (await this.current()).byName.get(escaped) ?? [];
  }

  /** When the version's name, tags, validity etc. were last seen to change (its date until then). */
  changed(v: VersionRow): number {
    return this.changedAt.get(v.uid)?.at ?? v.date;
  }
}
