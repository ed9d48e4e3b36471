/**
 * Numbers of the NBD protocol (fixed newstyle handshake, simple and structured replies, base:allocation).
 * Names follow the protocol document (doc/proto.md of NetworkBlockDevice/nbd) without the `NBD_` prefix.
 */

// ---- Magics ----------------------------------------------------------------------------------------------
/** 'NBDMAGIC', first 8 bytes sent by a server. */
export const NBD_MAGIC = 0x4e42444d41474943n;
/** 'IHAVEOPT': second 8 bytes of the newstyle greeting, and the prefix of every option request. */
export const IHAVEOPT = 0x49484156454f5054n;
/** Oldstyle greeting's second magic (we never speak oldstyle; clients use it to detect an oldstyle server). */
export const CLISERV_MAGIC = 0x00420281861253n;
/** Prefix of every option reply. */
export const OPTION_REPLY_MAGIC = 0x3e889045565a9n;
export const REQUEST_MAGIC = 0x25609513;
export const SIMPLE_REPLY_MAGIC = 0x67446698;
export const STRUCTURED_REPLY_MAGIC = 0x668e33ef;
/** Reserved by the experimental extended-headers extension (recognised only to give a better error). */
export const EXTENDED_REQUEST_MAGIC = 0x21e41c71;

// ---- Handshake flags (server, 16 bits) and client flags (32 bits) --------------------------------------------
export const FLAG_FIXED_NEWSTYLE = 1 << 0;
export const FLAG_NO_ZEROES = 1 << 1;
export const FLAG_C_FIXED_NEWSTYLE = 1 << 0;
export const FLAG_C_NO_ZEROES = 1 << 1;

// ---- Transmission flags (16 bits) -------------------------------------------------------------------------
export const FLAG_HAS_FLAGS = 1 << 0;
export const FLAG_READ_ONLY = 1 << 1;
export const FLAG_SEND_FLUSH = 1 << 2;
export const FLAG_SEND_FUA = 1 << 3;
export const FLAG_ROTATIONAL = 1 << 4;
export const FLAG_SEND_TRIM = 1 << 5;
export const FLAG_SEND_WRITE_ZEROES = 1 << 6;
export const FLAG_SEND_DF = 1 << 7;
export const FLAG_CAN_MULTI_CONN = 1 << 8;
export const FLAG_SEND_RESIZE = 1 << 9;
export const FLAG_SEND_CACHE = 1 << 10;
export const FLAG_SEND_FAST_ZERO = 1 << 11;

// ---- Options ----------------------------------------------------------------------------------------------
export const OPT_EXPORT_NAME = 1;
export const OPT_ABORT = 2;
export const OPT_LIST = 3;
export const OPT_PEEK_EXPORT = 4;
export const OPT_STARTTLS = 5;
export const OPT_INFO = 6;
export const OPT_GO = 7;
export const OPT_STRUCTURED_REPLY = 8;
export const OPT_LIST_META_CONTEXT = 9;
export const OPT_SET_META_CONTEXT = 10;
export const OPT_EXTENDED_HEADERS = 11;

// ---- Option reply types -----------------------------------------------------------------------------------
export const REP_ACK = 1;
export const REP_SERVER = 2;
export const REP_INFO = 3;
export const REP_META_CONTEXT = 4;
const REP_ERR = 0x80000000;
export const REP_ERR_UNSUP = REP_ERR + 1;
export const REP_ERR_POLICY = REP_ERR + 2;
export const REP_ERR_INVALID = REP_ERR + 3;
export const REP_ERR_PLATFORM = REP_ERR + 4;
export const REP_ERR_TLS_REQD = REP_ERR + 5;
export const REP_ERR_UNKNOWN = REP_ERR + 6;
export const REP_ERR_SHUTDOWN = REP_ERR + 7;
export const REP_ERR_BLOCK_SIZE_REQD = REP_ERR + 8;
export const REP_ERR_TOO_BIG = REP_ERR + 9;
export const REP_ERR_EXT_HEADER_REQD = REP_ERR + 10;

export function isReplyError(type: number): boolean {
  return type >= REP_ERR;
}

// ---- NBD_INFO types (in NBD_REP_INFO replies and NBD_OPT_INFO/GO requests) ----------------------------------
export const INFO_EXPORT = 0;
export const INFO_NAME = 1;
export const INFO_DESCRIPTION = 2;
export const INFO_BLOCK_SIZE = 3;

// ---- Commands and command flags ---------------------------------------------------------------------------
export const CMD_READ = 0;
export const CMD_WRITE = 1;
export const CMD_DISC = 2;
export const CMD_FLUSH = 3;
export const CMD_TRIM = 4;
export const CMD_CACHE = 5;
export const CMD_WRITE_ZEROES = 6;
export const CMD_BLOCK_STATUS = 7;
export const CMD_RESIZE = 8;

export const CMD_FLAG_FUA = 1 << 0;
export const CMD_FLAG_NO_HOLE = 1 << 1;
export const CMD_FLAG_DF = 1 << 2;
export const CMD_FLAG_REQ_ONE = 1 << 3;
export const CMD_FLAG_FAST_ZERO = 1 << 4;

// ---- Structured reply flags and chunk types ---------------------------------------------------------------
export const REPLY_FLAG_DONE = 1 << 0;

export const REPLY_TYPE_NONE = 0;
export const REPLY_TYPE_OFFSET_DATA = 1;
export const REPLY_TYPE_OFFSET_HOLE = 2;
export const REPLY_TYPE_BLOCK_STATUS = 5;
export const REPLY_TYPE_ERROR = (1 << 15) + 1;
export const REPLY_TYPE_ERROR_OFFSET = (1 << 15) + 2;

export function isErrorChunk(type: number): boolean {
  return (type & (1 << 15)) !== 0;
}

// ---- base:allocation --------------------------------------------------------------------------------------
export const META_BASE_ALLOCATION = 'base:allocation';
export const STATE_HOLE = 1 << 0;
export const STATE_ZERO = 1 << 1;

// ---- qemu:dirty-bitmap:NAME (QEMU's metadata context for a persistent or transient dirty bitmap) ------------
export const META_QEMU_DIRTY_BITMAP_PREFIX = 'qemu:dirty-bitmap:';
/** The run changed since the bitmap was started. */
export const STATE_DIRTY = 1 << 0;

// ---- Error values (the protocol's own numbering, which happens to match Linux errno) -----------------------
export const EPERM = 1;
export const EIO = 5;
export const ENOMEM = 12;
export const EINVAL = 22;
export const ENOSPC = 28;
export const EOVERFLOW = 75;
export const ENOTSUP = 95;
export const ESHUTDOWN = 108;

export const ERRNO_NAMES: Readonly<Record<number, string>> = {
  [EPERM]: 'EPERM',
  [EIO]: 'EIO',
  [ENOMEM]: 'ENOMEM',
  [EINVAL]: 'EINVAL',
  [ENOSPC]: 'ENOSPC',
  [EOVERFLOW]: 'EOVERFLOW',
  [ENOTSUP]: 'ENOTSUP',
  [ESHUTDOWN]: 'ESHUTDOWN',
};

export function errnoName(errno: number): string {
  return ERRNO_NAMES[errno] ?? `error ${errno}`;
}

// ---- Sizes ------------------------------------------------------------------------------------------------
/** IANA port for NBD. */
export const NBD_DEFAULT_PORT = 10809;
/** Spec limit for any string (export names, descriptions, error messages). */
export const MAX_STRING_BYTES = 4096;
/** Request header: magic 4, flags 2, type 2, cookie 8, offset 8, length 4. */
export const REQUEST_HEADER_BYTES = 28;
/** Simple reply header: magic 4, error 4, cookie 8. */
export const SIMPLE_REPLY_HEADER_BYTES = 16;
/** Structured reply chunk header: magic 4, flags 2, type 2, cookie 8, length 4. */
export const STRUCTURED_REPLY_HEADER_BYTES = 20;
/** Option request header: magic 8, option 4, length 4. */
export const OPTION_HEADER_BYTES = 16;
/** Option reply header: magic 8, option 4, reply type 4, length 4. */
export const OPTION_REPLY_HEADER_BYTES = 20;
/** Servers should not send more block status descriptors than this in one chunk. */
export const MAX_BLOCK_STATUS_DESCRIPTORS = 1 << 20;
