// The serving process: opens the images, mounts them, and shuts down cleanly when
// the mount goes away (tsmount -u, a plain umount, SIGTERM), writing everything out
// before it exits.
import fs from 'node:fs';
import path from 'node:path';
import createDebug from '../drivers/util/debug.js';
import type { BlockNode, CacheMode } from '../drivers/types.js';
import { UsageError, messageOf } from '../drivers/errors.js';
import { decryptsInChain, openGraph } from '../drivers/open.js';
import type { PreallocateOptions } from '../drivers/filters/preallocate.js';
import { namedFilesOf, type NamedFilePolicy } from '../drivers/trust.js';
import { fileProtocol, protocolFor } from '../drivers/protocol/index.js';
import type { LockingMode } from '../drivers/protocol/lock.js';
import { SysError } from '../drivers/errors.js';
import { FlatFs, type FlatFile } from './flatfs.js';
import { mount, setReadahead, unmountFuse, type FuseMount } from './fuse.js';
import { flatFileOwnership, rootOwnership, type MountAccess, type PulledFile } from './access.js';
import { findMount, mountDevice, mountSource, shownImage, stillMounted, writeState } from './mounts.js';
import { log } from './log.js';
import { formatOf } from '../drivers/open.js';
import { partitionFiles } from './partitions.js';
import { prepareOverlays } from './overlay.js';
import { layerFiles } from './layers.js';
import { chainOf, mountCounters, StatusPublisher, type FileDetails, type MountDetails, type WorkerIo } from './status.js';
import { CountingFilter, newCounters, type IoCounters } from '../drivers/filters/counting.js';
import { ClusterCache } from '../cache/cluster-cache.js';

const debug = createDebug('tsmount:server');

/**
 * Kernel readahead per mount (fuse.ts setReadahead says why): two full READs, 2 x 1020
 * KiB (fuse-dev.ts DEFAULT_MAX_READ, a READ a worker can splice). With 512 KiB, a
 * reader's 1 MiB read(2) was served in two halves, one after the other (850 MB/s against
 * 1.7 GB/s with 1 MiB, on the same image, same run); a 1 MiB window over 1020 KiB READs
 * would end each window with a 4 KiB one. One READ's window (1020 KiB, sessions 7-27)
 * kept one READ in flight ahead of the reader: where a READ costs CPU (inflating,
 * decrypting), one worker worked while the other waited. Two: a LUKS image +24 %, a
 * compressed qcow2 +11 %, a streamOptimized vmdk +12 %, plain formats the same
 * (scripts/BENCHMARKS.md, session 28). `-o max_readahead=N` sets it instead.
 */
const READAHEAD_KIB = Number(process.env.TSMOUNT_READAHEAD_KIB ?? 2040);

/** The readahead a `-o max_readahead=N` (bytes) among the mount options asks for, in KiB; undefined if none does. */
export function askedReadahead(fuseOptions: readonly string[]): number | undefined {
  let kib: number | undefined;
  for (const opt of fuseOptions) {
    for (const o of opt.split(',')) {
      const m = /^max_readahead=(\d+)$/.exec(o);
      if (m) kib = Math.ceil(Number(m[1]) / 1024);
    }
  }
  return kib;
}

export interface ServeOptions {
  images: string[];
  mountpoint: string;
  format?: string;
  rw: boolean;
  cache: CacheMode;
  /** Total bytes for the data cache and the metadata caches. */
  cacheSize: number;
  locking: LockingMode;
  forceShare: boolean;
  shareRw: boolean;
  /** Extra libfuse -o options (tsmount's own already taken out: fs/access.ts). */
  fuseOptions: string[];
  /** Ownership choices, allow_other, growable; default: the image's, neither. */
  access?: MountAccess;
  /** Passphrase for encrypted images. */
  secret?: string;
  /** Which files an image may name (drivers/trust.ts); 'owner' when absent. */
  namedFiles?: NamedFilePolicy;
  /** QEMU's preallocate filter over each written image file (an overlay's, where there is one). */
  preallocate?: PreallocateOptions;
  /** Polled between steps of the start: true once whoever started us has gone. */
  abandoned?: () => boolean;
  /** Write into this qcow2 overlay over the image, made if missing (fs/overlay.ts). */
  overlay?: string;
  /** Write into a temporary overlay, discarded when the server exits. */
  snapshot?: boolean;
  /** Show each layer of the backing chain as <stem>@<layer>.raw too (fs/layers.ts). */
  layers?: boolean;
  /** Show each partition as <stem>-p<N>.raw too (fs/partitions.ts). */
  partitions?: boolean;
  /** Called once everything is open, just before mounting. */
  beforeMount?: () => void;
}

/** The start was abandoned (a signal, or the starting command went away): nothing stays mounted. */
export class AbandonedError extends UsageError {}

export interface MountTarget {
  mountpoint: string;
  /** The mountpoint is a regular file: mount the one image over it. */
  overFile: boolean;
  /** File names inside the mount, one per image. */
  names: string[];
}

/**
 * The mountpoint as the kernel will name it: symlinks resolved once, here, so the
 * mount table, the registry and `tsmount -u` all see the same path.
 */
export function resolveMountpoint(mountpoint: string): string {
  try {
    return fs.realpathSync(path.resolve(mountpoint));
  } catch {
    throw new UsageError(`${mountpoint}: mountpoint does not exist`);
  }
}

/** Whether -o nonempty is among the mount options. */
function allowsNonempty(fuseOptions: string[]): boolean {
  return fuseOptions.some((o) => o.split(',').includes('nonempty'));
}

/** `disk.qcow2` -> `disk.raw`; checked before anything is opened. */
export function planMount(images: string[], mountpoint: string, fuseOptions: string[] = []): MountTarget {
  if (images.length === 0) throw new UsageError('no image given');
  const mp = resolveMountpoint(mountpoint);
  let st: fs.Stats;
  try {
    st = fs.statSync(mp);
  } catch {
    throw new UsageError(`${mountpoint}: mountpoint does not exist`);
  }
  if (findMount(mp)) throw new UsageError(`${mountpoint}: already a tsmount mount`);
  // The files in it would be hidden until unmount: libfuse's old default, and ours.
  if (st.isDirectory() && !allowsNonempty(fuseOptions) && fs.readdirSync(mp).length > 0) {
    throw new UsageError(`${mountpoint}: mountpoint is not empty (its files would be hidden until unmount); add -o nonempty to mount over them`);
  }
  if (st.isFile()) {
    if (images.length !== 1) throw new UsageError(`${mountpoint}: a regular file can hold only one image, ${images.length} given`);
    return { mountpoint: mp, overFile: true, names: [''] };
  }
  if (!st.isDirectory()) throw new UsageError(`${mountpoint}: not a directory or regular file`);
  const names = images.map((img) => `${stemOf(img)}.raw`);
  const dup = names.find((n, i) => names.indexOf(n) !== i);
  if (dup) throw new UsageError(`two images would both appear as ${dup}`);
  return { mountpoint: mp, overFile: false, names };
}

export function stemOf(spec: string): string {
  const p = protocolFor(spec);
  return (p.stem ?? fileProtocol.stem!)(spec);
}

/**
 * Internal snapshots as read-only files beside their image: MOUNTPOINT/<stem>@<name>.raw
 * (the bytes of `qemu-img convert -l <name>`). Names that cannot be a file name, or
 * that another file already has, are left out with a warning.
 */
function snapshotFiles(files: FlatFile[]): FlatFile[] {
  const out: FlatFile[] = [];
  const taken = new Set(files.map((f) => f.name));
  files.forEach((f) => {
    const stem = f.name.replace(/\.raw$/, '');
    for (const s of f.node.snapshots?.() ?? []) {
      const name = `${stem}@${s.name}.raw`;
      if (s.name === '' || /[/\0]/.test(s.name) || Buffer.byteLength(name) > 255 || taken.has(name)) {
        log('warning', `snapshot '${s.name}' of ${f.node.name} cannot be shown as a file; skipped`);
        continue;
      }
      taken.add(name);
      out.push({ ...f, name, node: s.node, writable: false });
    }
  });
  return out;
}

export class Server {
  private shuttingDown: Promise<void> | undefined;
  private watcher: NodeJS.Timeout | undefined;
  readonly exited: Promise<number>;
  private resolveExit!: (code: number) => void;
  private session: FuseMount | undefined;
  /** The mount's device number ("0:NN"), which names it in the registry. */
  private dev: string | undefined;
  private stateFile: string | undefined;
  private status: StatusPublisher | undefined;

  private constructor(
    private readonly target: MountTarget,
    private readonly nodes: BlockNode[],
    private readonly flat: FlatFs,
  ) {
    this.exited = new Promise((r) => (this.resolveExit = r));
  }

  /** Open every image, then mount; on any failure nothing stays open or mounted. */
  static async start(opts: ServeOptions): Promise<Server> {
    const target = planMount(opts.images, opts.mountpoint, opts.fuseOptions);
    if (opts.partitions && target.overFile) throw new UsageError(`${opts.mountpoint}: --partitions needs a directory as the mountpoint`);
    if (opts.abandoned?.()) throw new AbandonedError('interrupted before the mount was ready; not mounted');
    const overlays = await prepareOverlays(opts.images, opts);
    // With an overlay the graph opens the overlay; the image is its (read-only) backing file.
    const specs = overlays?.specs ?? opts.images;
    const nodes = await openGraph(specs, {
      readOnly: !opts.rw,
      format: overlays ? 'qcow2' : opts.format,
      cache: opts.cache,
      cacheSize: opts.cacheSize,
      locking: opts.locking,
      forceShare: opts.forceShare,
      shareRw: opts.shareRw,
      secret: opts.secret,
      namedFiles: opts.namedFiles,
      preallocate: opts.preallocate,
    }).catch((err: unknown) => {
      overlays?.discard();
      throw err;
    });
    const access = opts.access ?? { allowOther: false, growable: false };
    const counters = newCounters();
    const files: FlatFile[] = nodes.map((node, i) => {
      // A local image lends its mode and time to the flat file; the owner is the mounting user.
      const local = protocolFor(specs[i]!) === fileProtocol ? specs[i]!.replace(/^file:/, '') : undefined;
      const st = local !== undefined ? fs.statSync(local) : undefined;
      // The other files the image reads (backing files, extents, a data file) narrow the mode.
      const others: PulledFile[] = namedFilesOf(node).map((f) => ({ uid: f.stat.uid, gid: f.stat.gid, mode: f.stat.mode, written: f.write }));
      const own = flatFileOwnership(st, others, { writable: opts.rw, encrypted: decryptsInChain(node), choice: access });
      return { name: target.names[i]!, node: new CountingFilter(node, counters), writable: opts.rw, ...own, mtime: st?.mtime ?? new Date(), hostFile: local };
    });
    if (!target.overFile) files.push(...snapshotFiles(files));
    if (opts.layers && !target.overFile) files.push(...layerFiles(files.slice(0, nodes.length), new Set(files.map((f) => f.name)), (m) => log('warning', m)));
    let partitionsOf = new Map<string, FileDetails['partition']>();
    if (opts.partitions) {
      const parts = await partitionFiles(files.slice(0, nodes.length), new Set(files.map((f) => f.name)), (m) => log('warning', m));
      files.push(...parts.map((p) => p.file));
      partitionsOf = new Map(parts.map((p) => [p.file.name, { number: p.partition.number, scheme: p.partition.scheme, ...(p.partition.name ? { name: p.partition.name } : {}) }]));
    }
    const flat = new FlatFs(files, target.overFile, (msg) => log('err', msg), {
      root: rootOwnership(access, opts.rw),
      growable: access.growable,
    });
    const server = new Server(target, nodes, flat);
    server.io = counters;
    server.caches = nodes.map((n) => (n instanceof ClusterCache ? n.stats : { hits: 0, misses: 0 }));
    server.ready = files.map((f, i) => readyLine(f, nodes[i] ?? f.node, opts.rw, target.mountpoint, overlays !== undefined && i < nodes.length));
    opts.beforeMount?.();
    if (opts.abandoned?.()) {
      await Promise.allSettled(nodes.map((n) => n.close()));
      throw new AbandonedError('interrupted before the mount was ready; not mounted');
    }
    try {
      server.session = await mount(target.mountpoint, flat, {
        fsname: mountSource(opts.images),
        readOnly: !opts.rw,
        allowOther: access.allowOther,
        allowRoot: access.allowRoot,
        extra: opts.fuseOptions,
      });
    } catch (err) {
      await Promise.allSettled(nodes.map((n) => n.close()));
      throw err;
    }
    server.dev = mountDevice(target.mountpoint);
    if (server.dev) {
      setReadahead(server.dev, askedReadahead(opts.fuseOptions) ?? READAHEAD_KIB);
      const details: MountDetails = {
        chains: nodes.map((n, i) => chainOf(n, shownImage(specs[i]!))),
        files: files.map((f) => ({ name: f.name, writable: f.writable, ...(partitionsOf.has(f.name) ? { partition: partitionsOf.get(f.name) } : {}) })),
        ...(opts.overlay !== undefined ? { overlay: path.resolve(opts.overlay) } : opts.snapshot ? { overlay: 'temporary' } : {}),
      };
      const state = { pid: process.pid, mountpoint: target.mountpoint, images: opts.images.map(shownImage), rw: opts.rw, details };
      server.stateFile = writeState(server.dev, state);
      if (server.stateFile) {
        server.status = new StatusPublisher(server.stateFile, state, counters, server.caches, () => server.workerIo());
        server.status.publish();
        server.status.start();
      }
      if (!server.stateFile) debug('no state file for %s: tsmount -u will not wait for this server', target.mountpoint);
    }
    server.watch();
    // However the process ends, the registry must not name it.
    process.once('exit', () => server.forget());
    if (opts.abandoned?.()) {
      await server.shutdown(true);
      throw new AbandonedError('interrupted before the mount was ready; unmounted');
    }
    return server;
  }

  /** One line per file: "disk.raw ready: 1 GiB, qcow2, read-only". */
  ready: string[] = [];

  /** When the mount was made (ms since the epoch), for the summary's uptime. */
  private readonly startedAt = Date.now();
  private io: IoCounters = newCounters();
  private caches: { hits: number; misses: number }[] = [];

  /** What the FUSE workers served from the read maps, and how requests moved between them and the JS thread. */
  private workerIo(): ReturnType<WorkerIo> {
    return { ...this.flat.workerIo(), ...this.session?.transportCounters?.() };
  }

  /** The one line logged when the server exits: uptime and the counters tsmount --list shows. */
  get summary(): string {
    const c = mountCounters(this.io, this.caches, () => this.workerIo());
    const up = (Date.now() - this.startedAt) / 1000;
    return `up ${up.toFixed(1)} s: ${c.reads + c.writes} I/O requests (${c.reads} reads, ${c.writes} writes), ${c.bytesRead} bytes read, ${c.bytesWritten} bytes written, ${c.errors} errors, cache ${c.cacheHits} hits / ${c.cacheMisses} misses`;
  }

  get mountpoint(): string {
    return this.target.mountpoint;
  }

  /**
   * A plain umount ends the FUSE session without telling us: look for it. Where the
   * backend sees the session end, that alone counts: a lazy unmount (umount -l) leaves
   * the mount table at once, but its users go on reading until they close.
   */
  private watch(): void {
    if (this.session?.closed) {
      void this.session.closed.then(() => {
        debug('FUSE session of %s ended', this.target.mountpoint);
        void this.shutdown(false);
      });
      return;
    }
    this.watcher = setInterval(() => {
      if (!this.mounted()) {
        debug('mount %s is gone', this.target.mountpoint);
        void this.shutdown(false);
      }
    }, 250);
  }

  /** Our mount is still in the mount table (not one someone mounted there since). */
  private mounted(): boolean {
    return this.dev ? stillMounted(this.target.mountpoint, this.dev) : !!findMount(this.target.mountpoint);
  }

  /** Remove the state file, from the exit path too (synchronously). */
  forget(): void {
    if (this.stateFile) fs.rmSync(this.stateFile, { force: true });
    this.stateFile = undefined;
  }

  /**
   * Unmount (unless that already happened), write everything out, close every node.
   * Resolves `exited` with the exit status.
   */
  shutdown(unmount: boolean): Promise<void> {
    this.shuttingDown ??= (async () => {
      // Always one line of why: a signal (tsmount -u sends one right after its umount) may come before the session's end is seen.
      debug('shutting down %s: %s', this.target.mountpoint, unmount ? 'asked to (a signal)' : 'its mount went away');
      if (this.watcher) clearInterval(this.watcher);
      await this.status?.stop();
      let code = 0;
      if (unmount && this.mounted()) {
        try {
          unmountFuse(this.target.mountpoint, false);
        } catch (err) {
          // Busy: detach it now, so no new request arrives; open files see errors.
          debug('umount %s: %s, detaching', this.target.mountpoint, err instanceof SysError ? err.errno : messageOf(err));
          log('warning', `${this.target.mountpoint}: busy; detached (files still open on it see errors)`);
          code = 1;
          try {
            unmountFuse(this.target.mountpoint, true);
          } catch {
            /* gone already */
          }
        }
      }
      try {
        await this.flat.flushAll();
      } catch (err) {
        log('err', `flushing on unmount failed: ${messageOf(err)}`);
        code = 1;
      }
      for (const n of this.nodes) {
        try {
          await n.close();
        } catch (err) {
          log('err', `closing ${n.name} failed: ${messageOf(err)}`);
          code = 1;
        }
      }
      this.forget();
      this.resolveExit(code);
    })();
    return this.shuttingDown;
  }
}

const UNITS = ['bytes', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB', 'EiB'];

/** 1073741824 -> "1 GiB", 1610612736 -> "1.5 GiB". */
export function humanSize(n: number): string {
  let u = 0;
  let v = n;
  while (v >= 1024 && u < UNITS.length - 1) {
    v /= 1024;
    u++;
  }
  return `${u === 0 ? v : Number(v.toFixed(v < 10 ? 2 : 1))} ${UNITS[u]}`;
}

/** An image under an overlay (--overlay, --snapshot) is named by its own format: "vmdk under a qcow2 overlay". */
function readyLine(f: FlatFile, formatNode: BlockNode, rw: boolean, mountpoint: string, overlaid: boolean): string {
  const where = f.name === '' ? mountpoint : path.join(mountpoint, f.name);
  const below = overlaid ? formatNode.backing : undefined;
  const format = below ? `${formatOf(below) ?? 'raw'} under a ${formatOf(formatNode) ?? 'qcow2'} overlay` : (formatOf(formatNode) ?? 'raw');
  return `${where} ready: ${humanSize(f.node.size)}, ${format}, ${f.writable && rw ? 'read-write' : 'read-only'}`;
}
