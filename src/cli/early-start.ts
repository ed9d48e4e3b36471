import * as os from 'node:os';
import * as path from 'node:path';
import { startEarlyWorkers } from '../codec/early-workers';

/**
 * Imported first by main.ts: when the process is backy itself running a command that encodes or decodes
 * blocks from its first second, the codec workers start booting now, beside the loading of everything else
 * (see early-workers.ts). Servers (nbd, mount) start once and are not worth it; other commands never need them.
 */
const CODEC_COMMANDS = new Set(['backup', 'restore', 'scrub']);

/** The command word of a backy command line (global options come before it; -c takes a value). */
export function commandWord(argv: string[]): string | undefined {
  for (let i = 2; i < argv.length; i++) {
    const a = argv[i];
    if (a === '-c' || a === '--configfile') i++;
    else if (!a.startsWith('-')) return a;
  }
  return undefined;
}

if (require.main?.filename === path.join(__dirname, 'main.js') && CODEC_COMMANDS.has(commandWord(process.argv) ?? '')) {
  startEarlyWorkers(Math.max(1, os.availableParallelism()));
}
