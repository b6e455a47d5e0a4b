// The serving process: `tsmount --foreground` in the user's terminal, or the detached
// server a command started (server-process.ts). The detached one loads the server's
// modules while it waits on its ready channel for the command's options, plans the
// mount from them as the command did (mount-plan.ts), mounts, says OK and waits for
// the command's ACK before the mount is the user's.
import net from 'node:net';
import { messageOf } from '../drivers/errors.js';
import { settleWorkers } from '../drivers/util/worker-pools.js';
import type { Server } from '../fs/server.js';
import { planMount, type CliOptions, type MountPlan } from './mount-plan.js';
import { READY_FD } from './server-process.js';

/** How long an open may take before tsmount says on the terminal what it waits for. */
export const SLOW_OPEN_MS = 1000;

/**
 * Opening may take long: a remote image's first connection, a vvfat tree of many files,
 * a key derivation. On a terminal, once SLOW_OPEN_MS have passed, one line on stderr
 * says what the mount waits for; elsewhere (a script, a pipe) nothing. The returned
 * function cancels it, once the wait is over.
 */
export function slowNotice(images: string[]): () => void {
  if (!process.stderr.isTTY) return () => undefined;
  const fat = images.find((i) => i.startsWith('fat:'));
  const remote = images.find((i) => /^[a-z][a-z0-9+.-]*:\/\//i.test(i));
  const why = fat !== undefined ? ' (reading the directory tree of the virtual FAT disk)' : remote !== undefined ? ' (the remote server)' : '';
  const timer = setTimeout(() => process.stderr.write(`tsmount: waiting for ${images.join(', ')} to open${why}...\n`), SLOW_OPEN_MS);
  timer.unref();
  return () => clearTimeout(timer);
}

/** What the command sends the server: its parsed options and the paths, one JSON line. */
export interface ServeRequest {
  opts: CliOptions;
  paths: string[];
}

/** The server's end of the ready channel (a socket pair): lines in, lines out. */
class ReadyChannel {
  private readonly socket: net.Socket;
  private heard = '';
  private readonly lines: string[] = [];
  private ended = false;
  private wake: (() => void) | undefined;

  constructor(fd: number) {
    this.socket = new net.Socket({ fd, readable: true, writable: true });
    this.socket.setEncoding('utf8');
    this.socket.on('data', (chunk: string) => {
      this.heard += chunk;
      for (let nl = this.heard.indexOf('\n'); nl >= 0; nl = this.heard.indexOf('\n')) {
        this.lines.push(this.heard.slice(0, nl));
        this.heard = this.heard.slice(nl + 1);
      }
      this.wake?.();
    });
    const end = (): void => {
      this.ended = true;
      this.wake?.();
    };
    this.socket.on('end', end);
    this.socket.on('error', end);
    this.socket.on('close', end);
  }

  /** The next line, or undefined once the command has gone (end of file, an error). */
  async line(): Promise<string | undefined> {
    while (!this.lines.length && !this.ended) await new Promise<void>((resolve) => (this.wake = resolve));
    return this.lines.shift();
  }

  /** Write a line; resolves once written or once the command has gone. */
  say(text: string): Promise<void> {
    return new Promise((resolve) => {
      if (this.socket.destroyed) return resolve();
      this.socket.write(`${text}\n`, () => resolve());
    });
  }

  close(): void {
    this.socket.destroy();
  }
}

/** The command that started this server: its channel and its pid. */
interface Starter {
  channel: ReadyChannel;
  pid: number;
}

/**
 * The detached server (after tsmount-server.cts, which says whether it is an I/O
 * flusher): load the server while the command checks the command line, then serve
 * what it sends. A command that goes away first (it found an error,
 * or was killed) ends this process with nothing done.
 */
export async function serveStarted(starterPid: number, ioFlusher: number): Promise<void> {
  const channel = new ReadyChannel(READY_FD);
  // The starter's pid comes from the starter: one that died before we ran this line
  // would otherwise look like our parent (init) forever.
  const orphaned = setInterval(() => {
    if (process.ppid !== starterPid) process.kill(process.pid, 'SIGTERM');
  }, 100);
  // Loaded now, while the command parses; the signal's default action still ends this.
  const loading = Promise.all([import('../fs/server.js'), import('../fs/log.js')]);
  // Said on the channel once the command asks, not as an unhandled rejection now.
  loading.catch(() => undefined);
  const line = await channel.line();
  if (line === undefined) process.exit(0);
  clearInterval(orphaned);
  let plan: MountPlan;
  try {
    const req = JSON.parse(line) as ServeRequest;
    plan = await planMount(req.opts, req.paths);
    await loading;
  } catch (err) {
    await channel.say(`ERR ${messageOf(err)}`);
    process.exit(1);
  }
  await serve(plan, ioFlusher, { channel, pid: starterPid });
}

/**
 * Mount `plan` and serve it until unmounted; exits the process. Without a starter
 * (--foreground), errors go to stderr; with one, on the ready channel.
 */
export async function serve(plan: MountPlan, ioFlusher: number, starter?: Starter): Promise<never> {
  const { opts, images } = plan;
  // Once the starting command is gone, its end of our stderr is closed.
  process.stderr.on('error', () => undefined);
  const { enableDebug, log, openSyslog } = await import('../fs/log.js');
  // A detached server without --log also says things to syslog, as daemons do.
  if (starter && opts.log === undefined) openSyslog();
  if (opts.debug) enableDebug();
  // Only a writable mount can have a loop device write back into it: said only there.
  const writable = !!opts.rw || opts.overlay !== undefined || !!opts.snapshot;
  const why = ioFlusher === 1 ? 'EPERM: this process lacks CAP_SYS_RESOURCE' : ioFlusher === 22 ? 'EINVAL: the kernel is older than 5.6' : ioFlusher < 0 ? 'prctl could not be called' : `prctl errno ${ioFlusher}`;
  if (ioFlusher !== 0 && writable) log('info', `cannot mark the server an I/O flusher (${why}): a loop device over this mount may stall under memory pressure`);
  // Started detached: if the starting command goes away before the mount is ready
  // (Ctrl-C, timeout), stop. Until mounting begins, a signal keeps its default action,
  // which ends even a long key derivation at once, with nothing mounted; from then
  // on it marks the start abandoned, and the start unmounts before it returns.
  let abandoned = false;
  let mounting = false;
  let server: Server | undefined;
  const orphaned = starter === undefined ? undefined : setInterval(() => {
    if (process.ppid === starter.pid) return;
    // process.exit would wait for a key derivation running on the thread pool; the
    // signal's default action (no handler yet) ends the process at once.
    if (!mounting) process.kill(process.pid, 'SIGTERM');
    abandoned = true;
  }, 100);
  const onSignal = (): void => {
    abandoned = true;
    void server?.shutdown(true);
  };
  // Run by hand in the foreground on a terminal: the same word on a slow open as the starter's.
  const quiet = starter === undefined ? slowNotice(images) : () => undefined;
  try {
    const { Server } = await import('../fs/server.js');
    server = await Server.start({
      images,
      mountpoint: plan.mountpoint,
      format: opts.format,
      // An overlay exists to be written: the image under it never is.
      rw: writable,
      overlay: opts.overlay,
      snapshot: !!opts.snapshot,
      partitions: !!opts.partitions,
      layers: !!opts.layers,
      cache: opts.cache,
      cacheSize: plan.cacheSize,
      locking: opts.locking,
      forceShare: !!opts.forceShare,
      shareRw: !!opts.shareRw,
      namedFiles: opts.confine ? 'confine' : opts.trustImagePaths ? 'trust' : 'owner',
      fuseOptions: plan.access.rest,
      access: plan.access.access,
      secret: plan.secret,
      preallocate: plan.preallocate,
      abandoned: () => abandoned,
      beforeMount: () => {
        mounting = true;
        for (const sig of ['SIGTERM', 'SIGINT', 'SIGHUP'] as const) process.on(sig, onSignal);
      },
    });
  } catch (err) {
    quiet();
    // Nobody may be listening for this one: say it where the server's messages go.
    if (abandoned) log('warning', messageOf(err));
    if (starter) await starter.channel.say(`ERR ${messageOf(err)}`);
    else process.stderr.write(`tsmount: ${messageOf(err)}\n`);
    await settleWorkers();
    process.exit(1);
  }
  quiet();
  const running = server;
  // A bug must not leave a dead mount behind: write out what we can, unmount, exit.
  const crash = (err: unknown): void => {
    log('err', `internal error: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}`);
    setTimeout(() => process.exit(1), 10_000).unref();
    void running.shutdown(true).finally(() => process.exit(1));
  };
  process.on('uncaughtException', crash);
  process.on('unhandledRejection', crash);
  if (starter) {
    clearInterval(orphaned);
    // The mount is the user's once the starter has acknowledged it, not once we said
    // OK: a starter killed between reading OK and exiting would otherwise leave a mount
    // nobody was told about (and a status that says it failed).
    await starter.channel.say('OK');
    const acked = (await starter.channel.line()) === 'ACK';
    starter.channel.close();
    if (abandoned || !acked) {
      log('warning', `${running.mountpoint}: interrupted before the mount was ready; unmounting`);
      await running.shutdown(true);
      process.exit(1);
    }
  }
  for (const line of running.ready) log('info', line);
  const code = await running.exited;
  log('info', `${running.mountpoint}: exiting: ${running.summary}`);
  log(code === 0 ? 'info' : 'err', `${running.mountpoint} ${code === 0 ? 'unmounted' : 'unmounted, not cleanly (see the messages above)'}`);
  // Worker threads inside a job must not be stopped (worker-pools.ts).
  await settleWorkers();
  process.exit(code);
}

/** Serve in this process (--foreground): the same as a detached server, errors on stderr. */
export async function serveHere(plan: MountPlan): Promise<never> {
  // PR_SET_IO_FLUSHER first, so that the threads started from now on (FUSE workers,
  // io_uring queues) inherit it (sys.ts says why). Libuv's pool, started before this
  // ES module ran, does not: only the detached server (tsmount-server.cts) has it
  // there too.
  const ioFlusher = (await import('../drivers/util/sys.js')).setIoFlusher();
  return serve(plan, ioFlusher);
}

