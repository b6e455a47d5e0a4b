// The file system tsmount presents: each image as one flat file, MOUNTPOINT/<stem>.raw,
// or the mountpoint itself when it is a regular file. Turns typed errors into errno.
import { constants as osc } from 'node:os';
import createDebug from 'debug';
import type { BlockNode } from '../drivers/types.js';
import { ReadOnlyError, TsmountError, messageOf } from '../drivers/errors.js';
import type { FsOps, Stat } from './fuse.js';
import type { Ownership } from './access.js';
import { FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE } from '../drivers/util/sys.js';

const debug = createDebug('tsmount:fs');
const E = osc.errno;

class ErrnoError extends TsmountError {
  constructor(message: string, override readonly errno: number) {
    super(message);
  }
}

export interface FlatFile {
  /** File name inside the mount, e.g. "disk.raw"; '' for a mount over a regular file. */
  name: string;
  node: BlockNode;
  writable: boolean;
  /** Owner, group and permission bits (fs/access.ts); chown and chmod change them. */
  uid: number;
  gid: number;
  /** Permission bits while writable; getattr drops the write bits of a read-only file. */
  mode: number;
  mtime: Date;
}

/** What the whole mount allows (fs/access.ts). */
export interface FlatFsAccess {
  /** The mount's root directory; undefined: the mounting user's, 0755 (0555). */
  root?: Ownership;
  /** Truncate may grow a disk (--growable); otherwise growing fails with EPERM. */
  growable: boolean;
}

const O_ACCMODE = 3;

const O_RDONLY = 0;

export class FlatFs implements FsOps {
  private readonly byPath = new Map<string, FlatFile>();
  private nextFd = 1;
  /** Files with writes not yet flushed, so a close(2) after reads costs nothing. */
  private readonly dirty = new Set<FlatFile>();
  private readonly mountTime = new Date();

  /** overFile: the mountpoint is a regular file and '/' is the one image. */
  constructor(
    private readonly files: FlatFile[],
    private readonly overFile: boolean,
    private readonly onIoError: (msg: string) => void = () => {},
    private readonly access: FlatFsAccess = { growable: false },
  ) {
    for (const f of files) this.byPath.set(overFile ? '/' : `/${f.name}`, f);
  }

  private file(path: string): FlatFile {
    const f = this.byPath.get(path);
    if (!f) throw new ErrnoError(`${path}: no such file`, E.ENOENT);
    return f;
  }

  async getattr(path: string): Promise<Stat> {
    if (path === '/' && !this.overFile) {
      const anyWritable = this.files.some((f) => f.writable);
      const t = this.mountTime;
      const root = this.access.root ?? { uid: process.getuid?.() ?? 0, gid: process.getgid?.() ?? 0, mode: anyWritable ? 0o755 : 0o555 };
      return { mode: 0o040000 | root.mode, size: 4096, uid: root.uid, gid: root.gid, mtime: t, atime: t, ctime: t, nlink: 2 };
    }
    const f = this.file(path);
    const size = f.node.size;
    return {
      mode: 0o100000 | (f.writable ? f.mode : f.mode & ~0o222),
      size,
      uid: f.uid,
      gid: f.gid,
      mtime: f.mtime,
      atime: f.mtime,
      ctime: f.mtime,
      nlink: 1,
      blksize: 4096,
      blocks: Math.ceil(size / 512),
    };
  }

  async readdir(path: string): Promise<string[]> {
    if (path !== '/' || this.overFile) throw new ErrnoError(`${path}: not a directory`, E.ENOTDIR);
    return ['.', '..', ...this.files.map((f) => f.name)];
  }

  async open(path: string, flags: number): Promise<number> {
    const f = this.file(path);
    if ((flags & O_ACCMODE) !== O_RDONLY && !f.writable) throw new ReadOnlyError(`${path}: mounted read-only`);
    return this.nextFd++;
  }

  async release(): Promise<void> {}

  async read(path: string, _fd: number, buf: Buffer, length: number, position: number): Promise<number> {
    const f = this.file(path);
    const size = f.node.size;
    if (position >= size) return 0;
    const n = Math.min(length, size - position);
    try {
      await f.node.read(position, buf.subarray(0, n));
    } catch (err) {
      this.report('read', f, position, n, err);
      throw err;
    }
    return n;
  }

  async write(path: string, _fd: number, buf: Buffer, length: number, position: number): Promise<number> {
    const f = this.file(path);
    if (!f.writable) throw new ReadOnlyError(`${path}: mounted read-only`);
    const size = f.node.size;
    // The flat file has the disk's size: a write past the end is a full disk.
    if (position >= size) throw new ErrnoError(`${path}: write past the end of the disk`, E.ENOSPC);
    const n = Math.min(length, size - position);
    this.dirty.add(f);
    try {
      await f.node.write(position, buf.subarray(0, n));
    } catch (err) {
      this.report('write', f, position, n, err);
      throw err;
    }
    return n;
  }

  async truncate(path: string, size: number): Promise<void> {
    const f = this.file(path);
    if (size === f.node.size) return;
    if (!f.writable) throw new ReadOnlyError(`${path}: mounted read-only`);
    // Shrinking a disk through `>` or O_TRUNC would destroy it: never. Growing is
    // `qemu-img resize`, where the format can, and only when the mount was asked to.
    if (size < f.node.size) throw this.refuse(f, `shrinking the disk from ${f.node.size} to ${size} bytes refused: a disk cannot shrink through the mount`);
    // Growing changes the guest's disk: a stray `truncate -s 1P` must not (QEMU's export has `growable`).
    if (!this.access.growable) throw this.refuse(f, `growing the disk from ${f.node.size} to ${size} bytes refused: mount with --growable to allow it`);
    if (!f.node.truncate) throw new ErrnoError(`${path}: this image format cannot be resized`, E.EPERM);
    this.dirty.add(f);
    try {
      // Data still in the cache first: the cache drops its blocks when the size changes.
      await f.node.flush();
      await f.node.truncate(size);
    } catch (err) {
      this.report('truncate', f, size, 0, err);
      throw err;
    }
  }

  /**
   * fallocate(2) on the flat file: punching a hole or zeroing a range becomes the
   * format's zero operation (unmapped where the format can: `fallocate -p`, `blkdiscard`
   * on a loop device, `fstrim`); plain allocation inside the disk is a no-op, as every
   * byte of the disk already exists. The disk never grows this way.
   */
  async fallocate(path: string, mode: number, offset: number, length: number): Promise<void> {
    const f = this.file(path);
    if (!f.writable) throw new ReadOnlyError(`${path}: mounted read-only`);
    const size = f.node.size;
    const known = FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE;
    if (mode & ~known || (mode & FALLOC_FL_PUNCH_HOLE && !(mode & FALLOC_FL_KEEP_SIZE)) || (mode & FALLOC_FL_PUNCH_HOLE && mode & FALLOC_FL_ZERO_RANGE)) {
      throw new ErrnoError(`${path}: fallocate mode ${mode} is not supported`, E.EOPNOTSUPP);
    }
    if (!(mode & FALLOC_FL_KEEP_SIZE) && offset + length > size) throw new ErrnoError(`${path}: fallocate past the end of the disk`, E.ENOSPC);
    const n = Math.min(length, Math.max(0, size - offset));
    if (n === 0 || !(mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE))) return;
    if (!f.node.zero) throw new ErrnoError(`${path}: this image cannot zero ranges`, E.EOPNOTSUPP);
    this.dirty.add(f);
    try {
      await f.node.zero(offset, n, (mode & FALLOC_FL_PUNCH_HOLE) !== 0);
    } catch (err) {
      this.report('fallocate', f, offset, n, err);
      throw err;
    }
  }

  async flush(path: string): Promise<void> {
    const f = this.byPath.get(path);
    if (f && this.dirty.has(f)) await this.flushFile(f);
  }

  async fsync(path: string): Promise<void> {
    const f = this.file(path);
    if (f.writable) await this.flushFile(f);
  }

  private async flushFile(f: FlatFile): Promise<void> {
    this.dirty.delete(f);
    try {
      await f.node.flush();
    } catch (err) {
      this.dirty.add(f);
      this.report('flush', f, 0, 0, err);
      throw err;
    }
  }

  /** Flush every file; used before unmounting and on exit. */
  async flushAll(): Promise<void> {
    for (const f of this.files) if (f.writable) await this.flushFile(f);
  }

  async statfs(): Promise<Record<string, number>> {
    const total = this.files.reduce((a, f) => a + f.node.size, 0);
    const blocks = Math.ceil(total / 4096);
    return { bsize: 4096, frsize: 4096, blocks, bfree: 0, bavail: 0, files: this.files.length, ffree: 0, favail: 0, fsid: 0, flag: 0, namemax: 255 };
  }

  async utimens(): Promise<void> {}

  /**
   * chmod and chown change what getattr shows, for the life of the mount (the image
   * file keeps its own). They arrive only on a writable mount (the kernel answers
   * EROFS on a read-only one) and only from whom the kernel lets change them: with
   * default_permissions it checks ownership and CAP_CHOWN itself.
   */
  async chmod(path: string, mode: number): Promise<void> {
    const f = this.chattrTarget(path);
    f.mode = mode & 0o7777;
  }

  async chown(path: string, uid: number, gid: number): Promise<void> {
    const f = this.chattrTarget(path);
    // -1 (or its unsigned spelling from libfuse) leaves that id as it is.
    if (uid >= 0 && uid !== 0xffffffff) f.uid = uid;
    if (gid >= 0 && gid !== 0xffffffff) f.gid = gid;
  }

  private chattrTarget(path: string): FlatFile {
    if (path === '/' && !this.overFile) throw new ErrnoError(`${path}: the mount's root directory keeps its owner and mode`, E.EPERM);
    return this.file(path);
  }

  /** A refusal the user should be able to read about: logged, then EPERM. */
  private refuse(f: FlatFile, why: string): ErrnoError {
    const msg = `${f.node.name}: ${why}`;
    debug(msg);
    this.onIoError(msg);
    return new ErrnoError(msg, E.EPERM);
  }

  private report(op: string, f: FlatFile, offset: number, length: number, err: unknown): void {
    const msg = `${f.node.name}: ${op} at ${offset}+${length}: ${messageOf(err)}`;
    debug(msg);
    this.onIoError(msg);
  }
}
