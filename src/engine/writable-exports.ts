import type { BlockDevice, ExportCatalogue, ExportInfo } from '../device/types';
import { log } from '../util/log';
import { describeVersion, VersionCatalogue } from './catalogue';
import { Overlay, resolveOverlaySpec } from './overlays';
import type { Repository } from './repository';

/**
 * The versions (read-only, named by uid) plus one writable export per overlay, named by the overlay: a
 * CowDevice over the overlay's base version. The NBD server opens an export's device once for all its
 * connections, so every connection writes into the same overlay and sees what the others flushed.
 */
export class OverlayCatalogue implements ExportCatalogue {
  private readonly byName: Map<string, Overlay>;

  constructor(private readonly versions: VersionCatalogue, overlays: Overlay[]) {
    this.byName = new Map(overlays.map((o) => [o.name, o]));
  }

  async list(): Promise<ExportInfo[]> {
    const writable = [...this.byName.values()].map((o) => ({ name: o.name, description: describeOverlay(o) }));
    return [...writable, ...(await this.versions.list())];
  }

  async open(name: string): Promise<{ device: BlockDevice; description: string } | undefined> {
    const o = this.byName.get(name);
    if (!o) return this.versions.open(name);
    return { device: await o.open(this.versions.device(o.base)), description: describeOverlay(o) };
  }

  async exists(name: string): Promise<boolean> {
    return this.byName.has(name) || this.versions.exists(name);
  }
}

export function describeOverlay(o: Overlay): string {
  return `writable overlay ${o.name} of ${o.base.uid}: ${describeVersion(o.base)}`;
}

/**
 * Takes the overlays `-w` names (creating those that do not exist), locked for this process until the
 * repository closes.
 */
export async function useOverlays(repo: Repository, specs: string[], what: string): Promise<Overlay[]> {
  const out: Overlay[] = [];
  const seen = new Set<string>();
  try {
    for (const spec of specs) {
      const { name, uid } = await resolveOverlaySpec(repo, spec);
      if (seen.has(name)) continue;
      seen.add(name);
      const o = await Overlay.use(repo, name, what, uid);
      out.push(o);
      log.info(`writable export ${o.name}: overlay of version ${o.base.uid} (${o.base.name}) in ${o.dir}`);
    }
  } catch (e) {
    for (const o of out) await o.release().catch(() => undefined);
    throw e;
  }
  return out;
}
