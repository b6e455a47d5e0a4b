// The only module that knows fuse-native. Everything else sees promise-based
// operations and typed errors, so a fork or a libfuse3 binding can replace this file.
//
// fuse-native 2.2.6's sharp edges, handled here:
// - every operation times out after 15 s unless `timeout: false` (a slow NBD read or
//   a long flush must not turn into ETIMEDOUT): we pass false;
// - its mount refuses a mountpoint that is not a directory; QEMU's FUSE export mounts
//   over regular files and so do we, so _open is replaced (same native call);
// - its option string is built from a fixed list without big_writes/max_write; we
//   build the string ourselves and libfuse takes it as is;
// - the read/write buffer is libfuse's memory, detached once we call back: handlers
//   must finish with it before they resolve, and copy what they keep;
// - Fuse.unmount shells out to fusermount, and a child of the serving process
//   inherits /dev/fuse (no close-on-exec) and can keep a dead mount alive: the
//   serving process never spawns; it unmounts with umount2(2).
import fs from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';
import createDebug from 'debug';
import { errnoOf, messageOf } from '../drivers/errors.js';

const require = createRequire(import.meta.url);
const debug = createDebug('tsmount:fuse');

// eslint-disable-next-line @typescript-eslint/no-require-imports
const Fuse = require('fuse-native') as FuseNativeClass;
const nativeBinding = (require('node-gyp-build') as (dir: string) => NativeBinding)(
  path.dirname(require.resolve('fuse-native/package.json')),
);

interface NativeBinding {
  sizeof_fuse_thread_t: number;
  fuse_native_mount(mnt: string, opts: string, thread: Buffer, self: unknown, malloc: unknown, handlers: unknown, implemented: Uint32Array): void;
}

type Cb = (code: number, ...values: unknown[]) => void;

interface FuseNativeInstance {
  mnt: string;
  _thread: Buffer | null;
  _openCallback: ((err: Error | null) => void) | null;
  _malloc: unknown;
  _handlers: unknown;
  _getImplementedArray(): Uint32Array;
  mount(cb: (err: Error | null) => void): void;
}

type FuseNativeClass = {
  new (mnt: string, ops: Record<string, unknown>, opts: Record<string, unknown>): FuseNativeInstance;
  prototype: FuseNativeInstance & { _open(cb: (err: Error | null) => void): void };
};

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
  /** Fill buf (libfuse's memory: done with it when this resolves); returns bytes read. */
  read(path: string, fd: number, buf: Buffer, length: number, position: number): Promise<number>;
  write(path: string, fd: number, buf: Buffer, length: number, position: number): Promise<number>;
  truncate(path: string, size: number): Promise<void>;
  /** Called on every close(2) of a file descriptor. */
  flush(path: string, fd: number): Promise<void>;
  fsync(path: string, datasync: boolean, fd: number): Promise<void>;
  statfs(path: string): Promise<Record<string, number>>;
  utimens(path: string): Promise<void>;
  chmod(path: string, mode: number): Promise<void>;
  chown(path: string, uid: number, gid: number): Promise<void>;
}

export interface MountOptions {
  /** libfuse -o options, e.g. ['big_writes', 'max_write=131072']. */
  options: string[];
}

export interface FuseMount {
  readonly mountpoint: string;
}

/** The native mount call, without fuse-native's directory-only check. */
function openWithoutDirCheck(this: FuseNativeInstance & { _fuseOptions(): string }, cb: (err: Error | null) => void): void {
  this._thread = Buffer.alloc(nativeBinding.sizeof_fuse_thread_t);
  this._openCallback = cb;
  try {
    nativeBinding.fuse_native_mount(this.mnt, this._fuseOptions(), this._thread, this, this._malloc, this._handlers, this._getImplementedArray());
  } catch (err) {
    this._openCallback = null;
    cb(err instanceof Error ? err : new Error(String(err)));
  }
}

function adapt<A extends unknown[], R>(name: string, fn: (...args: A) => Promise<R>, reply: (cb: Cb, r: R) => void) {
  return (...argsAndCb: [...A, Cb]): void => {
    const cb = argsAndCb[argsAndCb.length - 1] as Cb;
    const args = argsAndCb.slice(0, -1) as A;
    fn(...args).then(
      (r) => reply(cb, r),
      (err: unknown) => {
        const errno = errnoOf(err);
        if (errno !== 2 /* ENOENT */) debug('%s(%o) failed: %s', name, args.filter((a) => !Buffer.isBuffer(a)), messageOf(err));
        cb(-errno);
      },
    );
  };
}

export function mount(mountpoint: string, ops: FsOps, opts: MountOptions): Promise<FuseMount> {
  const handlers: Record<string, unknown> = {
    getattr: adapt('getattr', ops.getattr.bind(ops), (cb, st) => cb(0, st)),
    fgetattr: adapt('fgetattr', (p: string) => ops.getattr(p), (cb, st) => cb(0, st)),
    readdir: adapt('readdir', ops.readdir.bind(ops), (cb, names) => cb(0, names)),
    open: adapt('open', ops.open.bind(ops), (cb, fd) => cb(0, fd)),
    release: adapt('release', ops.release.bind(ops), (cb) => cb(0)),
    read: adapt('read', ops.read.bind(ops), (cb, n) => cb(n)),
    write: adapt('write', ops.write.bind(ops), (cb, n) => cb(n)),
    truncate: adapt('truncate', ops.truncate.bind(ops), (cb) => cb(0)),
    ftruncate: adapt('ftruncate', (p: string, _fd: number, size: number) => ops.truncate(p, size), (cb) => cb(0)),
    flush: adapt('flush', ops.flush.bind(ops), (cb) => cb(0)),
    fsync: adapt('fsync', (p: string, datasync: number, fd: number) => ops.fsync(p, !!datasync, fd), (cb) => cb(0)),
    statfs: adapt('statfs', ops.statfs.bind(ops), (cb, s) => cb(0, s)),
    // fuse-native swaps atime and mtime; we ignore both, the image's times are its own.
    utimens: adapt('utimens', (p: string) => ops.utimens(p), (cb) => cb(0)),
    chmod: adapt('chmod', ops.chmod.bind(ops), (cb) => cb(0)),
    chown: adapt('chown', ops.chown.bind(ops), (cb) => cb(0)),
  };
  const fuse = new Fuse(mountpoint, handlers, { timeout: false });
  const options = opts.options.join(',');
  Object.assign(fuse, {
    _open: openWithoutDirCheck,
    _fuseOptions: () => (options ? `-o${options}` : ''),
  });
  return new Promise((resolve, reject) => {
    fuse.mount((err) => {
      if (err) reject(new Error(`${mountpoint}: mount failed: ${err.message}`));
      else resolve({ mountpoint: fuse.mnt });
    });
  });
}

/** /proc/self/mountinfo escapes space, tab, newline and backslash as octal. */
function escapeMountPath(p: string): string {
  return p.replace(/[ \t\n\\]/g, (c) => `\\${c.charCodeAt(0).toString(8).padStart(3, '0')}`);
}

/**
 * Widen the kernel's readahead window for this mount (/sys/class/bdi/MAJ:MIN).
 *
 * libfuse 2 cannot negotiate requests over 128 KiB (FUSE_MAX_PAGES came with
 * libfuse 3), so a 1 MiB read(2) becomes 128 KiB requests; with the default 128 KiB
 * window about one of them is ahead of the reader at a time. A wider window keeps
 * several readahead requests in flight (async_read), which the multi-threaded loop
 * and the thread pool serve in parallel. Measured on 2 cores: 512 KiB beat 128 KiB,
 * 1 MiB and 4 MiB. Needs root (sysfs); best effort, reads are correct either way.
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
