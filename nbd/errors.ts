/** How device failures become NBD error numbers, log lines and the messages a client is sent. */
import { DeviceError } from '../src/device/types';
import * as C from './constants';

/** Longest error message sent to a client (the spec's limit is 4096 bytes). */
export const MAX_CLIENT_MESSAGE = 512;

function isDeviceError(e: unknown): e is DeviceError {
  return e instanceof DeviceError || (e instanceof Error && e.name === 'DeviceError');
}

/**
 * The NBD error for a failed device call. ENOTSUP is only ever sent for a FAST_ZERO request (`fastZero`):
 * the spec reserves it for that; otherwise it is an I/O failure to the client.
 */
export function errnoOf(e: unknown, fastZero = false): number {
  if (!isDeviceError(e)) return C.EIO;
  switch (e.errno) {
    case 'EPERM':
      return C.EPERM;
    case 'EINVAL':
      return C.EINVAL;
    case 'ENOSPC':
      return C.ENOSPC;
    case 'ENOTSUP':
      return fastZero ? C.ENOTSUP : C.EIO;
    default:
      return C.EIO;
  }
}

/** The first byte that could not be read, when the device said. */
export function failingOffset(e: unknown): number | undefined {
  const off = (e as { offset?: unknown } | null)?.offset;
  return typeof off === 'number' && Number.isFinite(off) ? off : undefined;
}

export function oneLine(e: unknown): string {
  const s = e instanceof Error ? e.message : String(e);
  return s.replace(/\s*[\r\n]+\s*/g, ' ').slice(0, 500);
}

/** Device errors are told to the client; anything else (a bug) only as "internal server error". */
export function messageForClient(e: unknown): string {
  return isDeviceError(e) ? oneLine(e) : 'internal server error';
}

/** Longest part of a client-chosen name (an export name) repeated in a log line. */
export const MAX_LOGGED_NAME = 64;

/** A client-chosen name for a log line: quoted, control characters escaped, cut to MAX_LOGGED_NAME. */
export function quoteName(name: string): string {
  const cut = name.length > MAX_LOGGED_NAME ? `${name.slice(0, MAX_LOGGED_NAME)}…` : name;
  return `"${cut.replace(/[\x00-\x1f\x7f"\\]/g, (c) => `\\x${c.charCodeAt(0).toString(16).padStart(2, '0')}`)}"${name.length > MAX_LOGGED_NAME ? ` (${Buffer.byteLength(name)} bytes)` : ''}`;
}
