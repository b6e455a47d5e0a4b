// Building the block graph for one image: protocol node, format node, backing chain.
import fs from 'node:fs';
import createDebug from 'debug';
import type { BlockNode, CacheMode, FormatDriver, OpenOptions } from './types.js';
import { CorruptImageError, TsmountError, UntrustedFileError, UsageError, messageOf } from './errors.js';
import { lockRequestFor, type LockingMode } from './protocol/lock.js';
import { fileProtocol, hasOwnProtocol, protocolFor } from './protocol/index.js';
import { formatByName, probeFormat, PROBE_BYTES } from './format/index.js';
import { NamedFileGuard, recordNamedFiles, type NamedFilePolicy, type NamedRequest } from './trust.js';

const debug = createDebug('tsmount:open');

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
  /** Passphrase for encrypted images (--secret, --secret-file). */
  secret?: string;
  /** Which files the image may name (drivers/trust.ts); 'owner' when absent. */
  namedFiles?: NamedFilePolicy;
}

const formats = new WeakMap<BlockNode, string>();

/** The format driver that opened a node (for tsimg info and messages). */
export function formatOf(node: BlockNode): string | undefined {
  return formats.get(node);
}

/** Images whose node, or a backing file under it, decrypts (BlockNode.encrypted). */
const decrypting = new WeakSet<BlockNode>();

/**
 * Whether reading this image yields plaintext of an encrypted image: its own format
 * decrypts, or an image in its backing chain does (an overlay shows the plaintext of
 * every cluster it leaves to an encrypted backing file).
 */
export function decryptsInChain(node: BlockNode): boolean {
  return decrypting.has(node);
}

/** Backing chains deeper than this are taken for a loop or a mistake. */
export const MAX_BACKING_DEPTH = 256;

/** Open an image (a path or a URI) and its backing chain; returns the top format node. */
export async function openImage(spec: string, opts: ImageOptions): Promise<BlockNode> {
  const guard = new NamedFileGuard(opts.namedFiles ?? 'owner');
  const node = await openChain(spec, opts.format, opts, 0, new Set(), guard, undefined);
  recordNamedFiles(node, guard.files);
  return node;
}

/** A request to the guard for a name in `spec`, or undefined for a remote file (not checked). */
function namedRequest(spec: string, role: string, name: string, resolved: string, write: boolean): NamedRequest | undefined {
  if (protocolFor(resolved) !== fileProtocol) return undefined;
  return { naming: spec, role, name, resolved: resolved.replace(/^file:/, ''), write };
}

/** One identity per object, so a loop in the chain is seen whatever the spelling. */
function identity(spec: string): string {
  try {
    return fs.realpathSync(spec);
  } catch {
    return spec;
  }
}

async function openChain(
  spec: string,
  format: string | undefined,
  opts: ImageOptions,
  depth: number,
  seen: Set<string>,
  guard: NamedFileGuard,
  named: NamedRequest | undefined,
): Promise<BlockNode> {
  const isBacking = depth > 0;
  const readOnly = opts.readOnly || isBacking;
  const id = identity(spec);
  if (seen.has(id)) throw new CorruptImageError(`${spec}: backing chain loops back to this file`);
  if (depth > MAX_BACKING_DEPTH) throw new CorruptImageError(`${spec}: backing chain deeper than ${MAX_BACKING_DEPTH}`);
  seen.add(id);

  const protocol = protocolFor(spec);
  const policy =
    opts.locking === 'off'
      ? undefined
      : { readOnly, backing: isBacking, forceShare: opts.forceShare, shareRw: opts.shareRw, mode: opts.locking, format };
  const lock = policy && lockRequestFor(policy);
  const openProtocol = () => protocol.open(spec, { readOnly, lock, cache: opts.cache });
  const file = depth === 0 ? await guard.openTop(openProtocol) : await guard.open(named, openProtocol);
  try {
    const driver = await chooseDriver(file, spec, format);
    // Locked before probing as if raw; any other format refuses writers (--share-rw).
    let backingDecrypts = false;
    const imageLock = (file as { imageLock?: { update(r: ReturnType<typeof lockRequestFor>): void } }).imageLock;
    if (policy && format === undefined) imageLock?.update(lockRequestFor({ ...policy, format: driver.name }));
    const openOpts: OpenOptions = {
      readOnly,
      cache: opts.cache,
      metadataCacheBytes: opts.metadataCacheBytes,
      secret: opts.secret,
      openFile: async (name, role = 'file') => {
        const resolved = hasOwnProtocol(name) ? name : protocol.resolveRelative(spec, name);
        const p = protocolFor(resolved);
        const lockReq = policy && lockRequestFor({ ...policy, format: driver.name });
        return guard.open(namedRequest(spec, role, name, resolved, !readOnly), () => p.open(resolved, { readOnly, lock: lockReq, cache: opts.cache }));
      },
      openBacking: async (name, fmt) => {
        const resolved = hasOwnProtocol(name) ? name : protocol.resolveRelative(spec, name);
        try {
          const b = await openChain(resolved, fmt, opts, depth + 1, seen, guard, namedRequest(spec, 'backing file', name, resolved, false));
          if (decrypting.has(b)) backingDecrypts = true;
          return b;
        } catch (err) {
          if (err instanceof CorruptImageError && /backing chain/.test(err.message)) throw err;
          if (err instanceof UntrustedFileError) throw err;
          const why = messageOf(err).replace(`${resolved}: `, '');
          const wrapped = new UsageError(`${spec}: cannot open backing file '${name}' (${resolved}): ${why}`);
          throw err instanceof TsmountError ? Object.assign(wrapped, { errno: err.errno }) : wrapped;
        }
      },
    };
    const node = await driver.open(file, openOpts);
    formats.set(node, driver.name);
    if (node.encrypted || backingDecrypts) decrypting.add(node);
    debug('%s: %s, %d bytes%s%s', spec, driver.name, node.size, readOnly ? ', read-only' : '', isBacking ? `, backing file at depth ${depth}` : '');
    return node;
  } catch (err) {
    await file.close().catch(() => undefined);
    throw err;
  }
}

async function chooseDriver(file: BlockNode, spec: string, format: string | undefined): Promise<FormatDriver> {
  if (file.size === 0) throw new UsageError(`${spec}: empty file, not a disk image`);
  const head = new Uint8Array(Math.min(PROBE_BYTES, file.size));
  await file.read(0, head);
  if (format !== undefined) {
    const driver = driverNamed(format, spec);
    if (driver.name !== 'raw' && driver.probe(head, spec) === 0) {
      const probed = safeProbe(head, spec);
      throw new UsageError(`${spec}: not a ${format} image${probed && probed !== 'raw' ? ` (it looks like ${probed})` : ''}`);
    }
    return driver;
  }
  return probeFormat(head, spec);
}

/** formatByName, with the image named: `-f` and a backing_fmt apply to one file. */
function driverNamed(format: string, spec: string): FormatDriver {
  try {
    return formatByName(format);
  } catch (err) {
    if (err instanceof TsmountError) throw Object.assign(err, { message: `${spec}: ${err.message}` });
    throw err;
  }
}

function safeProbe(head: Uint8Array, spec: string): string | undefined {
  try {
    return probeFormat(head, spec).name;
  } catch {
    return undefined;
  }
}
