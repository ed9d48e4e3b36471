import { IoError } from '../util/errors';
import type { SchemeOpener } from './registry';

export const nbdOpener: SchemeOpener = {
  async openSource(u) {
    throw new IoError(`${u.url}: NBD sources are not supported yet`);
  },
};
