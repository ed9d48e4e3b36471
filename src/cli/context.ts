import { Config, loadConfig } from '../config/config';
import type { Repository } from '../engine/repository';
import { enginePasswords } from '../meta/pg-errors';
import { log } from '../util/log';
import type { OutputMode } from './output';

export interface GlobalOptions {
  verbose?: boolean;
  debug?: boolean;
  machineOutput?: boolean;
  skipHeader?: boolean;
  humanReadable?: boolean;
  configfile?: string;
  json?: boolean;
}

/** What every command gets: global options, the configuration (loaded on first use) and output mode. */
export class Context {
  private cfg: Config | undefined;
  private repos: Repository[] = [];

  constructor(readonly opts: GlobalOptions) {}

  get output(): OutputMode {
    return { machine: !!this.opts.machineOutput, skipHeader: !!this.opts.skipHeader, human: !!this.opts.humanReadable, json: !!this.opts.json };
  }

  /** Non-interactive output: progress goes to the logfile only. */
  get quiet(): boolean {
    return !!this.opts.machineOutput || !!this.opts.json;
  }

  config(): Config {
    if (!this.cfg) {
      this.cfg = loadConfig(this.opts.configfile);
      log.addSecret(this.cfg.encryptionKey?.toString('hex'));
      log.addSecret(this.cfg.data.s3.secretAccessKey);
      for (const pw of enginePasswords(this.cfg.metaEngine)) log.addSecret(pw);
      log.setLogfile(this.cfg.logfile);
      if (this.opts.verbose) log.fileLevel = 'debug';
      for (const w of this.cfg.warnings) log.warn(w);
    }
    return this.cfg;
  }

  async repository(): Promise<Repository> {
    const { Repository } = await import('../engine/repository');
    const repo = await Repository.open(this.config());
    this.repos.push(repo);
    return repo;
  }

  /** The command failed: closing repositories skips work that is only worth doing after success. */
  failed = false;

  async close(): Promise<void> {
    for (const r of this.repos.splice(0)) await r.close({ syncStorageMeta: !this.failed });
  }
}
