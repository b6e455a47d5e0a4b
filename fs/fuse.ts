// The FUSE layer's one interface. Everything else sees promise-based, path-based
// operations and typed errors; which FUSE implementation serves them is chosen here:
// - fuse-dev.ts speaks the kernel protocol on /dev/fuse from Node's event loop
//   (root: it calls mount(2) itself). 1 MiB requests, no thread hand-offs.
// - fuse-native.ts is libfuse 2 through fuse-native, for users who cannot mount(2)
//   (the setuid fusermount does it for libfuse). 128 KiB requests.
// TSMOUNT_FUSE=libfuse forces the second (for comparison and tests).
import fs from 'node:fs';
import createDebug from 'debug';
import { messageOf } from '../drivers/errors.js';

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

/** Promise-based operations; a thrown error becomes errnoOf(err). */
export interface FsOps {
  getattr(path: string): Promise<Stat>;
  readdir(path: string): Promise<string[]>;
  open(path: string, flags: number): Promise<number>;
  release(path: string, fd: number): Promise<void>;
  /** Fill buf (done with it when this resolves); returns bytes read. */
  read(path: string, fd: number, buf: Buffer, length: number, position: number): Promise<number>;
  /** buf is the handler's to keep until this resolves. */
  write(path: string, fd: number, buf: Buffer, length: number, position: number): Promise<number>;
  truncate(path: string, size: number): Promise<void>;
  /** Called on every close(2) of a file descriptor. */
  flush(path: string, fd: number): Promise<void>;
  fsync(path: string, datasync: boolean, fd: number): Promise<void>;
  /** fallocate(2) modes: 0, KEEP_SIZE, PUNCH_HOLE|KEEP_SIZE, ZERO_RANGE[|KEEP_SIZE]. */
  fallocate?(path: string, mode: number, offset: number, length: number): Promise<void>;
  statfs(path: string): Promise<Record<string, number>>;
  utimens(path: string): Promise<void>;
  chmod(path: string, mode: number): Promise<void>;
  chown(path: string, uid: number, gid: number): Promise<void>;
}

export interface MountOptions {
  /** The mount's source as /proc/mounts shows it (tsmount:PID). */
  fsname: string;
  readOnly: boolean;
  allowOther: boolean;
  /** Extra `-o` options from the command line, libfuse's names. */
  extra: string[];
}

export interface FuseMount {
  readonly mountpoint: string;
  /** Resolves when the kernel ends the session (unmounted), where the backend can tell. */
  readonly closed?: Promise<void>;
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

/** /proc/self/mountinfo escapes space, tab, newline and backslash as octal. */
function escapeMountPath(p: string): string {
  return p.replace(/[ \t\n\\]/g, (c) => `\\${c.charCodeAt(0).toString(8).padStart(3, '0')}`);
}

/**
 * Widen the kernel's readahead window for this mount (/sys/class/bdi/MAJ:MIN). The
 * window the kernel offers a FUSE mount at INIT is 128 KiB and INIT can only shrink
 * it; a wider one keeps several readahead requests in flight (async_read), which the
 * server answers concurrently. Needs root (sysfs); best effort, reads are correct
 * either way.
 */
export function setReadahead(mountpoint: string, kib: number, source: string): void {
  let info: string;
  try {
    info = fs.readFileSync('/proc/self/mountinfo', 'utf8');
  } catch {
    return;
  }
  const mp = escapeMountPath(mountpoint);
  let dev: string | undefined;
  for (const line of info.split('\n')) {
    const [pre, post] = line.split(' - ');
    const f = pre?.split(' ') ?? [];
    const [fstype, src] = post?.split(' ') ?? [];
    if (f[4] === mp && fstype?.startsWith('fuse') && src === source) dev = f[2];
  }
  if (!dev || !/^\d+:\d+$/.test(dev)) return;
  try {
    fs.writeFileSync(`/sys/class/bdi/${dev}/read_ahead_kb`, String(kib));
  } catch (err) {
    debug('readahead for %s not set: %s', mountpoint, messageOf(err));
  }
}
