// The serving process: opens the images, mounts them, and shuts down cleanly when
// the mount goes away (tsmount -u, a plain umount, SIGTERM), writing everything out
// before it exits.
import fs from 'node:fs';
import path from 'node:path';
import createDebug from 'debug';
import type { BlockNode, CacheMode } from '../drivers/types.js';
import { UsageError, messageOf } from '../drivers/errors.js';
import { openGraph } from '../drivers/open.js';
import { fileProtocol, protocolFor } from '../drivers/protocol/index.js';
import type { LockingMode } from '../drivers/protocol/lock.js';
import { SysError } from '../drivers/errors.js';
import { FlatFs, type FlatFile } from './flatfs.js';
import { mount, setReadahead, unmountFuse, type FuseMount } from './fuse.js';
import { findMount } from './mounts.js';

const debug = createDebug('tsmount:server');

/**
 * Kernel readahead per mount (fuse.ts setReadahead says why): one full request. With
 * 512 KiB, a reader's 1 MiB read(2) was served in two halves, one after the other
 * (850 MB/s against 1.7 GB/s with 1 MiB, on the same image, same run).
 */
const READAHEAD_KIB = Number(process.env.TSMOUNT_READAHEAD_KIB ?? 1024);

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
  /** Extra libfuse -o options. */
  fuseOptions: string[];
  /** Passphrase for encrypted images. */
  secret?: string;
}

export interface MountTarget {
  mountpoint: string;
  /** The mountpoint is a regular file: mount the one image over it. */
  overFile: boolean;
  /** File names inside the mount, one per image. */
  names: string[];
}

/** `disk.qcow2` -> `disk.raw`; checked before anything is opened. */
export function planMount(images: string[], mountpoint: string): MountTarget {
  if (images.length === 0) throw new UsageError('no image given');
  const mp = path.resolve(mountpoint);
  let st: fs.Stats;
  try {
    st = fs.statSync(mp);
  } catch {
    throw new UsageError(`${mountpoint}: mountpoint does not exist`);
  }
  if (findMount(mp)) throw new UsageError(`${mountpoint}: already a tsmount mount`);
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
        process.stderr.write(`tsmount: snapshot '${s.name}' of ${f.node.name} cannot be shown as a file; skipped\n`);
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

  private constructor(
    private readonly target: MountTarget,
    private readonly nodes: BlockNode[],
    private readonly flat: FlatFs,
  ) {
    this.exited = new Promise((r) => (this.resolveExit = r));
  }

  /** Open every image, then mount; on any failure nothing stays open or mounted. */
  static async start(opts: ServeOptions): Promise<Server> {
    const target = planMount(opts.images, opts.mountpoint);
    const nodes = await openGraph(opts.images, {
      readOnly: !opts.rw,
      format: opts.format,
      cache: opts.cache,
      cacheSize: opts.cacheSize,
      locking: opts.locking,
      forceShare: opts.forceShare,
      shareRw: opts.shareRw,
      secret: opts.secret,
    });
    const files: FlatFile[] = nodes.map((node, i) => {
      // A local image lends its owner and time to the flat file; a remote one, the server's.
      const st = protocolFor(opts.images[i]!) === fileProtocol ? fs.statSync(opts.images[i]!.replace(/^file:/, '')) : undefined;
      return { name: target.names[i]!, node, writable: opts.rw, uid: st?.uid ?? process.getuid?.() ?? 0, gid: st?.gid ?? process.getgid?.() ?? 0, mtime: st?.mtime ?? new Date() };
    });
    if (!target.overFile) files.push(...snapshotFiles(files));
    const flat = new FlatFs(files, target.overFile, (msg) => process.stderr.write(`tsmount: ${msg}\n`));
    const server = new Server(target, nodes, flat);
    const fsname = `tsmount:${process.pid}`;
    try {
      server.session = await mount(target.mountpoint, flat, {
        fsname,
        readOnly: !opts.rw,
        allowOther: process.getuid?.() === 0,
        extra: opts.fuseOptions,
      });
      setReadahead(target.mountpoint, READAHEAD_KIB, fsname);
    } catch (err) {
      await Promise.allSettled(nodes.map((n) => n.close()));
      throw err;
    }
    server.watch();
    return server;
  }

  get mountpoint(): string {
    return this.target.mountpoint;
  }

  /** A plain umount ends the FUSE session without telling us: look for it. */
  private watch(): void {
    void this.session?.closed?.then(() => {
      debug('FUSE session of %s ended', this.target.mountpoint);
      void this.shutdown(false);
    });
    this.watcher = setInterval(() => {
      if (!findMount(this.target.mountpoint, process.pid)) {
        debug('mount %s is gone', this.target.mountpoint);
        void this.shutdown(false);
      }
    }, 250);
  }

  /**
   * Unmount (unless that already happened), write everything out, close every node.
   * Resolves `exited` with the exit status.
   */
  shutdown(unmount: boolean): Promise<void> {
    this.shuttingDown ??= (async () => {
      if (this.watcher) clearInterval(this.watcher);
      let code = 0;
      if (unmount && findMount(this.target.mountpoint, process.pid)) {
        try {
          unmountFuse(this.target.mountpoint, false);
        } catch (err) {
          // Busy: detach it now, so no new request arrives; open files see errors.
          debug('umount %s: %s, detaching', this.target.mountpoint, err instanceof SysError ? err.errno : messageOf(err));
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
        process.stderr.write(`tsmount: flushing on unmount failed: ${messageOf(err)}\n`);
        code = 1;
      }
      for (const n of this.nodes) {
        try {
          await n.close();
        } catch (err) {
          process.stderr.write(`tsmount: closing ${n.name} failed: ${messageOf(err)}\n`);
          code = 1;
        }
      }
      this.resolveExit(code);
    })();
    return this.shuttingDown;
  }
}
