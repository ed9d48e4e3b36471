import * as fs from 'node:fs';
import * as path from 'node:path';
import { getHashes } from 'node:crypto';
import { Config, configFromText } from '../config/config';
import { IniData, parseIni } from '../config/ini';
import { ConfigError } from '../util/errors';

/**
 * What an import needs from backy2's own configuration file (backy2 reads only the file given with -c, so
 * only its values count, with backy2's built-in defaults where it had them).
 */
export interface Backy2Config {
  file: string;
  blockSize: number;
  hashFunction: string;
  /** '' disables backy2's locking */
  lockDir: string;
  processName: string;
  encryptionVersion: number;
  encryptionKey?: Buffer;
  /** sqlite:////absolute/path or postgresql://... (SQLAlchemy's driver suffix and sqlite options dropped) */
  engine: string;
  data: { type: 'file'; path: string } | { type: 's3'; bucket: string; endpoint?: string };
  /** backy's view of backy2's data backend (same keys), to read blobs from it */
  dataConfig: Config;
}

export function loadBacky2Config(file: string): Backy2Config {
  const abs = path.resolve(file);
  let text: string;
  try {
    text = fs.readFileSync(abs, 'utf8');
  } catch (e) {
    throw new ConfigError(`cannot read backy2 configuration ${abs}: ${(e as NodeJS.ErrnoException).code === 'ENOENT' ? 'no such file' : (e as Error).message}`);
  }
  let ini: IniData;
  try {
    ini = parseIni(text, abs);
  } catch (e) {
    throw new ConfigError((e as Error).message);
  }
  const get = (s: string, k: string) => ini.get(s)?.get(k)?.trim();
  const where = (s: string, k: string) => `${abs}: [${s === 'defaults' ? 'DEFAULTS' : s === 'metabackend' ? 'MetaBackend' : 'DataBackend'}] ${k}`;

  const blockSizeText = get('defaults', 'block_size') ?? '4194304';
  if (!/^\d+$/.test(blockSizeText) || +blockSizeText < 512) throw new ConfigError(`${where('defaults', 'block_size')} = "${blockSizeText}" is not a block size`);
  const hashFunction = (get('defaults', 'hash_function') ?? 'sha512').toLowerCase();
  if (!getHashes().includes(hashFunction)) throw new ConfigError(`${where('defaults', 'hash_function')} = "${hashFunction}" is not a hash function backy knows`);
  const encText = get('defaults', 'encryption_version') ?? '0';
  if (!/^[01]$/.test(encText)) throw new ConfigError(`${where('defaults', 'encryption_version')} = "${encText}": backy2 knows 0 and 1`);
  const keyText = get('defaults', 'encryption_key') ?? '';
  let encryptionKey: Buffer | undefined;
  if (keyText) {
    if (!/^[0-9a-fA-F]{64}$/.test(keyText)) throw new ConfigError(`${where('defaults', 'encryption_key')}: expected 64 hexadecimal characters`);
    encryptionKey = Buffer.from(keyText, 'hex');
  }

  const engine = normaliseSqlAlchemyUrl(get('metabackend', 'engine') ?? 'sqlite:////tmp/backy.sqlite', where('metabackend', 'engine'));

  const type = (get('databackend', 'type') ?? 'backy2.data_backends.file').replace(/^backy2\.(enterprise\.)?data_backends\./, '');
  let data: Backy2Config['data'];
  const lines = ['[DEFAULTS]', 'encryption = none', '[DataBackend]'];
  const copy = (...keys: string[]) => {
    for (const k of keys) {
      const v = get('databackend', k);
      if (v !== undefined && v !== '') lines.push(`${k} = ${v}`);
    }
  };
  if (type === 'file') {
    const p = get('databackend', 'path') ?? '/tmp';
    data = { type: 'file', path: path.resolve(p) };
    lines.push('type = file', `path = ${data.path}`);
  } else if (type === 's3' || type === 'minio') {
    const bucket = get('databackend', 'bucket_name') ?? '';
    if (!bucket) throw new ConfigError(`${where('databackend', 'bucket_name')} is missing`);
    let endpoint = get('databackend', 'endpoint_url') || undefined;
    if (type === 'minio' && get('databackend', 'host')) {
      endpoint = `${/^(1|yes|true|on)$/i.test(get('databackend', 'secure') ?? '') ? 'https' : 'http'}://${get('databackend', 'host')}`;
    }
    data = { type: 's3', bucket, endpoint };
    lines.push('type = s3', 'addressing_style = path');
    copy('aws_access_key_id', 'aws_access_key_id_file', 'aws_secret_access_key', 'aws_secret_access_key_file', 'region_name', 'bucket_name', 'addressing_style');
    if (endpoint) lines.push(`endpoint_url = ${endpoint}`);
    const ssl = get('databackend', 'use_ssl');
    if (ssl) lines.push(`use_ssl = ${ssl}`);
  } else {
    throw new ConfigError(`${where('databackend', 'type')} = "${get('databackend', 'type')}": backy imports backy2's file and s3 (or minio) data backends`);
  }
  copy('simultaneous_reads', 'simultaneous_writes');
  let dataConfig: Config;
  try {
    dataConfig = configFromText(lines.join('\n'), abs);
  } catch (e) {
    throw new ConfigError(`${abs}: ${(e as Error).message}`);
  }

  return {
    file: abs,
    blockSize: +blockSizeText,
    hashFunction,
    lockDir: get('defaults', 'lock_dir') ?? '/tmp',
    processName: get('defaults', 'process_name') || 'backy2',
    encryptionVersion: +encText,
    encryptionKey,
    engine,
    data,
    dataConfig,
  };
}

/** SQLAlchemy's URL as backy spells engines: sqlite:////abs/path or postgresql://user:pw@host:port/db. */
export function normaliseSqlAlchemyUrl(url: string, where: string): string {
  const u = url.trim();
  if (u.startsWith('sqlite:///')) {
    const p = u.slice('sqlite:///'.length).replace(/\?.*$/, '');
    if (!p || p === ':memory:') throw new ConfigError(`${where} = "${u}": an in-memory database holds nothing to import`);
    return `sqlite:///${path.resolve(p)}`;
  }
  const m = /^postgres(?:ql)?(?:\+\w+)?:\/\/(.*)$/.exec(u);
  if (m) return `postgresql://${m[1]}`;
  throw new ConfigError(`${where}: backy imports backy2's sqlite and postgresql databases, not "${u.replace(/\/\/[^@/]*@/, '//***@')}"`);
}
