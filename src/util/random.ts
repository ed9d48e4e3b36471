/** `n` distinct items of `items` chosen at random (all of them, shuffled, when there are fewer). */
export function randomSample<T>(items: T[], n: number): T[] {
  const a = [...items];
  const k = Math.min(n, a.length);
  // Partial Fisher-Yates: the first k places end up a uniform random sample.
  for (let i = 0; i < k; i++) {
    const j = i + Math.floor(Math.random() * (a.length - i));
    [a[i], a[j]] = [a[j], a[i]];
  }
  return a.slice(0, k);
}
