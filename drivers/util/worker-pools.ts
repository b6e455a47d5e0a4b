// How the process's worker pools (the qcow2 inflate pool, the decode pool) end.
//
// Node aborts the whole process when it tears down a worker that was stopped between
// building a zlib stream and initialising it (node_zlib.cc: "close before init", seen
// once in CI when a short convert ended the inflate pool with worker.terminate()).
// So a pool never terminates a worker that may be running a job: it asks the worker
// to end with a message (END), which the worker acts on between jobs, after closing
// its zlib engine. And a command that exits on purpose (process.exit) first waits,
// briefly, for the jobs still inside workers: settleWorkers().
//
// A worker that is idle when the process exits is safe: it runs no JavaScript.
import type { Worker } from 'node:worker_threads';

/** The message that ends a pool worker between jobs. */
export const END = 'tsmount:end';

export function isEnd(m: unknown): boolean {
  return m === END;
}

/** How pool workers ended: by END (exit code 0), or stopped or failed (any other code). For tests. */
const exits = { clean: 0, other: 0 };

/** A pool records each of its workers' exit here. */
export function noteExit(code: number): void {
  if (code === 0) exits.clean++;
  else exits.other++;
}

export function poolExits(): { clean: number; other: number } {
  return { ...exits };
}

/** A pool's wait for the jobs its workers are still running (each pool registers one). */
type Settle = () => Promise<void>;

const pools = new Set<Settle>();

export function registerPool(settle: Settle): void {
  pools.add(settle);
}

/** Workers asked to end (endWorker) and not gone yet. */
const ending = new Set<Busy>();

/** How many workers were asked to end and have not exited yet (tests wait for none). */
export function workersEnding(): number {
  return ending.size;
}

/**
 * Ask a pool's worker to end after the job it runs (END), with its listeners replaced:
 * its exit is only recorded from now on. A worker already gone is left alone.
 */
export function endWorker(worker: Worker, busy: Busy): void {
  worker.removeAllListeners('exit');
  worker.removeAllListeners('error');
  worker.on('error', () => undefined);
  // threadId is -1 once the worker is gone.
  if (worker.threadId < 0) return;
  ending.add(busy);
  worker.on('exit', (code) => {
    noteExit(code);
    busy.gone();
    ending.delete(busy);
  });
  worker.postMessage(END);
  worker.unref();
}

/**
 * Resolves once no pool worker runs a job (those jobs' results are dropped), or after
 * `ms`. Call before process.exit where a failure may leave compression jobs running.
 */
export async function settleWorkers(ms = 2000): Promise<void> {
  if (pools.size === 0 && ending.size === 0) return;
  let timer: NodeJS.Timeout | undefined;
  const late = new Promise<void>((resolve) => {
    timer = setTimeout(resolve, ms);
  });
  try {
    const all = [...[...pools].map((s) => s().catch(() => undefined)), ...[...ending].map((b) => b.idle())];
    await Promise.race([Promise.all(all), late]);
  } finally {
    clearTimeout(timer);
  }
}

/** Counts a worker's jobs in flight and resolves waiters when it has none. */
export class Busy {
  private n = 0;
  private waiters: (() => void)[] = [];

  start(): void {
    this.n++;
  }

  /** A job came back (or its worker died). */
  done(): void {
    if (this.n > 0) this.n--;
    if (this.n === 0) this.wake();
  }

  /** The worker is gone: nothing of it runs any more. */
  gone(): void {
    this.n = 0;
    this.wake();
  }

  idle(): Promise<void> {
    return this.n === 0 ? Promise.resolve() : new Promise<void>((resolve) => this.waiters.push(resolve));
  }

  private wake(): void {
    const w = this.waiters;
    this.waiters = [];
    for (const f of w) f();
  }
}
