// The tsmount command: parse and check the command line, then unmount, list, serve in
// the foreground, or hand the mount to a detached server (started early by
// tsmount.ts, or here) and return only once the flat files exist, or with the
// server's one-line error. The server is a separate process started before anything
// is mounted: libfuse2 opens /dev/fuse without close-on-exec, so the serving process
// itself must never spawn a child.
import type { ChildProcess } from 'node:child_process';
import type { Duplex } from 'node:stream';
import fs from 'node:fs';
import path from 'node:path';
import { Command, Option } from 'commander';
import { CACHE_MODES } from '../drivers/types.js';
import { messageOf, UsageError } from '../drivers/errors.js';
// Only light modules load up front: the command that starts a server never needs the
// drivers (the server imports them itself).
import { unmount } from './unmount.js';
import { packageVersion } from './version.js';
import { TSMOUNT_HELP_AFTER } from './help.js';
import { planMount, type CliOptions } from './mount-plan.js';
import { startServer } from './server-process.js';
import { slowNotice, type ServeRequest } from './serve.js';

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
    .option('--preallocate', "QEMU's preallocate filter: a write past the end of the image file first allocates --prealloc-size more (--rw; also -o preallocate)")
    .option('--prealloc-size <bytes>', 'with --preallocate: how much to allocate past the end (default 128M; also -o prealloc-size=N)')
    .option('--prealloc-align <bytes>', 'with --preallocate: the file end it allocates to is a multiple of this (default 1M, a multiple of 512; also -o prealloc-align=N)')
    .option('--partitions', 'show each MBR/GPT partition too, as <stem>-p<N>.raw (also -o partitions)')
    .option('--overlay <file>', 'write into this qcow2 overlay over the image (made if missing); the image is never written; implies --rw')
    .option('--snapshot', 'write into a temporary overlay, discarded at unmount; implies --rw')
    .option('--layers', 'show each layer of the backing chain too, read-only, as <stem>@<layer>.raw')
    .option('--list', 'list the tsmount mounts: images, read-only or not, server pid, counters')
    .addOption(new Option('--output <fmt>', 'with --list: human or json').choices(['human', 'json']).default('human'))
    .option('--log <file>', 'where the detached server writes its messages (default: syslog, see journalctl -t tsmount)')
    .option('--debug', 'log the debug namespaces tsmount:* (as DEBUG=tsmount:* does) to --log, or the terminal with --foreground')
    .addHelpText('after', TSMOUNT_HELP_AFTER)
    .showHelpAfterError(false)
    .configureOutput({ outputError: (str, write) => write(`tsmount: ${str.replace(/^error: /, '').trim()}\n`) })
    .version(packageVersion(), '-V, --version')
    .exitOverride((err) => process.exit(err.exitCode === 0 ? 0 : 1));
}

/**
 * The command: `early` is a server tsmount.ts started before parsing, on a guess
 * (server-process.ts); it is used if the command line asks for a detached server and
 * killed otherwise.
 */
export async function run(argv: string[], early: ChildProcess | undefined): Promise<void> {
  // An early server the command does not hand a mount to has done nothing yet: gone.
  let handed = false;
  const discard = (): void => {
    if (handed || early === undefined) return;
    handed = true;
    early.kill('SIGKILL');
    for (const s of early.stdio) s?.destroy();
    early.unref();
  };
  process.on('exit', discard);
  try {
    const cmd = program();
    cmd.parse(argv);
    const opts = cmd.opts<CliOptions>();
    const paths = cmd.args;
    if (opts.unmount || opts.list || opts.foreground) discard();
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
    // Checked here so that a typo fails before a server is involved; the server plans
    // the mount again from the same options.
    const plan = await planMount(opts, paths);
    if (opts.foreground) {
      await (await import('./serve.js')).serveHere(plan);
      return;
    }
    // A --log file must be the server's stderr from its start: a server started before
    // parsing (server-process.ts does not, but an option spelled otherwise might) is replaced.
    if (opts.log !== undefined) discard();
    handed = true;
    await daemonize({ opts, paths }, opts.log === undefined ? early : undefined, plan.images);
  } catch (err) {
    if (!(err instanceof UsageError) && process.env.DEBUG) process.stderr.write(`${(err as Error).stack ?? String(err)}\n`);
    fail(messageOf(err));
  }
}

/**
 * Hand the mount to a detached server (the early one, or one started now) and wait
 * for its first word: OK, or ERR and a reason.
 */
async function daemonize(req: ServeRequest, early: ChildProcess | undefined, images: string[]): Promise<void> {
  const log = req.opts.log;
  const logFd = log ? fs.openSync(path.resolve(log), 'a') : undefined;
  const child = early ?? startServer([...req.paths, ...(log ? ['--log', log] : [])], logFd);
  if (logFd !== undefined) fs.closeSync(logFd);
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
  channel.write(`${JSON.stringify(req)}\n`);
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
  const exited = new Promise<number | null>((resolve) => (child.exitCode !== null || child.signalCode !== null ? resolve(child.exitCode) : child.on('exit', (code) => resolve(code))));
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

