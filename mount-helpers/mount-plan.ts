// What a mount command line asks for, checked: the command runs planMount so that a
// typo fails before a server is involved, and the server runs it again on the same
// options (sent on its ready channel as JSON), because resolving image names and the
// iSCSI settings leave state in the process that opens the images. Light modules only:
// the command loads this before it knows whether it will serve.
import fs from 'node:fs';
import { UsageError } from '../drivers/errors.js';
import type { CacheMode } from '../drivers/types.js';
import type { LockingMode } from '../drivers/protocol/lock.js';
import { parseSize } from '../drivers/options.js';
import { parseMountAccess } from '../fs/access.js';
import { readSecretFile } from './secret.js';
import { needsResolving, oneSecret, resolveImageNames } from './image-opts.js';
import { preallocateOptions, type PreallocateOptions } from '../drivers/filters/preallocate.js';

/** tsmount's options as commander parses them: plain JSON, so they cross to the server. */
export interface CliOptions {
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
  preallocate?: boolean;
  preallocSize?: string;
  preallocAlign?: string;
  log?: string;
  debug?: boolean;
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

export interface MountPlan {
  opts: CliOptions;
  /** Image names as the drivers take them (--image-opts and json: resolved). */
  images: string[];
  mountpoint: string;
  cacheSize: number;
  secret: string | undefined;
  access: ReturnType<typeof parseMountAccess>;
  /** QEMU's preallocate filter over the written file (--preallocate, or file.driver=preallocate). */
  preallocate: PreallocateOptions | undefined;
}

/** A plain path (or file:PATH), not a URI of another protocol. */
function isLocalPath(spec: string): boolean {
  return spec.startsWith('file:') || !/^[a-z][a-z0-9+.-]*:/i.test(spec);
}

/** The options and paths of a mount, checked (UsageError with the one-line reason). */
export async function planMount(opts: CliOptions, paths: readonly string[]): Promise<MountPlan> {
  if (opts.lazy) throw new UsageError('--lazy goes with -u');
  if (paths.length < 2) throw new UsageError('need at least one IMAGE and a MOUNTPOINT (see --help)');
  let images = paths.slice(0, -1);
  let keySecret: string | undefined;
  let named: PreallocateOptions | undefined;
  const mountpoint = paths[paths.length - 1]!;
  if (needsResolving(images, opts)) {
    const resolved = await resolveImageNames(images, opts.format, opts);
    if (new Set(resolved.map((p) => p.format)).size > 1) throw new UsageError('--image-opts: every image needs the same driver, and -f must agree with it');
    keySecret = oneSecret(resolved, undefined);
    const filters = new Set(resolved.map((p) => JSON.stringify(p.preallocate ?? null)));
    if (filters.size > 1) throw new UsageError('--image-opts: every image needs the same preallocate filter options, or none');
    named = resolved[0]?.preallocate;
    images = resolved.map((p) => p.spec);
    opts = { ...opts, format: resolved[0]?.format ?? opts.format };
  }
  if (opts.iscsi.length || opts.readconfig.length) {
    (await import('../drivers/protocol/iscsi/uri.js')).configureIscsi({ iscsi: opts.iscsi, readconfig: opts.readconfig, object: opts.object });
  }
  if (opts.forceShare && (opts.rw || opts.overlay !== undefined || opts.snapshot)) throw new UsageError('--force-share works only read-only (without --rw, --overlay or --snapshot)');
  if (opts.confine && opts.trustImagePaths) throw new UsageError('give --confine or --trust-image-paths, not both');
  const cacheSize = parseSize(opts.cacheSize, '--cache-size');
  if (cacheSize < 1 << 20) throw new UsageError('--cache-size must be at least 1M');
  // Cheap checks first, so a typo fails fast; the server's open checks everything.
  if (!fs.existsSync(mountpoint)) throw new UsageError(`${mountpoint}: mountpoint does not exist`);
  for (const img of images) if (isLocalPath(img) && !fs.existsSync(img.replace(/^file:/, ''))) throw new UsageError(`${img}: no such file`);
  if (keySecret !== undefined && (opts.secret !== undefined || opts.secretFile !== undefined)) throw new UsageError('give the passphrase by key-secret or by --secret/--secret-file, not both');
  if (opts.secret !== undefined && opts.secretFile !== undefined) throw new UsageError('give --secret or --secret-file, not both');
  const secret = keySecret ?? (opts.secretFile === undefined ? opts.secret : readSecretFile(opts.secretFile));
  return { opts, images, mountpoint, cacheSize, secret, access: parseMountAccess(opts.option, opts), preallocate: preallocateFor(opts, named) };
}

/**
 * The preallocate filter of a mount: --preallocate, --prealloc-size and --prealloc-align
 * (each of the last two implies the first), or the filter an --image-opts list names;
 * not both. It grows only a file that is written.
 */
function preallocateFor(opts: CliOptions, named: PreallocateOptions | undefined): PreallocateOptions | undefined {
  const flagged = !!opts.preallocate || opts.preallocSize !== undefined || opts.preallocAlign !== undefined;
  if (!flagged) return named;
  if (named) throw new UsageError('give the preallocate filter by --image-opts (file.driver=preallocate) or by --preallocate, not both');
  if (!opts.rw && opts.overlay === undefined && !opts.snapshot) throw new UsageError('--preallocate needs --rw (it grows only a file that is written)');
  return preallocateOptions({ size: opts.preallocSize, align: opts.preallocAlign }, '--preallocate');
}
