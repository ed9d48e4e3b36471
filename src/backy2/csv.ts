/**
 * CSV as backy2 wrote and read its metadata dumps: Python's csv module with its defaults (delimiter ",", quote
 * character '"', QUOTE_MINIMAL, lines ending in CRLF). A field is quoted only when it holds a comma, a quote
 * (doubled inside) or a line break; a row of one empty field is written as "" so it is not an empty line.
 */
export function csvRow(fields: (string | number)[]): string {
  const cells = fields.map((f) => {
    const s = String(f);
    return /[",\r\n]/.test(s) ? `"${s.replace(/"/g, '""')}"` : s;
  });
  if (cells.length === 1 && cells[0] === '') return '""\r\n';
  return `${cells.join(',')}\r\n`;
}

/** Splits CSV text into rows of fields (quoted fields may hold commas, quotes and line breaks). */
export function* csvRows(text: string): Generator<string[]> {
  let i = 0;
  const n = text.length;
  while (i < n) {
    const row: string[] = [];
    for (;;) {
      let field = '';
      if (text[i] === '"') {
        i++;
        for (;;) {
          const q = text.indexOf('"', i);
          if (q < 0) throw new Error('unterminated quoted field');
          field += text.slice(i, q);
          i = q + 1;
          if (text[i] === '"') {
            field += '"';
            i++;
          } else break;
        }
        // Python accepts text after the closing quote up to the delimiter; so do we.
        while (i < n && text[i] !== ',' && text[i] !== '\r' && text[i] !== '\n') field += text[i++];
      } else {
        const start = i;
        while (i < n && text[i] !== ',' && text[i] !== '\r' && text[i] !== '\n') i++;
        field = text.slice(start, i);
      }
      row.push(field);
      if (text[i] === ',') {
        i++;
        continue;
      }
      if (text[i] === '\r') i++;
      if (text[i] === '\n') i++;
      break;
    }
    if (row.length === 1 && row[0] === '' ) continue; // an empty line
    yield row;
  }
}
