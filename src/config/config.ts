import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { availableHashes, hashAvailable } from '../codec/hashes';
import { ConfigError } from '../util/errors';
import { maskEngineUrl } from '../util/secrets';
import { IniData, mergeIni, parseIni } from './ini';
import { parseSize } from './size';

/** Where backy2 looked for its configuration; later files win. */
export function defaultConfigFiles(): string[] {
  const files = ['/etc/backy.cfg', '/etc/backy/backy.cfg'];
  try {
    const d = '/etc/backy/conf.d';
    for (const f of fs.readdirSync(d).sort()) if (!f.startsWith('.')) files.push(path.join(d, f));
  } catch { /* no conf.d */ }
  files.push(path.join(os.homedir(), '.backy.cfg'), path.resolve('backy.cfg'));
  return files;
}

export interface S3Config {
  endpointUrl?: string;
  regionName: string;
  bucketName: string;
  accessKeyId?: string;
  secretAccessKey?: string;
  addressingStyle: 'path' | 'virtual';
  useSsl: boolean;
  storageClass?: string;
  prefix: string;
  simultaneousRemovals: number;
  connectTimeoutMs: number;
  readTimeoutMs: number;
  maxRetries: number;
}

export interface Config {
  /** The files that were read, in order. */
  files: string[];
  logfile?: string;
  blockSize: number;
  /**
   * The repository's checksum function. Unless `hash_function` is set, a new repository gets the fastest on
   * this machine (see fastestHash) and an existing one keeps what it was created with: Repository.create and
   * Repository.open fill it in then.
   */
  hashFunction: string;
  /** hash_function was set in a configuration file (it must then agree with the repository's). */
  hashFunctionConfigured: boolean;
  lockDir: string;
  disallowRmWhenYoungerThanDays: number;
  encryption: 'aes-256-gcm' | 'none';
  /** 32 bytes, present when encryption is on. */
  encryptionKey?: Buffer;
  compression: 'zstd' | 'none';
  compressionLevel: number;
  /** Bytes of the shared block cache (NBD, FUSE). */
  cacheSize: number;
  /** shared: the block cache keeps blocks in a /dev/shm file; heap: in the process's memory. */
  cacheMemory: 'shared' | 'heap';
  /** Where copy-on-write overlays of writable exports and mounts are kept (`[DEFAULTS] overlay_dir`). */
  overlayDir: string;
  /** checksum: reads recompute the plaintext checksum besides the GCM tag; tag: the tag alone (encrypted blobs). */
  readVerification: 'checksum' | 'tag';
  /** Worker threads for hashing and encryption; defaults to the number of CPUs. */
  workers: number;
  metaEngine: string;
  data: {
    type: 'file' | 's3';
    path: string;
    simultaneousReads: number;
    simultaneousWrites: number;
    bandwidthRead: number;
    bandwidthWrite: number;
    /** fsync every blob and its directory (safe default; off only for throwaway repositories). */
    fsync: boolean;
    s3: S3Config;
  };
  /** Everything as read, for sections other modules interpret (schedulers). */
  ini: IniData;
  /**
   * Keys of [DEFAULTS], [MetaBackend] or [DataBackend] written in one of the three where backy does not read them
   * (and so ignores them), but does read them in another: one line each, for the command to show.
   */
  warnings: string[];
}

const DEFAULT_INI = `
[DEFAULTS]
block_size = 4194304
lock_dir = /run/lock
disallow_rm_when_younger_than_days = 6
encryption = aes-256-gcm
compression = zstd
compression_level = 1
cache_size = 1G
cache_memory = shared
overlay_dir = /var/lib/backy/overlays
read_verification = checksum
simultaneous_reads = 8
simultaneous_writes = 8

[MetaBackend]
engine = sqlite:////var/lib/backy/backy.sqlite

[DataBackend]
type = file
path = /var/lib/backy/data
bandwidth_read = 0
bandwidth_write = 0
fsync = true
region_name = us-east-1
bucket_name = backy
addressing_style = path
use_ssl = true
prefix =
simultaneous_removals = 4
connect_timeout = 10
read_timeout = 60
max_retries = 6
`;


/** Reads and validates the configuration: `file` alone when given (-c), otherwise backy2's lookup list. */
export function loadConfig(file?: string): Config {
  const ini = parseIni(DEFAULT_INI, 'built-in defaults');
  const files: string[] = [];
  const bases = new Map<string, string>(); // "section.key" -> directory of the file that set it
  const candidates = file ? [path.resolve(file)] : defaultConfigFiles();
  for (const f of candidates) {
    let text: string;
    try {
      text = fs.readFileSync(f, 'utf8');
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      if (file) throw new ConfigError(`cannot read config file ${f}: ${code === 'ENOENT' ? 'no such file' : (e as Error).message}`);
      if (code === 'ENOENT' || code === 'ENOTDIR') continue;
      throw new ConfigError(`cannot read config file ${f}: ${(e as Error).message}`);
    }
    let parsed: IniData;
    try {
      parsed = parseIni(text, f);
    } catch (e) {
      throw new ConfigError((e as Error).message);
    }
    for (const [s, sec] of parsed) for (const k of sec.keys()) bases.set(`${s}.${k}`, path.dirname(f));
    mergeIni(ini, parsed);
    files.push(f);
  }
  return validate(ini, files, (s, k) => bases.get(`${s}.${k}`) ?? process.cwd(), (s, k) => bases.has(`${s}.${k}`));
}

/** Builds a Config from INI text alone (tests, `init`). */
export function configFromText(text: string, source = 'config'): Config {
  const ini = parseIni(DEFAULT_INI, 'built-in defaults');
  const parsed = parseIni(text, source);
  mergeIni(ini, parsed);
  return validate(ini, [source], () => process.cwd(), (s, k) => !!parsed.get(s)?.has(k));
}

/** `written`: whether a key was set by the configuration (not the built-in defaults). */
function validate(ini: IniData, files: string[], baseOf: (section: string, key: string) => string, written: (section: string, key: string) => boolean): Config {
  // What was asked for where: a key found only elsewhere was put in the wrong section (see `misplaced`).
  const asked = new Set<string>();
  const get = (section: string, key: string): string | undefined => {
    asked.add(`${section}.${key}`);
    return ini.get(section)?.get(key);
  };
  const sectionName = (section: string) => `[${section === 'defaults' ? 'DEFAULTS' : section === 'metabackend' ? 'MetaBackend' : section === 'databackend' ? 'DataBackend' : section}]`;
  const where = (section: string, key: string) => `${sectionName(section)} ${key}`;
  const bad = (section: string, key: string, allowed: string): never => {
    throw new ConfigError(`invalid ${where(section, key)} = "${maskEngineUrl(get(section, key) ?? '')}": ${allowed}`);
  };
  const int = (section: string, key: string, min: number, max: number): number => {
    const v = get(section, key)?.trim() ?? '';
    if (!/^\d+$/.test(v) || +v < min || +v > max) bad(section, key, `expected an integer from ${min} to ${max}`);
    return +v;
  };
  const size = (section: string, key: string, min: number, max: number): number => {
    const n = parseSize(get(section, key) ?? '');
    if (n === undefined || n < min || n > max) bad(section, key, `expected bytes from ${min} to ${max} (suffixes K, M, G allowed)`);
    return n!;
  };
  const bool = (section: string, key: string): boolean => {
    const v = (get(section, key) ?? '').trim().toLowerCase();
    if (['1', 'yes', 'true', 'on'].includes(v)) return true;
    if (['0', 'no', 'false', 'off'].includes(v)) return false;
    return bad(section, key, 'expected true or false');
  };
  const oneOf = <T extends string>(section: string, key: string, allowed: readonly T[], aliases: Record<string, T> = {}): T => {
    const v = (get(section, key) ?? '').trim().toLowerCase();
    if ((allowed as readonly string[]).includes(v)) return v as T;
    if (v in aliases) return aliases[v];
    return bad(section, key, `allowed: ${allowed.join(', ')}`);
  };
  const pathOf = (section: string, key: string): string => {
    // Not trimmed: the parser already did, except inside quotes, where spaces are part of the path.
    const v = get(section, key) ?? '';
    if (!v.trim()) bad(section, key, 'expected a path');
    return path.resolve(baseOf(section, key), v.replace(/^~(?=\/|$)/, os.homedir()));
  };
  // Simultaneous reads/writes: backy2 had them under [DataBackend]; the brief lists [DEFAULTS]. Both work.
  const dataOrDefault = (key: string, min: number, max: number): number =>
    get('databackend', key) !== undefined ? int('databackend', key, min, max) : int('defaults', key, min, max);

  const blockSize = int('defaults', 'block_size', 4096, 64 * 1024 * 1024);
  if (blockSize % 512 !== 0) bad('defaults', 'block_size', 'expected a multiple of 512 from 4096 to 67108864');

  const hashFunctionConfigured = get('defaults', 'hash_function') !== undefined;
  // Unset: backy2's sha512 until the repository says otherwise (a repository from before the setting was
  // recorded is sha512).
  const hashFunction = hashFunctionConfigured ? (get('defaults', 'hash_function') ?? '').trim().toLowerCase() : 'sha512';
  if (!hashAvailable(hashFunction)) bad('defaults', 'hash_function', `allowed: ${availableHashes().join(', ')}`);

  const encryption = oneOf('defaults', 'encryption', ['aes-256-gcm', 'none'] as const, { aes: 'aes-256-gcm', off: 'none', no: 'none', '0': 'none', false: 'none' });
  let encryptionKey: Buffer | undefined;
  const keyText = (get('defaults', 'encryption_key') ?? get('databackend', 'encryption_key') ?? '').trim();
  if (encryption === 'aes-256-gcm') {
    if (!keyText) {
      throw new ConfigError('no encryption_key in [DEFAULTS]: create one with "openssl rand -hex 32" (or run "backy init"), ' +
        'or set "encryption = none" to store backups unencrypted');
    }
    if (!/^[0-9a-fA-F]{64}$/.test(keyText)) {
      throw new ConfigError('invalid [DEFAULTS] encryption_key: expected 64 hexadecimal characters (32 bytes; "openssl rand -hex 32")');
    }
    encryptionKey = Buffer.from(keyText, 'hex');
  }

  const logfileText = (get('defaults', 'logfile') ?? '').trim();
  const engine = get('metabackend', 'engine') ?? ''; // as written (see pathOf)
  const dataType = oneOf('databackend', 'type', ['file', 's3'] as const, {
    'backy2.data_backends.file': 'file', 'backy2.data_backends.s3': 's3',
  });

  const s3: S3Config = {
    endpointUrl: get('databackend', 'endpoint_url')?.trim() || undefined,
    regionName: (get('databackend', 'region_name') ?? '').trim() || 'us-east-1',
    bucketName: (get('databackend', 'bucket_name') ?? '').trim(),
    accessKeyId: readSecret(get('databackend', 'aws_access_key_id'), get('databackend', 'aws_access_key_id_file'), 'aws_access_key_id_file'),
    secretAccessKey: readSecret(get('databackend', 'aws_secret_access_key'), get('databackend', 'aws_secret_access_key_file'), 'aws_secret_access_key_file'),
    addressingStyle: oneOf('databackend', 'addressing_style', ['path', 'virtual'] as const, { auto: 'virtual' }),
    useSsl: bool('databackend', 'use_ssl'),
    storageClass: get('databackend', 'storage_class')?.trim() || undefined,
    prefix: normalisePrefix(get('databackend', 'prefix') ?? ''),
    simultaneousRemovals: int('databackend', 'simultaneous_removals', 1, 64),
    connectTimeoutMs: int('databackend', 'connect_timeout', 1, 3600) * 1000,
    readTimeoutMs: int('databackend', 'read_timeout', 1, 3600) * 1000,
    maxRetries: int('databackend', 'max_retries', 0, 20),
  };
  if (dataType === 's3' && !s3.bucketName) bad('databackend', 'bucket_name', 'expected a bucket name');

  const config: Config = {
    files,
    logfile: logfileText ? pathOf('defaults', 'logfile') : undefined,
    blockSize,
    hashFunction,
    hashFunctionConfigured,
    lockDir: pathOf('defaults', 'lock_dir'),
    disallowRmWhenYoungerThanDays: int('defaults', 'disallow_rm_when_younger_than_days', 0, 100000),
    encryption,
    encryptionKey,
    compression: oneOf('defaults', 'compression', ['zstd', 'none'] as const, { off: 'none', no: 'none' }),
    compressionLevel: int('defaults', 'compression_level', 1, 19),
    cacheSize: size('defaults', 'cache_size', 0, 2 ** 50),
    cacheMemory: oneOf('defaults', 'cache_memory', ['shared', 'heap'] as const),
    overlayDir: pathOf('defaults', 'overlay_dir'),
    readVerification: oneOf('defaults', 'read_verification', ['checksum', 'tag'] as const),
    workers: get('defaults', 'workers') !== undefined ? int('defaults', 'workers', 1, 256) : Math.max(1, os.availableParallelism()),
    metaEngine: normaliseEngine(engine, baseOf('metabackend', 'engine')),
    data: {
      type: dataType,
      path: dataType === 'file' ? pathOf('databackend', 'path') : '',
      simultaneousReads: dataOrDefault('simultaneous_reads', 1, 256),
      simultaneousWrites: dataOrDefault('simultaneous_writes', 1, 256),
      bandwidthRead: size('databackend', 'bandwidth_read', 0, 2 ** 50),
      bandwidthWrite: size('databackend', 'bandwidth_write', 0, 2 ** 50),
      fsync: bool('databackend', 'fsync'),
      s3,
    },
    ini,
    warnings: [],
  };
  config.warnings.push(...misplaced());
  return config;

  /** See Config.warnings. */
  function misplaced(): string[] {
    const sections = ['defaults', 'metabackend', 'databackend'];
    const lines: string[] = [];
    for (const s of sections) {
      for (const k of ini.get(s)?.keys() ?? []) {
        if (asked.has(`${s}.${k}`) || !written(s, k)) continue;
        const home = sections.find((o) => o !== s && asked.has(`${o}.${k}`));
        if (home) lines.push(`${where(s, k)} has no effect there (ignored): backy reads it in ${sectionName(home)}`);
      }
    }
    return lines;
  }

  function normaliseEngine(url: string, base: string): string {
    if (url.startsWith('sqlite:///')) {
      // SQLAlchemy: sqlite:////absolute/path, sqlite:///relative/path
      const p = url.slice('sqlite:///'.length);
      if (!p) bad('metabackend', 'engine', 'expected sqlite:////absolute/path or postgresql://user:password@host:port/db');
      return `sqlite:///${path.resolve(base, p)}`;
    }
    if (url === 'sqlite://:memory:' || url === 'sqlite://') return 'sqlite://:memory:';
    if (/^postgres(ql)?(\+\w+)?:\/\//.test(url)) return url.replace(/^postgres(ql)?(\+\w+)?:/, 'postgresql:');
    return bad('metabackend', 'engine', 'expected sqlite:////absolute/path or postgresql://user:password@host:port/db');
  }

  function readSecret(value: string | undefined, file: string | undefined, key: string): string | undefined {
    if (value?.trim()) return value.trim();
    if (file?.trim()) {
      try {
        return fs.readFileSync(path.resolve(baseOf('databackend', key), file.trim()), 'utf8').trim();
      } catch (e) {
        throw new ConfigError(`cannot read [DataBackend] ${key} ${file.trim()}: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`);
      }
    }
    return undefined;
  }
}

function normalisePrefix(p: string): string {
  const t = p.trim().replace(/^\/+/, '');
  return t && !t.endsWith('/') ? `${t}/` : t;
}

/** The file path of an sqlite engine URL, or undefined for other engines. */
export function sqlitePath(engine: string): string | undefined {
  if (engine === 'sqlite://:memory:') return ':memory:';
  return engine.startsWith('sqlite:///') ? engine.slice('sqlite:///'.length) : undefined;
}
