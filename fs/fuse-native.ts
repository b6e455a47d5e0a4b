// The libfuse 2 backend (fuse-native), for users who cannot call mount(2): fs/fuse.ts
// chooses it only where fuse-dev.ts cannot serve. The only module that knows fuse-native.
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
// libfuse 2's high-level API names files by path; FsOps knows node ids. PathOps maps
// one to the other, resolving each path once by LOOKUP from the root.
import { createRequire } from 'node:module';
import path from 'node:path';
import createDebug from '../drivers/util/debug.js';
import { errnoOf, messageOf } from '../drivers/errors.js';
import { ROOT_ID, type FsOps, type FuseMount, type MountOptions, type Stat } from './fuse.js';

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
    // DEBUG=tsmount:fuse: every request (the buffer left out); free when off.
    if (debug.enabled) debug('request: %s(%o)', name, args.filter((a) => !Buffer.isBuffer(a)));
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

/** FsOps by path, for libfuse 2: each path resolved to its node id once. */
class PathOps {
  private readonly ids = new Map<string, number>([['/', ROOT_ID]]);

  constructor(private readonly ops: FsOps) {}

  async ino(path: string): Promise<number> {
    const known = this.ids.get(path);
    if (known !== undefined) return known;
    const slash = path.lastIndexOf('/');
    const parent = await this.ino(slash <= 0 ? '/' : path.slice(0, slash));
    const { ino } = await this.ops.lookup(parent, path.slice(slash + 1));
    this.ids.set(path, ino);
    return ino;
  }

  async getattr(path: string): Promise<Stat> {
    return this.ops.getattr(await this.ino(path));
  }
  async readdir(path: string): Promise<string[]> {
    const entries = await this.ops.readdir(await this.ino(path));
    return ['.', '..', ...entries.map((e) => e.name)];
  }
  async open(path: string, flags: number): Promise<number> {
    return (await this.ops.open(await this.ino(path), flags)).fh;
  }
  async release(path: string, fh: number): Promise<void> {
    return this.ops.release(await this.ino(path), fh);
  }
  async read(path: string, fh: number, buf: Buffer, length: number, position: number): Promise<number> {
    return this.ops.read(await this.ino(path), fh, buf, length, position);
  }
  async write(path: string, fh: number, buf: Buffer, length: number, position: number): Promise<number> {
    return this.ops.write(await this.ino(path), fh, buf, length, position);
  }
  async truncate(path: string, size: number): Promise<void> {
    return this.ops.truncate(await this.ino(path), size);
  }
  async flush(path: string, fh: number): Promise<void> {
    return this.ops.flush(await this.ino(path), fh);
  }
  async fsync(path: string, datasync: boolean, fh: number): Promise<void> {
    return this.ops.fsync(await this.ino(path), fh, datasync);
  }
  async statfs(path: string): Promise<Record<string, number>> {
    return this.ops.statfs(await this.ino(path));
  }
  async utimens(path: string): Promise<void> {
    return this.ops.utimens(await this.ino(path));
  }
  async chmod(path: string, mode: number): Promise<void> {
    return this.ops.chmod(await this.ino(path), mode);
  }
  async chown(path: string, uid: number, gid: number): Promise<void> {
    return this.ops.chown(await this.ino(path), uid, gid);
  }
}

export function mountNative(mountpoint: string, fsOps: FsOps, opts: MountOptions): Promise<FuseMount> {
  const ops = new PathOps(fsOps);
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
  const options = [
    // libfuse splits -o at commas and takes `\,` as a comma in a value.
    `fsname=${opts.fsname.replace(/[\\,]/g, '\\$&')}`,
    'subtype=tsmount',
    // 128 KiB requests instead of 4 KiB ones (libfuse 2's most).
    'big_writes',
    'max_write=131072',
    'max_read=131072',
    'max_readahead=131072',
    // Only this process changes the image (it holds the lock): the kernel may keep
    // pages across opens.
    'kernel_cache',
    'default_permissions',
    ...(opts.allowOther ? ['allow_other'] : opts.allowRoot ? ['allow_root'] : []),
    'nonempty',
    ...(opts.readOnly ? ['ro'] : []),
    // Passthrough is the /dev/fuse backend's (fuse-session.ts); libfuse 2 has none.
    ...opts.extra.flatMap((o) => o.split(',')).filter((o) => o !== 'passthrough' && o !== 'nopassthrough'),
  ].join(',');
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

