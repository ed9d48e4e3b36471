import * as fs from 'node:fs';
import * as path from 'node:path';
import { randomBytes } from 'node:crypto';
import type { Register } from './index';
import { configFromText, loadConfig } from '../../config/config';
import { iniValue } from '../../config/ini';
import { IoError } from '../../util/errors';
import { log } from '../../util/log';

/**
 * `backy init [DIR]`: a working setup in one command. Writes DIR/backy.cfg (or ./backy.cfg with data in
 * ./backy-data) with a fresh random key, then creates the database and data directory. An existing config
 * is never overwritten: it is used as it is.
 */
export const register: Register = (program, wrap) => {
  program.command('init [dir]')
    .description('write a configuration with a new encryption key and initialize the database (never overwrites)')
    .action(wrap(async (ctx, dir?: string) => {
      const base = path.resolve(dir ?? '.');
      const dataDir = dir ? base : path.join(base, 'backy-data');
      const cfgFile = ctx.opts.configfile ? path.resolve(ctx.opts.configfile) : path.join(base, 'backy.cfg');
      if (fs.existsSync(cfgFile)) {
        log.info(`${cfgFile} exists: left unchanged`);
      } else {
        const text = configText(dataDir);
        fs.mkdirSync(path.dirname(cfgFile), { recursive: true });
        fs.mkdirSync(dataDir, { recursive: true, mode: 0o700 });
        try {
          fs.writeFileSync(cfgFile, text, { mode: 0o600, flag: 'wx' });
        } catch (e) {
          throw new IoError(`cannot write ${cfgFile}: ${(e as Error).message}`);
        }
        log.info(`wrote ${cfgFile} with a new encryption key: keep a copy of it somewhere safe`);
      }
      const { Repository } = await import('../../engine/repository');
      const cfg = loadConfig(cfgFile);
      const r = await Repository.create(cfg);
      log.info(r.created ? `initialized database (${r.description})` : `database exists (${r.description}): left unchanged`);
      const here = path.resolve('backy.cfg') === cfgFile;
      const quoted = /^[\w./+-]+$/.test(cfgFile) ? cfgFile : `'${cfgFile.replace(/'/g, `'\\''`)}'`;
      log.info(`ready: ${here ? '' : `backy -c ${quoted} `}backup file:///path/to/image NAME`);
    }));
};

/**
 * The configuration `init` writes for a repository in `dataDir`. Paths are quoted where they need it (" #",
 * " ;", leading or trailing spaces) and the text is read back before it is written: every path must come back
 * exactly as meant.
 */
function configText(dataDir: string): string {
  const want = {
    logfile: path.join(dataDir, 'backy.log'),
    lockDir: dataDir,
    engine: `sqlite:///${path.join(dataDir, 'backy.sqlite')}`,
    data: path.join(dataDir, 'data'),
  };
  let text: string;
  try {
    text = [
      '# backy configuration, written by "backy init". Built-in defaults apply to every key not set here.',
      '[DEFAULTS]',
      `logfile = ${iniValue(want.logfile)}`,
      `lock_dir = ${iniValue(want.lockDir)}`,
      '# AES-256-GCM key of every blob in this repository. Keep a copy somewhere else: without it the backups',
      '# cannot be read.',
      `encryption_key = ${randomBytes(32).toString('hex')}`,
      '',
      '[MetaBackend]',
      `engine = ${iniValue(want.engine)}`,
      '',
      '[DataBackend]',
      'type = file',
      `path = ${iniValue(want.data)}`,
      '',
    ].join('\n');
  } catch (e) {
    throw new IoError(`cannot write a configuration for ${JSON.stringify(dataDir)}: ${(e as Error).message}`);
  }
  const back = configFromText(text, 'the new configuration');
  const got = { logfile: back.logfile, lockDir: back.lockDir, engine: back.metaEngine, data: back.data.path };
  for (const k of Object.keys(want) as (keyof typeof want)[]) {
    if (got[k] !== want[k]) throw new IoError(`cannot write a configuration for ${JSON.stringify(dataDir)}: ${k} would read back as ${JSON.stringify(got[k])}`);
  }
  return text;
}
