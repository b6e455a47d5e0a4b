// The file protocol: a regular file or a host block device (QEMU's file and
// host_device drivers). It knows nothing of formats.
import fs from 'node:fs';
import path from 'node:path';
import { constants as osc } from 'node:os';
import type { BlockNode, Extent, ProtocolOpenOptions, TruncateOptions } from '../types.js';
import { IoError, SysError, UnsupportedError, UsageError } from '../errors.js';
import koffi from 'koffi';
import {
  blockDeviceRange,
  blockDeviceSectorSize,
  blockDeviceSize,
  fallocate,
  lseek,
  preadNoWait,
  SEEK_DATA,
  SEEK_HOLE,
  FALLOC_FL_KEEP_SIZE,
  FALLOC_FL_PUNCH_HOLE,
  FALLOC_FL_ZERO_RANGE,
} from '../util/sys.js';
import { ImageLock, type LockRequest } from './lock.js';
import { realMediumIoctls, removableKind, RemovableMedium, type MediumIoctls } from './removable.js';

const E = osc.errno;

function pread(fd: number, buf: Uint8Array, off: number, len: number, pos: number): Promise<number> {
  return new Promise((resolve, reject) => {
    fs.read(fd, buf, off, len, pos, (err, n) => (err ? reject(err) : resolve(n)));
  });
}

function pwrite(fd: number, buf: Uint8Array, off: number, len: number, pos: number): Promise<number> {
  return new Promise((resolve, reject) => {
    fs.write(fd, buf, off, len, pos, (err, n) => (err ? reject(err) : resolve(n)));
  });
}

function pwritev(fd: number, parts: Uint8Array[], pos: number): Promise<number> {
  return new Promise((resolve, reject) => {
    fs.writev(fd, parts, pos, (err, n) => (err ? reject(err) : resolve(n)));
  });
}

/** The parts of `parts` from byte `skip` on (what a short pwritev left to write). */
function partsFrom(parts: Uint8Array[], skip: number): Uint8Array[] {
  const out: Uint8Array[] = [];
  for (const p of parts) {
    if (skip >= p.length) {
      skip -= p.length;
      continue;
    }
    out.push(skip > 0 ? p.subarray(skip) : p);
    skip = 0;
  }
  return out;
}

function fdatasync(fd: number): Promise<void> {
  return new Promise((resolve, reject) => fs.fdatasync(fd, (err) => (err ? reject(err) : resolve())));
}

/**
 * Reads up to this size are first tried on the JS thread with preadv2(RWF_NOWAIT):
 * when the page cache holds the bytes (the common case for a mounted image that is
 * being read) that saves the two thread hand-offs of the thread pool, about half the
 * cost of a 4 KiB FUSE read. Larger reads go to the thread pool, where two cores copy
 * in parallel. TSMOUNT_NOWAIT_READ_MAX=0 turns it off.
 */
const NOWAIT_READ_MAX = Number(process.env.TSMOUNT_NOWAIT_READ_MAX ?? 256 * 1024);

/**
 * Writes up to this size to a regular file are made on the JS thread (see write): a
 * FUSE WRITE (1 MiB at most) and a tsimg convert chunk (2 MiB). The pool's two
 * hand-offs cost more than the copy blocks the thread: allocating dd through a mount
 * +4..10 % (qcow2) and +4..25 % (raw) in 7 alternated pairs, convert 0.97 -> 0.87 s
 * (scripts/BENCHMARKS.md, session 8). Overwrites are the FUSE workers' own (in place);
 * reads go to the workers, so what waits meanwhile is the rest of the main thread's
 * requests. Three earlier tries of 1 MiB (sessions 3-5) were within their noise.
 */
const SYNC_WRITE_MAX = Number(process.env.TSMOUNT_SYNC_WRITE_MAX ?? 2 * 1024 * 1024);

/** Zeros written per request by a resize with preallocation=full. */
const FULL_PREALLOC_CHUNK = 1 << 20;

export interface FileOpenOptions {
  readOnly: boolean;
  /** Lock as QEMU does; undefined means no locking (locking=off). */
  lock?: LockRequest;
  /** cache=unsafe: flush() does nothing until close. */
  ignoreFlush?: boolean;
  /** false: close does not sync either (ProtocolOpenOptions.syncOnClose). */
  syncOnClose?: boolean;
  /** cache=none/directsync: a block device is opened O_DIRECT (bypassing the host's page cache). */
  direct?: boolean;
  /** Treat the device as a removable drive with these ioctls (tests inject a fake drive). */
  medium?: MediumIoctls;
  /** How often the removable drive is asked again (ms); 0 asks at every look. */
  mediumPollMs?: number;
}

/** What a protocol's open options mean for a local file or device (the file and nvme protocols). */
export function fileOpenOptions(opts: ProtocolOpenOptions): FileOpenOptions {
  const unsafe = opts.cache === 'unsafe';
  return {
    readOnly: opts.readOnly,
    lock: opts.lock,
    ignoreFlush: unsafe,
    syncOnClose: !unsafe || opts.syncOnClose !== false,
    direct: opts.cache === 'none' || opts.cache === 'directsync',
  };
}

/**
 * qemu-block-drivers(7), "Using host drives": printed once per device for a writable
 * open of a host block device.
 */
const warnedDevices = new Set<string>();
function warnHostWrite(dev: string): void {
  if (warnedDevices.has(dev)) return;
  warnedDevices.add(dev);
  process.stderr.write(
    `tsmount: WARNING: ${dev} is a host device opened read-write: unless you know what you do, it is better to only make READ-ONLY accesses to the hard disk, otherwise you may corrupt your host data\n`,
  );
}

/** Buffers for O_DIRECT are aligned to this (any logical block size up to a page). */
const DIRECT_ALIGN = 4096;

/** A buffer of `length` bytes whose address is a multiple of DIRECT_ALIGN. */
function alignedBuffer(length: number): Buffer {
  const raw = Buffer.allocUnsafeSlow(length + DIRECT_ALIGN);
  const addr = Number(BigInt(koffi.address(raw) as bigint) % BigInt(DIRECT_ALIGN));
  const skip = (DIRECT_ALIGN - addr) % DIRECT_ALIGN;
  return raw.subarray(skip, skip + length);
}

function ioError(what: string, file: string, err: unknown): IoError {
  const e = err as NodeJS.ErrnoException;
  const code = e.code ?? 'EIO';
  const errno = (E as Record<string, number>)[code] ?? E.EIO;
  return new IoError(`${file}: ${what} failed: ${code}`, errno);
}

export class FileNode implements BlockNode {
  private closed = false;
  private extentHint: { punch: boolean; zeroRange: boolean } = { punch: true, zeroRange: true };
  /** Cleared when preadv2(RWF_NOWAIT) is not supported for this file. */
  private noWait = NOWAIT_READ_MAX > 0;

  private constructor(
    readonly name: string,
    readonly fd: number,
    private currentSize: number,
    readonly readOnly: boolean,
    readonly isBlockDevice: boolean,
    private readonly lock: ImageLock | undefined,
    private readonly ignoreFlush: boolean,
    private readonly syncOnClose: boolean,
    private readonly sectorSize: number,
    readonly direct: boolean,
    private readonly medium: RemovableMedium | undefined,
  ) {
    if (direct) this.noWait = false;
  }

  /** The last device error logged, so a failing device logs once, not at every request. */
  private lastLogged = '';

  static async open(filename: string, opts: FileOpenOptions): Promise<FileNode> {
    const name = filename;
    let st: fs.Stats;
    try {
      st = await fs.promises.stat(filename);
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (code === 'ENOENT') throw new UsageError(`${name}: no such file`, E.ENOENT);
      throw ioError('stat', name, err);
    }
    if (st.isDirectory()) throw new UsageError(`${name}: is a directory, not an image`);
    if (!st.isFile() && !st.isBlockDevice()) throw new UsageError(`${name}: not a regular file or block device`);
    const device = st.isBlockDevice();
    // A CD-ROM or floppy drive opens without a medium in only with O_NONBLOCK (as QEMU's host_cdrom).
    const removable = device && (opts.medium !== undefined || removableKind(st.rdev) !== undefined);
    const direct = device && !!opts.direct;
    let flags = opts.readOnly ? fs.constants.O_RDONLY : fs.constants.O_RDWR;
    if (removable) flags |= fs.constants.O_NONBLOCK;
    if (direct) flags |= fs.constants.O_DIRECT;
    let fd: number;
    try {
      fd = fs.openSync(filename, flags);
    } catch (err) {
      throw ioError('open', name, err);
    }
    let lock: ImageLock | undefined;
    try {
      const full = path.resolve(name);
      const medium = removable ? new RemovableMedium(fd, full, opts.medium ?? realMediumIoctls, opts.mediumPollMs) : undefined;
      const size = medium ? 0 : device ? blockDeviceSize(fd) : st.size;
      // A drive without a medium cannot say its block size: a CD's is 2048, a floppy's 512.
      const sector = !device ? 1 : medium ? (removableKind(st.rdev) === 'floppy' ? 512 : 2048) : blockDeviceSectorSize(fd);
      if (opts.lock) lock = ImageLock.acquire(fd, name, opts.lock);
      if (device && !opts.readOnly) warnHostWrite(full);
      return new FileNode(full, fd, size, opts.readOnly, device, lock, !!opts.ignoreFlush, opts.syncOnClose !== false, sector, direct, medium);
    } catch (err) {
      fs.closeSync(fd);
      throw err;
    }
  }

  get size(): number {
    return this.medium ? this.medium.size : this.currentSize;
  }

  /**
   * A host block device's logical block size (BLKSSZGET): the graph builder puts the
   * alignment filter over the node, so unaligned requests become whole sectors (which
   * O_DIRECT needs, and which a 4 KiB-sector device is written in anyway).
   */
  get requestAlignment(): number | undefined {
    return this.isBlockDevice && this.sectorSize > 1 ? this.sectorSize : undefined;
  }

  /** Bumped when a removable medium is inserted, removed or changed; undefined for other files. */
  get mediumGeneration(): number | undefined {
    return this.medium?.generation;
  }

  /** The drive of a removable medium, to ask again now (tests, and a reader that wants no delay). */
  get removableMedium(): RemovableMedium | undefined {
    return this.medium;
  }

  /**
   * An error of a host device (it vanished, shrank, failed): one log line per new
   * error, not one per request, and EIO (or the call's errno) for the reader.
   */
  private deviceError(what: string, err: unknown): IoError {
    const e = err instanceof IoError ? err : ioError(what, this.name, err);
    if (this.isBlockDevice && e.message !== this.lastLogged) {
      this.lastLogged = e.message;
      process.stderr.write(`tsmount: ${e.message}\n`);
    }
    return e;
  }

  /** Before a request on a removable medium: ENOMEDIUM without one, EIO past its end. */
  private mediumCheck(end: number, generation: number): void {
    const m = this.medium;
    if (!m) return;
    const errno = m.check(end, generation);
    if (errno) throw this.deviceError('read', new IoError(`${this.name}: ${errno === E.EIO ? 'medium changed or too small' : 'no medium'}`, errno));
  }

  /**
   * The file's bytes are the node's (FUSE passthrough, fs/fuse-session.ts); not for a
   * removable medium (the node follows medium changes the kernel would not see) nor a
   * device opened O_DIRECT (the kernel would pass unaligned reads to it as they come).
   */
  get passthroughFd(): number | undefined {
    return this.closed || this.medium || this.direct ? undefined : this.fd;
  }

  /** The same descriptor for block status offsets (fs/read-map.ts), with the same exclusions. */
  get hostFd(): number | undefined {
    return this.passthroughFd;
  }

  /**
   * A writable regular file (no device, no O_DIRECT, no removable medium): its data may
   * be overwritten by the FUSE workers with pwrite(2) on hostFd, as write() would.
   */
  get inPlaceWrites(): boolean {
    return !this.readOnly && !this.isBlockDevice && this.hostFd !== undefined;
  }

  async read(offset: number, dst: Uint8Array): Promise<void> {
    if (this.medium) {
      // Asked of the drive at most every poll interval (a drive's status query can be slow).
      const generation = this.medium.generation;
      void this.medium.inserted;
      this.mediumCheck(offset + dst.length, generation);
    }
    // O_DIRECT reads go through a buffer aligned in memory (AlignFilter aligns them on the device).
    const into = this.direct ? alignedBuffer(dst.length) : dst;
    let done = 0;
    if (this.noWait && dst.length <= NOWAIT_READ_MAX) {
      const n = preadNoWait(this.fd, dst, offset);
      if (n === dst.length) return;
      if (n > 0) done = n;
      else if (n === -E.EOPNOTSUPP || n === -E.EINVAL || n === -E.ENOSYS) this.noWait = false;
      // EAGAIN (not cached), a short read or the end of the file: the thread pool finishes.
    }
    while (done < dst.length) {
      let n: number;
      try {
        n = await pread(this.fd, into, done, dst.length - done, offset + done);
      } catch (err) {
        throw this.deviceError('read', err);
      }
      if (n === 0) {
        // A device ends where it ends: reading short of the request means it shrank or went away.
        if (this.isBlockDevice) throw this.deviceError('read', new IoError(`${this.name}: read failed: the device ends at ${offset + done} (it shrank or was detached)`, E.EIO));
        // Past the end of file reads as zeros, as QEMU's file-posix does.
        dst.fill(0, done);
        return;
      }
      done += n;
    }
    if (into !== dst) dst.set(into);
    this.lastLogged = '';
  }

  async write(offset: number, src: Uint8Array): Promise<void> {
    if (this.medium) this.mediumCheck(offset + src.length, this.medium.generation);
    let done = 0;
    if (this.direct) {
      const bounce = alignedBuffer(src.length);
      bounce.set(src);
      src = bounce;
    }
    if (src.length <= SYNC_WRITE_MAX && !this.isBlockDevice) {
      // A buffered write is a copy into the page cache: cheaper on the JS thread than
      // the two thread hand-offs of the pool (pwritev2 has no RWF_NOWAIT for buffered
      // writes on ext4).
      try {
        while (done < src.length) done += fs.writeSync(this.fd, src, done, src.length - done, offset + done);
      } catch (err) {
        throw ioError('write', this.name, err);
      }
    }
    while (done < src.length) {
      try {
        done += await pwrite(this.fd, src, done, src.length - done, offset + done);
      } catch (err) {
        throw this.deviceError('write', err);
      }
    }
    if (offset + src.length > this.currentSize && !this.isBlockDevice) this.currentSize = offset + src.length;
  }

  /**
   * fallocate(FALLOC_FL_ZERO_RANGE) without FALLOC_FL_KEEP_SIZE: unwritten extents
   * (counted in st_blocks, read as zeros), and the file grows past its end to cover
   * them. Not on a host device (BLKZEROOUT may write the zeros itself) nor a medium; a
   * file system without it answers false from then on. On the JS thread, as small
   * writes are: one system call with no data (a 64 KiB write of zeros cost 10x as much
   * here, scripts/BENCHMARKS.md session 18).
   */
  async allocateZeros(offset: number, length: number): Promise<boolean> {
    if (this.isBlockDevice || this.medium || !this.extentHint.zeroRange || this.readOnly) return false;
    if (!this.tryFallocate(FALLOC_FL_ZERO_RANGE, offset, length, 'zeroRange')) return false;
    if (offset + length > this.currentSize) this.currentSize = offset + length;
    return true;
  }

  /**
   * One pwritev of the parts (qcow2 writes a new cluster's old head, the new data and
   * its old tail this way, as QEMU's merge_cow does): one system call, no copy. Small
   * ones on the JS thread, as write() does; O_DIRECT goes through write()'s bounce buffer.
   */
  async writev(offset: number, parts: Uint8Array[]): Promise<void> {
    let total = 0;
    for (const p of parts) total += p.length;
    if (this.direct || this.medium || parts.length === 1) return this.write(offset, parts.length === 1 ? parts[0]! : Buffer.concat(parts));
    let done = 0;
    if (total <= SYNC_WRITE_MAX && !this.isBlockDevice) {
      try {
        while (done < total) done += fs.writevSync(this.fd, partsFrom(parts, done), offset + done);
      } catch (err) {
        throw ioError('write', this.name, err);
      }
    }
    while (done < total) {
      try {
        done += await pwritev(this.fd, done === 0 ? parts : partsFrom(parts, done), offset + done);
      } catch (err) {
        throw this.deviceError('write', err);
      }
    }
    if (offset + total > this.currentSize && !this.isBlockDevice) this.currentSize = offset + total;
  }

  async zero(offset: number, length: number, unmap: boolean): Promise<void> {
    if (!this.isBlockDevice && offset + length > this.currentSize) {
      // Zeroing past the end is growing the file: the new part reads as zeros anyway.
      const inside = Math.max(0, this.currentSize - offset);
      if (inside > 0) await this.zero(offset, inside, unmap);
      await this.truncate(offset + length);
      return;
    }
    if (this.isBlockDevice && this.blockZero(offset, length, unmap)) return;
    if (!this.isBlockDevice) {
      // Punching a hole both frees the space and reads back as zeros.
      if (unmap && this.extentHint.punch && this.tryFallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length, 'punch')) return;
      if (this.extentHint.zeroRange && this.tryFallocate(FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length, 'zeroRange')) return;
    }
    const chunk = Buffer.alloc(Math.min(length, 1 << 20));
    for (let done = 0; done < length; done += chunk.length) {
      const n = Math.min(chunk.length, length - done);
      await this.write(offset + done, n === chunk.length ? chunk : chunk.subarray(0, n));
    }
  }

  /**
   * Zeroes on a host device without writing them: with `unmap`, fallocate's punch hole
   * (the kernel discards where the device then reads zeros, and refuses otherwise),
   * else BLKZEROOUT (WRITE ZEROES where the device has it). False where neither works.
   */
  private blockZero(offset: number, length: number, unmap: boolean): boolean {
    if (unmap && this.extentHint.punch && this.tryFallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length, 'punch')) return true;
    if (!this.extentHint.zeroRange) return false;
    try {
      blockDeviceRange(this.fd, 'zeroout', offset, length);
      return true;
    } catch (err) {
      if (err instanceof SysError && (err.errno === E.EOPNOTSUPP || err.errno === E.ENOTTY || err.errno === E.EINVAL)) {
        this.extentHint.zeroRange = false;
        return false;
      }
      throw this.deviceError('zero', new IoError(`${this.name}: BLKZEROOUT failed: errno ${(err as SysError).errno}`, (err as SysError).errno ?? E.EIO));
    }
  }

  /**
   * BLKDISCARD on a host device (QEMU's pdiscard): the range's blocks are given back;
   * what it reads afterwards is up to the device. False where the device cannot discard.
   */
  async discard(offset: number, length: number): Promise<boolean> {
    if (!this.isBlockDevice) return this.tryFallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length, 'punch');
    try {
      blockDeviceRange(this.fd, 'discard', offset, length);
      return true;
    } catch (err) {
      if (err instanceof SysError && (err.errno === E.EOPNOTSUPP || err.errno === E.ENOTTY)) return false;
      throw this.deviceError('discard', new IoError(`${this.name}: BLKDISCARD failed: errno ${(err as SysError).errno}`, (err as SysError).errno ?? E.EIO));
    }
  }

  private tryFallocate(mode: number, offset: number, length: number, kind: 'punch' | 'zeroRange'): boolean {
    try {
      fallocate(this.fd, mode, offset, length);
      return true;
    } catch (err) {
      if (err instanceof SysError && (err.errno === E.EOPNOTSUPP || err.errno === E.ENOSYS || err.errno === E.EINVAL)) {
        this.extentHint[kind] = false;
        return false;
      }
      throw new IoError(`${this.name}: fallocate failed: errno ${(err as SysError).errno}`, (err as SysError).errno ?? E.EIO);
    }
  }

  /**
   * ftruncate, as QEMU's file-posix: a regular file grows with zeros (holes), so the
   * new area reads as zeros whatever `zeroNew` asks. Preallocation (growing only):
   * falloc reserves the new area (fallocate, posix_fallocate's call), full writes its
   * zeros; metadata is no mode of a plain file.
   */
  async truncate(size: number, o: TruncateOptions = {}): Promise<void> {
    if (this.isBlockDevice) throw new UsageError(`${this.name}: cannot resize a block device`);
    const prealloc = o.prealloc ?? 'off';
    if (prealloc === 'metadata') throw new UnsupportedError(`Unsupported preallocation mode: ${prealloc}`);
    const old = this.currentSize;
    if (prealloc !== 'off' && size < old) throw new UsageError('Cannot use preallocation for shrinking files');
    try {
      await new Promise<void>((resolve, reject) => fs.ftruncate(this.fd, size, (e) => (e ? reject(e) : resolve())));
    } catch (err) {
      throw ioError('truncate', this.name, err);
    }
    this.currentSize = size;
    // QEMU's allocate_first_block: a file grown from nothing gets its first block
    // written (512 bytes, or 4 KiB from a 4 KiB file on), which helps later alignment
    // probing; the same first block as qemu-img's, in qemu-img map and st_blocks.
    if (old === 0 && size > 0 && prealloc !== 'full') {
      try {
        fs.writeSync(this.fd, Buffer.alloc(size < 4096 ? 512 : 4096), 0, size < 4096 ? Math.min(512, size) : 4096, 0);
      } catch {
        // An optimisation: a failure changes nothing else (QEMU ignores it too).
      }
    }
    if (size <= old || prealloc === 'off') return;
    if (prealloc === 'falloc') {
      try {
        fallocate(this.fd, 0, old, size - old);
      } catch (err) {
        throw new IoError(`${this.name}: Could not preallocate new data: errno ${(err as SysError).errno}`, (err as SysError).errno ?? E.EIO);
      }
      return;
    }
    const zeros = Buffer.alloc(Math.min(size - old, FULL_PREALLOC_CHUNK));
    for (let pos = old; pos < size; pos += zeros.length) await this.write(pos, zeros.subarray(0, Math.min(zeros.length, size - pos)));
  }

  async flush(): Promise<void> {
    if (this.readOnly || this.ignoreFlush) return;
    try {
      await fdatasync(this.fd);
    } catch (err) {
      throw this.deviceError('fdatasync', err);
    }
  }

  /**
   * The host file's data and holes (SEEK_DATA/SEEK_HOLE, as QEMU's file-posix answers
   * block status): a hole reads as zeros, so it is 'zero', and a sparse raw image shows
   * its holes through the mount. Where the host cannot tell (a block device, a file
   * system without SEEK_DATA), everything is data.
   */
  async blockStatus(offset: number, length: number): Promise<Extent[]> {
    const end = offset + length;
    const out: Extent[] = [];
    // Data and holes alike may be written in place: a hole filled so reads as written, and
    // st_blocks is counted again after the workers' writes (fs/flatfs.ts).
    const inPlace = this.inPlaceWrites;
    const zeros = (at: number, length: number): Extent => ({ offset: at, length, kind: 'zero', ...(inPlace ? { inPlace } : {}) });
    let pos = offset;
    while (pos < end) {
      const data = this.isBlockDevice ? pos : lseek(this.fd, pos, SEEK_DATA);
      if (data === -E.ENXIO) break;
      if (data < pos) return [...out, { offset: pos, length: end - pos, kind: 'data', ...(inPlace ? { inPlace } : {}) }];
      if (data > pos) out.push(zeros(pos, Math.min(data, end) - pos));
      if (data >= end) return out;
      const hole = this.isBlockDevice ? end : lseek(this.fd, data, SEEK_HOLE);
      const stop = hole > data ? Math.min(hole, end) : end;
      out.push({ offset: data, length: stop - data, kind: 'data', ...(inPlace ? { inPlace } : {}) });
      pos = stop;
    }
    if (pos < end) out.push(zeros(pos, end - pos));
    return out;
  }

  /** st_blocks in bytes (qcow2's detection of metadata preallocation, as QEMU's bdrv_get_allocated_file_size). */
  allocatedBytes(): Promise<number> {
    return new Promise((resolve, reject) => fs.fstat(this.fd, (err, st) => (err ? reject(new IoError(`${this.name}: fstat: ${err.message}`)) : resolve(st.blocks * 512))));
  }

  /** The lock held on this file, to change when a node is reopened read-write. */
  get imageLock(): ImageLock | undefined {
    return this.lock;
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    try {
      if (!this.readOnly && this.syncOnClose) await fdatasync(this.fd);
    } finally {
      this.lock?.release();
      fs.closeSync(this.fd);
    }
  }
}
