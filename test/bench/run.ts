import * as fs from 'node:fs';
import * as path from 'node:path';
import { machineLine } from './common';

/**
 * `npm run bench`: runs every test/bench/*.bench.ts (each exports `run(): Promise<void>`), or only those
 * whose name contains one of the arguments (`npm run bench -- backup nbd`).
 */
async function main(): Promise<void> {
  const filters = process.argv.slice(2);
  console.log(`# backy benchmarks, ${new Date().toISOString()}\n${machineLine()}`);
  const files = fs.readdirSync(__dirname).filter((f) => f.endsWith('.bench.js')).sort()
    .filter((f) => !filters.length || filters.some((x) => f.includes(x)));
  for (const f of files) {
    console.log(`\n# ${f.replace(/\.bench\.js$/, '')}`);
    const mod = require(path.join(__dirname, f)) as { run: () => Promise<void> };
    await mod.run();
  }
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
