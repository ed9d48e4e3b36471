import { formatBytes } from '../config/size';
import { log } from './log';

/**
 * Progress of long work: a bar with bytes done, throughput and ETA when stderr is a terminal, otherwise a
 * log line every 5 % (and at least every minute) once the work takes more than two seconds, so cron mails and
 * journals stay readable.
 */
export class Progress {
  private done = 0;
  private readonly start = Date.now();
  private lastDraw = 0;
  private lastPct = -1;
  private lastLine = Date.now();
  private readonly tty: boolean;
  private drawn = false;

  constructor(private readonly what: string, private readonly total: number, opts: { quiet?: boolean } = {}) {
    this.tty = !opts.quiet && !!process.stderr.isTTY && log.consoleLevel !== 'error';
    this.quiet = !!opts.quiet;
  }
  private readonly quiet: boolean;

  add(bytes: number): void {
    this.done += bytes;
    const now = Date.now();
    if (this.tty) {
      if (now - this.lastDraw >= 200) this.draw(now);
      return;
    }
    const pct = this.total ? Math.floor((this.done / this.total) * 20) * 5 : 100;
    // Short jobs stay quiet: lines start once the work has taken two seconds.
    if (now - this.start < 2000) return;
    if (pct < 100 && (pct > this.lastPct || now - this.lastLine > 60_000)) {
      this.lastPct = pct;
      this.lastLine = now;
      const line = `${this.what}: ${pct}% (${this.stats(now)})`;
      if (this.quiet) log.fileOnly(line);
      else log.info(line);
    }
  }

  private stats(now: number): string {
    const secs = Math.max(0.001, (now - this.start) / 1000);
    const rate = this.done / secs;
    const eta = rate > 0 ? Math.max(0, (this.total - this.done) / rate) : 0;
    return `${formatBytes(this.done)} of ${formatBytes(this.total)}, ${formatBytes(rate)}/s, ETA ${fmtDuration(eta)}`;
  }

  private draw(now: number): void {
    this.lastDraw = now;
    const width = 30;
    const frac = this.total ? Math.min(1, this.done / this.total) : 1;
    const bar = '#'.repeat(Math.round(frac * width)).padEnd(width, '.');
    process.stderr.write(`\r${this.what} [${bar}] ${(frac * 100).toFixed(1).padStart(5)}% ${this.stats(now)}\x1b[K`);
    this.drawn = true;
  }

  /** Clears the bar; the caller logs the summary line. */
  finish(): void {
    if (this.tty && this.drawn) process.stderr.write('\r\x1b[K');
  }

  elapsed(): number {
    return (Date.now() - this.start) / 1000;
  }
}

export function fmtDuration(secs: number): string {
  if (!isFinite(secs)) return '?';
  const s = Math.round(secs);
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m${String(s % 60).padStart(2, '0')}s`;
  return `${Math.floor(s / 3600)}h${String(Math.floor((s % 3600) / 60)).padStart(2, '0')}m`;
}
