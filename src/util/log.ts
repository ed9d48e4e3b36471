import * as fs from 'node:fs';

/**
 * Logging: human lines on stderr and, when configured, in the logfile. Never on stdout, which belongs to
 * command output (-m and --json are parsed by scripts).
 */
export type Level = 'debug' | 'info' | 'warn' | 'error';
const rank: Record<Level, number> = { debug: 10, info: 20, warn: 30, error: 40 };

class Logger {
  consoleLevel: Level = 'info';
  fileLevel: Level = 'info';
  private fd: number | undefined;
  /** Lines that must never appear (keys, passwords): replaced by *** wherever they show up. */
  private secrets: string[] = [];

  setLogfile(file: string | undefined): void {
    if (this.fd !== undefined) fs.closeSync(this.fd);
    this.fd = undefined;
    if (!file) return;
    try {
      this.fd = fs.openSync(file, 'a', 0o640);
    } catch (e) {
      this.write('warn', `cannot open logfile ${file}: ${(e as Error).message}; logging to stderr only`, false);
    }
  }

  addSecret(s: string | undefined): void {
    if (s && s.length >= 6) this.secrets.push(s);
  }

  private redact(line: string): string {
    for (const s of this.secrets) if (line.includes(s)) line = line.split(s).join('***');
    return line;
  }

  private write(level: Level, msg: string, toFile = true): void {
    const line = this.redact(msg);
    if (rank[level] >= rank[this.consoleLevel]) {
      process.stderr.write(level === 'info' || level === 'debug' ? `${line}\n` : `${level.toUpperCase()}: ${line}\n`);
    }
    if (toFile && this.fd !== undefined && rank[level] >= rank[this.fileLevel]) {
      const ts = new Date().toISOString().replace('T', ' ').slice(0, 19);
      try {
        fs.writeSync(this.fd, `${ts} ${process.pid} ${level.toUpperCase()} ${line}\n`);
      } catch {
        /* a full disk must not turn a log line into a failed backup */
      }
    }
  }

  debug(msg: string): void { this.write('debug', msg); }
  info(msg: string): void { this.write('info', msg); }
  warn(msg: string): void { this.write('warn', msg); }
  error(msg: string): void { this.write('error', msg); }
  /** Into the logfile only (e.g. progress lines shown on the console as a bar). */
  fileOnly(msg: string): void {
    if (this.fd !== undefined) {
      const ts = new Date().toISOString().replace('T', ' ').slice(0, 19);
      try { fs.writeSync(this.fd, `${ts} ${process.pid} INFO ${this.redact(msg)}\n`); } catch { /* see above */ }
    }
  }
}

export const log = new Logger();
