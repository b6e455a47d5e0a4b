#!/usr/bin/env node
// tsimg: make and inspect images, beside tsmount. Subcommands follow qemu-img's, one
// module each under tsimg/; every one opens images through drivers/open.ts.
//   tsimg create [-f FMT] [-o OPTIONS] [-b BACKING [-F BACKING_FMT]] FILE [SIZE]
//   (every subcommand that opens an image also takes --image-opts, --object, json: names)
//   tsimg info [-f FMT] [--output human|json] [--backing-chain] [-U] FILE
//   tsimg map [-f FMT] [--output human|json|svg] [-U] FILE
//   tsimg check [-f FMT] [-r leaks|all] [--output human|json] [-U] FILE
//   tsimg compare [-f FMT] [-F FMT] [-s] [-U] FILE1 FILE2
//   tsimg convert [-p] [-c] [-n] [-W] [-m N] [-f FMT] [-O FMT] [-o OPTIONS] [-B BACKING] SRC... DST
//   tsimg snapshot -l|-c NAME|-d NAME|-a NAME FILE
//   tsimg bitmap (--add|--remove|--clear|--enable|--disable|--merge SRC)... [-g SIZE] [-b FILE [-F FMT]] FILE BITMAP
//   tsimg resize [--shrink] [--preallocation MODE] FILE [+|-]SIZE
//   tsimg commit [-p] [-d] FILE
//   tsimg rebase [-u] [-p] -b NEW [-F FMT] FILE
//   tsimg amend -o OPTIONS FILE
//   tsimg measure [-O FMT] [-o OPTIONS] [--output human|json] (--size SIZE | FILE)
//   tsimg dd [-f FMT] [-O FMT] [bs=N] [count=N] [skip=N] if=INPUT of=OUTPUT
import { Command } from 'commander';
import { messageOf, UsageError } from '../drivers/errors.js';
import { ExitError } from './tsimg/exit-error.js';
// Only the types here: each subcommand's module (and the drivers it needs) is imported
// when that subcommand runs, so `tsimg --version` or `info` does not load convert's.
import type { CreateCli } from '../drivers/create.js';
import type { InfoCli } from './tsimg/info.js';
import type { MapCli } from './tsimg/map.js';
import type { CheckCli } from './tsimg/check.js';
import type { CompareCli } from './tsimg/compare.js';
import type { ConvertCli } from './tsimg/convert.js';
import type { SnapshotCli } from './tsimg/snapshot.js';
import type { BitmapCli } from './tsimg/bitmap.js';
import type { ResizeCli } from './tsimg/resize.js';
import type { CommitCli } from './tsimg/commit.js';
import type { RebaseCli } from './tsimg/rebase.js';
import type { AmendCli } from './tsimg/amend.js';
import type { MeasureCli } from './tsimg/measure.js';
import type { DdCli } from './tsimg/dd.js';
import { packageVersion } from './version.js';


function fail(msg: string, code = 1): never {
  process.stderr.write(`tsimg: ${msg}\n`);
  process.exit(code);
}

const collect = (v: string, acc: string[]): string[] => [...acc, v];

/** The options of every subcommand that opens an image to read it. */
function openOptions(c: Command, formatFlag = '-f, --format <fmt>'): Command {
  return c
    .option(formatFlag, 'image format (probed when absent)')
    .option('-U, --force-share', 'open the image even when another process holds it')
    .option('--secret <pass>', 'passphrase')
    .option('--secret-file <file>', 'read the passphrase from a file')
    .option('--image-opts', "each image is QEMU's key=value list (driver=qcow2,file.driver=nbd,file.server.path=...)")
    .option('--object <def>', 'QEMU object (repeatable): secret,id=ID,file=FILE|data=TEXT (key-secret=ID names it), tls-creds-x509/-psk,id=ID,dir=DIR', collect, [] as string[])
    .option('--confine', "open only files under the image's own folder that the image names")
    .option('--trust-image-paths', 'open every file an image names, as QEMU does (unsafe for images you did not write)')
    .option('--iscsi <opts>', 'iSCSI login options: user=U,password=P,initiator-name=IQN,header-digest=...', collect, [] as string[])
    .option('--readconfig <file>', 'QEMU config file with [iscsi] sections', collect, [] as string[]);
}

async function main(argv: string[]): Promise<void> {
  let exitCode = 0;
  const program = new Command('tsimg')
    .description('Create and inspect disk images (subcommands as in qemu-img)')
    .configureOutput({ outputError: (str, write) => write(`tsimg: ${str.replace(/^error: /, '').trim()}\n`) })
    .version(packageVersion(), '-V, --version')
    .exitOverride((err) => process.exit(err.exitCode === 0 ? 0 : 1))
    .hook('preAction', async (_program, action) => {
      const o = action.opts<{ iscsi?: string[]; readconfig?: string[] }>();
      if (o.iscsi?.length || o.readconfig?.length) (await import('../drivers/protocol/iscsi/uri.js')).configureIscsi(o);
      // The images a subcommand opens are its first arguments: compare's two, convert's source.
      if (action.name() !== 'create' && action.name() !== 'dd') await (await import('./tsimg/common.js')).resolveImageArgs(action.processedArgs as unknown[], action.opts(), action.name() === 'compare' ? 2 : 1);
    });
  program
    .command('create')
    .description('create an image (-o help: the format\'s options)')
    .argument('[file]')
    .argument('[size]')
    .option('-f, --format <fmt>', 'image format', 'raw')
    .option('-o, --options <opts>', 'format options, key=value,...', collect, [] as string[])
    .option('-b, --backing <file>', 'backing file')
    .option('-F, --backing-format <fmt>', 'backing file format')
    .option('--secret <pass>', 'passphrase for encryption')
    .option('--secret-file <file>', 'read the passphrase from a file')
    .option('--object <def>', 'QEMU object (repeatable): secret,id=ID,file=FILE|data=TEXT, named by key-secret=ID (luks) or encrypt.key-secret=ID (qcow2, qcow)', collect, [] as string[])
    .option('-q, --quiet', 'print nothing')
    .addHelpText('after', '\nExamples: tsimg create -f qcow2 disk.qcow2 20G\n          tsimg create -f qcow2 -o help')
    .action(async (file: string | undefined, size: string | undefined, o: CreateCli & { secretFile?: string }) => {
      const help = o.options.some((t) => t.split(',').some((k) => k === 'help' || k === '?'));
      if (file === undefined && !help) throw new UsageError("missing required argument 'file'");
      const { readSecret } = await import('./tsimg/common.js');
      await (await import('../drivers/create.js')).createImage(file ?? '', size, { ...o, secret: readSecret(o) });
    });
  openOptions(program.command('info').description('show an image (and with --backing-chain every layer under it)').argument('<file>'))
    .option('--output <fmt>', 'human or json', 'human')
    .option('--backing-chain', 'show every layer of the backing chain')
    .action(async (file: string, o: InfoCli) => (await import('./tsimg/info.js')).info(file, o));
  openOptions(program.command('map').description('show where each run of the disk comes from, through the backing chain').argument('<file>'))
    .option('--output <fmt>', 'human, json, or svg (a picture, one row per layer)', 'human')
    .addHelpText('after', '\nExample: tsimg map --output svg disk.qcow2 > map.svg')
    .action(async (file: string, o: MapCli) => (await import('./tsimg/map.js')).map(file, o));
  openOptions(program.command('check').description("check an image's metadata (exit 0 clean, 2 corrupt, 3 leaks)").argument('<file>'))
    .option('--output <fmt>', 'human or json', 'human')
    .option('-r, --repair <what>', 'repair: leaks, or all (leaks and corruptions)')
    .option('-p, --progress', 'show progress while repairing')
    .addHelpText('after', '\nExample: tsimg check -r leaks disk.qcow2')
    .action(async (file: string, o: CheckCli) => {
      exitCode = await (await import('./tsimg/check.js')).check(file, o);
    });
  openOptions(program.command('compare').description('compare what two images read (exit 0 equal, 1 different, 2 error)').argument('<file1>').argument('<file2>'))
    .option('-F, --second-format <fmt>', "the second image's format")
    .option('-s, --strict', 'images of different sizes differ')
    .option('-p, --progress', 'show progress')
    .action(async (a: string, b: string, o: CompareCli) => {
      exitCode = await (await import('./tsimg/compare.js')).compare(a, b, o);
    });
  openOptions(program.command('convert').description('copy an image (several: one after the other) into a new image of any writable format, sparse').argument('<src...>', 'source images, then the new image').usage('[options] SRC... DST'))
    .option('-O, --output-format <fmt>', 'format of the new image (default: raw)')
    .option('--target-image-opts', "with -n: DST is QEMU's driver=...,file.filename=... list (its key-secret names an --object secret)")
    .option('-o, --options <opts>', 'options of the new image, key=value,...', collect, [] as string[])
    .option('-p, --progress', 'show progress')
    .option('-B, --backing-file <file>', 'make the new image an overlay of this file, holding only what differs from it')
    .option('-F, --backing-format <fmt>', 'the format of the -B file')
    .option('-W, --parallel', 'write each chunk as soon as it is read, out of order')
    .option('-m, --coroutines <n>', 'chunks in flight, 1 to 16 (default 8); written in order unless -W')
    .option('-t, --cache <mode>', 'cache mode of the new image, as qemu-img: unsafe (the default: nothing is synced, the host writes it back later), writeback, writethrough, none or directsync (synced before convert returns)', 'unsafe')
    .option('-c, --compress', 'compress the data clusters (qcow2, qcow; vmdk streamOptimized always is)')
    .option('-S, --sparse-size <size>', 'zero runs at least this long (a multiple of 512; default 4k) are left unwritten; 0 writes every byte, holes too')
    .option('-C, --copy-range', "qemu-img's copy offloading: data is copied whole, zeros and all (not offloaded here: the same image)")
    .option('-l, --snapshot <snapshot>', "convert the source's internal snapshot: its ID or name, or snapshot.id=ID,snapshot.name=NAME")
    .option('-n, --skip-create', 'write into an existing image instead of creating one')
    .option('--target-is-zero', 'with -n: the target reads zeros everywhere, so holes need no writing')
    .option('--salvage', 'carry on past read errors: what cannot be read is written as zeros, with a warning for each sector')
    .option('--bitmaps', "copy the source's persistent bitmaps (qcow2 to qcow2)")
    .option('--skip-broken-bitmaps', 'with --bitmaps: leave out inconsistent bitmaps, with a warning')
    .option('-T, --source-cache <mode>', 'cache mode of the sources (writeback, the default, writethrough, none, directsync, unsafe)')
    .option('-q, --quiet', 'print nothing: no progress, no warnings')
    .option('--target-secret <pass>', 'passphrase of an encrypted new image')
    .option('--target-secret-file <file>', "read the new image's passphrase from a file")
    .addHelpText('after', '\nExamples: tsimg convert -p -O qcow2 disk.vmdk disk.qcow2\n          tsimg convert -c -O qcow2 part1.raw part2.raw joined.qcow2')
    .action(async (args: string[], o: ConvertCli) => {
      if (args.length < 2) throw new UsageError('convert needs a source and a target: SRC... DST');
      await (await import('./tsimg/convert.js')).convert(args.slice(0, -1), args[args.length - 1]!, o);
    });
  openOptions(program.command('snapshot').description('list, create, delete or apply internal snapshots (qcow2)').argument('<file>'))
    .option('-l, --list', 'list the snapshots')
    .option('-c, --create <name>', 'create a snapshot')
    .option('-d, --delete <name>', 'delete a snapshot (by ID or name)')
    .option('-a, --apply <name>', 'revert the disk to a snapshot (by ID or name)')
    .addHelpText('after', '\nExample: tsimg snapshot -c before-upgrade disk.qcow2')
    .action(async (file: string, o: SnapshotCli) => (await import('./tsimg/snapshot.js')).snapshot(file, o));
  openOptions(program.command('bitmap').description('add, remove, clear, enable, disable or merge persistent dirty bitmaps (qcow2), in the order given').argument('<file>').argument('<bitmap>'))
    .option('--add', 'add a new, empty, enabled bitmap')
    .option('--remove', 'remove the bitmap')
    .option('--clear', 'clear every bit')
    .option('--enable', 'enable it (it records changes)')
    .option('--disable', 'disable it (it keeps its bits)')
    .option('--merge <source>', 'set every bit the source bitmap has set (repeatable)', collect, [] as string[])
    .option('-g, --granularity <size>', 'bytes per bit of a new bitmap (--add)')
    .option('-b, --source-file <file>', "--merge's source bitmap is in this image")
    .option('-F, --source-format <fmt>', 'the format of the -b image')
    .addHelpText('after', '\nExample: tsimg bitmap --add -g 64k disk.qcow2 backup-1')
    .action(async (file: string, name: string, o: BitmapCli) => (await import('./tsimg/bitmap.js')).bitmap(file, name, o, argv.slice(argv.indexOf('bitmap') + 1)));
  openOptions(program.command('resize').description('change the virtual size ([+|-]SIZE); a shrink needs --shrink').argument('<file>').argument('<size>'))
    .option('--shrink', 'allow making the image smaller (data past the new end is lost)')
    .option('--preallocation <mode>', 'allocate the new area: off, metadata (qcow2), falloc or full (raw, qcow2, luks)')
    .option('-q, --quiet', 'print nothing')
    .addHelpText('after', '\nExample: tsimg resize disk.qcow2 +10G')
    .action(async (file: string, size: string, o: ResizeCli) => (await import('./tsimg/resize.js')).resize(file, size, o));
  openOptions(program.command('commit').description('write the image into its backing file, then empty it').argument('<file>'))
    .option('-p, --progress', 'show progress')
    .option('-d, --drop', 'keep the image as it is after committing')
    .option('-q, --quiet', 'print nothing')
    .addHelpText('after', '\nExample: tsimg commit overlay.qcow2')
    .action(async (file: string, o: CommitCli) => (await import('./tsimg/commit.js')).commit(file, o));
  openOptions(program.command('rebase').description('change the backing file (safe: copies what would read differently; -u: header only)').argument('<file>'))
    .requiredOption('-b, --backing <file>', "the new backing file ('' for none)")
    .option('-F, --backing-format <fmt>', 'the new backing file format')
    .option('-u, --unsafe', 'only rewrite the backing file name')
    .option('-p, --progress', 'show progress')
    .option('-q, --quiet', 'print nothing')
    .addHelpText('after', '\nExample: tsimg rebase -b new-base.qcow2 -F qcow2 overlay.qcow2')
    .action(async (file: string, o: RebaseCli) => (await import('./tsimg/rebase.js')).rebase(file, o));
  openOptions(program.command('amend').description('change format options in place (qcow2: compat, lazy_refcounts, backing_file, backing_fmt)').argument('<file>'))
    .option('-o, --options <opts>', 'options, key=value,...', collect, [] as string[])
    .addHelpText('after', '\nExample: tsimg amend -o lazy_refcounts=on disk.qcow2')
    .action(async (file: string, o: AmendCli) => (await import('./tsimg/amend.js')).amend(file, o));
  openOptions(program.command('measure').description('the size a new image would need (qemu-img measure)').argument('[file]'))
    .option('-O, --output-format <fmt>', 'format of the new image', 'raw')
    .option('-o, --options <opts>', 'options of the new image, key=value,...', collect, [] as string[])
    .option('--size <size>', 'measure an empty image of this size')
    .option('--output <fmt>', 'human or json', 'human')
    .addHelpText('after', '\nExample: tsimg measure -O qcow2 --output json disk.raw')
    .action(async (file: string | undefined, o: MeasureCli) => (await import('./tsimg/measure.js')).measure(file, o));
  openOptions(program.command('dd').description("copy bs-sized blocks of an image into a new one (qemu-img dd)").argument('<operands...>', 'bs=N, count=N, skip=N, if=INPUT, of=OUTPUT'))
    .option('-O, --output-format <fmt>', 'format of the new image', 'raw')
    .addHelpText('after', '\nExample: tsimg dd -f qcow2 -O raw bs=1M count=64 if=disk.qcow2 of=head.raw')
    .action(async (operands: string[], o: DdCli) => (await import('./tsimg/dd.js')).dd(operands, o));
  openOptions(program.command('bench').description("run a simple I/O benchmark on an image (qemu-img bench)").argument('<file>'))
    .option('-c, --count <n>', 'requests (default 75000)')
    .option('-d, --depth <n>', 'requests in flight (default 64)')
    .option('-o, --offset <offset>', 'offset of the first request (default 0)')
    .option('-s, --size <size>', 'bytes per request (default 4096)')
    .option('-S, --step-size <size>', 'offset step between requests (default: the size)')
    .option('-t, --cache <mode>', 'cache mode (writeback, the default, writethrough, none, directsync, unsafe)')
    .option('-w, --write', 'write instead of read')
    .option('--pattern <byte>', 'the byte written (default 0)')
    .option('--flush-interval <n>', 'flush every n requests (write tests)')
    .option('--no-drain', 'flush without waiting for the requests in flight')
    .option('-i, --aio <mode>', "qemu-img's AIO mode (threads, native, io_uring): accepted, the same I/O here")
    .option('-n, --native', "qemu-img's -n (native AIO): accepted, the same I/O here")
    .option('-q, --quiet', 'quiet')
    .addHelpText('after', '\nExample: tsimg bench -w -c 10000 -d 16 -s 64k disk.qcow2')
    .action(async (file: string, o: import('./tsimg/bench.js').BenchCli) => (await import('./tsimg/bench.js')).bench(file, o));
  await program.parseAsync(argv);
  process.exitCode = exitCode;
}

main(process.argv).catch(async (err: unknown) => {
  if (process.env.DEBUG) process.stderr.write(`${(err as Error).stack ?? String(err)}\n`);
  // A failed convert may leave compression jobs in worker threads: stopping a worker
  // inside one can abort the process (worker-pools.ts).
  // (Imported here: --version and friends load nothing of drivers/, format-registry.test.ts.)
  await (await import('../drivers/util/worker-pools.js')).settleWorkers();
  fail(messageOf(err), err instanceof ExitError ? err.code : 1);
});
