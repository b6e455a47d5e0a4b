// What every tsimg subcommand shares: how an image is opened for reading (through
// drivers/open.ts, like everything else), the passphrase and named-file options,
// and the exit code a failure carries.
import fs from 'node:fs';
import { createRequire } from 'node:module';
import type { BlockNode } from '../../drivers/types.js';
import { UsageError } from '../../drivers/errors.js';
import { parseSize } from '../../drivers/options.js';
import { openImage, type ImageOptions } from '../../drivers/open.js';
import { fileProtocol, protocolFor } from '../../drivers/protocol/index.js';
import type { NamedFilePolicy } from '../../drivers/trust.js';
import { readSecretFile } from '../secret.js';
import { needsResolving, oneSecret, resolveImageNames } from '../image-opts.js';
import type { PreallocateOptions } from '../../drivers/filters/preallocate.js';

/** Options every subcommand that opens an image takes. */
export interface OpenCli {
  format?: string;
  secret?: string;
  secretFile?: string;
  confine?: boolean;
  trustImagePaths?: boolean;
  /** -U: open an image another process holds (qemu-img's force-share). */
  forceShare?: boolean;
  /** --image-opts: each image argument is QEMU's option list. */
  imageOpts?: boolean;
  /** --object definitions (secret, tls-creds) the options name by id. */
  object?: string[];
  /** QEMU's preallocate filter, where the image's options name it (file.driver=preallocate): writable opens only. */
  preallocate?: PreallocateOptions;
}

/**
 * --image-opts, json: names and --object for the first `count` arguments (the images
 * a subcommand opens; compare's second takes its format from -F): each becomes a plain
 * name, its format the driver's, and a key-secret the passphrase, in place, before the
 * subcommand runs, so no subcommand knows these spellings.
 */
export async function resolveImageArgs(args: unknown[], o: OpenCli & { secondFormat?: string }, count: number): Promise<void> {
  // convert's one argument is its sources, then the new image (a plain name): the
  // sources share one format (-f), as in tsmount.
  if (Array.isArray(args[0])) {
    const all = (args[0] as unknown[]).filter((a): a is string => typeof a === 'string');
    const sources = all.slice(0, -1);
    if (!needsResolving(sources, o)) return;
    const resolved = await resolveImageNames(sources, o.format, o);
    args[0] = [...resolved.map((r) => r.spec), ...all.slice(-1)];
    o.format = resolved[0]?.format;
    return takeSecret(resolved, o);
  }
  const names = args.slice(0, count).filter((a): a is string => typeof a === 'string');
  if (!needsResolving(names, o)) return;
  const resolved = await Promise.all(names.map(async (n, i) => (await resolveImageNames([n], i === 1 ? o.secondFormat : o.format, o))[0]!));
  resolved.forEach((r, i) => (args[i] = r.spec));
  o.format = resolved[0]?.format;
  o.preallocate = resolved[0]?.preallocate;
  if (resolved.length > 1) o.secondFormat = resolved[1]?.format;
  takeSecret(resolved, o);
}

/** The passphrase a key-secret named, unless --secret or --secret-file gave one too. */
function takeSecret(resolved: Parameters<typeof oneSecret>[0], o: OpenCli): void {
  const secret = oneSecret(resolved, undefined);
  if (secret === undefined) return;
  if (o.secret !== undefined || o.secretFile !== undefined) throw new UsageError('give the passphrase by key-secret or by --secret/--secret-file, not both');
  o.secret = secret;
}

export { ExitError } from './exit-error.js';

export function readSecret(o: { secret?: string; secretFile?: string }): string | undefined {
  if (o.secretFile === undefined) return o.secret;
  return readSecretFile(o.secretFile);
}

export function namedFilePolicy(o: { confine?: boolean; trustImagePaths?: boolean }): NamedFilePolicy {
  if (o.confine && o.trustImagePaths) throw new UsageError('give --confine or --trust-image-paths, not both');
  return o.confine ? 'confine' : o.trustImagePaths ? 'trust' : 'owner';
}

/** The read-only open of every subcommand but create's writes; -U lets others hold the image. */
export function readOnlyOptions(o: OpenCli, extra: Partial<ImageOptions> = {}): ImageOptions {
  return {
    readOnly: true,
    format: o.format,
    cache: 'writeback',
    metadataCacheBytes: 4 << 20,
    locking: 'auto',
    forceShare: o.forceShare ?? false,
    shareRw: false,
    secret: readSecret(o),
    namedFiles: namedFilePolicy(o),
    preallocate: o.preallocate,
    ...extra,
  };
}

/** Open an image with its backing chain, read-only. */
export function openForRead(spec: string, o: OpenCli): Promise<BlockNode> {
  return openImage(spec, readOnlyOptions(o));
}

/** Bytes the file takes on disk (qemu-img's actual-size), for local files; undefined elsewhere. */
export function allocatedOnDisk(spec: string): number | undefined {
  if (protocolFor(spec) !== fileProtocol) return undefined;
  try {
    return fs.statSync(spec.replace(/^file:/, '')).blocks * 512;
  } catch {
    return undefined;
  }
}

/** Where output goes: one place, so a subcommand never mixes writers. */
export function print(text: string): void {
  process.stdout.write(text);
}

/** The writable open of the subcommands that change an image (the image locks taken as qemu-img takes them). */
export function writableOptions(o: OpenCli, extra: Partial<ImageOptions> = {}): ImageOptions {
  return readOnlyOptions(o, { readOnly: false, ...extra });
}

export interface Progress {
  /** Fraction done, 0..1. */
  update(done: number): void;
  /** The last redraw, and the end of the line. */
  done(): void;
}

/** Redraws of the line without a terminal (-p into a pipe or file): every this many hundredths of a percent, as qemu-img's 1% steps. */
const PIPE_STEP = 100;

/**
 * Progress of long work (convert, commit, rebase, compare, check -r). On a terminal, a
 * bar redrawn in place by cli-progress (at most every 100 ms, and only when the shown
 * value changed); with -p and no terminal, qemu-img's own output, "    (12.00/100%)\r"
 * at each whole percent and a newline at the end, so scripts written for qemu-img -p
 * read it; otherwise undefined, and nothing is printed. update() is a compare and
 * a return between redraws, so -p costs nothing measurable.
 */
export function progress(forced: boolean | undefined): Progress | undefined {
  const tty = process.stdout.isTTY === true;
  if (!forced && !tty) return undefined;
  let last = -1;
  /** The share in hundredths of a percent, 0..10000. */
  const scaled = (done: number): number => Math.floor(Math.min(1, Math.max(0, done)) * 10000);
  if (tty) {
    // cli-progress (CommonJS) is loaded only when a bar is drawn.
    const { Presets, SingleBar } = createRequire(import.meta.url)('cli-progress') as typeof import('cli-progress');
    const bar = new SingleBar(
      {
        stream: process.stdout,
        // qemu-img's numbers beside the bar.
        format: '{bar} ({pct}/100%)',
        barsize: 40,
        fps: 10,
        // Nothing the terminal would keep if the command ended mid-bar (an error, Ctrl-C):
        // the cursor stays visible and line wrapping on (the line is cut to the width instead).
        hideCursor: false,
        linewrap: true,
        clearOnComplete: false,
      },
      Presets.shades_classic,
    );
    const pct = (v: number): { pct: string } => ({ pct: (v / 100).toFixed(2) });
    bar.start(10000, 0, pct(0));
    last = 0;
    return {
      update: (done) => {
        const v = scaled(done);
        if (v === last) return;
        last = v;
        bar.update(v, pct(v));
      },
      done: () => {
        bar.update(10000, pct(10000));
        bar.stop();
      },
    };
  }
  const draw = (v: number): void => {
    last = v;
    print(`    (${(v / 100).toFixed(2)}/100%)\r`);
  };
  draw(0);
  return {
    update: (done) => {
      const v = scaled(done);
      if (v >= last + PIPE_STEP) draw(v - (v % PIPE_STEP));
    },
    done: () => {
      if (last !== 10000) draw(10000);
      print('\n');
    },
  };
}

/**
 * `o`'s keys in the order qemu-img prints a QDict: QEMU's JSON writer walks the dict's
 * 512 hash buckets in turn (tdb_hash of the key), and each bucket newest key first. So
 * which keys are present moves none of the others (qemu-img check's "fragmented-clusters"
 * comes last, after "format").
 */
export function qdictOrder(o: Record<string, unknown>): Record<string, unknown> {
  const keys = Object.keys(o).map((k, i) => ({ k, i, b: qdictBucket(k) }));
  keys.sort((x, y) => x.b - y.b || y.i - x.i);
  return Object.fromEntries(keys.map(({ k }) => [k, o[k]]));
}

/** QEMU's qdict bucket of a key: tdb_hash(key) % QDICT_BUCKET_MAX (512). */
function qdictBucket(key: string): number {
  const bytes = Buffer.from(key, 'utf8');
  let v = Math.imul(0x238f13af, bytes.length) >>> 0;
  for (let i = 0; i < bytes.length; i++) v = (v + ((bytes[i]! << ((i * 5) % 24)) >>> 0)) >>> 0;
  return ((Math.imul(1103515243, v) + 12345) >>> 0) % 512;
}

const SUFFIXES = 'You may use k, M, G, T, P or E suffixes for kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.';

/** qemu-img's cvtnum_full: a size with an optional suffix within [min, max], or its message (one line). */
export function cvtnum(what: string, text: string, min = 0, max = Number.MAX_SAFE_INTEGER): number {
  let n: number;
  try {
    if (text.startsWith('-')) throw new Error();
    n = parseSize(text, what);
  } catch {
    throw new UsageError(`Invalid ${what} specified. ${SUFFIXES}`);
  }
  if (n < min || n > max) throw new UsageError(`Invalid ${what} specified. Must be between ${min} and ${max}.`);
  return n;
}
