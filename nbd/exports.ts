/**
 * One open device per export, shared by every connection to it (reference counted): what one connection
 * writes and flushes, all read (NBD_FLAG_CAN_MULTI_CONN), and a device with state (an overlay, a cache of its
 * own) exists once. The device is closed when its last connection lets go; a connection arriving meanwhile
 * waits for that close and opens it afresh.
 */
import { oneLine, quoteName } from './errors';
import { ReadOnlyDevice } from '../src/device/read-only';
import type { BlockDevice, ExportCatalogue, ExportInfo } from '../src/device/types';

export interface OpenExport {
  readonly name: string;
  readonly device: BlockDevice;
  readonly description: string;
}

interface Entry {
  opening: Promise<OpenExport | undefined>;
  refs: number;
}

export class SharedExports {
  private readonly open = new Map<string, Entry>();
  private readonly closing = new Map<string, Promise<void>>();

  constructor(
    private readonly catalogue: ExportCatalogue,
    private readonly log: (line: string) => void,
    private readonly opts: { readOnly?: boolean } = {},
  ) {}

  list(): Promise<ExportInfo[]> {
    return this.catalogue.list();
  }

  /** Opens (or joins) the named export; undefined when there is none. Each success needs one release(). */
  async acquire(name: string): Promise<OpenExport | undefined> {
    for (;;) {
      const closing = this.closing.get(name);
      if (closing) await closing;
      else break;
    }
    let e = this.open.get(name);
    if (e && this.catalogue.exists && !(await this.catalogue.exists(name))) return undefined;
    // The check awaited: the entry may have been closed meanwhile.
    e = this.open.get(name);
    if (!e) {
      const opening = this.catalogue.open(name).then((o) =>
        o ? { name, device: this.opts.readOnly ? new ReadOnlyDevice(o.device) : o.device, description: o.description } : undefined,
      );
      e = { opening, refs: 0 };
      this.open.set(name, e);
      const entry = e;
      // A failed or empty open is not kept: the next connection asks the catalogue again.
      opening.then(
        (o) => {
          if (!o && this.open.get(name) === entry) this.open.delete(name);
        },
        () => {
          if (this.open.get(name) === entry) this.open.delete(name);
        },
      );
    }
    e.refs++;
    try {
      const o = await e.opening;
      if (!o) e.refs--;
      return o;
    } catch (err) {
      e.refs--;
      throw err;
    }
  }

  /** Lets go of an export acquired before; the last release closes its device. */
  async release(x: OpenExport): Promise<void> {
    const e = this.open.get(x.name);
    if (!e) return;
    if (--e.refs > 0) return;
    this.open.delete(x.name);
    if (!x.device.close) return;
    const closed = x.device.close().catch((err: unknown) => this.log(`closing export ${quoteName(x.name)} failed: ${oneLine(err)}`));
    this.closing.set(x.name, closed);
    try {
      await closed;
    } finally {
      if (this.closing.get(x.name) === closed) this.closing.delete(x.name);
    }
  }

  /** Exports open now (for tests and status). */
  get openCount(): number {
    return this.open.size;
  }
}
