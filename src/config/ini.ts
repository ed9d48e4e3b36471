/**
 * backy2's configuration format (Python configparser): `[section]`, `key = value` or `key: value`, `#` and `;`
 * comments, indented lines continue the previous value. Section and key names are case-insensitive.
 */
export type IniData = Map<string, Map<string, string>>;

export function parseIni(text: string, source: string): IniData {
  const data: IniData = new Map();
  let section: Map<string, string> | undefined;
  let lastKey: string | undefined;
  const lines = text.split(/\r?\n/);
  for (let i = 0; i < lines.length; i++) {
    const raw = lines[i];
    const trimmed = raw.trim();
    if (trimmed === '' || trimmed.startsWith('#') || trimmed.startsWith(';')) {
      if (trimmed === '') lastKey = undefined;
      continue;
    }
    if (/^\s/.test(raw) && lastKey && section) {
      section.set(lastKey, `${section.get(lastKey)}\n${trimmed}`.trim());
      continue;
    }
    const sec = /^\[([^\]]+)\]\s*$/.exec(trimmed);
    if (sec) {
      const name = sec[1].trim().toLowerCase();
      section = data.get(name) ?? new Map();
      data.set(name, section);
      lastKey = undefined;
      continue;
    }
    const m = /^([^=:]+?)\s*[=:]\s*(.*)$/.exec(trimmed);
    if (!m || !section) {
      throw new Error(`${source}:${i + 1}: cannot parse "${trimmed.slice(0, 60)}"${section ? '' : ' (no [section] before it)'}`);
    }
    lastKey = m[1].toLowerCase();
    section.set(lastKey, m[2].startsWith('"') ? unquote(m[2], `${source}:${i + 1}`) : stripInlineComment(m[2]));
  }
  return data;
}

/**
 * A value in double quotes is taken literally (no inline comment, spaces kept), with \" and \\ escapes: how
 * `backy init` writes a path that contains " #", " ;" or leading or trailing spaces. Anything after the closing
 * quote must be a comment.
 */
function unquote(v: string, where: string): string {
  let out = '';
  for (let k = 1; k < v.length; k++) {
    const c = v[k];
    if (c === '\\' && (v[k + 1] === '"' || v[k + 1] === '\\')) {
      out += v[++k];
    } else if (c === '"') {
      const rest = v.slice(k + 1).trim();
      if (rest && !/^[#;]/.test(rest)) throw new Error(`${where}: unexpected text after the closing quote: "${rest.slice(0, 40)}"`);
      return out;
    } else {
      out += c;
    }
  }
  throw new Error(`${where}: a quoted value has no closing quote`);
}

/** `value` as an INI value that reads back exactly (quoted only when it has to be). */
export function iniValue(value: string): string {
  if (/[\r\n]/.test(value)) throw new Error('a configuration value cannot contain a line break');
  const plain = value === value.trim() && !/\s[#;]/.test(value) && !value.startsWith('"') && !/^[#;]/.test(value);
  return plain ? value : `"${value.replace(/[\\"]/g, (c) => `\\${c}`)}"`;
}

function stripInlineComment(v: string): string {
  // configparser only treats " #" / " ;" as inline comments when configured to; backy2 values never contain
  // them, and hex keys or URLs never have a space before '#', so this is safe and friendlier.
  const m = /\s[#;]/.exec(v);
  return (m ? v.slice(0, m.index) : v).trim();
}

export function mergeIni(into: IniData, from: IniData): void {
  for (const [name, sec] of from) {
    const target = into.get(name) ?? new Map<string, string>();
    for (const [k, v] of sec) target.set(k, v);
    into.set(name, target);
  }
}
