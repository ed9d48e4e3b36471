import { StorageError } from '../util/errors';

export interface RetryPolicy {
  /** Attempts after the first one. */
  maxRetries: number;
  /** A lower limit for failures where the other end could not be reached at all (the judge says which). */
  maxUnreachableRetries?: number;
  /** Backoff before the first retry; doubles with every further one. */
  baseDelayMs: number;
  maxDelayMs: number;
}

export const DEFAULT_RETRY: RetryPolicy = { maxRetries: 6, baseDelayMs: 200, maxDelayMs: 20_000 };

/** How the caller judges a failure: worth another attempt, or final (thrown as it is: missing object, denied). */
export type Verdict = { retry: true; reason: string; /** a lower limit than the policy's for this kind of failure */ maxRetries?: number }
  | { retry: false; error: Error };

/** The operation and its object, for the final error: "store blob ab/cd/… in s3://bucket/prefix/ at https://…"
 * (never with credentials). */
export type Operation = string;

/**
 * Backoff before retry `n` (1-based): half the exponential step, fixed, plus up to the other half at random.
 * The fixed half keeps a throttled client really backing off; the random half keeps many clients that
 * failed together (all writers hitting one 503) from coming back in lockstep.
 */
export function backoffMs(policy: RetryPolicy, n: number, random = Math.random): number {
  const step = Math.min(policy.maxDelayMs, policy.baseDelayMs * 2 ** (n - 1));
  return step / 2 + random() * (step / 2);
}

/**
 * Runs `fn` until it succeeds, a failure is judged final, or `maxRetries` retries are spent; then throws a
 * StorageError naming the operation, the object and the last reason.
 */
export async function withRetry<T>(
  op: Operation,
  policy: RetryPolicy,
  judge: (e: unknown) => Verdict,
  fn: (attempt: number) => Promise<T>,
  onRetry?: (reason: string, retry: number, delayMs: number) => void,
): Promise<T> {
  for (let attempt = 0; ; attempt++) {
    try {
      return await fn(attempt);
    } catch (e) {
      const v = judge(e);
      if (!v.retry) throw v.error;
      if (attempt >= Math.min(policy.maxRetries, v.maxRetries ?? Infinity)) {
        const tries = attempt + 1;
        throw new StorageError(`cannot ${op}: ${v.reason} ` +
          `(${tries === 1 ? 'no retries configured' : `gave up after ${tries} attempts`})`);
      }
      const delay = backoffMs(policy, attempt + 1);
      onRetry?.(v.reason, attempt + 1, delay);
      await new Promise((r) => setTimeout(r, delay));
    }
  }
}
