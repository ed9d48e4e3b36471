import type { Command } from 'commander';
import type { Action } from '../main';
export type Register = (program: Command, wrap: (fn: Action) => (...args: unknown[]) => Promise<void>) => void;

/**
 * Every command, in the order `backy --help` lists them; each module is named after its command. A module is
 * loaded only when its command runs (or for help): loading all of them cost every command ~45 ms here.
 */
export const COMMAND_NAMES = ['init', 'initdb', 'backup', 'restore', 'ls', 'scrub', 'rm', 'protect', 'unprotect', 'cleanup', 'stats', 'add-tag',
  'remove-tag', 'expire', 'nbd', 'mount', 'umount', 'overlay', 'fixate', 'db-migrate', 'due', 'sla', 'enforce', 'du', 'diff-meta', 'db-rebuild',
  'import-backy2', 'export', 'import'] as const;

export function loadCommand(name: string): Register {
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  return (require(`./${name}`) as { register: Register }).register;
}

/** Global options that take a value: the word after them is not the command. */
const GLOBAL_OPTIONS_WITH_VALUE = new Set(['-c', '--configfile']);

/**
 * The commands to register for this command line: only the one it runs when the first word that is not a global
 * option names a command, otherwise (help, no command, a misspelt one that needs suggestions) all of them.
 */
export function commandsFor(argv: string[]): Register[] {
  for (let i = 2; i < argv.length; i++) {
    const word = argv[i];
    if (word === '--') break;
    if (word.startsWith('-')) {
      // `-c FILE`, or `-c` last in a group of short flags (`-mc FILE`).
      if (GLOBAL_OPTIONS_WITH_VALUE.has(word) || /^-[a-zA-Z]+c$/.test(word)) i++;
      continue;
    }
    if ((COMMAND_NAMES as readonly string[]).includes(word)) return [loadCommand(word)];
    break;
  }
  return COMMAND_NAMES.map(loadCommand);
}
