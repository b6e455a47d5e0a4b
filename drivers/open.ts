// Building the block graph: for each image its protocol node, format node and backing
// chain (openImage), the alignment filter where a node asks for it, and the cluster
// cache on top (openGraph). The server, tsimg, the benchmarks and the tests all build
// graphs here and nowhere else.
import fs from 'node:fs';
import createDebug from './util/debug.js';
import type { BlockNode, CacheMode, FormatDriver, OpenOptions, ProtocolOpenOptions } from './types.js';
import { BackingChainError, TsmountError, UntrustedFileError, UsageError, messageOf } from './errors.js';
import { lockRequestFor, type LockingMode } from './protocol/lock.js';
import { fileProtocol, hasOwnProtocol, protocolFor } from './protocol/index.js';
import { formatByName, probeFormat, PROBE_BYTES, PROBE_TAIL_BYTES } from './format/index.js';
import { NamedFileGuard, namedFilesOf, recordNamedFiles, type NamedFilePolicy, type NamedRequest } from './trust.js';
import { aligned } from './filters/align.js';
import { guarded } from './filters/read-only.js';
import { metadataOnly } from './filters/no-io.js';
import { withFaults } from './filters/faults.js';
import { preallocated, type PreallocateOptions } from './filters/preallocate.js';
import { ClusterCache, DEFAULT_BLOCK_SIZE } from '../cache/cluster-cache.js';

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
  /** Open no backing file (tsimg info opens each layer by itself, as qemu-img info). */
  noBacking?: boolean;
  /** Metadata only: encrypted images open without a passphrase, data is refused (OpenOptions.noIo). */
  noIo?: boolean;
  /** Opened for a repair (tsimg check -r): OpenOptions.check. */
  check?: boolean;
  /** ProtocolOpenOptions.syncOnClose, for every file of the image (tsimg convert -t unsafe). */
  syncOnClose?: boolean;
  /**
   * QEMU's preallocate filter over the image's own file (file.driver=preallocate,
   * tsmount --preallocate): writable opens only, not its backing files or other files.
   */
  preallocate?: PreallocateOptions;
}

const formats = new WeakMap<BlockNode, string>();

/** The format driver that opened a node (for tsimg info and messages). */
export function formatOf(node: BlockNode): string | undefined {
  return formats.get(node);
}

/**
 * Whether reading this image yields plaintext of an encrypted image: its own format
 * decrypts, or an image in its backing chain does (an overlay shows the plaintext of
 * every cluster it leaves to an encrypted backing file).
 */
export function decryptsInChain(node: BlockNode): boolean {
  for (let n: BlockNode | undefined = node; n; n = n.backing) if (n.encrypted) return true;
  return false;
}

/** Backing chains deeper than this are taken for a loop or a mistake. */
export const MAX_BACKING_DEPTH = 256;

export interface GraphOptions extends Omit<ImageOptions, 'metadataCacheBytes'> {
  /** Bytes for the data cache and every node's metadata tables together (--cache-size). */
  cacheSize: number;
}

/** --cache-size split between guest data and per-node metadata tables. */
export function cacheBudget(total: number): { data: number; metadata: number } {
  const metadata = Math.max(1 << 20, Math.floor(total / 4));
  return { data: Math.max(0, total - metadata), metadata };
}

/**
 * Open each image with its chain and put the cluster cache over it, the budget split
 * evenly between the images. On failure nothing stays open.
 */
export async function openGraph(specs: string[], opts: GraphOptions): Promise<BlockNode[]> {
  const budget = cacheBudget(opts.cacheSize);
  const share = (n: number): number => Math.floor(n / Math.max(1, specs.length));
  const nodes: BlockNode[] = [];
  try {
    for (const spec of specs) {
      const node = await openImage(spec, { ...opts, metadataCacheBytes: share(budget.metadata) });
      const top = cacheOver(node, opts.cache, share(budget.data));
      formats.set(top, formats.get(node)!);
      recordNamedFiles(top, namedFilesOf(node));
      nodes.push(top);
    }
  } catch (err) {
    await Promise.allSettled(nodes.map((n) => n.close()));
    throw err;
  }
  return nodes;
}

/** The cluster cache over an image's top node: in the node's chunks where it decodes whole chunks. */
export function cacheOver(node: BlockNode, mode: CacheMode, dataBytes: number): ClusterCache {
  const chunk = node.chunkSize;
  // A removable medium can change under any cached byte: its data is not cached.
  const maxBytes = node.mediumGeneration !== undefined ? 0 : dataBytes;
  return new ClusterCache(node, { mode, maxBytes, blockSize: chunk ?? DEFAULT_BLOCK_SIZE, chunked: chunk !== undefined });
}

/**
 * The filters every node gets from the graph builder, and nobody else: alignment
 * where the node asks for it, the read-only check where it was opened read-only.
 */
function filtered(node: BlockNode): BlockNode {
  return guarded(aligned(node));
}

/** A protocol node's filters: those of every node, and injected faults in the fault tests (TSMOUNT_FAULTS). */
function filteredProtocol(node: BlockNode): BlockNode {
  return filtered(withFaults(node));
}

/** A protocol node for `spec` (a path or a URI). */
export async function openProtocol(spec: string, opts: ProtocolOpenOptions): Promise<BlockNode> {
  return filtered(await protocolFor(spec).open(spec, opts));
}

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
  if (seen.has(id)) throw new BackingChainError(`${spec}: backing chain loops back to this file`);
  if (depth > MAX_BACKING_DEPTH) throw new BackingChainError(`${spec}: backing chain deeper than ${MAX_BACKING_DEPTH}`);
  seen.add(id);

  const protocol = protocolFor(spec);
  // The preallocate filter: the top image's own file, opened writable (QEMU's does nothing otherwise).
  const prealloc = depth === 0 && !readOnly ? opts.preallocate : undefined;
  const policy =
    opts.locking === 'off'
      ? undefined
      : { readOnly, backing: isBacking, forceShare: opts.forceShare, shareRw: opts.shareRw, mode: opts.locking, format, preallocate: prealloc !== undefined };
  const lock = policy && lockRequestFor(policy);
  // The guard sees the protocol node itself (it checks the opened descriptor); the filters go on after.
  const openFile = () => protocol.open(spec, { readOnly, lock, cache: opts.cache, syncOnClose: opts.syncOnClose });
  const opened = filteredProtocol(depth === 0 ? await guard.openTop(openFile) : await guard.open(named, openFile));
  let file = opened;
  try {
    if (prealloc) file = preallocated(opened, prealloc);
    const driver = await chooseDriver(file, spec, format);
    // Locked before probing as if raw; any other format refuses writers (--share-rw).
    if (policy && format === undefined) file.imageLock?.update(lockRequestFor({ ...policy, format: driver.name }));
    const openOpts: OpenOptions = {
      readOnly,
      cache: opts.cache,
      metadataCacheBytes: opts.metadataCacheBytes,
      secret: opts.secret,
      noBacking: opts.noBacking,
      noIo: opts.noIo,
      check: opts.check,
      openFile: async (name, role = 'file') => {
        const resolved = hasOwnProtocol(name) ? name : protocol.resolveRelative(spec, name);
        const p = protocolFor(resolved);
        const lockReq = policy && lockRequestFor({ ...policy, format: driver.name, preallocate: false });
        return filteredProtocol(await guard.open(namedRequest(spec, role, name, resolved, !readOnly), () => p.open(resolved, { readOnly, lock: lockReq, cache: opts.cache, syncOnClose: opts.syncOnClose })));
      },
      openBacking: async (name, fmt) => {
        const resolved = hasOwnProtocol(name) ? name : protocol.resolveRelative(spec, name);
        try {
          return await openChain(resolved, fmt, opts, depth + 1, seen, guard, namedRequest(spec, 'backing file', name, resolved, false));
        } catch (err) {
          if (err instanceof BackingChainError || err instanceof UntrustedFileError) throw err;
          const why = messageOf(err).replace(`${resolved}: `, '');
          const message = `${spec}: cannot open backing file '${name}' (${resolved}): ${why}`;
          throw err instanceof TsmountError ? err.withMessage(message) : new UsageError(message, undefined, { cause: err });
        }
      },
    };
    const node = metadataOnly(filtered(await driver.open(file, openOpts)), opts.noIo);
    formats.set(node, driver.name);
    debug('%s: %s, %d bytes%s%s', spec, driver.name, node.size, readOnly ? ', read-only' : '', isBacking ? `, backing file at depth ${depth}` : '');
    return node;
  } catch (err) {
    await file.close().catch(() => undefined);
    throw err;
  }
}

async function chooseDriver(file: BlockNode, spec: string, format: string | undefined): Promise<FormatDriver> {
  // A drive with no medium in is a raw disk of no bytes until one is inserted.
  if (file.size === 0 && file.mediumGeneration !== undefined && (format === undefined || format === 'raw')) return driverNamed('raw', spec);
  if (file.size === 0) throw new UsageError(`${spec}: empty file, not a disk image`);
  const head = new Uint8Array(Math.min(PROBE_BYTES, file.size));
  const tail = new Uint8Array(Math.min(PROBE_TAIL_BYTES, file.size));
  // Both at once: over NBD or SSH that is one round trip, not two. A file no longer
  // than the head has its tail in it already.
  const tailInHead = file.size <= head.length;
  await Promise.all([file.read(0, head), tail.length > 0 && !tailInHead ? file.read(file.size - tail.length, tail) : undefined]);
  if (tailInHead) tail.set(head.subarray(head.length - tail.length));
  if (format !== undefined) {
    const driver = driverNamed(format, spec);
    if (driver.name !== 'raw' && driver.probe(head, spec, tail) === 0) {
      const probed = safeProbe(head, spec, tail);
      throw new UsageError(`${spec}: not a ${format} image${probed && probed !== 'raw' ? ` (it looks like ${probed})` : ''}`);
    }
    return driver;
  }
  return probeFormat(head, spec, tail);
}

/** formatByName, with the image named: `-f` and a backing_fmt apply to one file. */
function driverNamed(format: string, spec: string): FormatDriver {
  try {
    return formatByName(format);
  } catch (err) {
    if (err instanceof TsmountError) throw err.withMessage(`${spec}: ${err.message}`);
    throw err;
  }
}

function safeProbe(head: Uint8Array, spec: string, tail: Uint8Array): string | undefined {
  try {
    return probeFormat(head, spec, tail).name;
  } catch {
    return undefined;
  }
}
