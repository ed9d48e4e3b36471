/**
 * Logs failures without flooding: a reader may hit the same bad block over and over (the kernel retries a
 * failed readahead page by page; a client loops), so a line about one cause is repeated at most once per
 * `intervalMs`, with the number of repeats it stood for.
 */
export class FailureLog {
  private last = new Map<string, { at: number; repeats: number }>();

  constructor(private readonly write: (line: string) => void, private readonly intervalMs = 10_000, private readonly now = () => Date.now()) {}

  /**
   * `key` groups lines about the same cause (e.g. the device error without the request's offset). `write`
   * overrides the writer given at construction for this line.
   */
  report(key: string, line: string, write = this.write): void {
    const t = this.now();
    const prev = this.last.get(key);
    if (prev && t - prev.at < this.intervalMs) {
      prev.repeats++;
      return;
    }
    write(prev?.repeats ? `${line} (and ${prev.repeats} similar failures)` : line);
    this.last.set(key, { at: t, repeats: 0 });
    if (this.last.size > 1000) this.last.clear();
  }
}
