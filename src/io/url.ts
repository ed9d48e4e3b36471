import * as path from 'node:path';
import { IoError } from '../util/errors';

/** Sources and targets are URLs (file:///dev/sda, file:///images/vm.img); a plain path means file://. */
export function parseIoUrl(url: string): { scheme: string; path: string } {
  const m = /^([a-z][a-z0-9+.-]*):\/\/(.*)$/i.exec(url);
  if (!m) {
    if (!url) throw new IoError('empty source/target');
    return { scheme: 'file', path: path.resolve(url) };
  }
  const scheme = m[1].toLowerCase();
  if (scheme !== 'file') throw new IoError(`unsupported URL scheme "${scheme}://" in ${url} (supported: file://)`);
  if (!m[2]) throw new IoError(`no path in ${url}`);
  return { scheme, path: path.resolve(decodeURIComponent(m[2])) };
}
