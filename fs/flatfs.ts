// The file system tsmount presents: each image as one flat file, MOUNTPOINT/<stem>.raw,
// or the mountpoint itself when it is a regular file. Files are known by node id: the
// root is 1, the flat files 2, 3, ... in order, fixed for the life of the mount, so a
// name is resolved once (LOOKUP) and every later request indexes an array. Turns typed
// errors into errno.
import fs from 'node:fs';
import { constants as osc } from 'node:os';
import createDebug from '../drivers/util/debug.js';
import type { BlockNode } from '../drivers/types.js';
import { ErrnoError, ReadOnlyError, messageOf } from '../drivers/errors.js';
import { resizeNode } from '../drivers/resize.js';
import { ROOT_ID, type DirEntry, type Entry, type FsOps, type Opened, type Stat } from './fuse.js';
import type { Ownership } from './access.js';
import { FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE } from '../drivers/util/sys.js';
import { allocatedBytes, seek } from './extents.js';
import { readableAround, ReadMap, type MapChange } from './read-map.js';
import { WORKER_WRITES, writeInPlace, type MapShare } from './read-map-runs.js';

const debug = createDebug('tsmount:fs');
const E = osc.errno;

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
  /**
   * The local image file, whose allocation st_blocks falls back to when the chain's
   * block status is too costly to add up; undefined for remote images.
   */
  hostFile?: string;
}

/** A flat file as the tree holds it: its node id and what st_blocks needs. */
interface Inode {
  ino: number;
  file: FlatFile;
  /** Bytes allocated through the chain, computed on the first stat after a change. */
  allocated: Promise<number> | undefined;
  /** Bumped by every write, zero and resize: a count made before it is stale. */
  gen: number;
  /** A count ran out of budget once: later stats take the fallback straight away. */
  tooCostly: boolean;
  /** The FUSE workers' read map (readMapFor); null: the file has none. */
  map?: ReadMap | null;
  /** Writes, zeros and resizes in flight: a read map is not made while any is (readMapFor). */
  changing: number;
  /** The map's count of the workers' writes when the main thread last read: when it moved, cached data goes. */
  workerWritesSeen: number;
  /** The same count when st_blocks was last counted: a worker's write may have filled a hole. */
  workerWritesCounted: number;
}

/** A change in flight: the map told of its start (if any), to tell of its end. */
interface Change {
  map: ReadMap | null | undefined;
  change?: MapChange;
}

/**
 * st_blocks is the data through the backing chain (what `du`, `cp --sparse` and `tar
 * --sparse` look at to decide whether to look for holes), added up from block status
 * at the first stat after a change. Block status is per table for most formats, so a
 * 1 TiB sparse qcow2, vdi or qed is counted in milliseconds (here: 5-50 ms warm, 300 ms
 * on a cold, loaded machine); vmdk walks every grain (20 s for 1 TiB), and a huge
 * fragmented image or a slow remote one costs too, so the count stops after this many
 * runs or this long and falls back, for the life of the mount, to the host image
 * file's allocation (which also counts metadata, and not the backing files), or to the
 * virtual size for remote images.
 */
const ALLOCATION_MAX_RUNS = 1 << 18;
const ALLOCATION_MAX_MS = 500;

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
  /** By node id; [0] and [ROOT_ID] are empty unless the root is the one file. */
  private readonly inodes: (Inode | undefined)[] = [];
  private readonly byName = new Map<string, Inode>();
  private nextFd = 1;
  /** writeAround's scratch (read-map-runs.ts readRuns). */
  private readonly aroundHit = [0, 0, 0, 0, 0];
  private readonly aroundRuns: number[] = [];
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
    files.forEach((file, i) => {
      const ino = overFile ? ROOT_ID : ROOT_ID + 1 + i;
      const inode: Inode = { ino, file, allocated: undefined, gen: 0, tooCostly: false, changing: 0, workerWritesSeen: 0, workerWritesCounted: 0 };
      this.inodes[ino] = inode;
      this.byName.set(file.name, inode);
    });
  }

  private inode(ino: number): Inode {
    const f = this.inodes[ino];
    if (!f) throw new ErrnoError(`node ${ino}: no such file`, ino === ROOT_ID ? E.EISDIR : E.ENOENT);
    return f;
  }

  private file(ino: number): FlatFile {
    return this.inode(ino).file;
  }

  /**
   * A write, zero or resize finished: st_blocks is counted again at the next stat. (A
   * count that ran during the change may have missed it; allocated() drops it.)
   */
  private changed(i: Inode): void {
    i.gen++;
    i.allocated = undefined;
  }

  /**
   * The read map FUSE worker threads serve this file's READs from (fs/read-map.ts), made
   * on first use. Every read-only file whose chain has a layer that can be read around
   * the graph (BlockNode.hostFd) has one; a writable file only when it is the mount's one
   * writable file: the map is invalidated by that file's own writes, and a second
   * writable file (a partition of it, with --partitions) could change its bytes
   * unseen.
   *
   * Not while a change is in flight (undefined: ask again later): the map would not
   * know of that change, and could publish what its walk saw before it ended. (It did:
   * a map made during a write had its count of writes in flight go to -1 at that
   * write's end, so it later published a window while another write was halfway, and
   * fio's verify on a --rw qcow2 read zeros where it had written.)
   */
  readMapFor(ino: number): MapShare | null | undefined {
    const i = this.inodes[ino];
    if (!i) return null;
    if (i.map === undefined) {
      if (i.changing !== 0) return undefined;
      const f = i.file;
      const ok = readableAround(f.node) && (!f.writable || this.files.filter((x) => x.writable).length === 1);
      i.map = ok ? new ReadMap(f.node) : null;
    }
    return i.map ? i.map.share() : null;
  }

  /**
   * A change of [offset, offset + length) starts (a resize: length < 0): returns the
   * map to tell its end, the one told of its start even if the map is made meanwhile,
   * once the workers' writes in flight (which never start during a change) ended.
   */
  private async beginChange(i: Inode, offset: number, length: number): Promise<Change> {
    i.changing++;
    this.dirty.add(i.file);
    const map = i.map;
    if (!map) return { map };
    const { change, drained } = length < 0 ? map.beginResize() : map.beginWrite(offset, length);
    if (drained) await drained;
    return { map, change };
  }

  private endChange(i: Inode, c: Change, failed: boolean, resize = false): void {
    i.changing--;
    if (c.map && c.change) {
      if (resize) c.map.endResize(c.change, failed);
      else c.map.endWrite(c.change, failed);
    }
    this.changed(i);
  }

  /**
   * An overwrite the JS thread read itself (its spin, or its own descriptor while the
   * workers are parked for a writer), where the map publishes every byte as writable in
   * place: one pwrite(2), as a worker's (read-map-runs.ts writeInPlace, under the same
   * rules: no change of the file in flight, the current epoch), instead of a change
   * through the graph. Random 4 KiB writes into a half-allocated qcow2, most of them
   * overwrites taken by the spin: see scripts/BENCHMARKS.md, session 18.
   */
  writeAround(ino: number, position: number, src: Buffer, at: number, length: number): boolean {
    const i = this.inodes[ino];
    const map = i?.map;
    if (!map || i.changing !== 0 || !i.file.writable || position + length > i.file.node.size) return false;
    return writeInPlace(map.table, position, length, src, at, this.aroundHit, this.aroundRuns);
  }

  mapMiss(ino: number, position: number, length: number, write = false): void {
    const map = this.inodes[ino]?.map;
    if (!map) return;
    if (!write) map.miss(position, length);
    // Workers that hand every write over (TSMOUNT_FUSE_WORKER_WRITES=0, for comparison) need no map for them.
    else if (WORKER_WRITES) map.wrote(position, length);
  }

  /** What the worker threads served from the read maps (reads, and writes in place), for the server's counters. */
  workerIo(): { reads: number; bytes: number; spliced: number; writes: number; bytesWritten: number } {
    const sum = { reads: 0, bytes: 0, spliced: 0, writes: 0, bytesWritten: 0 };
    for (const i of this.inodes) {
      if (!i?.map) continue;
      const s = i.map.served();
      sum.reads += s.reads;
      sum.bytes += s.bytes;
      sum.spliced += s.spliced;
      sum.writes += s.writes;
      sum.bytesWritten += s.bytesWritten;
    }
    return sum;
  }

  async lookup(parent: number, name: string): Promise<Entry> {
    if (parent !== ROOT_ID || this.overFile) throw new ErrnoError(`node ${parent}: not a directory`, E.ENOTDIR);
    const f = this.byName.get(name);
    if (!f) throw new ErrnoError(`/${name}: no such file`, E.ENOENT);
    return { ino: f.ino, attr: await this.getattr(f.ino) };
  }

  async getattr(ino: number): Promise<Stat> {
    if (ino === ROOT_ID && !this.overFile) {
      const anyWritable = this.files.some((f) => f.writable);
      const t = this.mountTime;
      const root = this.access.root ?? { uid: process.getuid?.() ?? 0, gid: process.getgid?.() ?? 0, mode: anyWritable ? 0o755 : 0o555 };
      return { mode: 0o040000 | root.mode, size: 4096, uid: root.uid, gid: root.gid, mtime: t, atime: t, ctime: t, nlink: 2 };
    }
    const i = this.inode(ino);
    const f = i.file;
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
      blocks: Math.ceil((await this.allocated(i)) / 512),
    };
  }

  /** Data bytes through the chain, counted once per change (ALLOCATION_MAX_RUNS says how). */
  private allocated(i: Inode): Promise<number> {
    // The workers write in place around the main thread, holes of a raw image included.
    const w = i.map ? i.map.workerWrites() : 0;
    if (w !== i.workerWritesCounted) {
      i.workerWritesCounted = w;
      i.allocated = undefined;
    }
    if (i.allocated) return i.allocated;
    const gen = i.gen;
    const p = this.countAllocated(i).catch((err: unknown) => {
      debug('%s: counting allocated bytes failed: %s', i.file.node.name, messageOf(err));
      return i.file.node.size;
    });
    i.allocated = p;
    // A change while counting: this count may have missed it; the next stat counts again.
    void p.then(() => {
      if (i.gen !== gen && i.allocated === p) i.allocated = undefined;
    });
    return p;
  }

  private async countAllocated(i: Inode): Promise<number> {
    const f = i.file;
    const size = f.node.size;
    if (!i.tooCostly) {
      const n = await allocatedBytes(f.node, size, { maxRuns: ALLOCATION_MAX_RUNS, deadline: Date.now() + ALLOCATION_MAX_MS });
      if (n !== undefined) return n;
      debug('%s: block status too costly to add up; st_blocks from the image file from now on', f.node.name);
      i.tooCostly = true;
    }
    if (!f.hostFile) return size;
    return Math.min(size, (await fs.promises.stat(f.hostFile)).blocks * 512);
  }

  async readdir(ino: number): Promise<DirEntry[]> {
    if (ino !== ROOT_ID || this.overFile) throw new ErrnoError(`node ${ino}: not a directory`, E.ENOTDIR);
    return [...this.byName.values()].map((i) => ({ name: i.file.name, ino: i.ino, dir: false }));
  }

  /** Whether the file can change is known from its node: no second getattr. */
  async open(ino: number, flags: number): Promise<Opened> {
    const f = this.file(ino);
    if ((flags & O_ACCMODE) !== O_RDONLY && !f.writable) throw new ReadOnlyError(`${f.node.name}: mounted read-only`);
    return { fh: this.nextFd++, writable: f.writable, size: f.node.size, passthroughFd: f.node.passthroughFd };
  }

  async release(): Promise<void> {}

  async read(ino: number, _fh: number, buf: Buffer, length: number, position: number): Promise<number> {
    const i = this.inode(ino);
    const f = i.file;
    // Workers wrote around the graph since: what the cluster cache holds may be stale.
    if (i.map) {
      const w = i.map.workerWrites();
      if (w !== i.workerWritesSeen) {
        i.workerWritesSeen = w;
        f.node.dropCachedData?.();
      }
    }
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

  async write(ino: number, _fh: number, buf: Buffer, length: number, position: number): Promise<number> {
    const i = this.inode(ino);
    const f = i.file;
    if (!f.writable) throw new ReadOnlyError(`${f.node.name}: mounted read-only`);
    const size = f.node.size;
    // The flat file has the disk's size: a write past the end is a full disk.
    if (position >= size) throw new ErrnoError(`${f.node.name}: write past the end of the disk`, E.ENOSPC);
    const n = Math.min(length, size - position);
    const c = await this.beginChange(i, position, n);
    let failed = true;
    try {
      await f.node.write(position, buf.subarray(0, n));
      failed = false;
    } catch (err) {
      this.report('write', f, position, n, err);
      throw err;
    } finally {
      this.endChange(i, c, failed);
    }
    return n;
  }

  async truncate(ino: number, size: number): Promise<void> {
    const i = this.inode(ino);
    const f = i.file;
    if (size === f.node.size) return;
    if (!f.writable) throw new ReadOnlyError(`${f.node.name}: mounted read-only`);
    // Shrinking a disk through `>` or O_TRUNC would destroy it: never. Growing is
    // `qemu-img resize`, where the format can, and only when the mount was asked to.
    if (size < f.node.size) throw this.refuse(f, `shrinking the disk from ${f.node.size} to ${size} bytes refused: a disk cannot shrink through the mount`);
    // Growing changes the guest's disk: a stray `truncate -s 1P` must not (QEMU's export has `growable`).
    if (!this.access.growable) throw this.refuse(f, `growing the disk from ${f.node.size} to ${size} bytes refused: mount with --growable to allow it`);
    if (!f.node.truncate) throw new ErrnoError(`${f.node.name}: this image format cannot be resized`, E.EPERM);
    const c = await this.beginChange(i, 0, -1);
    let failed = true;
    try {
      // Data still in the cache first: the cache drops its blocks when the size changes.
      await f.node.flush();
      await resizeNode(f.node, size);
      failed = false;
    } catch (err) {
      this.report('truncate', f, size, 0, err);
      throw err;
    } finally {
      this.endChange(i, c, failed, true);
    }
  }

  /**
   * fallocate(2) on the flat file: punching a hole or zeroing a range becomes the
   * format's zero operation (unmapped where the format can: `fallocate -p`, `blkdiscard`
   * on a loop device, `fstrim`); plain allocation inside the disk is a no-op, as every
   * byte of the disk already exists. The disk never grows this way.
   */
  async fallocate(ino: number, _fh: number, mode: number, offset: number, length: number): Promise<void> {
    const i = this.inode(ino);
    const f = i.file;
    if (!f.writable) throw new ReadOnlyError(`${f.node.name}: mounted read-only`);
    const size = f.node.size;
    const known = FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE;
    if (mode & ~known || (mode & FALLOC_FL_PUNCH_HOLE && !(mode & FALLOC_FL_KEEP_SIZE)) || (mode & FALLOC_FL_PUNCH_HOLE && mode & FALLOC_FL_ZERO_RANGE)) {
      throw new ErrnoError(`${f.node.name}: fallocate mode ${mode} is not supported`, E.EOPNOTSUPP);
    }
    if (!(mode & FALLOC_FL_KEEP_SIZE) && offset + length > size) throw new ErrnoError(`${f.node.name}: fallocate past the end of the disk`, E.ENOSPC);
    const n = Math.min(length, Math.max(0, size - offset));
    if (n === 0 || !(mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE))) return;
    if (!f.node.zero) throw new ErrnoError(`${f.node.name}: this image cannot zero ranges`, E.EOPNOTSUPP);
    const c = await this.beginChange(i, offset, n);
    let failed = true;
    try {
      await f.node.zero(offset, n, (mode & FALLOC_FL_PUNCH_HOLE) !== 0);
      failed = false;
    } catch (err) {
      this.report('fallocate', f, offset, n, err);
      throw err;
    } finally {
      this.endChange(i, c, failed);
    }
  }

  async flush(ino: number): Promise<void> {
    const i = this.inodes[ino];
    if (!i) return;
    // Taken first: a worker's write after this point marks the file again.
    const workersWrote = i.map?.takeDirty() ?? false;
    if (this.dirty.has(i.file) || workersWrote) await this.flushFile(i.file);
  }

  async fsync(ino: number): Promise<void> {
    const f = this.file(ino);
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

  /**
   * lseek(2) SEEK_DATA/SEEK_HOLE from the image's block status through its backing
   * chain: `cp --sparse`, `tar --sparse` and `qemu-img map` then skip what the image
   * never stored, and a range punched with `fallocate -p` is a hole afterwards.
   */
  async lseek(ino: number, _fh: number, offset: number, whence: number): Promise<number> {
    const f = this.file(ino);
    return seek(f.node, f.node.size, offset, whence);
  }

  /** The kernel ends the session (DESTROY, sent for fuseblk mounts): write everything. */
  destroy(): Promise<void> {
    return this.flushAll();
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
  async chmod(ino: number, mode: number): Promise<void> {
    const f = this.chattrTarget(ino);
    f.mode = mode & 0o7777;
  }

  async chown(ino: number, uid: number, gid: number): Promise<void> {
    const f = this.chattrTarget(ino);
    // -1 (or its unsigned spelling from libfuse) leaves that id as it is.
    if (uid >= 0 && uid !== 0xffffffff) f.uid = uid;
    if (gid >= 0 && gid !== 0xffffffff) f.gid = gid;
  }

  private chattrTarget(ino: number): FlatFile {
    if (ino === ROOT_ID && !this.overFile) throw new ErrnoError(`the mount's root directory keeps its owner and mode`, E.EPERM);
    return this.file(ino);
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
