/** Secrets inside connection URLs, found so they can be kept out of every message and log line. */

/** Query parameters of a connection URL that carry secrets (libpq and pg accept them besides user:password@). */
const SECRET_PARAMS = /([?&](?:ssl)?password=)[^&#]*/gi;

/**
 * The engine URL with every password replaced by ***: safe for messages, logs and `description`. Covers
 * `user:password@host` and `?password=` / `&sslpassword=` query parameters.
 */
export function maskEngineUrl(url: string): string {
  // A password may contain '@' (percent-encoded or not) but never '/': mask up to the last '@' of the authority.
  return url.replace(/^([a-z][a-z0-9+.-]*:\/\/[^:@/]*):[^/]*@/i, '$1:***@').replace(SECRET_PARAMS, '$1***');
}

/**
 * Every password of an engine URL, as written and decoded, to keep out of every message and log line
 * (a driver error may quote either form).
 */
export function enginePasswords(url: string): string[] {
  const raw: string[] = [];
  const m = /^[a-z][a-z0-9+.-]*:\/\/[^:@/]*:([^/]*)@/i.exec(url);
  if (m?.[1]) raw.push(m[1]);
  for (const q of url.matchAll(SECRET_PARAMS)) {
    const value = q[0].slice(q[1].length);
    if (value) raw.push(value);
  }
  const out = new Set<string>();
  for (const r of raw) {
    out.add(r);
    try {
      out.add(decodeURIComponent(r.replace(/\+/g, ' ')));
      out.add(decodeURIComponent(r));
    } catch { /* not percent-encoded */ }
  }
  return [...out].filter(Boolean);
}
