import * as fs from 'node:fs';
import * as path from 'node:path';
import { execFileSync } from 'node:child_process';
import { BACKY } from './helpers/cli';
import { sha256File } from './helpers/images';

/**
 * `npm run demo`: backy's daily cycle on the embedded defaults (SQLite + a local directory), with the real
 * CLI: init, backup of a disk image, a differential backup after a change, ls, scrub, restore, compare,
 * rm, cleanup. Everything lives in ./backy-data (the config in ./backy.cfg); run it again at will.
 */
function backy(...args: string[]): string {
  console.log(`\n$ backy ${args.join(' ')}`);
  const out = execFileSync(process.execPath, [BACKY, ...args], { stdio: ['ignore', 'pipe', 'inherit'] }).toString();
  process.stdout.write(out);
  return out.trim();
}

function main(): void {
  const data = path.resolve('backy-data');
  fs.mkdirSync(data, { recursive: true });
  backy('init');
  // A real disk image: an ext4 filesystem holding this project's sources, 128 MiB, mostly empty.
  const img = path.join(data, 'demo-disk.img');
  fs.rmSync(img, { force: true });
  execFileSync('mke2fs', ['-q', '-F', '-t', 'ext4', '-d', path.resolve(__dirname, '../../src'), img, '128M']);
  const first = backy('-m', 'backup', '-t', 'demo', `file://${img}`, 'demo-disk').split('\n').pop()!;
  // Change the image a little and back it up again against the first version.
  const fd = fs.openSync(img, 'r+');
  fs.writeSync(fd, Buffer.from(`changed at ${new Date().toISOString()}`), 0, undefined, 100 * 1024 * 1024);
  fs.closeSync(fd);
  const second = backy('-m', 'backup', '-f', first, `file://${img}`, 'demo-disk').split('\n').pop()!;
  backy('ls', 'demo-disk');
  backy('scrub', second);
  const restored = path.join(data, 'demo-disk.restored.img');
  fs.rmSync(restored, { force: true });
  backy('restore', second, `file://${restored}`);
  const same = sha256File(restored) === sha256File(img);
  console.log(`\nrestored image ${same ? 'is identical to' : 'DIFFERS from'} the original`);
  fs.rmSync(restored);
  backy('rm', '-f', first);
  backy('cleanup');
  backy('stats', '-l', '2');
  if (!same) process.exit(1);
}

main();
