// The FUSE layer's one interface. Everything else sees promise-based operations keyed
// by node id, and typed errors; which FUSE implementation serves them is chosen here:
// - /dev/fuse spoken from Node's event loop: fuse-dev.ts mounts (mount(2) as root;
//   otherwise fusermount3 mounts and hands the descriptor back) and parses -o,
//   fuse-session.ts is the transport, fuse-codec.ts the wire format. 1 MiB requests,
//   no thread hand-offs.
// - fuse-native.ts is libfuse 2 through fuse-native: the fallback where Node lacks
//   the pipe binding fuse-dev.ts needs, or neither mount(2) nor fusermount3 is there.
//   128 KiB requests; libfuse 2 names files by path, so it maps paths to node ids.
// TSMOUNT_FUSE=libfuse forces the second, TSMOUNT_FUSE=fusermount the fusermount3
// path even as root (for comparison and tests).
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import createDebug from '../drivers/util/debug.js';
import { IoError, messageOf } from '../drivers/errors.js';
import { umount2, MNT_DETACH } from '../drivers/util/sys.js';
import type { MapShare } from './read-map-runs.js';

const debug = createDebug('tsmount:fuse');

export interface Stat {
  mode: number;
  size: number;
  uid: number;
  gid: number;
  mtime: Date;
  atime: Date;
  ctime: Date;
  nlink: number;
  blocks?: number;
  blksize?: number;
}

/** The node id of the mount's root (FUSE_ROOT_ID). */
export const ROOT_ID = 1;

/** What LOOKUP finds: the name's node id, and its attributes. */
export interface Entry {
  ino: number;
  attr: Stat;
}

export interface DirEntry {
  name: string;
  ino: number;
  dir: boolean;
}

/** What OPEN hands back: the file handle, and what the page-cache policy needs to know. */
export interface Opened {
  fh: number;
  /** The file's bytes can change while it is open (a writable flat file). */
  writable: boolean;
  size: number;
  /** A host descriptor with exactly the file's bytes (BlockNode.passthroughFd). */
  passthroughFd?: number;
}

/**
 * Promise-based operations keyed by node id (`ino`) and file handle (`fh`), as the
 * kernel names files: LOOKUP resolves a name once, every later request carries the
 * node id. A thrown error becomes errnoOf(err).
 */
export interface FsOps {
  lookup(parent: number, name: string): Promise<Entry>;
  /** The kernel dropped its last reference to `ino` (its lookup count reached zero). */
  forget?(ino: number): void;
  getattr(ino: number): Promise<Stat>;
  /** The entries of a directory, without '.' and '..'. */
  readdir(ino: number): Promise<DirEntry[]>;
  open(ino: number, flags: number): Promise<Opened>;
  release(ino: number, fh: number): Promise<void>;
  /** Fill buf (done with it when this resolves); returns bytes read. */
  read(ino: number, fh: number, buf: Buffer, length: number, position: number): Promise<number>;
  /** buf is the handler's to keep until this resolves. */
  write(ino: number, fh: number, buf: Buffer, length: number, position: number): Promise<number>;
  truncate(ino: number, size: number): Promise<void>;
  /** Called on every close(2) of a file descriptor. */
  flush(ino: number, fh: number): Promise<void>;
  fsync(ino: number, fh: number, datasync: boolean): Promise<void>;
  /** fallocate(2) modes: 0, KEEP_SIZE, PUNCH_HOLE|KEEP_SIZE, ZERO_RANGE[|KEEP_SIZE]. */
  fallocate?(ino: number, fh: number, mode: number, offset: number, length: number): Promise<void>;
  /** lseek(2) with SEEK_DATA (3) or SEEK_HOLE (4): the offset found; ENXIO past the end. */
  lseek?(ino: number, fh: number, offset: number, whence: number): Promise<number>;
  statfs(ino: number): Promise<Record<string, number>>;
  utimens(ino: number): Promise<void>;
  chmod(ino: number, mode: number): Promise<void>;
  chown(ino: number, uid: number, gid: number): Promise<void>;
  /** The kernel ends the session (DESTROY): write everything out. */
  destroy?(): Promise<void>;
  /**
   * The shared read map of a flat file (fs/read-map.ts), which FUSE worker threads
   * answer READs (and overwrites in place) from, with the ciphers its entries name;
   * null where the file has none, undefined when it cannot be made now (a write is in
   * flight): asked again at a later READ or WRITE.
   */
  readMapFor?(ino: number): MapShare | null | undefined;
  /** A READ (or a WRITE: `write`) of [position, position + length) was served on the JS thread: publish the map around it. */
  mapMiss?(ino: number, position: number, length: number, write?: boolean): void;
  /**
   * A WRITE the JS thread read, written as a worker writes an overwrite in place (the
   * read map publishes all of it so), synchronously; false: serve it with write().
   */
  writeAround?(ino: number, position: number, src: Buffer, at: number, length: number): boolean;
}

export interface MountOptions {
  /** The mount's source as /proc/mounts shows it (tsmount#IMAGE). */
  fsname: string;
  readOnly: boolean;
  allowOther: boolean;
  /** Only the mounting user and root (libfuse's allow_root); meaningless with allowOther. */
  allowRoot?: boolean;
  /** Extra `-o` options from the command line, libfuse's names. */
  extra: string[];
}

export interface FuseMount {
  readonly mountpoint: string;
  /** Resolves when the kernel ends the session (unmounted), where the backend can tell. */
  readonly closed?: Promise<void>;
  /** How requests moved between the FUSE worker threads and the JS thread, where the backend has workers. */
  transportCounters?(): TransportCounters | undefined;
}

/**
 * Requests the FUSE workers handed to the JS thread, those its spin read itself instead,
 * and the times a writer made it park the workers (fs/fuse-session.ts writerMode).
 */
export interface TransportCounters {
  handedOver: number;
  spinTakes: number;
  writerParks: number;
}

export async function mount(mountpoint: string, ops: FsOps, opts: MountOptions): Promise<FuseMount> {
  if (process.env.TSMOUNT_FUSE !== 'libfuse') {
    const dev = await import('./fuse-dev.js');
    if (dev.available()) return dev.mountDev(mountpoint, ops, opts);
    debug('/dev/fuse cannot be mounted directly here: using libfuse');
  }
  const native = await import('./fuse-native.js');
  return native.mountNative(mountpoint, ops, opts);
}

/**
 * Widen the kernel's readahead window for this mount (/sys/class/bdi/MAJ:MIN, `dev`
 * from mountinfo). The window the kernel offers a FUSE mount at INIT is 128 KiB and
 * INIT can only shrink it; a wider one keeps several readahead requests in flight
 * (async_read), which the server answers concurrently. Needs root (sysfs); best
 * effort, reads are correct either way.
 */
export function setReadahead(dev: string, kib: number): void {
  if (!dev || !/^\d+:\d+$/.test(dev)) return;
  try {
    fs.writeFileSync(`/sys/class/bdi/${dev}/read_ahead_kb`, String(kib));
  } catch (err) {
    debug('readahead for %s not set: %s', dev, messageOf(err));
  }
}

/** The setuid mount helper (fuse3's fusermount3, or fuse 2's fusermount), for users who may not call mount(2). */
export function fusermountHelper(): string | undefined {
  for (const name of ['fusermount3', 'fusermount']) {
    for (const dir of (process.env.PATH ?? '/usr/bin:/bin').split(':')) {
      const p = path.join(dir || '.', name);
      try {
        fs.accessSync(p, fs.constants.X_OK);
        return p;
      } catch {
        /* next */
      }
    }
  }
  return undefined;
}


/**
 * Unmount a FUSE mount: umount2 as root; otherwise the setuid helper's -u (safe to
 * spawn from the serving process: its /dev/fuse descriptor is close-on-exec, unlike
 * libfuse 2's). The one way both the server and `tsmount -u` unmount. Throws an error
 * whose errno is EBUSY when a file on the mount is open.
 */
export function unmountFuse(mountpoint: string, lazy: boolean): void {
  const helper = process.getuid?.() === 0 ? undefined : fusermountHelper();
  try {
    umount2(mountpoint, lazy ? MNT_DETACH : 0);
    return;
  } catch (err) {
    if (!helper) throw err;
  }
  const r = spawnSync(helper, ['-u', ...(lazy ? ['-z'] : []), '--', mountpoint], { stdio: ['ignore', 'ignore', 'pipe'] });
  if (r.status !== 0) throw new IoError(`${path.basename(helper)} -u: ${String(r.stderr).trim() || `status ${r.status}`}`, /busy/i.test(String(r.stderr)) ? 16 /* EBUSY */ : 1 /* EPERM */);
}
