/**
 * Sources and targets by URL scheme. Each scheme's opener is its own module, loaded when a URL of that scheme
 * is opened (so a file backup does not load the NBD client).
 */
import { IoError } from '../util/errors';
import type { Source, SourceOptions, Target, TargetOptions } from './types';
import { fileUrlPath, IoUrl, splitScheme } from './url';

export interface SchemeOpener {
  openSource?(u: IoUrl, opts: SourceOptions): Promise<Source>;
  openTarget?(u: IoUrl, opts: TargetOptions): Promise<Target>;
}

const fileOpener: SchemeOpener = {
  async openSource(u, opts) {
    if (opts.bitmap) throw new IoError(`${u.url}: a file has no dirty bitmap (--bitmap needs an nbd:// source)`);
    const { openFileSource } = await import('./file');
    return openFileSource(fileUrlPath(u), u.url);
  },
  async openTarget(u, opts) {
    const { openFileTarget } = await import('./file');
    return openFileTarget(fileUrlPath(u), u.url, opts);
  },
};

const nbdOpener = (): Promise<SchemeOpener> => import('./nbd').then((m) => m.nbdOpener);

/** scheme → its opener (loaded on first use). */
const SCHEMES = new Map<string, () => Promise<SchemeOpener>>([
  ['file', async () => fileOpener],
  ['nbd', nbdOpener],
  ['nbd+unix', nbdOpener],
  ['nbds', nbdOpener],
  ['nbds+unix', nbdOpener],
]);

async function opener(url: string): Promise<{ u: IoUrl; o: SchemeOpener }> {
  const u = splitScheme(url);
  const load = SCHEMES.get(u.scheme);
  if (!load) throw new IoError(`unsupported URL scheme "${u.scheme}://" in ${url} (supported: ${[...SCHEMES.keys()].map((k) => `${k}://`).join(', ')})`);
  return { u, o: await load() };
}

export async function openSource(url: string, opts: SourceOptions = {}): Promise<Source> {
  const { u, o } = await opener(url);
  if (!o.openSource) throw new IoError(`${u.scheme}:// cannot be a backup source`);
  return o.openSource(u, opts);
}

export async function openTarget(url: string, opts: TargetOptions): Promise<Target> {
  const { u, o } = await opener(url);
  if (!o.openTarget) throw new IoError(`${u.scheme}:// cannot be a restore target`);
  return o.openTarget(u, opts);
}

/** The schemes a URL may use, for help texts. */
export function knownSchemes(): string[] {
  return [...SCHEMES.keys()];
}
