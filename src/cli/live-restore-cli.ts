import type { Context } from './context';
import type { Repository } from '../engine/repository';
import type { LiveEvent } from '../engine/live-restore';
import type { NbdServiceOptions } from '../engine/nbd-service';
import { BackyError, StorageError } from '../util/errors';
import { log } from '../util/log';

/**
 * `restore --live` in the terminal: SIGINT/SIGTERM stop it (a second one exits at once; the progress map
 * stays consistent either way), --json prints one event per line on stdout (serving, progress every second,
 * complete, stopped), and the exit code says whether everything was restored.
 */
export async function runLiveRestore(
  ctx: Context,
  repo: Repository,
  uid: string,
  target: string,
  o: { sparse?: boolean; force?: boolean; continue?: boolean; state?: string; exitWhenDone?: boolean },
  serve: Pick<NbdServiceOptions, 'listen' | 'tls' | 'maxConnections' | 'handshakeTimeoutMs' | 'replyTimeoutMs'>,
): Promise<void> {
  const { liveRestore } = await import('../engine/live-restore');
  const stop = new AbortController();
  const onSignal = (signal: NodeJS.Signals): void => {
    process.off('SIGTERM', onSignal);
    process.off('SIGINT', onSignal);
    process.once('SIGTERM', forceExit);
    process.once('SIGINT', forceExit);
    log.info(`${signal}: stopping the live restore`);
    stop.abort();
  };
  process.on('SIGTERM', onSignal);
  process.on('SIGINT', onSignal);
  const json = ctx.output.json;
  const onEvent = (e: LiveEvent): void => {
    if (json) process.stdout.write(`${JSON.stringify(e)}\n`);
  };
  try {
    const r = await liveRestore(repo, {
      uid, target, force: !!o.force, sparse: !!o.sparse, resume: !!o.continue, statePath: o.state,
      serve, exitWhenDone: !!o.exitWhenDone, stop: stop.signal, onEvent, quiet: ctx.quiet,
    });
    if (r.errors.length) throw new StorageError(`${r.errors.length} blocks could not be restored (first at offset ${r.errors[0].offset}); continue with --live --continue once storage is repaired`);
    if (!r.complete) {
      throw new BackyError(`live restore stopped before it was complete (${Math.floor((r.doneBytes / Math.max(1, r.bytes)) * 100)}% restored); ` +
        `continue with "backy restore --live --continue ${uid} ${target}"`);
    }
  } finally {
    process.off('SIGTERM', onSignal);
    process.off('SIGINT', onSignal);
  }
}

function forceExit(): void {
  log.warn('second signal: exiting at once (continue later with --live --continue)');
  process.exit(1);
}
