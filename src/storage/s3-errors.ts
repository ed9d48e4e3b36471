/**
 * Sorts what the AWS SDK (or the network under it) throws into the few cases backy acts on. Reasons are
 * built from status codes, S3 error codes and errno names only, never from request details, so no
 * credential or signature can leak into a message.
 */
export type S3FailureKind =
  /** the object does not exist (S3's NoSuchKey) */
  | 'not-found'
  | 'no-bucket'
  /** credentials wrong, expired or without permission */
  | 'denied'
  /** none configured and none in the SDK's default places */
  | 'no-credentials'
  /** the endpoint cannot be reached at all */
  | 'unreachable'
  /** worth another attempt: throttling, 5xx, timeouts, dropped connections */
  | 'transient'
  /** a request the server will never accept as it is */
  | 'fatal';

export interface S3Failure {
  kind: S3FailureKind;
  reason: string;
  /** HTTP status of the response, when one arrived. */
  status?: number;
}

const THROTTLING = new Set(['SlowDown', 'Throttling', 'ThrottlingException', 'ThrottledException', 'RequestThrottled',
  'RequestThrottledException', 'TooManyRequestsException', 'RequestLimitExceeded', 'BandwidthLimitExceeded',
  'ProvisionedThroughputExceededException', 'EC2ThrottledException', 'TransactionInProgressException']);
const TRANSIENT_CODES = new Set(['InternalError', 'ServiceUnavailable', 'RequestTimeout', 'RequestTimeoutException',
  'PriorRequestNotComplete', 'OperationAborted', 'IDPCommunicationError', 'XAmzContentSHA256Mismatch', 'BadDigest',
  'IncompleteBody']);
const DENIED = new Set(['InvalidAccessKeyId', 'SignatureDoesNotMatch', 'AccessDenied', 'InvalidToken', 'ExpiredToken',
  'TokenRefreshRequired', 'AllAccessDisabled', 'AccountProblem', 'InvalidSecurity', 'NotSignedUp',
  'AuthorizationHeaderMalformed', 'Forbidden', 'Unauthorized']);
const UNREACHABLE = new Set(['ECONNREFUSED', 'ENOTFOUND', 'EAI_AGAIN', 'EHOSTUNREACH', 'ENETUNREACH', 'EHOSTDOWN',
  'ENETDOWN', 'CERT_HAS_EXPIRED', 'DEPTH_ZERO_SELF_SIGNED_CERT', 'SELF_SIGNED_CERT_IN_CHAIN',
  'UNABLE_TO_VERIFY_LEAF_SIGNATURE', 'ERR_TLS_CERT_ALTNAME_INVALID']);
const NETWORK = new Set(['ECONNRESET', 'ECONNABORTED', 'EPIPE', 'ETIMEDOUT', 'ESOCKETTIMEDOUT', 'ERR_STREAM_PREMATURE_CLOSE',
  'UND_ERR_SOCKET', 'ECANCELED', 'ERR_HTTP_INVALID_HEADER_VALUE', 'HPE_INVALID_CONSTANT', 'ERR_SOCKET_CONNECTION_TIMEOUT']);

interface SdkLikeError {
  name?: string;
  code?: string;
  message?: string;
  Code?: string;
  $fault?: string;
  $metadata?: { httpStatusCode?: number };
  $response?: { statusCode?: number };
  cause?: unknown;
}

function networkCode(e: SdkLikeError): string | undefined {
  for (let x: SdkLikeError | undefined = e, depth = 0; x && depth < 4; x = x.cause as SdkLikeError | undefined, depth++) {
    const c = x.code;
    if (typeof c === 'string' && (UNREACHABLE.has(c) || NETWORK.has(c) || /^E[A-Z]+$/.test(c))) return c;
  }
  return undefined;
}

export function classifyS3Error(err: unknown): S3Failure {
  const f = classify(err);
  const status = (err as SdkLikeError | undefined)?.$metadata?.httpStatusCode;
  return status === undefined ? f : { ...f, status };
}

function classify(err: unknown): S3Failure {
  if (!err || typeof err !== 'object') return { kind: 'fatal', reason: String(err) };
  const e = err as SdkLikeError;
  const status = e.$metadata?.httpStatusCode ?? e.$response?.statusCode;
  // Errors of bodiless responses (HEAD) carry no S3 code: the SDK calls them "Unknown" or by the status.
  const rawName = e.Code ?? e.name ?? '';
  const name = rawName === 'Unknown' || rawName === 'UnknownError' || /^\d+$/.test(rawName) ? '' : rawName;
  const net = networkCode(e);
  const withStatus = (what: string) => (status ? `HTTP ${status} ${what}` : what).trim();

  if (name === 'CredentialsProviderError') {
    return { kind: 'no-credentials', reason: 'no credentials found (set aws_access_key_id and aws_secret_access_key, or the AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY environment, or a credentials file)' };
  }
  if (net && UNREACHABLE.has(net)) return { kind: 'unreachable', reason: net === 'ECONNREFUSED' ? 'connection refused' : net === 'ENOTFOUND' ? 'host not found' : net };
  if (name === 'TimeoutError' || net === 'ETIMEDOUT' || net === 'ESOCKETTIMEDOUT') {
    // The SDK names a reset connection a TimeoutError too; tell them apart for the message.
    return { kind: 'transient', reason: net === 'ECONNRESET' || net === 'EPIPE' ? 'connection reset' : 'timed out' };
  }
  if (net) return { kind: 'transient', reason: net === 'ECONNRESET' ? 'connection reset' : net };
  if (name === 'NoSuchBucket') return { kind: 'no-bucket', reason: withStatus('NoSuchBucket') };
  // Only S3's own NoSuchKey says the object is gone. The SDK names any other 404 "NotFound" (a HEAD's, but
  // also a web page from something in the way), which must not get a blob marked missing: callers that
  // expect a bodiless 404 (HeadBucket) look at the status themselves.
  if (name === 'NoSuchKey') return { kind: 'not-found', reason: withStatus(name) };
  if (THROTTLING.has(name) || status === 429 || status === 503) return { kind: 'transient', reason: withStatus(name || 'throttled') };
  if (TRANSIENT_CODES.has(name) || status === 408 || (status !== undefined && status >= 500)) return { kind: 'transient', reason: withStatus(name || 'server error') };
  if (name === 'RequestTimeTooSkewed') return { kind: 'denied', reason: withStatus('RequestTimeTooSkewed: this machine\'s clock differs too much from the server\'s') };
  if (DENIED.has(name) || status === 403 || status === 401) return { kind: 'denied', reason: withStatus(name || 'Forbidden') };
  if (status !== undefined) return { kind: 'fatal', reason: withStatus(name) };
  // No HTTP status: the response never arrived whole (truncated body, cut-off XML) or the request never
  // left. Programming errors are not cured by retrying; anything else from the wire may be.
  if (err instanceof TypeError || err instanceof RangeError || err instanceof ReferenceError) return { kind: 'fatal', reason: `${e.name}: ${e.message}` };
  const msg = (e.message ?? '').split('\n')[0];
  return { kind: 'transient', reason: /aborted|socket hang up|premature|closed/i.test(msg) ? 'connection closed early' : (name && name !== 'Error' ? name : 'response could not be read') };
}
