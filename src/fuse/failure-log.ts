/**
 * Logs failed requests without flooding: the kernel retries a failed readahead page by page, and a reader
 * may hit the same bad block over and over, so a line is repeated at most once per `intervalMs`, with the
 * number of repeats it stood for.
 */
export class FailureLog {
  private last = new Map<string, { at: number; repeats: number }>();

  constructor(private readonly write: (line: string) => void, private readonly intervalMs = 10_000, private readonly now = () => Date.now()) {}

  /** `key` groups lines about the same cause (e.g. the device error without the request's offset). */
  report(key: string, line: string): void {
    const t = this.now();
    const prev = this.last.get(key);
    if (prev && t - prev.at < this.intervalMs) {
      prev.repeats++;
      return;
    }
    this.write(prev?.repeats ? `${line} (and ${prev.repeats} similar failures)` : line);
    this.last.set(key, { at: t, repeats: 0 });
    if (this.last.size > 1000) this.last.clear();
  }
}
