/**
 * Every failure a user can cause or meet ends as a BackyError: one line on stderr and a documented exit code.
 * Codes follow backy2 so scripts written for it keep working.
 */
export const ExitCode = {
  OK: 0,
  /** configuration, database, source or target problems, wrong key */
  CONFIG: 1,
  USAGE: 2,
  /** differential backup: unhinted blocks differ from the base */
  SANITY: 5,
  /** storage (data backend) errors: missing or corrupt blob, unreachable storage */
  STORAGE: 6,
  /** scrub found bad blocks */
  SCRUB: 20,
  IMPORT_KEY: 22,
  IMPORT_VALUE: 23,
  /** anything else: locked, too young, protected, unknown uid, initdb on an existing database */
  OTHER: 100,
} as const;

export class BackyError extends Error {
  constructor(message: string, readonly exitCode: number = ExitCode.OTHER) {
    super(message);
    this.name = new.target.name;
  }
}

export class ConfigError extends BackyError {
  constructor(message: string) { super(message, ExitCode.CONFIG); }
}
export class DatabaseError extends BackyError {
  constructor(message: string) { super(message, ExitCode.CONFIG); }
}
/** Source or target of a backup or restore cannot be used. */
export class IoError extends BackyError {
  constructor(message: string) { super(message, ExitCode.CONFIG); }
}
export class WrongKeyError extends BackyError {
  constructor(message = 'the encryption key does not match the one this repository was written with') {
    super(message, ExitCode.CONFIG);
  }
}
export class UsageError extends BackyError {
  constructor(message: string) { super(message, ExitCode.USAGE); }
}
export class SanityError extends BackyError {
  constructor(message: string) { super(message, ExitCode.SANITY); }
}
export class StorageError extends BackyError {
  constructor(message: string) { super(message, ExitCode.STORAGE); }
}
/** The object does not exist in storage. Never retried. */
export class BlobNotFoundError extends StorageError {
  constructor(readonly key: string) { super(`blob ${key} is missing from storage`); }
}
/** The object exists but does not decrypt, decompress or match its checksum. */
export class BlobCorruptError extends StorageError {
  constructor(readonly key: string, reason: string) { super(`blob ${key} is corrupt: ${reason}`); }
}
export class LockedError extends BackyError {
  constructor(message: string) { super(message, ExitCode.OTHER); }
}
export class NotFoundError extends BackyError {
  constructor(message: string) { super(message, ExitCode.OTHER); }
}

/** One line describing any error, without a stack: for stderr and logs. */
export function errorLine(err: unknown): string {
  if (err instanceof Error) {
    const msg = err.message.split('\n')[0];
    if (err instanceof BackyError) return msg;
    const code = (err as NodeJS.ErrnoException).code;
    return code && !msg.includes(code) ? `${code}: ${msg}` : msg;
  }
  return String(err);
}
