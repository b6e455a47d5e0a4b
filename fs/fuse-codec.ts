// The FUSE wire format of linux/fuse.h (protocol 7.38): decoding the kernel's requests
// and encoding our replies. Pure: no I/O and no state; fs/fuse-session.ts moves the
// bytes. Each struct is an `as const` table of byte offsets named after its C struct.
// FUSE speaks the host's byte order; tsmount runs on little-endian hosts (x86_64,
// aarch64). A message the kernel could not have sent (a length that disagrees with
// what was read, a body shorter than its struct) is an EIO answer, never a read past
// the message into whatever the pooled buffer held before.
import { constants as osc } from 'node:os';
import { ErrnoError } from '../drivers/errors.js';
import type { Stat } from './fuse.js';

const E = osc.errno;

/** enum fuse_opcode. */
export const Op = {
  LOOKUP: 1, FORGET: 2, GETATTR: 3, SETATTR: 4, READLINK: 5, SYMLINK: 6, MKNOD: 8, MKDIR: 9,
  UNLINK: 10, RMDIR: 11, RENAME: 12, LINK: 13, OPEN: 14, READ: 15, WRITE: 16, STATFS: 17,
  RELEASE: 18, FSYNC: 20, SETXATTR: 21, GETXATTR: 22, LISTXATTR: 23, REMOVEXATTR: 24,
  FLUSH: 25, INIT: 26, OPENDIR: 27, READDIR: 28, RELEASEDIR: 29, FSYNCDIR: 30, GETLK: 31,
  SETLK: 32, SETLKW: 33, ACCESS: 34, CREATE: 35, INTERRUPT: 36, BMAP: 37, DESTROY: 38,
  IOCTL: 39, POLL: 40, NOTIFY_REPLY: 41, BATCH_FORGET: 42, FALLOCATE: 43, READDIRPLUS: 44,
  RENAME2: 45, LSEEK: 46, COPY_FILE_RANGE: 47, SETUPMAPPING: 48, REMOVEMAPPING: 49,
  SYNCFS: 50, TMPFILE: 51, STATX: 52,
} as const;

const OP_NAMES = new Map<number, string>(Object.entries(Op).map(([k, v]) => [v, k.toLowerCase()]));

/** The request's name for messages: "read", "lookup", or "opcode 99". */
export function opName(opcode: number): string {
  return OP_NAMES.get(opcode) ?? `opcode ${opcode}`;
}

/**
 * Requests allow_root does not check (libfuse's list): they act on a file already open
 * (and may come from the kernel on another user's behalf), or carry no reply.
 */
export const UNCHECKED_BY_ALLOW_ROOT: ReadonlySet<number> = new Set([
  Op.INIT, Op.READ, Op.WRITE, Op.FSYNC, Op.RELEASE, Op.READDIR, Op.FSYNCDIR, Op.RELEASEDIR, Op.FORGET, Op.BATCH_FORGET, Op.INTERRUPT, Op.DESTROY,
]);

/** Requests that would create, link, rename or remove a name. */
export const CHANGES_NAMES: ReadonlySet<number> = new Set([Op.SYMLINK, Op.MKNOD, Op.MKDIR, Op.UNLINK, Op.RMDIR, Op.RENAME, Op.LINK, Op.CREATE, Op.RENAME2, Op.TMPFILE]);

/** fuse_init_in/out.flags, and flags2 (bits 32-63). */
export const Init = {
  ASYNC_READ: 1 << 0,
  BIG_WRITES: 1 << 5,
  ASYNC_DIO: 1 << 15,
  PARALLEL_DIROPS: 1 << 18,
  MAX_PAGES: 1 << 22,
  INIT_EXT: 1 << 30,
  /** FUSE_DIRECT_IO_ALLOW_MMAP is bit 36: bit 4 of flags2 (7.39). */
  DIRECT_IO_ALLOW_MMAP_HI: 1 << 4,
  /** FUSE_PASSTHROUGH is bit 37: bit 5 of flags2 (7.40). */
  PASSTHROUGH_HI: 1 << 5,
} as const;

/** fuse_open_out.open_flags. */
export const FOPEN_DIRECT_IO = 1 << 0;
export const FOPEN_KEEP_CACHE = 1 << 1;
/** The kernel does this open's reads and writes on a backing file itself (7.40). */
export const FOPEN_PASSTHROUGH = 1 << 7;

/** fuse_setattr_in.valid. */
export const Fattr = { MODE: 1 << 0, UID: 1 << 1, GID: 1 << 2, SIZE: 1 << 3, ATIME: 1 << 4, MTIME: 1 << 5, FH: 1 << 6 } as const;

export const FSYNC_FDATASYNC = 1 << 0;
/** The interrupt's own unique has this bit set (fuse_dev_do_read). */
export const INT_REQ_BIT = 1;

export const DT_DIR = 4;
export const DT_REG = 8;

// ---- struct layouts (byte offsets) ----

/** struct fuse_in_header. */
export const InHeader = { len: 0, opcode: 4, unique: 8, nodeid: 16, uid: 24, gid: 28, pid: 32, total_extlen: 36, SIZE: 40 } as const;
/** struct fuse_out_header. */
export const OutHeader = { len: 0, error: 4, unique: 8, SIZE: 16 } as const;
/** struct fuse_attr. */
export const Attr = {
  ino: 0, size: 8, blocks: 16, atime: 24, mtime: 32, ctime: 40, atimensec: 48, mtimensec: 52, ctimensec: 56,
  mode: 60, nlink: 64, uid: 68, gid: 72, rdev: 76, blksize: 80, flags: 84, SIZE: 88,
} as const;
/** struct fuse_entry_out. */
export const EntryOut = { nodeid: 0, generation: 8, entry_valid: 16, attr_valid: 24, entry_valid_nsec: 32, attr_valid_nsec: 36, attr: 40, SIZE: 40 + Attr.SIZE } as const;
/** struct fuse_attr_out. */
export const AttrOut = { attr_valid: 0, attr_valid_nsec: 8, dummy: 12, attr: 16, SIZE: 16 + Attr.SIZE } as const;
/** struct fuse_forget_in. */
export const ForgetIn = { nlookup: 0, SIZE: 8 } as const;
/** struct fuse_batch_forget_in, followed by `count` struct fuse_forget_one. */
export const BatchForgetIn = { count: 0, dummy: 4, SIZE: 8 } as const;
/** struct fuse_forget_one. */
export const ForgetOne = { nodeid: 0, nlookup: 8, SIZE: 16 } as const;
/** struct fuse_setattr_in. */
export const SetattrIn = {
  valid: 0, padding: 4, fh: 8, size: 16, lock_owner: 24, atime: 32, mtime: 40, ctime: 48,
  atimensec: 56, mtimensec: 60, ctimensec: 64, mode: 68, unused4: 72, uid: 76, gid: 80, unused5: 84, SIZE: 88,
} as const;
/** struct fuse_open_in. */
export const OpenIn = { flags: 0, open_flags: 4, SIZE: 8 } as const;
/** struct fuse_open_out. */
export const OpenOut = { fh: 0, open_flags: 8, backing_id: 12, SIZE: 16 } as const;
/** struct fuse_release_in. */
export const ReleaseIn = { fh: 0, flags: 8, release_flags: 12, lock_owner: 16, SIZE: 24 } as const;
/** struct fuse_flush_in. */
export const FlushIn = { fh: 0, unused: 8, padding: 12, lock_owner: 16, SIZE: 24 } as const;
/** struct fuse_read_in (READ and READDIR). */
export const ReadIn = { fh: 0, offset: 8, size: 16, read_flags: 20, lock_owner: 24, flags: 32, padding: 36, SIZE: 40 } as const;
/** struct fuse_write_in, followed by the data. */
export const WriteIn = { fh: 0, offset: 8, size: 16, write_flags: 20, lock_owner: 24, flags: 32, padding: 36, SIZE: 40 } as const;
/** struct fuse_write_out. */
export const WriteOut = { size: 0, padding: 4, SIZE: 8 } as const;
/** struct fuse_statfs_out (struct fuse_kstatfs). */
export const StatfsOut = { blocks: 0, bfree: 8, bavail: 16, files: 24, ffree: 32, bsize: 40, namelen: 44, frsize: 48, padding: 52, SIZE: 80 } as const;
/** struct fuse_fsync_in. */
export const FsyncIn = { fh: 0, fsync_flags: 8, padding: 12, SIZE: 16 } as const;
/** struct fuse_init_in; before 7.36 only the first 16 bytes. */
export const InitIn = { major: 0, minor: 4, max_readahead: 8, flags: 12, flags2: 16, SIZE: 64, SIZE_OLD: 16 } as const;
/** struct fuse_init_out; before 7.23 only the first 24 bytes. */
export const InitOut = {
  major: 0, minor: 4, max_readahead: 8, flags: 12, max_background: 16, congestion_threshold: 18, max_write: 20,
  time_gran: 24, max_pages: 28, map_alignment: 30, flags2: 32, max_stack_depth: 36, SIZE: 64, SIZE_OLD: 24,
} as const;
/** struct fuse_interrupt_in. */
export const InterruptIn = { unique: 0, SIZE: 8 } as const;
/** struct fuse_fallocate_in. */
export const FallocateIn = { fh: 0, offset: 8, length: 16, mode: 24, padding: 28, SIZE: 32 } as const;
/** struct fuse_lseek_in. */
export const LseekIn = { fh: 0, offset: 8, whence: 16, padding: 20, SIZE: 24 } as const;
/** struct fuse_lseek_out. */
export const LseekOut = { offset: 0, SIZE: 8 } as const;
/** struct fuse_dirent, followed by the name, padded to 8 bytes. */
export const Dirent = { ino: 0, off: 8, namelen: 16, type: 20, name: 24 } as const;

/** The largest name a LOOKUP may carry (FUSE_NAME_MAX is 1024; NAME_MAX is 255). */
const NAME_MAX = 1024;

// ---- integers ----

/** A u64 as a number: exact below 2^53, which every size and offset of a flat file is. */
export function u64(b: Buffer, o: number): number {
  return b.readUInt32LE(o) + b.readUInt32LE(o + 4) * 0x100000000;
}
export function putU64(b: Buffer, o: number, v: number): void {
  b.writeUInt32LE(v >>> 0, o);
  b.writeUInt32LE(Math.floor(v / 0x100000000) >>> 0, o + 4);
}

function malformed(what: string): ErrnoError {
  return new ErrnoError(`malformed FUSE request: ${what}`, E.EIO);
}

function need(body: Buffer, size: number, what: string): void {
  if (body.length < size) throw malformed(`${what} body of ${body.length} bytes, needs ${size}`);
}

// ---- requests (kernel -> us) ----

/** struct fuse_in_header, decoded into a record the session reuses for every request. */
export interface Header {
  len: number;
  opcode: number;
  unique: number;
  nodeid: number;
  uid: number;
  gid: number;
  pid: number;
}

export function newHeader(): Header {
  return { len: 0, opcode: 0, unique: 0, nodeid: 0, uid: 0, gid: 0, pid: 0 };
}

/**
 * Decode the header of the `n` bytes read into `msg`. False when there is no whole
 * header (nothing can be answered); throws EIO, with `h` filled, when the message is
 * not the length it says.
 */
export function decodeHeader(msg: Buffer, n: number, h: Header): boolean {
  if (n < InHeader.SIZE || msg.length < n) return false;
  h.len = msg.readUInt32LE(InHeader.len);
  h.opcode = msg.readUInt32LE(InHeader.opcode);
  h.unique = u64(msg, InHeader.unique);
  h.nodeid = u64(msg, InHeader.nodeid);
  h.uid = msg.readUInt32LE(InHeader.uid);
  h.gid = msg.readUInt32LE(InHeader.gid);
  h.pid = msg.readUInt32LE(InHeader.pid);
  if (h.len !== n) throw malformed(`length ${h.len}, read ${n}`);
  return true;
}

/** READ and WRITE, the hot path: decoded into a reused record, no allocation. */
export interface IoRequest {
  fh: number;
  offset: number;
  size: number;
}

export function newIoRequest(): IoRequest {
  return { fh: 0, offset: 0, size: 0 };
}

/**
 * struct fuse_read_in or fuse_write_in from a request body. `maxSize`: the largest
 * request negotiated at INIT. A WRITE's data is body[WriteIn.SIZE, WriteIn.SIZE + size),
 * and must be exactly what follows the struct.
 */
export function decodeIo(opcode: number, body: Buffer, maxSize: number, r: IoRequest): void {
  need(body, ReadIn.SIZE, opcode === Op.WRITE ? 'WRITE' : 'READ');
  r.fh = u64(body, ReadIn.fh);
  r.offset = u64(body, ReadIn.offset);
  r.size = body.readUInt32LE(ReadIn.size);
  if (r.size > maxSize) throw new ErrnoError(`request of ${r.size} bytes, more than the ${maxSize} negotiated`, E.EINVAL);
  if (opcode === Op.WRITE && body.length !== WriteIn.SIZE + r.size) throw malformed(`WRITE of ${r.size} bytes carries ${body.length - WriteIn.SIZE}`);
}

/** Every other request, decoded to values (the body's buffer is reused afterwards). */
export type Request =
  | { kind: 'lookup'; name: string }
  | { kind: 'forget'; items: { nodeid: number; nlookup: number }[] }
  | { kind: 'getattr' }
  | { kind: 'setattr'; valid: number; fh: number; size: number; mode: number; uid: number; gid: number }
  | { kind: 'open'; flags: number }
  | { kind: 'release'; fh: number }
  | { kind: 'flush'; fh: number }
  | { kind: 'fsync'; fh: number; datasync: boolean }
  | { kind: 'statfs' }
  | { kind: 'init'; major: number; minor: number; maxReadahead: number; flags: number; flags2: number }
  | { kind: 'opendir' }
  | { kind: 'readdir'; fh: number; offset: number; size: number }
  | { kind: 'releasedir' }
  | { kind: 'fsyncdir' }
  | { kind: 'access' }
  | { kind: 'interrupt'; unique: number }
  | { kind: 'destroy' }
  | { kind: 'fallocate'; fh: number; offset: number; length: number; mode: number }
  | { kind: 'lseek'; fh: number; offset: number; whence: number }
  /** Creates, links, renames or removes a name. */
  | { kind: 'changesNames'; opcode: number }
  | { kind: 'unsupported'; opcode: number };

/** Decode a request other than READ and WRITE; `nodeid` is the header's. */
export function decodeRequest(opcode: number, nodeid: number, body: Buffer): Request {
  switch (opcode) {
    case Op.LOOKUP: {
      const nul = body.indexOf(0);
      if (nul < 0) throw malformed('LOOKUP name without its NUL');
      if (nul === 0 || nul > NAME_MAX) throw new ErrnoError(`LOOKUP name of ${nul} bytes`, nul === 0 ? E.ENOENT : E.ENAMETOOLONG);
      return { kind: 'lookup', name: body.toString('utf8', 0, nul) };
    }
    case Op.FORGET:
      need(body, ForgetIn.SIZE, 'FORGET');
      return { kind: 'forget', items: [{ nodeid, nlookup: u64(body, ForgetIn.nlookup) }] };
    case Op.BATCH_FORGET: {
      need(body, BatchForgetIn.SIZE, 'BATCH_FORGET');
      const count = body.readUInt32LE(BatchForgetIn.count);
      // Checked against the bytes there before anything is allocated for `count`.
      need(body, BatchForgetIn.SIZE + count * ForgetOne.SIZE, 'BATCH_FORGET');
      const items: { nodeid: number; nlookup: number }[] = [];
      for (let i = 0, o = BatchForgetIn.SIZE; i < count; i++, o += ForgetOne.SIZE) {
        items.push({ nodeid: u64(body, o + ForgetOne.nodeid), nlookup: u64(body, o + ForgetOne.nlookup) });
      }
      return { kind: 'forget', items };
    }
    case Op.GETATTR:
      return { kind: 'getattr' };
    case Op.SETATTR:
      need(body, SetattrIn.SIZE, 'SETATTR');
      return {
        kind: 'setattr',
        valid: body.readUInt32LE(SetattrIn.valid),
        fh: u64(body, SetattrIn.fh),
        size: u64(body, SetattrIn.size),
        mode: body.readUInt32LE(SetattrIn.mode),
        uid: body.readUInt32LE(SetattrIn.uid),
        gid: body.readUInt32LE(SetattrIn.gid),
      };
    case Op.OPEN:
      need(body, OpenIn.SIZE, 'OPEN');
      return { kind: 'open', flags: body.readUInt32LE(OpenIn.flags) };
    case Op.RELEASE:
      need(body, ReleaseIn.SIZE, 'RELEASE');
      return { kind: 'release', fh: u64(body, ReleaseIn.fh) };
    case Op.FLUSH:
      need(body, FlushIn.SIZE, 'FLUSH');
      return { kind: 'flush', fh: u64(body, FlushIn.fh) };
    case Op.FSYNC:
      need(body, FsyncIn.SIZE, 'FSYNC');
      return { kind: 'fsync', fh: u64(body, FsyncIn.fh), datasync: (body.readUInt32LE(FsyncIn.fsync_flags) & FSYNC_FDATASYNC) !== 0 };
    case Op.STATFS:
      return { kind: 'statfs' };
    case Op.INIT: {
      need(body, InitIn.SIZE_OLD, 'INIT');
      const minor = body.readUInt32LE(InitIn.minor);
      const flags = body.readUInt32LE(InitIn.flags);
      // flags2 exists from 7.36, and only when the kernel says so (FUSE_INIT_EXT).
      const hasFlags2 = minor >= 36 && (flags & Init.INIT_EXT) !== 0 && body.length >= InitIn.flags2 + 4;
      return {
        kind: 'init',
        major: body.readUInt32LE(InitIn.major),
        minor,
        maxReadahead: body.readUInt32LE(InitIn.max_readahead),
        flags,
        flags2: hasFlags2 ? body.readUInt32LE(InitIn.flags2) : 0,
      };
    }
    case Op.OPENDIR:
      return { kind: 'opendir' };
    case Op.READDIR:
      need(body, ReadIn.SIZE, 'READDIR');
      return { kind: 'readdir', fh: u64(body, ReadIn.fh), offset: u64(body, ReadIn.offset), size: body.readUInt32LE(ReadIn.size) };
    case Op.RELEASEDIR:
      return { kind: 'releasedir' };
    case Op.FSYNCDIR:
      return { kind: 'fsyncdir' };
    case Op.ACCESS:
      return { kind: 'access' };
    case Op.INTERRUPT:
      need(body, InterruptIn.SIZE, 'INTERRUPT');
      return { kind: 'interrupt', unique: u64(body, InterruptIn.unique) };
    case Op.DESTROY:
      return { kind: 'destroy' };
    case Op.FALLOCATE:
      need(body, FallocateIn.SIZE, 'FALLOCATE');
      return { kind: 'fallocate', fh: u64(body, FallocateIn.fh), offset: u64(body, FallocateIn.offset), length: u64(body, FallocateIn.length), mode: body.readUInt32LE(FallocateIn.mode) };
    case Op.LSEEK:
      need(body, LseekIn.SIZE, 'LSEEK');
      return { kind: 'lseek', fh: u64(body, LseekIn.fh), offset: u64(body, LseekIn.offset), whence: body.readUInt32LE(LseekIn.whence) };
    default:
      return CHANGES_NAMES.has(opcode) ? { kind: 'changesNames', opcode } : { kind: 'unsupported', opcode };
  }
}

// ---- replies (us -> kernel) ----

/** A reply buffer with room for the header and `body` bytes, the start of the body zeroed. */
export function replyBuffer(body: number): Buffer {
  const b = Buffer.allocUnsafe(OutHeader.SIZE + body);
  b.fill(0, 0, OutHeader.SIZE + Math.min(body, 256));
  return b;
}

/** struct fuse_out_header; `error` is a positive errno (0: success). */
export function encodeOutHeader(b: Buffer, len: number, error: number, unique: number): void {
  b.writeUInt32LE(len, OutHeader.len);
  b.writeInt32LE(-error, OutHeader.error);
  putU64(b, OutHeader.unique, unique);
}

/** struct fuse_attr at `o`. */
export function encodeAttr(b: Buffer, o: number, ino: number, st: Stat): void {
  b.fill(0, o, o + Attr.SIZE);
  putU64(b, o + Attr.ino, ino);
  putU64(b, o + Attr.size, st.size);
  putU64(b, o + Attr.blocks, st.blocks ?? Math.ceil(st.size / 512));
  const times: [Date, number, number][] = [[st.atime, Attr.atime, Attr.atimensec], [st.mtime, Attr.mtime, Attr.mtimensec], [st.ctime, Attr.ctime, Attr.ctimensec]];
  for (const [t, sec, nsec] of times) {
    const ms = t.getTime();
    putU64(b, o + sec, Math.max(0, Math.floor(ms / 1000)));
    b.writeUInt32LE(Math.max(0, (ms % 1000) * 1e6), o + nsec);
  }
  b.writeUInt32LE(st.mode >>> 0, o + Attr.mode);
  b.writeUInt32LE(st.nlink, o + Attr.nlink);
  b.writeUInt32LE(st.uid >>> 0, o + Attr.uid);
  b.writeUInt32LE(st.gid >>> 0, o + Attr.gid);
  b.writeUInt32LE(st.blksize ?? 4096, o + Attr.blksize);
}

/** fuse_attr_out; returns the reply's length. */
export function encodeAttrOut(b: Buffer, ino: number, st: Stat, validSeconds: number): number {
  const o = OutHeader.SIZE;
  putU64(b, o + AttrOut.attr_valid, validSeconds);
  b.writeUInt32LE(0, o + AttrOut.attr_valid_nsec);
  b.writeUInt32LE(0, o + AttrOut.dummy);
  encodeAttr(b, o + AttrOut.attr, ino, st);
  return o + AttrOut.SIZE;
}

/** fuse_entry_out (LOOKUP); returns the reply's length. */
export function encodeEntryOut(b: Buffer, nodeid: number, st: Stat, validSeconds: number): number {
  const o = OutHeader.SIZE;
  putU64(b, o + EntryOut.nodeid, nodeid);
  putU64(b, o + EntryOut.generation, 0);
  putU64(b, o + EntryOut.entry_valid, validSeconds);
  putU64(b, o + EntryOut.attr_valid, validSeconds);
  b.writeUInt32LE(0, o + EntryOut.entry_valid_nsec);
  b.writeUInt32LE(0, o + EntryOut.attr_valid_nsec);
  encodeAttr(b, o + EntryOut.attr, nodeid, st);
  return o + EntryOut.SIZE;
}

export function encodeOpenOut(b: Buffer, fh: number, openFlags: number, backingId = 0): number {
  const o = OutHeader.SIZE;
  putU64(b, o + OpenOut.fh, fh);
  b.writeUInt32LE(openFlags, o + OpenOut.open_flags);
  b.writeInt32LE(backingId, o + OpenOut.backing_id);
  return o + OpenOut.SIZE;
}

export function encodeWriteOut(b: Buffer, size: number): number {
  b.writeUInt32LE(size, OutHeader.SIZE + WriteOut.size);
  b.writeUInt32LE(0, OutHeader.SIZE + WriteOut.padding);
  return OutHeader.SIZE + WriteOut.SIZE;
}

export function encodeLseekOut(b: Buffer, offset: number): number {
  putU64(b, OutHeader.SIZE + LseekOut.offset, offset);
  return OutHeader.SIZE + LseekOut.SIZE;
}

export interface Statfs {
  blocks: number;
  bfree: number;
  bavail: number;
  files: number;
  ffree: number;
  bsize: number;
  namelen: number;
  frsize: number;
}

export function encodeStatfsOut(b: Buffer, s: Statfs): number {
  const o = OutHeader.SIZE;
  b.fill(0, o, o + StatfsOut.SIZE);
  putU64(b, o + StatfsOut.blocks, s.blocks);
  putU64(b, o + StatfsOut.bfree, s.bfree);
  putU64(b, o + StatfsOut.bavail, s.bavail);
  putU64(b, o + StatfsOut.files, s.files);
  putU64(b, o + StatfsOut.ffree, s.ffree);
  b.writeUInt32LE(s.bsize, o + StatfsOut.bsize);
  b.writeUInt32LE(s.namelen, o + StatfsOut.namelen);
  b.writeUInt32LE(s.frsize, o + StatfsOut.frsize);
  return o + StatfsOut.SIZE;
}

export interface InitReply {
  major: number;
  minor: number;
  maxReadahead: number;
  flags: number;
  maxBackground: number;
  congestionThreshold: number;
  maxWrite: number;
  timeGran: number;
  maxPages: number;
  flags2: number;
  /** With FUSE_PASSTHROUGH: how deep the backing files' own stacking may be. */
  maxStackDepth?: number;
}

/** fuse_init_out, as long as the kernel's minor version knows it. */
export function encodeInitOut(b: Buffer, r: InitReply, kernelMinor: number): number {
  const o = OutHeader.SIZE;
  b.fill(0, o, o + InitOut.SIZE);
  b.writeUInt32LE(r.major, o + InitOut.major);
  b.writeUInt32LE(r.minor, o + InitOut.minor);
  b.writeUInt32LE(r.maxReadahead, o + InitOut.max_readahead);
  b.writeUInt32LE(r.flags >>> 0, o + InitOut.flags);
  b.writeUInt16LE(r.maxBackground, o + InitOut.max_background);
  b.writeUInt16LE(r.congestionThreshold, o + InitOut.congestion_threshold);
  b.writeUInt32LE(r.maxWrite, o + InitOut.max_write);
  b.writeUInt32LE(r.timeGran, o + InitOut.time_gran);
  b.writeUInt16LE(r.maxPages, o + InitOut.max_pages);
  b.writeUInt32LE(r.flags2 >>> 0, o + InitOut.flags2);
  b.writeUInt32LE(r.maxStackDepth ?? 0, o + InitOut.max_stack_depth);
  return o + (kernelMinor < 23 ? InitOut.SIZE_OLD : InitOut.SIZE);
}

export interface DirEntryOut {
  name: string;
  ino: number;
  type: number;
}

/**
 * struct fuse_dirent records for entries[first...] into b from OutHeader.SIZE, as many
 * as fit; each record's `off` is the index of the entry after it (where the next
 * READDIR resumes). Returns the reply's length.
 */
export function encodeDirents(b: Buffer, entries: readonly DirEntryOut[], first: number): number {
  let pos = OutHeader.SIZE;
  for (let i = first; i < entries.length; i++) {
    const e = entries[i]!;
    const nameLen = Buffer.byteLength(e.name);
    const padded = (Dirent.name + nameLen + 7) & ~7;
    if (pos + padded > b.length) break;
    b.fill(0, pos, pos + padded);
    putU64(b, pos + Dirent.ino, e.ino);
    putU64(b, pos + Dirent.off, i + 1);
    b.writeUInt32LE(nameLen, pos + Dirent.namelen);
    b.writeUInt32LE(e.type, pos + Dirent.type);
    b.write(e.name, pos + Dirent.name, 'utf8');
    pos += padded;
  }
  return pos;
}

// ---- the kernel's side, for tests and tools that speak to a session ----

/** A whole request as the kernel sends it: header and body. */
export function encodeRequest(h: { opcode: number; unique: number; nodeid: number; uid?: number; gid?: number; pid?: number }, body: Buffer = Buffer.alloc(0)): Buffer {
  const b = Buffer.alloc(InHeader.SIZE + body.length);
  b.writeUInt32LE(b.length, InHeader.len);
  b.writeUInt32LE(h.opcode, InHeader.opcode);
  putU64(b, InHeader.unique, h.unique);
  putU64(b, InHeader.nodeid, h.nodeid);
  b.writeUInt32LE(h.uid ?? 0, InHeader.uid);
  b.writeUInt32LE(h.gid ?? 0, InHeader.gid);
  b.writeUInt32LE(h.pid ?? 0, InHeader.pid);
  body.copy(b, InHeader.SIZE);
  return b;
}

export interface ReplyHeader {
  len: number;
  error: number;
  unique: number;
}

export function decodeOutHeader(b: Buffer): ReplyHeader {
  if (b.length < OutHeader.SIZE) throw malformed(`reply of ${b.length} bytes`);
  return { len: b.readUInt32LE(OutHeader.len), error: -b.readInt32LE(OutHeader.error), unique: u64(b, OutHeader.unique) };
}

export function decodeAttr(b: Buffer, o: number): Stat & { ino: number } {
  const time = (sec: number, nsec: number): Date => new Date(u64(b, o + sec) * 1000 + Math.floor(b.readUInt32LE(o + nsec) / 1e6));
  return {
    ino: u64(b, o + Attr.ino),
    size: u64(b, o + Attr.size),
    blocks: u64(b, o + Attr.blocks),
    atime: time(Attr.atime, Attr.atimensec),
    mtime: time(Attr.mtime, Attr.mtimensec),
    ctime: time(Attr.ctime, Attr.ctimensec),
    mode: b.readUInt32LE(o + Attr.mode),
    nlink: b.readUInt32LE(o + Attr.nlink),
    uid: b.readUInt32LE(o + Attr.uid),
    gid: b.readUInt32LE(o + Attr.gid),
    blksize: b.readUInt32LE(o + Attr.blksize),
  };
}

/** The entries of a READDIR reply. */
export function decodeDirents(b: Buffer, len: number): (DirEntryOut & { off: number })[] {
  const out: (DirEntryOut & { off: number })[] = [];
  let pos = OutHeader.SIZE;
  while (pos + Dirent.name <= len) {
    const nameLen = b.readUInt32LE(pos + Dirent.namelen);
    if (pos + Dirent.name + nameLen > len) throw malformed('dirent past the end of the reply');
    out.push({ ino: u64(b, pos + Dirent.ino), off: u64(b, pos + Dirent.off), type: b.readUInt32LE(pos + Dirent.type), name: b.toString('utf8', pos + Dirent.name, pos + Dirent.name + nameLen) });
    pos += (Dirent.name + nameLen + 7) & ~7;
  }
  return out;
}
