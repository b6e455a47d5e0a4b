// The few system calls Node does not offer, through koffi (an FFI that ships prebuilt
// binaries, so nothing is compiled at install): fcntl locks, ioctl for block device
// sizes, fallocate for holes and zeroes, umount2. Linux x86_64/aarch64 layouts.
import koffi from 'koffi';
import { SysError } from '../errors.js';

const libc = koffi.load('libc.so.6');

// struct flock (asm-generic/fcntl.h): short l_type, short l_whence, off_t l_start,
// off_t l_len, pid_t l_pid. koffi lays it out with the C padding.
const Flock = koffi.struct('tsmount_flock', {
  l_type: 'short',
  l_whence: 'short',
  l_start: 'int64_t',
  l_len: 'int64_t',
  l_pid: 'int',
});

interface FlockValue {
  l_type: number;
  l_whence: number;
  l_start: number;
  l_len: number;
  l_pid: number;
}

const fcntlLock = libc.func('int fcntl(int fd, int cmd, _Inout_ tsmount_flock *lock)');
const ioctlU64 = libc.func('int ioctl(int fd, unsigned long req, _Out_ uint64_t *out)');
const ioctlInt = libc.func('int ioctl(int fd, unsigned long req, _Out_ int *out)');
const ioctlRange = libc.func('int ioctl(int fd, unsigned long req, const uint64_t *range)');
const ioctlArg = libc.func('int ioctl(int fd, unsigned long req, long arg)');
// struct fuse_backing_map (linux/fuse.h, 7.40): int32 fd, uint32 flags, uint64 padding.
const FuseBackingMap = koffi.struct('tsmount_fuse_backing_map', { fd: 'int32_t', flags: 'uint32_t', padding: 'uint64_t' });
const ioctlBackingOpen = libc.func('int ioctl(int fd, unsigned long req, const tsmount_fuse_backing_map *map)');
const ioctlBackingClose = libc.func('int ioctl(int fd, unsigned long req, const uint32_t *id)');
const ioctlClone = libc.func('int ioctl(int fd, unsigned long req, const uint32_t *oldfd)');
const ioctlIntIn = libc.func('int ioctl(int fd, unsigned long req, const int *in)');
const ioctlBuffer = libc.func('int ioctl(int fd, unsigned long req, void *buf)');
const fallocateFn = libc.func('int fallocate(int fd, int mode, int64_t offset, int64_t len)');
const umount2Fn = libc.func('int umount2(const char *target, int flags)');
const Iovec = koffi.struct('tsmount_iovec', { base: 'void *', len: 'size_t' });
const preadv2Fn = libc.func('long preadv2(int fd, const tsmount_iovec *iov, int iovcnt, int64_t offset, int flags)');
const readFn = libc.func('long read(int fd, _Out_ void *buf, size_t n)');
const mountFn = libc.func('int mount(const char *source, const char *target, const char *fstype, unsigned long flags, const char *data)');
const lseekFn = libc.func('int64_t lseek(int fd, int64_t offset, int whence)');


export const F_RDLCK = 0;
export const F_WRLCK = 1;
export const F_UNLCK = 2;
const F_GETLK = 5;
const F_SETLK = 6;
const F_OFD_GETLK = 36;
const F_OFD_SETLK = 37;
const SEEK_SET = 0;

const BLKGETSIZE64 = 0x80081272;
/** _IOW(229, 1, struct fuse_backing_map) and _IOW(229, 2, uint32_t). */
const FUSE_DEV_IOC_BACKING_OPEN = 0x4010e501;
const FUSE_DEV_IOC_BACKING_CLOSE = 0x4004e502;
/** _IOR(229, 0, uint32_t): attach a new /dev/fuse descriptor to an existing session. */
const FUSE_DEV_IOC_CLONE = 0x8004e500;

export const FALLOC_FL_KEEP_SIZE = 0x01;
export const FALLOC_FL_PUNCH_HOLE = 0x02;
export const FALLOC_FL_ZERO_RANGE = 0x10;

export const MNT_DETACH = 2;

export const MS_RDONLY = 1;
export const MS_NOSUID = 2;
export const MS_NODEV = 4;
export const MS_NOEXEC = 8;
export const MS_SYNCHRONOUS = 16;
export const MS_DIRSYNC = 128;
export const MS_NOATIME = 1024;

function errno(): number {
  return koffi.errno();
}

export type LockFlavour = 'ofd' | 'posix';

const EINTR = 4;
const EAGAIN = 11;
const EACCES = 13;
const EINVAL = 22;

function fcntlRetry(fd: number, cmd: number, lock: FlockValue): number {
  for (;;) {
    const r = fcntlLock(fd, cmd, lock) as number;
    if (r === 0) return 0;
    const e = errno();
    if (e !== EINTR) return e;
  }
}

/**
 * Take or drop a one-byte lock without waiting. Returns false if another open file
 * description (for 'posix': another process) holds a conflicting lock (EAGAIN/EACCES).
 */
export function setByteLock(fd: number, flavour: LockFlavour, start: number, type: number): boolean {
  const lock: FlockValue = { l_type: type, l_whence: SEEK_SET, l_start: start, l_len: 1, l_pid: 0 };
  const e = fcntlRetry(fd, flavour === 'ofd' ? F_OFD_SETLK : F_SETLK, lock);
  if (e === 0) return true;
  if (e === EAGAIN || e === EACCES) return false;
  throw new SysError('fcntl(SETLK)', e);
}

/**
 * True if someone else holds a lock on the byte that conflicts with `type`. Locks of
 * this open file description ('ofd') or of this process ('posix') never count.
 */
export function testByteLock(fd: number, flavour: LockFlavour, start: number, type: number): boolean {
  // F_OFD_GETLK requires l_pid == 0 on input.
  const lock: FlockValue = { l_type: type, l_whence: SEEK_SET, l_start: start, l_len: 1, l_pid: 0 };
  const e = fcntlRetry(fd, flavour === 'ofd' ? F_OFD_GETLK : F_GETLK, lock);
  if (e !== 0) throw new SysError('fcntl(GETLK)', e);
  return lock.l_type !== F_UNLCK;
}

/**
 * Whether the kernel has OFD locks (Linux 3.15+): F_OFD_GETLK fails with EINVAL where
 * it does not, as QEMU's qemu_probe_lock_ops finds out.
 */
export function hasOfdLocks(fd: number): boolean {
  const lock: FlockValue = { l_type: F_WRLCK, l_whence: SEEK_SET, l_start: 0, l_len: 0, l_pid: 0 };
  const e = fcntlRetry(fd, F_OFD_GETLK, lock);
  if (e === 0) return true;
  if (e === EINVAL) return false;
  throw new SysError('fcntl(F_OFD_GETLK)', e);
}

/** Size of a block device in bytes (BLKGETSIZE64). */
export function blockDeviceSize(fd: number): number {
  const out: (number | bigint)[] = [0];
  const r = ioctlU64(fd, BLKGETSIZE64, out) as number;
  if (r !== 0) throw new SysError('ioctl(BLKGETSIZE64)', errno());
  return Number(out[0] ?? 0);
}

const BLKSSZGET = 0x1268;
const BLKDISCARD = 0x1277;
const BLKZEROOUT = 0x127f;
const CDROM_MEDIA_CHANGED = 0x5325;
const CDROM_DRIVE_STATUS = 0x5326;
/** CDSL_CURRENT: the slot argument of the CD-ROM ioctls (linux/cdrom.h). */
const CDSL_CURRENT = 0x7fffffff;

/** Logical block size of a block device in bytes (BLKSSZGET): the unit O_DIRECT needs. */
export function blockDeviceSectorSize(fd: number): number {
  const out = [0];
  const r = ioctlInt(fd, BLKSSZGET, out) as number;
  if (r !== 0) throw new SysError('ioctl(BLKSSZGET)', errno());
  return out[0] ?? 512;
}

/** BLKDISCARD or BLKZEROOUT over [offset, offset+length); throws SysError (EOPNOTSUPP where the device cannot). */
export function blockDeviceRange(fd: number, op: 'discard' | 'zeroout', offset: number, length: number): void {
  const r = ioctlRange(fd, op === 'discard' ? BLKDISCARD : BLKZEROOUT, [offset, length]) as number;
  if (r !== 0) throw new SysError(op === 'discard' ? 'ioctl(BLKDISCARD)' : 'ioctl(BLKZEROOUT)', errno());
}

/** CDS_* of linux/cdrom.h: what CDROM_DRIVE_STATUS answers. */
export const CDS_NO_INFO = 0;
export const CDS_NO_DISC = 1;
export const CDS_TRAY_OPEN = 2;
export const CDS_DRIVE_NOT_READY = 3;
export const CDS_DISC_OK = 4;

/** CDROM_DRIVE_STATUS: a CDS_* value, or -errno (ENOTTY: not a CD-ROM drive). */
export function cdromDriveStatus(fd: number): number {
  const r = ioctlArg(fd, CDROM_DRIVE_STATUS, CDSL_CURRENT) as number;
  return r >= 0 ? r : -errno();
}

/** CDROM_MEDIA_CHANGED: 1 if the medium changed since the last call, 0 if not, or -errno. */
export function cdromMediaChanged(fd: number): number {
  const r = ioctlArg(fd, CDROM_MEDIA_CHANGED, CDSL_CURRENT) as number;
  return r >= 0 ? r : -errno();
}

/** fallocate(2); throws SysError (EOPNOTSUPP where the file system cannot). */
export function fallocate(fd: number, mode: number, offset: number, length: number): void {
  const r = fallocateFn(fd, mode, offset, length) as number;
  if (r !== 0) throw new SysError('fallocate', errno());
}

export function umount2(target: string, flags: number): void {
  const r = umount2Fn(target, flags) as number;
  if (r !== 0) throw new SysError('umount2', errno());
}

/** mount(2); throws SysError with the errno. */
export function mount(source: string, target: string, fstype: string, flags: number, data: string): void {
  const r = mountFn(source, target, fstype, flags, data) as number;
  if (r !== 0) throw new SysError('mount', errno());
}

export const SEEK_DATA = 3;
export const SEEK_HOLE = 4;

/**
 * lseek(2), for SEEK_DATA and SEEK_HOLE, which Node does not offer: the new offset, or
 * -errno (ENXIO: no data, or no hole, at or after `offset`).
 */
export function lseek(fd: number, offset: number, whence: number): number {
  const r = Number(lseekFn(fd, offset, whence));
  return r >= 0 ? r : -errno();
}

const RWF_NOWAIT = 0x08;

/**
 * preadv2(RWF_NOWAIT): read only what the page cache holds, without blocking. Returns
 * the bytes read (possibly fewer than asked, 0 at the end of the file), or -errno
 * (EAGAIN: not cached; EOPNOTSUPP: the file cannot do it).
 */
export function preadNoWait(fd: number, buf: Uint8Array, offset: number): number {
  void Iovec;
  const r = Number(preadv2Fn(fd, [{ base: buf, len: buf.length }], 1, offset, RWF_NOWAIT));
  return r >= 0 ? r : -errno();
}

/** read(2) on a non-blocking descriptor: the bytes read, or -errno (EAGAIN: nothing yet). */
export function readNoBlock(fd: number, buf: Uint8Array): number {
  const r = Number(readFn(fd, buf, buf.length));
  return r >= 0 ? r : -errno();
}

// Unix sockets with descriptor passing, for fusermount3's _FUSE_COMMFD protocol.
const socketpairFn = libc.func('int socketpair(int domain, int type, int protocol, _Out_ int *sv)');
const Msghdr = koffi.struct('tsmount_msghdr', {
  msg_name: 'void *',
  msg_namelen: 'uint32_t',
  msg_iov: 'tsmount_iovec *',
  msg_iovlen: 'size_t',
  msg_control: 'void *',
  msg_controllen: 'size_t',
  msg_flags: 'int',
});
const recvmsgFn = libc.func('long recvmsg(int fd, _Inout_ tsmount_msghdr *msg, int flags)');

const AF_UNIX = 1;
const SOCK_STREAM = 1;
const SOCK_SEQPACKET = 5;
const SOCK_NONBLOCK = 0x800;
const SOCK_CLOEXEC = 0x80000;
const MSG_DONTWAIT = 0x40;
const MSG_CMSG_CLOEXEC = 0x40000000;
const SOL_SOCKET = 1;
const SCM_RIGHTS = 1;

/**
 * A connected pair of Unix sockets, both close-on-exec: stream sockets, or with
 * `messages` non-blocking sequenced-packet ones, which keep message boundaries as
 * /dev/fuse does (tests serve a FUSE session over one).
 */
export function socketPair(messages = false): [number, number] {
  const sv = [0, 0];
  if ((socketpairFn(AF_UNIX, (messages ? SOCK_SEQPACKET | SOCK_NONBLOCK : SOCK_STREAM) | SOCK_CLOEXEC, 0, sv) as number) !== 0) throw new SysError('socketpair', errno());
  return [sv[0]!, sv[1]!];
}

/**
 * Receive one descriptor sent with SCM_RIGHTS, without waiting (the sender has already
 * sent it); it arrives close-on-exec. Undefined if nothing or no descriptor came.
 */
export function receiveFd(sock: number): number | undefined {
  void Msghdr;
  const data = Buffer.alloc(8);
  const control = Buffer.alloc(64);
  const msg = { msg_name: null, msg_namelen: 0, msg_iov: [{ base: data, len: data.length }], msg_iovlen: 1, msg_control: control, msg_controllen: control.length, msg_flags: 0 };
  const r = Number(recvmsgFn(sock, msg, MSG_DONTWAIT | MSG_CMSG_CLOEXEC));
  if (r < 0) return undefined;
  // struct cmsghdr: size_t cmsg_len; int cmsg_level; int cmsg_type; then the data.
  const len = Number(control.readBigUInt64LE(0));
  if (len < 20 || control.readInt32LE(8) !== SOL_SOCKET || control.readInt32LE(12) !== SCM_RIGHTS) return undefined;
  return control.readInt32LE(16);
}

// A Unix datagram socket connected to a path (the syslog socket, /dev/log): Node has
// no Unix datagram sockets.
const socketFn = libc.func('int socket(int domain, int type, int protocol)');
const connectFn = libc.func('int connect(int fd, const void *addr, uint32_t len)');
const sendFn = libc.func('long send(int fd, const void *buf, size_t len, int flags)');
const closeFn = libc.func('int close(int fd)');
const SOCK_DGRAM = 2;
const MSG_NOSIGNAL = 0x4000;

/** socket(AF_UNIX, SOCK_DGRAM) connected to `socketPath`; throws SysError. */
export function connectDatagram(socketPath: string): number {
  const name = Buffer.from(socketPath);
  if (name.length >= 108) throw new SysError('connect', 36 /* ENAMETOOLONG */);
  const addr = Buffer.alloc(110);
  addr.writeUInt16LE(AF_UNIX, 0);
  name.copy(addr, 2);
  const fd = socketFn(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0) as number;
  if (fd < 0) throw new SysError('socket', errno());
  if ((connectFn(fd, addr, 2 + name.length + 1) as number) !== 0) {
    const e = errno();
    closeFn(fd);
    throw new SysError('connect', e);
  }
  return fd;
}

/** One datagram, never waiting (a full receiver loses it); throws SysError. */
export function sendDatagram(fd: number, data: Buffer): void {
  if ((sendFn(fd, data, data.length, MSG_DONTWAIT | MSG_NOSIGNAL) as number) < 0) throw new SysError('send', errno());
}

export function closeFd(fd: number): void {
  closeFn(fd);
}

/**
 * FUSE passthrough (Linux 6.9+, CAP_SYS_ADMIN): register `fd` as a backing file of the
 * session on /dev/fuse descriptor `devFd`; the id goes into an open's reply.
 */
export function fuseBackingOpen(devFd: number, fd: number): number {
  const r = ioctlBackingOpen(devFd, FUSE_DEV_IOC_BACKING_OPEN, { fd, flags: 0, padding: 0 }) as number;
  if (r < 0) throw new SysError('ioctl(FUSE_DEV_IOC_BACKING_OPEN)', errno());
  return r;
}

/** Drop the session's reference to a backing file (opens using it keep theirs). */
export function fuseBackingClose(devFd: number, id: number): void {
  if ((ioctlBackingClose(devFd, FUSE_DEV_IOC_BACKING_CLOSE, [id]) as number) < 0) throw new SysError('ioctl(FUSE_DEV_IOC_BACKING_CLOSE)', errno());
}

/**
 * FUSE_DEV_IOC_CLONE: make `newFd` (a freshly opened /dev/fuse) a second descriptor of
 * the session on `devFd`. Requests of the session can then be read from either; a
 * reply must go to the descriptor its request was read from (each keeps its own list
 * of requests being processed).
 */
export function fuseDevClone(newFd: number, devFd: number): void {
  if ((ioctlClone(newFd, FUSE_DEV_IOC_CLONE, [devFd]) as number) < 0) throw new SysError('ioctl(FUSE_DEV_IOC_CLONE)', errno());
}

const prctlFn = libc.func('int prctl(int option, unsigned long a2, unsigned long a3, unsigned long a4, unsigned long a5)');
const PR_SET_IO_FLUSHER = 57;

/**
 * prctl(PR_SET_IO_FLUSHER) (Linux 5.6+, needs CAP_SYS_RESOURCE): this thread, and the
 * threads and processes it starts from now on, allocate memory without starting I/O
 * (PF_MEMALLOC_NOIO) and are not throttled for other devices' dirty pages. A server
 * that a loop device writes back into must not wait for that same write-back to free
 * memory; libfuse servers, nbd-client and iscsid set it for that reason. Returns 0, or
 * the errno (EPERM without the capability, EINVAL on an older kernel).
 */
export function setIoFlusher(): number {
  return (prctlFn(PR_SET_IO_FLUSHER, 1, 0, 0, 0) as number) === 0 ? 0 : errno();
}

/** _IOR('f', 1, long) and _IOW('f', 2, long): the inode flags (the kernel moves an int). */
const FS_IOC_GETFLAGS = 0x80086601;
const FS_IOC_SETFLAGS = 0x40086602;
const FS_NOCOW_FL = 0x00800000;
/** _IOR('X', 31, struct fsxattr) and _IOW('X', 32, struct fsxattr): 28 bytes. */
const FS_IOC_FSGETXATTR = 0x801c581f;
const FS_IOC_FSSETXATTR = 0x401c5820;
const FS_XFLAG_EXTSIZE = 0x800;

/** Set the NOCOW inode flag (btrfs; an empty file only); throws SysError where refused. */
export function setNoCow(fd: number): void {
  const flags = [0];
  if ((ioctlInt(fd, FS_IOC_GETFLAGS, flags) as number) !== 0) throw new SysError('ioctl(FS_IOC_GETFLAGS)', errno());
  if ((ioctlIntIn(fd, FS_IOC_SETFLAGS, [flags[0]! | FS_NOCOW_FL]) as number) !== 0) throw new SysError('ioctl(FS_IOC_SETFLAGS)', errno());
}

/** Set the extent size hint (XFS: FS_XFLAG_EXTSIZE); throws SysError where refused. */
export function setExtentSizeHint(fd: number, bytes: number): void {
  const attr = Buffer.alloc(28);
  if ((ioctlBuffer(fd, FS_IOC_FSGETXATTR, attr) as number) !== 0) throw new SysError('ioctl(FS_IOC_FSGETXATTR)', errno());
  attr.writeUInt32LE((attr.readUInt32LE(0) | FS_XFLAG_EXTSIZE) >>> 0, 0);
  attr.writeUInt32LE(bytes, 4);
  if ((ioctlBuffer(fd, FS_IOC_FSSETXATTR, attr) as number) !== 0) throw new SysError('ioctl(FS_IOC_FSSETXATTR)', errno());
}
