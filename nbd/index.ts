/** NBD protocol layer: a server for any BlockDevice catalogue, and a small client. */
export * as nbdConstants from './constants';
export { NbdServer, blockSizesFor, normalizeExtents, transmissionFlags, MAX_OPTION_BYTES, PREFERRED_BLOCK_SIZE } from './server';
export type { NbdServerOptions, NbdListenOptions, NbdAddress } from './server';
export { NbdClient, NbdError, parseNbdUri } from './client';
export type { NbdClientOptions, NbdConnectAddress, NbdBlockSizes } from './client';
