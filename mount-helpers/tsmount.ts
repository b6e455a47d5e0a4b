#!/usr/bin/env node
// tsmount [options] IMAGE... MOUNTPOINT   |   tsmount -u MOUNTPOINT
//
// Without --foreground the command starts a detached server and returns only once
// the flat files exist (or with the server's one-line error). The server is started
// before anything is mounted: libfuse2 opens /dev/fuse without close-on-exec, so the
// serving process itself must never spawn a child.
import { spawn } from 'node:child_process';
import type { Duplex } from 'node:stream';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { Command, Option } from 'commander';
import { CACHE_MODES, type CacheMode } from '../drivers/types.js';
import { messageOf, UsageError } from '../drivers/errors.js';
import type { LockingMode } from '../drivers/protocol/lock.js';
// Only light modules load up front: the command that starts a server never needs the
// drivers (mount time is two Node start-ups; the server imports them itself).
import type { Server } from '../fs/server.js';
import { unmount } from './unmount.js';
import { parseSize } from '../drivers/options.js';
import { parseMountAccess } from '../fs/access.js';
import { readSecretFile } from './secret.js';
import { needsResolving, oneSecret, resolveImageNames } from './image-opts.js';
import { expandMountOptions } from './mount-options.js';
import { packageVersion } from './version.js';
import { TSMOUNT_HELP_AFTER } from './help.js';
import { settleWorkers } from '../drivers/util/worker-pools.js';


interface CliOptions {
  unmount?: boolean;
  lazy?: boolean;
  rw?: boolean;
  format?: string;
  foreground?: boolean;
  cache: CacheMode;
  cacheSize: string;
  locking: LockingMode;
  forceShare?: boolean;
  shareRw?: boolean;
  secret?: string;
  secretFile?: string;
  option: string[];
  uid?: string;
  gid?: string;
  umask?: string;
  growable?: boolean;
  log?: string;
  readyFd?: string;
  syslog?: boolean;
  debug?: boolean;
  starter?: string;
  imageOpts?: boolean;
  object: string[];
  iscsi: string[];
  readconfig: string[];
  confine?: boolean;
  trustImagePaths?: boolean;
  partitions?: boolean;
  overlay?: string;
  snapshot?: boolean;
  layers?: boolean;
  list?: boolean;
  output: string;
}

function readSecret(opts: CliOptions): string | undefined {
  if (opts.secret !== undefined && opts.secretFile !== undefined) fail('give --secret or --secret-file, not both');
  if (opts.secretFile === undefined) return opts.secret;
  return readSecretFile(opts.secretFile);
}

function fail(msg: string, code = 1): never {
  process.stderr.write(`tsmount: ${msg}\n`);
  process.exit(code);
}

function program(): Command {
  return new Command('tsmount')
    .usage('[options] IMAGE... MOUNTPOINT\n       tsmount -u [--lazy] MOUNTPOINT')
    .description('Present disk images as flat raw files: MOUNTPOINT/<stem>.raw')
    .argument('[paths...]', 'images, then the mountpoint')
    .option('-u, --unmount', 'unmount MOUNTPOINT; returns once every write is on disk and the server has exited')
    .option('--lazy', 'with -u: detach now even if busy (umount -l); the server exits after the last user closes, -u returns at once')
    .option('--rw', 'mount read-write (default: read-only)')
    .option('-f, --format <fmt>', 'image format (see Formats below); probed when absent')
    .option('--foreground', 'keep the server attached to this terminal')
    .addOption(new Option('--cache <mode>', 'cache mode, as QEMU').choices([...CACHE_MODES]).default('writeback'))
    .option('--cache-size <bytes>', 'bytes of cache for data and metadata (suffixes K, M, G)', '64M')
    .addOption(new Option('--locking <mode>', 'image locking, as QEMU').choices(['on', 'off', 'auto']).default('auto'))
    .option('-U, --force-share', 'open read-only even while another process writes the image (like qemu-img -U)')
    .option('--share-rw', 'let other writers use the image too (like share-rw=on)')
    .option('--confine', "open only files under the image's own folder that the image names (backing files, extents, data files)")
    .option('--trust-image-paths', 'open every file an image names, as QEMU does, even one its owner cannot read (unsafe for images you did not write)')
    .option('--image-opts', "each IMAGE is QEMU's key=value list (driver=qcow2,file.driver=ssh,file.host=...)")
    .option('--object <def>', 'QEMU object (repeatable): secret,id=ID,file=FILE|data=TEXT (an image names it with key-secret=ID), tls-creds-x509,id=ID,dir=DIR[,verify-peer=off] or tls-creds-psk,id=ID,dir=DIR[,username=NAME]; an image names it with tls-creds=ID', (v: string, acc: string[]) => [...acc, v], [] as string[])
    .option('--iscsi <opts>', 'iSCSI login options (repeatable): user=U,password=P,initiator-name=IQN,header-digest=CRC32C|CRC32C-NONE|NONE-CRC32C|NONE', (v: string, acc: string[]) => [...acc, v], [] as string[])
    .option('--readconfig <file>', "QEMU config file with [iscsi] and [iscsi \"TARGET-IQN\"] sections (repeatable)", (v: string, acc: string[]) => [...acc, v], [] as string[])
    .option('--secret <pass>', 'passphrase for encrypted images')
    .option('--secret-file <file>', 'read the passphrase from a file')
    .option('-o, --option <opt>', 'mount option (repeatable): allow_other, allow_root, uid=N, gid=N, umask=M, growable, nonempty, or a libfuse option', (v: string, acc: string[]) => [...acc, v], [] as string[])
    .option('--uid <n>', "owner of the flat files (default: the mounting user)")
    .option('--gid <n>', "group of the flat files (default: the mounting user's group)")
    .option('--umask <octal>', "flat files get mode 0666 & ~umask instead of the image file's")
    .option('--growable', 'let truncate grow the disk (--rw; also -o growable, -o resize)')
    .option('--partitions', 'show each MBR/GPT partition too, as <stem>-p<N>.raw (also -o partitions)')
    .option('--overlay <file>', 'write into this qcow2 overlay over the image (made if missing); the image is never written; implies --rw')
    .option('--snapshot', 'write into a temporary overlay, discarded at unmount; implies --rw')
    .option('--layers', 'show each layer of the backing chain too, read-only, as <stem>@<layer>.raw')
    .option('--list', 'list the tsmount mounts: images, read-only or not, server pid, counters')
    .addOption(new Option('--output <fmt>', 'with --list: human or json').choices(['human', 'json']).default('human'))
    .option('--log <file>', 'where the detached server writes its messages (default: syslog, see journalctl -t tsmount)')
    .option('--debug', 'log the debug namespaces tsmount:* (as DEBUG=tsmount:* does) to --log, or the terminal with --foreground')
    .addOption(new Option('--ready-fd <fd>').hideHelp())
    .addOption(new Option('--syslog').hideHelp())
    .addOption(new Option('--starter <pid>').hideHelp())
    .addHelpText('after', TSMOUNT_HELP_AFTER)
    .showHelpAfterError(false)
    .configureOutput({ outputError: (str, write) => write(`tsmount: ${str.replace(/^error: /, '').trim()}\n`) })
    .version(packageVersion(), '-V, --version')
    .exitOverride((err) => process.exit(err.exitCode === 0 ? 0 : 1));
}

async function main(argv: string[]): Promise<void> {
  // Every option also has an -o spelling (fstab, mount -t fuse.tsmount): rewritten first.
  argv = [...argv.slice(0, 2), ...expandMountOptions(argv.slice(2))];
  const cmd = program();
  cmd.parse(argv);
  const opts = cmd.opts<CliOptions>();
  const paths = cmd.args;

  if (opts.unmount) {
    if (paths.length !== 1) fail('-u takes exactly one MOUNTPOINT');
    const said = await unmount(paths[0]!, { lazy: !!opts.lazy });
    if (said) process.stderr.write(`tsmount: ${said}\n`);
    return;
  }
  if (opts.list) {
    if (paths.length !== 0) fail('--list takes no other arguments');
    const { listCommand } = await import('./list.js');
    process.stdout.write(await listCommand(opts.output === 'json'));
    return;
  }
  if (opts.lazy) fail('--lazy goes with -u');
  if (paths.length < 2) fail('need at least one IMAGE and a MOUNTPOINT (see --help)');
  let images = paths.slice(0, -1);
  let keySecret: string | undefined;
  if (needsResolving(images, opts)) {
    try {
      const resolved = await resolveImageNames(images, opts.format, opts);
      if (new Set(resolved.map((p) => p.format)).size > 1) fail('--image-opts: every image needs the same driver, and -f must agree with it');
      keySecret = oneSecret(resolved, undefined);
      images = resolved.map((p) => p.spec);
      opts.format = resolved[0]?.format ?? opts.format;
    } catch (err) {
      fail(messageOf(err));
    }
  }
  const mountpoint = paths[paths.length - 1]!;
  if (opts.iscsi.length || opts.readconfig.length) {
    try {
      (await import('../drivers/protocol/iscsi/uri.js')).configureIscsi({ iscsi: opts.iscsi, readconfig: opts.readconfig, object: opts.object });
    } catch (err) {
      fail(messageOf(err));
    }
  }
  if (opts.forceShare && (opts.rw || opts.overlay !== undefined || opts.snapshot)) fail('--force-share works only read-only (without --rw, --overlay or --snapshot)');
  if (opts.confine && opts.trustImagePaths) fail('give --confine or --trust-image-paths, not both');
  const cacheSize = parseSize(opts.cacheSize, '--cache-size');
  if (cacheSize < 1 << 20) fail('--cache-size must be at least 1M');
  // Cheap checks before a server is started, so a typo fails fast; the server checks
  // everything again (planMount) and reports through the ready channel.
  if (!fs.existsSync(mountpoint)) fail(`${mountpoint}: mountpoint does not exist`);
  for (const img of images) if (isLocalPath(img) && !fs.existsSync(img.replace(/^file:/, ''))) fail(`${img}: no such file`);
  if (keySecret !== undefined && (opts.secret !== undefined || opts.secretFile !== undefined)) fail('give the passphrase by key-secret or by --secret/--secret-file, not both');
  const secret = keySecret ?? readSecret(opts);
  let mountAccess: ReturnType<typeof parseMountAccess>;
  try {
    mountAccess = parseMountAccess(opts.option, opts);
  } catch (err) {
    fail(messageOf(err));
  }

  if (!opts.foreground) {
    await daemonize(argv, opts.log, images);
    return;
  }

  // The serving process: PR_SET_IO_FLUSHER first, before Node starts its thread pool,
  // so that every thread that reads or writes the image inherits it (sys.ts says why).
  const ioFlusher = (await import('../drivers/util/sys.js')).setIoFlusher();
  const readyFd = opts.readyFd !== undefined ? Number(opts.readyFd) : undefined;
  // Once the starting command is gone, its end of our stderr is closed.
  process.stderr.on('error', () => undefined);
  const { enableDebug, log, openSyslog } = await import('../fs/log.js');
  if (opts.syslog) openSyslog();
  if (opts.debug) enableDebug();
  // Only a writable mount can have a loop device write back into it: said only there.
  const writable = !!opts.rw || opts.overlay !== undefined || !!opts.snapshot;
  if (ioFlusher !== 0 && writable) log('info', `cannot mark the server an I/O flusher (prctl errno ${ioFlusher}): a loop device over this mount may stall under memory pressure`);
  // Started detached: if the starting command goes away before the mount is ready
  // (Ctrl-C, timeout), stop. Until mounting begins, a signal keeps its default action,
  // which ends even a long key derivation at once, with nothing mounted; from then
  // on it marks the start abandoned, and the start unmounts before it returns.
  let abandoned = false;
  let mounting = false;
  let server: Server | undefined;
  // The starter's pid comes from the starter: one that died before we ran this line
  // would otherwise look like our parent (init) forever.
  const parent = opts.starter !== undefined ? Number(opts.starter) : process.ppid;
  const orphaned = readyFd === undefined ? undefined : setInterval(() => {
    if (process.ppid === parent) return;
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
  const quiet = readyFd === undefined ? slowNotice(images) : () => undefined;
  try {
    const { Server } = await import('../fs/server.js');
    server = await Server.start({
      images,
      mountpoint,
      format: opts.format,
      // An overlay exists to be written: the image under it never is.
      rw: !!opts.rw || opts.overlay !== undefined || !!opts.snapshot,
      overlay: opts.overlay,
      snapshot: !!opts.snapshot,
      partitions: !!opts.partitions,
      layers: !!opts.layers,
      cache: opts.cache,
      cacheSize,
      locking: opts.locking,
      forceShare: !!opts.forceShare,
      shareRw: !!opts.shareRw,
      namedFiles: opts.confine ? 'confine' : opts.trustImagePaths ? 'trust' : 'owner',
      fuseOptions: mountAccess.rest,
      access: mountAccess.access,
      secret,
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
    if (readyFd !== undefined) {
      try {
        fs.writeSync(readyFd, `ERR ${messageOf(err)}\n`);
      } catch {
        /* nobody is listening any more */
      }
      await settleWorkers();
      process.exit(1);
    }
    await settleWorkers();
    fail(messageOf(err));
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
  if (readyFd !== undefined) {
    clearInterval(orphaned);
    // The mount is the user's once the starter has acknowledged it, not once we said
    // OK: a starter killed between reading OK and exiting would otherwise leave a mount
    // nobody was told about (and a status that says it failed).
    if (abandoned || !(await handOver(readyFd))) {
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

/**
 * Say OK on the ready channel (a socket pair) and wait for the starter's ACK; false
 * when the starter went away first (end of file, or an error).
 */
function handOver(fd: number): Promise<boolean> {
  const channel = new net.Socket({ fd, readable: true, writable: true });
  return new Promise((resolve) => {
    let heard = '';
    const done = (acked: boolean): void => {
      channel.destroy();
      resolve(acked);
    };
    channel.setEncoding('utf8');
    channel.on('data', (chunk: string) => {
      heard += chunk;
      if (heard.includes('\n')) done(heard.startsWith('ACK\n'));
    });
    channel.on('end', () => done(false));
    channel.on('error', () => done(false));
    channel.write('OK\n');
  });
}

/** A plain path (or file:PATH), not a URI of another protocol. */
function isLocalPath(spec: string): boolean {
  return spec.startsWith('file:') || !/^[a-z][a-z0-9+.-]*:/i.test(spec);
}

/** How long an open may take before tsmount says on the terminal what it waits for. */
const SLOW_OPEN_MS = 1000;

/**
 * Opening may take long: a remote image's first connection, a vvfat tree of many files,
 * a key derivation. On a terminal, once SLOW_OPEN_MS have passed, one line on stderr
 * says what the mount waits for; elsewhere (a script, a pipe) nothing. The returned
 * function cancels it, once the wait is over.
 */
function slowNotice(images: string[]): () => void {
  if (!process.stderr.isTTY) return () => undefined;
  const fat = images.find((i) => i.startsWith('fat:'));
  const remote = images.find((i) => /^[a-z][a-z0-9+.-]*:\/\//i.test(i));
  const why = fat !== undefined ? ' (reading the directory tree of the virtual FAT disk)' : remote !== undefined ? ' (the remote server)' : '';
  const timer = setTimeout(() => process.stderr.write(`tsmount: waiting for ${images.join(', ')} to open${why}...\n`), SLOW_OPEN_MS);
  timer.unref();
  return () => clearTimeout(timer);
}

/** Start the server detached and wait for its first word: OK, or ERR and a reason. */
async function daemonize(argv: string[], log: string | undefined, images: string[]): Promise<void> {
  const script = fileURLToPath(import.meta.url);
  const args = [...process.execArgv, script, ...argv.slice(2), '--foreground', '--ready-fd', '3', '--starter', String(process.pid), ...(log ? [] : ['--syslog'])];
  const logFd = log ? fs.openSync(path.resolve(log), 'a') : undefined;
  // Without --log, the server's stderr comes here until it is ready, so a crash at
  // startup still explains itself; after that it writes into a closed pipe, harmlessly.
  const child = spawn(process.execPath, args, { detached: true, stdio: ['ignore', logFd ?? 'ignore', logFd ?? 'pipe', 'pipe'] });
  // Interrupted before the mount is ready (Ctrl-C, timeout): the server, in its own
  // process group, must stop too and leave nothing mounted. Wait a little for it.
  let stopping = false;
  const interrupted = (sig: NodeJS.Signals, status: number): void => {
    stopping = true;
    try {
      process.kill(-child.pid!, sig);
    } catch {
      /* gone */
    }
    const quit = (): never => process.exit(status);
    if (child.exitCode !== null || child.signalCode !== null) quit();
    child.once('exit', quit);
    setTimeout(quit, 5000).unref();
  };
  process.on('SIGINT', () => interrupted('SIGINT', 130));
  process.on('SIGTERM', () => interrupted('SIGTERM', 143));
  process.on('SIGHUP', () => interrupted('SIGHUP', 129));
  // A socket pair: the server says OK or ERR, and waits for our ACK before the mount is ours.
  const channel = child.stdio[3] as Duplex;
  let said = '';
  let stderr = '';
  channel.setEncoding('utf8');
  channel.on('error', () => undefined);
  const answered = new Promise<void>((resolve) => {
    channel.on('data', (chunk: string) => {
      said += chunk;
      if (said.includes('\n')) resolve();
    });
    channel.on('end', resolve);
  });
  child.stderr?.on('data', (chunk: Buffer) => (stderr = (stderr + chunk.toString()).slice(-4096)));
  const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
  const quiet = slowNotice(images);
  await Promise.race([answered, exited]);
  quiet();
  // 'exit' can come before the last bytes of the pipe are read: let them arrive.
  await Promise.race([answered, new Promise((r) => setTimeout(r, 2000).unref())]);
  const line = said.split('\n')[0] ?? '';
  // Interrupted: the server is stopping, whatever it said; the handler exits.
  if (stopping) return new Promise(() => undefined);
  if (line === 'OK') {
    child.unref();
    child.stderr?.destroy();
    // Warnings the user must see at mount time (writing to a host disk) are passed on.
    for (const l of stderr.split('\n')) if (l.startsWith('tsmount: WARNING: ')) process.stderr.write(`${l}\n`);
    // Exit as soon as the ACK is out; a server that died meanwhile cannot be helped.
    const gone = 'the server exited as the mount became ready; nothing is mounted';
    channel.write('ACK\n', (err) => (err ? fail(gone) : process.exit(0)));
    setTimeout(() => fail(gone), 5000).unref();
    return new Promise(() => undefined);
  }
  if (line.startsWith('ERR ')) fail(line.slice(4));
  const code = await exited;
  const last = stderr.trim().split('\n').filter(Boolean).pop();
  fail(`the server exited before the mount was ready (status ${code ?? 'killed'})${last ? `: ${last.replace(/^tsmount: /, '')}` : ''}${log ? `; see ${log}` : ''}`);
}

main(process.argv).catch((err: unknown) => {
  if (!(err instanceof UsageError) && process.env.DEBUG) process.stderr.write(`${(err as Error).stack ?? String(err)}\n`);
  fail(messageOf(err));
});
