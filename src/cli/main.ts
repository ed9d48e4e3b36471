#!/usr/bin/env node
// First: it may start the codec workers, which then boot while the rest loads.
import './early-start';
import { Command, CommanderError } from 'commander';
import { BackyError, errorLine, ExitCode } from '../util/errors';
import { log } from '../util/log';
import { Context, GlobalOptions } from './context';
import { commandsFor } from './commands';

// eslint-disable-next-line @typescript-eslint/no-require-imports
const pkg = require('../../../package.json') as { version: string };

export type Action = (ctx: Context, ...args: any[]) => Promise<number | void>;

/** Builds the program; `register` functions of the commands get `wrap` to turn an Action into a handler. */
export function buildProgram(argv: string[] = process.argv): Command {
  const program = new Command('backy');
  program
    .description('Block-level, deduplicating, encrypted backup of disk images and block devices; every version can be served live over NBD or mounted.')
    .enablePositionalOptions()
    .option('-v, --verbose', 'verbose output (debug lines in the logfile and on stderr)')
    .option('-d, --debug', 'debug output: stack traces on errors')
    .option('-m, --machine-output', 'machine readable output (pipe separated, like backy2)')
    .option('-s, --skip-header', 'omit the header line of tables and machine output')
    .option('-r, --human-readable', 'sizes in KiB/MiB/GiB')
    .option('--json', 'output JSON')
    .option('-c, --configfile <file>', 'use only this configuration file')
    .version(pkg.version, '-V, --version', 'show the version')
    .helpOption('-h, --help', 'show help')
    .showSuggestionAfterError(true)
    .exitOverride();
  const wrap = (fn: Action) => async (...args: unknown[]) => {
    const ctx = new Context(program.opts<GlobalOptions>());
    if (ctx.opts.verbose) log.consoleLevel = 'debug';
    else if (ctx.opts.machineOutput) log.consoleLevel = 'error';
    let code: number = ExitCode.OK;
    try {
      // commander passes (args..., options, command): hand the command's options on, drop the Command.
      code = (await fn(ctx, ...args.slice(0, -1))) ?? ExitCode.OK;
    } catch (e) {
      code = reportError(e, !!ctx.opts.debug);
      ctx.failed = true;
    } finally {
      // Should the event loop run dry while closing (nothing left keeping it alive), the process still ends
      // with this command's code, not 0.
      process.exitCode = code;
      await ctx.close().catch(() => undefined);
    }
    await exitAfterOutput(code);
  };
  // Set before the commands exist: subcommands copy these settings when created.
  program.configureOutput({
    writeErr: (s) => process.stderr.write(s),
    outputError: (s, write) => write(s.split('\n')[0] + '\n'),
  });
  for (const register of commandsFor(argv)) register(program, wrap);
  return program;
}

/**
 * Exits once stdout and stderr have been handed to the kernel: a pipe to a slow reader (`backy -m ls | ...`)
 * makes writes asynchronous, and exiting earlier would cut the output short.
 */
export async function exitAfterOutput(code: number): Promise<never> {
  for (const s of [process.stdout, process.stderr]) {
    if (s.writableLength > 0 && !s.destroyed) {
      await new Promise<void>((resolve) => {
        s.once('drain', resolve);
        s.once('error', resolve);
        s.once('close', resolve);
      });
    }
  }
  process.exit(code);
}

export function reportError(e: unknown, debug: boolean): number {
  if (e instanceof BackyError) {
    log.error(e.message);
    if (debug && e.stack) process.stderr.write(`${e.stack}\n`);
    return e.exitCode;
  }
  log.error(`unexpected error: ${errorLine(e)}`);
  if (debug && e instanceof Error && e.stack) process.stderr.write(`${e.stack}\n`);
  return ExitCode.OTHER;
}

async function main(argv: string[]): Promise<void> {
  const program = buildProgram(argv);
  if (argv.length <= 2) {
    program.outputHelp({ error: true });
    process.exit(ExitCode.USAGE);
  }
  try {
    await program.parseAsync(argv);
  } catch (e) {
    if (e instanceof CommanderError) {
      if (e.code === 'commander.helpDisplayed' || e.code === 'commander.version' || e.code === 'commander.help') process.exit(0);
      process.exit(ExitCode.USAGE);
    }
    process.exit(reportError(e, argv.includes('-d') || argv.includes('--debug')));
  }
}

process.on('unhandledRejection', (e) => {
  process.exit(reportError(e, process.argv.includes('-d') || process.argv.includes('--debug')));
});

if (require.main === module) void main(process.argv);
