// Building the block graph for one image: protocol node, format node, backing chain.
import path from 'node:path';
import fs from 'node:fs';
import type { BlockNode, CacheMode, FormatDriver, OpenOptions } from './types.js';
import { CorruptImageError, UsageError } from './errors.js';
import { FileNode } from './protocol/file.js';
import { lockRequestFor, type LockingMode } from './protocol/lock.js';
import { formatByName, probeFormat, PROBE_BYTES } from './format/index.js';

export interface ImageOptions {
  readOnly: boolean;
  /** QEMU's driver name; probed when absent. */
  format?: string;
  cache: CacheMode;
  /** Bytes of metadata cache for each format node. */
  metadataCacheBytes: number;
  locking: LockingMode;
  /** Like qemu-img -U: read-only, and let others hold any permission. */
  forceShare: boolean;
  /** Like share-rw=on: let other writers in. */
  shareRw: boolean;
}

/** Backing chains deeper than this are taken for a loop or a mistake. */
export const MAX_BACKING_DEPTH = 256;

/** Open an image file and its backing chain; returns the top format node. */
export async function openImage(filename: string, opts: ImageOptions): Promise<BlockNode> {
  return openChain(filename, opts.format, opts, 0, new Set());
}

async function openChain(
  filename: string,
  format: string | undefined,
  opts: ImageOptions,
  depth: number,
  seen: Set<string>,
): Promise<BlockNode> {
  const isBacking = depth > 0;
  const readOnly = opts.readOnly || isBacking;
  let real: string;
  try {
    real = fs.realpathSync(filename);
  } catch {
    real = path.resolve(filename);
  }
  if (seen.has(real)) throw new CorruptImageError(`${filename}: backing chain loops back to this file`);
  if (depth > MAX_BACKING_DEPTH) throw new CorruptImageError(`${filename}: backing chain deeper than ${MAX_BACKING_DEPTH}`);
  seen.add(real);

  const policy =
    opts.locking === 'off'
      ? undefined
      : { readOnly, backing: isBacking, forceShare: opts.forceShare, shareRw: opts.shareRw, mode: opts.locking, format };
  const lock = policy && lockRequestFor(policy);
  const file = await FileNode.open(filename, { readOnly, lock, ignoreFlush: opts.cache === 'unsafe' });
  try {
    const driver = await chooseDriver(file, filename, format);
    // Locked before probing as if raw; any other format refuses writers (--share-rw).
    if (policy && format === undefined) file.imageLock?.update(lockRequestFor({ ...policy, format: driver.name }));
    const openOpts: OpenOptions = {
      readOnly,
      cache: opts.cache,
      metadataCacheBytes: opts.metadataCacheBytes,
      openBacking: (name, fmt, from) => {
        const resolved = resolveBackingName(name, from.name);
        return openChain(resolved, fmt, opts, depth + 1, seen).catch((err: unknown) => {
          if (err instanceof UsageError && !fs.existsSync(resolved)) {
            throw new UsageError(`${filename}: backing file '${name}' not found (looked for ${resolved})`);
          }
          throw err;
        });
      },
    };
    return await driver.open(file, openOpts);
  } catch (err) {
    await file.close().catch(() => undefined);
    throw err;
  }
}

/** QEMU resolves a relative backing name against the overlay's directory. */
export function resolveBackingName(name: string, overlay: string): string {
  if (name.startsWith('json:')) throw new UsageError(`backing file '${name}': json: names are not supported yet`);
  const plain = name.startsWith('file:') ? name.slice(5) : name;
  return path.isAbsolute(plain) ? plain : path.join(path.dirname(overlay), plain);
}

async function chooseDriver(file: BlockNode, filename: string, format: string | undefined): Promise<FormatDriver> {
  if (file.size === 0) throw new UsageError(`${filename}: empty file, not a disk image`);
  const head = new Uint8Array(Math.min(PROBE_BYTES, file.size));
  await file.read(0, head);
  if (format !== undefined) {
    const driver = formatByName(format);
    if (driver.name !== 'raw' && driver.probe(head, filename) === 0) {
      const probed = safeProbe(head, filename);
      throw new UsageError(`${filename}: not a ${format} image${probed && probed !== 'raw' ? ` (it looks like ${probed})` : ''}`);
    }
    return driver;
  }
  return probeFormat(head, filename);
}

function safeProbe(head: Uint8Array, filename: string): string | undefined {
  try {
    return probeFormat(head, filename).name;
  } catch {
    return undefined;
  }
}
