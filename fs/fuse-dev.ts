// FUSE spoken directly on /dev/fuse: the kernel protocol of linux/fuse.h (7.x), with
// mount(2) through koffi. No libfuse, no helper threads of our own.
//
// Why not libfuse 2 (fuse-native): it caps requests at 128 KiB, and every request
// crossed threads four times (libfuse worker -> JS thread -> thread pool -> JS thread
// -> libfuse worker). Here /dev/fuse is a non-blocking file descriptor in Node's own
// event loop (epoll, like qemu-storage-daemon's export): a request is read on the JS
// thread, its handler runs there, and the reply is one write(2) from the same thread.
// Several requests are in flight at once because handlers are asynchronous; the
// kernel matches replies by their `unique`. We negotiate FUSE_MAX_PAGES, so a 1 MiB
// read(2) or write(2) is one request.
//
// As root the mount is our own mount(2); otherwise fusermount3 mounts and passes the
// descriptor back (mountWithFusermount).
// The server must never make a synchronous file system call on its own mount: the
// only thread that could answer the kernel would be the one waiting.
import fs from 'node:fs';
import net from 'node:net';
import { spawn } from 'node:child_process';
import os, { constants as osc } from 'node:os';
import createDebug from 'debug';
import { errnoOf, messageOf, TsmountError } from '../drivers/errors.js';
import { mount as sysMount, readNoBlock, receiveFd, socketPair, MS_DIRSYNC, MS_NOATIME, MS_NODEV, MS_NOEXEC, MS_NOSUID, MS_RDONLY, MS_SYNCHRONOUS } from '../drivers/util/sys.js';
import { fusermountHelper, unmountFuse, type FsOps, type FuseMount, type MountOptions, type Stat } from './fuse.js';

const debug = createDebug('tsmount:fuse');
const E = osc.errno;

// Opcodes (enum fuse_opcode).
const OP = {
  LOOKUP: 1, FORGET: 2, GETATTR: 3, SETATTR: 4, OPEN: 14, READ: 15, WRITE: 16, STATFS: 17,
  RELEASE: 18, FSYNC: 20, FLUSH: 25, INIT: 26, OPENDIR: 27, READDIR: 28, RELEASEDIR: 29,
  FSYNCDIR: 30, ACCESS: 34, INTERRUPT: 36, DESTROY: 38, BATCH_FORGET: 42, FALLOCATE: 43,
} as const;

const OP_NAMES = new Map<number, string>(Object.entries(OP).map(([k, v]) => [v, k.toLowerCase()]));

/** symlink, mknod, mkdir, unlink, rmdir, rename, link, create, rename2, tmpfile. */
const CHANGES_NAMES = new Set([6, 8, 9, 10, 11, 12, 13, 35, 45, 51]);

// INIT flags (fuse_init_in/out.flags).
const FUSE_ASYNC_READ = 1 << 0;
const FUSE_BIG_WRITES = 1 << 5;
const FUSE_ASYNC_DIO = 1 << 15;
const FUSE_PARALLEL_DIROPS = 1 << 18;
const FUSE_MAX_PAGES = 1 << 22;
const FUSE_INIT_EXT = 1 << 30;
/** FUSE_DIRECT_IO_ALLOW_MMAP is bit 36: bit 4 of flags2 (protocol 7.39). */
const FUSE_DIRECT_IO_ALLOW_MMAP_HI = 1 << 4;

const FOPEN_DIRECT_IO = 1 << 0;
const FOPEN_KEEP_CACHE = 1 << 1;

// setattr valid bits.
const FATTR_MODE = 1 << 0;
const FATTR_UID = 1 << 1;
const FATTR_GID = 1 << 2;
const FATTR_SIZE = 1 << 3;
const FATTR_ATIME = 1 << 4;
const FATTR_MTIME = 1 << 5;

const FUSE_FSYNC_FDATASYNC = 1 << 0;

// Struct sizes.
const IN_HEADER = 40;
const OUT_HEADER = 16;
const ATTR_SIZE = 88;
const ENTRY_OUT = 40 + ATTR_SIZE;
const ATTR_OUT = 16 + ATTR_SIZE;
const INIT_OUT = 64;
const WRITE_IN = 40;

const KERNEL_MAJOR = 7;
const OUR_MINOR = 38;
const PAGE = 4096;
/** The kernel's default fs.fuse.max_pages_limit: 256 pages, 1 MiB requests. */
const MAX_PAGES = 256;
export const DEFAULT_MAX_WRITE = MAX_PAGES * PAGE;
/** How long the kernel may trust attributes and names we return. */
const ATTR_VALID_S = 1;

/** How long spin() looks for the next request (TSMOUNT_FUSE_SPIN_US, 0: never). */
const SPIN_NS = BigInt(Math.round(Number(process.env.TSMOUNT_FUSE_SPIN_US ?? 50) * 1000));
const SPIN_CHAIN = 64;

/** Reads larger than this reply from pooled buffers; at most this many are kept. */
const REPLY_POOL_MIN = 32 * 1024;
const REPLY_POOL_KEEP = 8;

const DT_DIR = 4;
const DT_REG = 8;

class FuseError extends TsmountError {
  constructor(message: string, override readonly errno: number) {
    super(message);
  }
}

/** What `-o` options and the server's own choices come to for this backend. */
interface DevConfig {
  flags: number;
  kernelOptions: string[];
  maxWrite: number;
  maxReadahead: number;
  /**
   * How opens use the kernel's page cache: 'auto' keeps it for files that cannot
   * change (read-only mounts, snapshots) and bypasses it for writable ones; 'kernel'
   * and 'direct' force one way for every file (-o kernel_cache, -o direct_io).
   */
  pageCache: 'auto' | 'kernel' | 'direct';
  /**
   * allow_root: the kernel lets everyone through (allow_other) and the session turns
   * away requests from users other than the mounting user and root, as libfuse does.
   */
  denyOthers: boolean;
}

/**
 * Requests allow_root does not check (libfuse's list): they act on a file already open
 * (and may come from the kernel on another user's behalf), or carry no reply.
 */
const UNCHECKED_OPS = new Set<number>([OP.INIT, OP.READ, OP.WRITE, OP.FSYNC, OP.RELEASE, OP.READDIR, OP.FSYNCDIR, OP.RELEASEDIR, OP.FORGET, OP.BATCH_FORGET, OP.INTERRUPT, OP.DESTROY]);

/** Options libfuse users know; each maps to a kernel option, a flag, or our own setting. */
function configure(opts: MountOptions): DevConfig {
  const cfg: DevConfig = {
    flags: MS_NOSUID | MS_NODEV | (opts.readOnly ? MS_RDONLY : 0),
    kernelOptions: ['default_permissions', ...(opts.allowOther || opts.allowRoot ? ['allow_other'] : [])],
    maxWrite: DEFAULT_MAX_WRITE,
    maxReadahead: DEFAULT_MAX_WRITE,
    pageCache: 'auto',
    denyOthers: !opts.allowOther && !!opts.allowRoot,
  };
  const flagOpts: Record<string, number> = { ro: MS_RDONLY, noexec: MS_NOEXEC, sync: MS_SYNCHRONOUS, dirsync: MS_DIRSYNC, noatime: MS_NOATIME };
  const clearOpts: Record<string, number> = { rw: MS_RDONLY, exec: MS_NOEXEC, atime: MS_NOATIME };
  const size = (o: string, v: string | undefined, min: number, max: number): number => {
    const n = Number(v);
    if (v === undefined || !/^\d+$/.test(v) || n < min || n > max) throw new FuseError(`-o ${o}: needs a number from ${min} to ${max}`, E.EINVAL);
    return n;
  };
  for (const opt of opts.extra) {
    for (const o of opt.split(',').filter(Boolean)) {
      const [key, value] = o.split('=', 2) as [string, string | undefined];
      if (key in flagOpts) cfg.flags |= flagOpts[key]!;
      else if (key in clearOpts) cfg.flags &= ~clearOpts[key]!;
      else if (key === 'allow_other' || key === 'default_permissions') {
        if (!cfg.kernelOptions.includes(key)) cfg.kernelOptions.push(key);
      } else if (key === 'max_read') cfg.kernelOptions.push(`max_read=${size(key, value, PAGE, 1 << 30)}`);
      else if (key === 'max_write') cfg.maxWrite = size(key, value, PAGE, DEFAULT_MAX_WRITE);
      else if (key === 'max_readahead') cfg.maxReadahead = size(key, value, 0, 1 << 30);
      else if (key === 'kernel_cache') cfg.pageCache = 'kernel';
      else if (key === 'direct_io') cfg.pageCache = 'direct';
      // libfuse 2 options that are how this backend always works, or mean nothing here.
      else if (['big_writes', 'async_read', 'nonempty', 'auto_cache', 'hard_remove', 'use_ino'].includes(key)) continue;
      else throw new FuseError(`-o ${o}: not a mount option tsmount knows`, E.EINVAL);
    }
  }
  return cfg;
}

/** The pipe binding lets a non-socket descriptor live in the event loop (epoll). */
interface PipeHandle {
  open(fd: number): number;
}
interface PipeWrap {
  Pipe: new (type: number) => PipeHandle;
  constants: { SOCKET: number };
}
function pipeWrap(): PipeWrap {
  const binding = (process as unknown as { binding(name: string): unknown }).binding;
  return binding('pipe_wrap') as PipeWrap;
}

/** Whether this backend can serve here: root (mount(2)), /dev/fuse, Node's pipe binding. */
export function available(): boolean {
  try {
    if (typeof pipeWrap().Pipe !== 'function') return false;
    if (process.getuid?.() !== 0) return fusermountHelper() !== undefined;
    fs.accessSync('/dev/fuse', fs.constants.R_OK | fs.constants.W_OK);
    return true;
  } catch {
    return false;
  }
}

/**
 * Without root: fusermount3 opens /dev/fuse, mounts, and hands the descriptor back over
 * a Unix socket (its _FUSE_COMMFD protocol, as libfuse uses it). It adds fd, rootmode,
 * user_id and group_id itself, and always nosuid,nodev.
 */
async function mountWithFusermount(helper: string, mountpoint: string, fsname: string, cfg: DevConfig): Promise<number> {
  const names: [number, string][] = [[MS_RDONLY, 'ro'], [MS_NOEXEC, 'noexec'], [MS_SYNCHRONOUS, 'sync'], [MS_DIRSYNC, 'dirsync'], [MS_NOATIME, 'noatime']];
  // fusermount3 splits -o at commas and takes `\,` as a comma in a value.
  const options = [`fsname=${fsname.replace(/[\\,]/g, '\\$&')}`, 'subtype=tsmount', ...cfg.kernelOptions, ...names.filter(([f]) => cfg.flags & f).map(([, n]) => n)];
  const [mine, theirs] = socketPair();
  try {
    const child = spawn(helper, ['-o', options.join(','), '--', mountpoint], {
      stdio: ['ignore', 'ignore', 'pipe', theirs],
      env: { ...process.env, _FUSE_COMMFD: '3' },
    });
    let stderr = '';
    child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
    const code = await new Promise<number | null>((resolve, reject) => {
      child.on('error', reject);
      child.on('close', (c) => resolve(c));
    });
    const fd = receiveFd(mine);
    if (code !== 0 || fd === undefined) {
      if (fd !== undefined) fs.closeSync(fd);
      const why = stderr.trim().split('\n').pop()?.replace(/^fusermount3: /, '');
      throw new FuseError(`fusermount3 failed${why ? `: ${why}` : ''}`, E.EPERM);
    }
    return fd;
  } finally {
    fs.closeSync(mine);
    fs.closeSync(theirs);
  }
}

function u64(b: Buffer, o: number): number {
  return b.readUInt32LE(o) + b.readUInt32LE(o + 4) * 0x100000000;
}
function putU64(b: Buffer, o: number, v: number): void {
  b.writeUInt32LE(v >>> 0, o);
  b.writeUInt32LE(Math.floor(v / 0x100000000) >>> 0, o + 4);
}

function putAttr(b: Buffer, o: number, ino: number, st: Stat): void {
  b.fill(0, o, o + ATTR_SIZE);
  putU64(b, o, ino);
  putU64(b, o + 8, st.size);
  putU64(b, o + 16, st.blocks ?? Math.ceil(st.size / 512));
  const times = [st.atime, st.mtime, st.ctime];
  times.forEach((t, i) => {
    const ms = t.getTime();
    putU64(b, o + 24 + i * 8, Math.max(0, Math.floor(ms / 1000)));
    b.writeUInt32LE(Math.max(0, (ms % 1000) * 1e6), o + 48 + i * 4);
  });
  b.writeUInt32LE(st.mode >>> 0, o + 60);
  b.writeUInt32LE(st.nlink, o + 64);
  b.writeUInt32LE(st.uid, o + 68);
  b.writeUInt32LE(st.gid, o + 72);
  b.writeUInt32LE(st.blksize ?? PAGE, o + 80);
}

/** A reply buffer with room for the header and `body` bytes. */
function replyBuf(body: number): Buffer {
  const b = Buffer.allocUnsafe(OUT_HEADER + body);
  b.fill(0, 0, OUT_HEADER + Math.min(body, 256));
  return b;
}

class Session implements FuseMount {
  private closedFlag = false;
  private readonly socket: net.Socket;
  private readonly paths = new Map<number, string>([[1, '/']]);
  private readonly ids = new Map<string, number>([['/', 1]]);
  private nextId = 2;
  /** The mounting user (allow_root lets this user and root through). */
  private readonly owner = process.getuid?.() ?? 0;
  private initDone!: (err?: Error) => void;
  readonly initialized: Promise<void>;
  private endDone!: () => void;
  readonly closed: Promise<void>;
  /** Requests being served. */
  inFlight = 0;
  /** Requests served in a row by spin() without the event loop running. */
  private spinChain = 0;
  private spinBuffer: Buffer | undefined;
  /** Reply buffers of OUT_HEADER + maxWrite bytes, for large reads. */
  private readonly replyPool: Buffer[] = [];
  /** Where the next request is read; undefined once a write took it. */
  private current: Buffer | undefined;
  /** Request buffers given back by finished writes. */
  private readonly requestPool: Buffer[] = [];

  private requestBuffer(): Buffer {
    this.current ??= this.requestPool.pop() ?? Buffer.allocUnsafe(this.cfg.maxWrite + PAGE);
    return this.current;
  }

  constructor(readonly mountpoint: string, private readonly fd: number, private readonly ops: FsOps, private readonly cfg: DevConfig) {
    this.initialized = new Promise((resolve, reject) => (this.initDone = (err) => (err ? reject(err) : resolve())));
    this.closed = new Promise((resolve) => (this.endDone = resolve));
    const { Pipe, constants } = pipeWrap();
    const handle = new Pipe(constants.SOCKET);
    const r = handle.open(fd);
    if (r !== 0) throw new FuseError(`/dev/fuse: cannot watch the descriptor (${r})`, E.EIO);
    // Requests are read into one buffer, reused while each request is parsed before
    // the callback returns. A write's data stays where the kernel put it: its buffer
    // is taken by the write, and the next read gets another one from the pool (the
    // function form of onread.buffer is asked for a buffer after every read).
    this.socket = new net.Socket({
      handle: handle as never,
      readable: true,
      writable: false,
      onread: {
        buffer: () => this.requestBuffer(),
        callback: (n: number, buf: Uint8Array) => {
          this.spinChain = 0;
          return this.dispatch(buf as Buffer, n);
        },
      },
    } as net.SocketConstructorOpts);
    this.socket.on('error', (err: NodeJS.ErrnoException) => {
      // ENODEV: unmounted (or the connection aborted): the normal end of a session.
      if (err.code !== 'ENODEV') debug('/dev/fuse: %s', err.message);
      this.end();
    });
    this.socket.on('end', () => this.end());
    this.socket.on('close', () => this.end());
  }

  private end(): void {
    if (this.closedFlag) return;
    this.closedFlag = true;
    this.initDone(new FuseError(`${this.mountpoint}: the FUSE session ended before it started`, E.ENODEV));
    this.socket.destroy();
    this.endDone();
  }

  close(): void {
    this.end();
  }

  private send(b: Buffer, unique: number, error = 0, len = b.length): void {
    if (this.closedFlag) return;
    b.writeUInt32LE(len, 0);
    b.writeInt32LE(-error, 4);
    putU64(b, 8, unique);
    try {
      fs.writeSync(this.fd, b, 0, len);
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      // ENOENT: the request was interrupted and the kernel no longer waits for it.
      if (code !== 'ENOENT' && code !== 'ENODEV') debug('reply to %d failed: %s', unique, messageOf(err));
    }
  }

  private sendError(unique: number, errno: number): void {
    this.send(Buffer.alloc(OUT_HEADER), unique, errno);
  }

  private pathOf(nodeid: number): string {
    const p = this.paths.get(nodeid);
    if (p === undefined) throw new FuseError(`no node ${nodeid}`, E.ENOENT);
    return p;
  }

  private idOf(path: string): number {
    let id = this.ids.get(path);
    if (id === undefined) {
      id = this.nextId++;
      this.ids.set(path, id);
      this.paths.set(id, path);
    }
    return id;
  }

  /** Parse one request out of the shared buffer, synchronously; serve it asynchronously. */
  private dispatch(buf: Buffer, n: number): boolean {
    if (n < IN_HEADER) return true;
    const len = buf.readUInt32LE(0);
    const opcode = buf.readUInt32LE(4);
    const unique = u64(buf, 8);
    const nodeid = u64(buf, 16);
    if (len !== n) {
      this.sendError(unique, E.EIO);
      return true;
    }
    const body = buf.subarray(IN_HEADER, n);
    if (this.cfg.denyOthers && !UNCHECKED_OPS.has(opcode)) {
      const uid = buf.readUInt32LE(24);
      if (uid !== 0 && uid !== this.owner) {
        this.sendError(unique, E.EACCES);
        return true;
      }
    }
    // DEBUG=tsmount:fuse: every request; the check keeps the hot path free when off.
    if (debug.enabled) {
      const io = opcode === OP.READ || opcode === OP.WRITE ? ` at ${u64(body, 8)}+${body.readUInt32LE(16)}` : '';
      debug('request %d: %s node %d%s', unique, OP_NAMES.get(opcode) ?? `opcode ${opcode}`, nodeid, io);
    }
    switch (opcode) {
      case OP.FORGET:
      case OP.BATCH_FORGET:
      case OP.INTERRUPT:
        // No reply. Node ids are fixed for the life of the mount; interrupts are
        // answered by the request finishing.
        return true;
      case OP.INIT:
        this.init(body, unique);
        return true;
      case OP.READ:
        this.serve(unique, () => this.read(nodeid, body, unique));
        return true;
      case OP.WRITE: {
        const fh = u64(body, 0);
        const offset = u64(body, 8);
        const size = body.readUInt32LE(16);
        const data = body.subarray(WRITE_IN, WRITE_IN + size);
        if (size < REPLY_POOL_MIN || buf !== this.current) {
          // Small: a copy is cheaper than a buffer of a megabyte.
          this.serve(unique, () => this.write(nodeid, fh, offset, Buffer.from(data), unique));
          return true;
        }
        // Large: the write keeps the request buffer; it comes back when the write is done.
        this.current = undefined;
        this.serve(unique, () =>
          this.write(nodeid, fh, offset, data, unique).finally(() => {
            if (this.requestPool.length < REPLY_POOL_KEEP) this.requestPool.push(buf);
          }),
        );
        return true;
      }
      default: {
        const copy = Buffer.from(body);
        this.serve(unique, () => this.other(opcode, nodeid, copy, unique));
        return true;
      }
    }
  }

  private serve(unique: number, fn: () => Promise<void>): void {
    this.inFlight++;
    fn().then(
      () => this.finished(),
      (err: unknown) => {
        const errno = errnoOf(err);
        if (errno !== E.ENOENT && errno !== E.ENOSYS) debug('request %d failed: %s', unique, messageOf(err));
        this.sendError(unique, errno);
        this.finished();
      },
    );
  }

  private finished(): void {
    if (--this.inFlight === 0 && SPIN_NS > 0 && !this.closedFlag) this.spin();
  }

  /**
   * The last reply is out and nothing else is being served: look for the next request
   * for a few microseconds before going back to epoll. A reader that waits on each
   * reply (psync, dd) sends its next request within that time, and this thread is then
   * still running when it comes: no wake-up of an idle CPU, which on these VMs cost
   * more than serving a 4 KiB request. After SPIN_CHAIN requests in a row the event
   * loop gets its turn (timers, the thread pool) before spinning again.
   */
  private spin(): void {
    if (this.spinChain >= SPIN_CHAIN) {
      this.spinChain = 0;
      return;
    }
    const deadline = process.hrtime.bigint() + SPIN_NS;
    // Its own buffer: the event loop's (this.current) may be read into at any time, and
    // dispatch copies a write out of any buffer that is not that one.
    const buf = (this.spinBuffer ??= Buffer.allocUnsafe(this.cfg.maxWrite + PAGE));
    do {
      const n = readNoBlock(this.fd, buf);
      if (n > 0) {
        this.spinChain++;
        this.dispatch(buf, n);
        return;
      }
      // ENODEV and the like: the event loop's read sees them too and ends the session.
      if (n !== -E.EAGAIN) return;
    } while (process.hrtime.bigint() < deadline);
    this.spinChain = 0;
  }

  private init(body: Buffer, unique: number): void {
    const major = body.readUInt32LE(0);
    const minor = body.readUInt32LE(4);
    const kernelReadahead = body.readUInt32LE(8);
    const kernelFlags = body.readUInt32LE(12);
    const out = replyBuf(INIT_OUT);
    out.fill(0);
    if (major !== KERNEL_MAJOR) {
      // A newer major: answer with ours and wait for the kernel to offer it again.
      out.writeUInt32LE(KERNEL_MAJOR, OUT_HEADER);
      out.writeUInt32LE(OUR_MINOR, OUT_HEADER + 4);
      if (major < KERNEL_MAJOR) {
        this.sendError(unique, E.EPROTO);
        this.initDone(new FuseError(`the kernel speaks FUSE ${major}.${minor}, tsmount needs 7.x`, E.EPROTO));
        return;
      }
      this.send(out, unique, 0, OUT_HEADER + 8);
      return;
    }
    const want = FUSE_ASYNC_READ | FUSE_BIG_WRITES | FUSE_ASYNC_DIO | FUSE_PARALLEL_DIROPS | FUSE_MAX_PAGES;
    const flags = (want & kernelFlags) | (kernelFlags & FUSE_INIT_EXT);
    // Shared mmap of a direct_io file (FUSE_DIRECT_IO_ALLOW_MMAP, Linux 6.6+): without
    // it, mmap of a writable flat file would fail with ENODEV.
    const kernelFlags2 = minor >= 36 && kernelFlags & FUSE_INIT_EXT ? body.readUInt32LE(16) : 0;
    const flags2 = kernelFlags2 & FUSE_DIRECT_IO_ALLOW_MMAP_HI;
    const o = OUT_HEADER;
    out.writeUInt32LE(KERNEL_MAJOR, o);
    out.writeUInt32LE(Math.min(minor, OUR_MINOR), o + 4);
    out.writeUInt32LE(Math.min(kernelReadahead, this.cfg.maxReadahead), o + 8);
    out.writeUInt32LE(flags, o + 12);
    out.writeUInt16LE(16, o + 16); // max_background: readahead and other async requests in flight
    out.writeUInt16LE(12, o + 18); // congestion_threshold
    // Without FUSE_MAX_PAGES (kernels before 4.20) the kernel caps requests at 32 pages.
    const maxWrite = flags & FUSE_MAX_PAGES ? this.cfg.maxWrite : Math.min(this.cfg.maxWrite, 32 * PAGE);
    out.writeUInt32LE(maxWrite, o + 20);
    out.writeUInt32LE(1, o + 24); // time_gran: nanoseconds
    out.writeUInt16LE(Math.ceil(maxWrite / PAGE), o + 28);
    out.writeUInt32LE(flags2, o + 32);
    this.send(out, unique, 0, minor < 23 ? OUT_HEADER + 24 : OUT_HEADER + INIT_OUT);
    debug('FUSE %d.%d, flags %s/%s, max_write %d', major, minor, flags.toString(16), flags2.toString(16), maxWrite);
    this.initDone();
  }

  private async read(nodeid: number, body: Buffer, unique: number): Promise<void> {
    const fh = u64(body, 0);
    const offset = u64(body, 8);
    const size = body.readUInt32LE(16);
    const path = this.pathOf(nodeid);
    // The data goes straight into the reply: no copy. Large replies reuse buffers, as
    // fresh megabyte buffers for every readahead request kept the GC busy (18 % of the
    // JS thread reading 1 GiB). A buffer goes back only after a read that succeeded:
    // then nothing below still writes into it.
    const big = size > REPLY_POOL_MIN && size <= this.cfg.maxWrite;
    const out = big ? (this.replyPool.pop() ?? Buffer.allocUnsafe(OUT_HEADER + this.cfg.maxWrite)) : Buffer.allocUnsafe(OUT_HEADER + size);
    const got = await this.ops.read(path, fh, out.subarray(OUT_HEADER, OUT_HEADER + size), size, offset);
    this.send(out, unique, 0, OUT_HEADER + got);
    if (big && this.replyPool.length < REPLY_POOL_KEEP) this.replyPool.push(out);
  }

  private async write(nodeid: number, fh: number, offset: number, data: Buffer, unique: number): Promise<void> {
    const path = this.pathOf(nodeid);
    const n = await this.ops.write(path, fh, data, data.length, offset);
    const out = replyBuf(8);
    out.writeUInt32LE(n, OUT_HEADER);
    this.send(out, unique);
  }

  private async attrReply(unique: number, nodeid: number, path: string): Promise<void> {
    const st = await this.ops.getattr(path);
    const out = replyBuf(ATTR_OUT);
    putU64(out, OUT_HEADER, ATTR_VALID_S);
    out.writeUInt32LE(0, OUT_HEADER + 8);
    out.writeUInt32LE(0, OUT_HEADER + 12);
    putAttr(out, OUT_HEADER + 16, nodeid, st);
    this.send(out, unique);
  }

  private async other(opcode: number, nodeid: number, body: Buffer, unique: number): Promise<void> {
    switch (opcode) {
      case OP.LOOKUP: {
        const parent = this.pathOf(nodeid);
        const st0 = await this.ops.getattr(parent);
        if ((st0.mode & 0o170000) !== 0o040000) throw new FuseError('not a directory', E.ENOTDIR);
        const nul = body.indexOf(0);
        const name = body.toString('utf8', 0, nul < 0 ? body.length : nul);
        const path = parent === '/' ? `/${name}` : `${parent}/${name}`;
        const st = await this.ops.getattr(path);
        const id = this.idOf(path);
        const out = replyBuf(ENTRY_OUT);
        putU64(out, OUT_HEADER, id);
        putU64(out, OUT_HEADER + 8, 0); // generation
        putU64(out, OUT_HEADER + 16, ATTR_VALID_S); // entry_valid
        putU64(out, OUT_HEADER + 24, ATTR_VALID_S); // attr_valid
        out.writeUInt32LE(0, OUT_HEADER + 32);
        out.writeUInt32LE(0, OUT_HEADER + 36);
        putAttr(out, OUT_HEADER + 40, id, st);
        this.send(out, unique);
        return;
      }
      case OP.GETATTR:
        return this.attrReply(unique, nodeid, this.pathOf(nodeid));
      case OP.SETATTR: {
        const path = this.pathOf(nodeid);
        const valid = body.readUInt32LE(0);
        if (valid & FATTR_SIZE) await this.ops.truncate(path, u64(body, 16));
        if (valid & FATTR_MODE) await this.ops.chmod(path, body.readUInt32LE(68));
        if (valid & (FATTR_UID | FATTR_GID)) await this.ops.chown(path, valid & FATTR_UID ? body.readUInt32LE(76) : -1, valid & FATTR_GID ? body.readUInt32LE(80) : -1);
        if (valid & (FATTR_ATIME | FATTR_MTIME)) await this.ops.utimens(path);
        return this.attrReply(unique, nodeid, path);
      }
      case OP.OPEN: {
        const path = this.pathOf(nodeid);
        const fh = await this.ops.open(path, body.readUInt32LE(0));
        const st = await this.ops.getattr(path);
        const out = replyBuf(16);
        putU64(out, OUT_HEADER, fh);
        // Every file of a writable mount counts as writable: its mode does not tell (root
        // writes a 0444 file, chmod changes it), and only snapshot files are not.
        out.writeUInt32LE(this.openFlags((this.cfg.flags & MS_RDONLY) === 0, st.size), OUT_HEADER + 8);
        this.send(out, unique);
        return;
      }
      case OP.RELEASE:
        await this.ops.release(this.pathOf(nodeid), u64(body, 0));
        this.send(replyBuf(0), unique);
        return;
      case OP.FLUSH:
        await this.ops.flush(this.pathOf(nodeid), u64(body, 0));
        this.send(replyBuf(0), unique);
        return;
      case OP.FSYNC:
        await this.ops.fsync(this.pathOf(nodeid), (body.readUInt32LE(8) & FUSE_FSYNC_FDATASYNC) !== 0, u64(body, 0));
        this.send(replyBuf(0), unique);
        return;
      case OP.FALLOCATE: {
        if (!this.ops.fallocate) throw new FuseError('fallocate', E.EOPNOTSUPP);
        await this.ops.fallocate(this.pathOf(nodeid), body.readUInt32LE(24), u64(body, 8), u64(body, 16));
        this.send(replyBuf(0), unique);
        return;
      }
      case OP.STATFS: {
        const s = await this.ops.statfs(this.pathOf(nodeid));
        const out = replyBuf(80);
        out.fill(0, OUT_HEADER);
        const o = OUT_HEADER;
        putU64(out, o, s.blocks ?? 0);
        putU64(out, o + 8, s.bfree ?? 0);
        putU64(out, o + 16, s.bavail ?? 0);
        putU64(out, o + 24, s.files ?? 0);
        putU64(out, o + 32, s.ffree ?? 0);
        out.writeUInt32LE(s.bsize ?? PAGE, o + 40);
        out.writeUInt32LE(s.namemax ?? 255, o + 44);
        out.writeUInt32LE(s.frsize ?? PAGE, o + 48);
        this.send(out, unique);
        return;
      }
      case OP.OPENDIR: {
        const st = await this.ops.getattr(this.pathOf(nodeid));
        if ((st.mode & 0o170000) !== 0o040000) throw new FuseError('not a directory', E.ENOTDIR);
        this.send(replyBuf(16), unique);
        return;
      }
      case OP.READDIR:
        return this.readdir(nodeid, body, unique);
      case OP.RELEASEDIR:
      case OP.FSYNCDIR:
      case OP.ACCESS:
        this.send(replyBuf(0), unique);
        return;
      case OP.DESTROY:
        this.send(replyBuf(0), unique);
        return;
      default:
        // The set of files is fixed: no creating, linking, renaming or removing.
        if (CHANGES_NAMES.has(opcode)) throw new FuseError(`opcode ${opcode}: the files of a tsmount mount are fixed`, E.EPERM);
        // Everything else (xattrs, statx, ioctl, lseek, ...): ENOSYS tells the kernel
        // not to ask again where it can, and it falls back to what it does itself.
        throw new FuseError(`opcode ${opcode}`, E.ENOSYS);
    }
  }

  /**
   * A file that cannot change keeps its pages across opens (FOPEN_KEEP_CACHE): reads
   * get the kernel's readahead and re-reads cost nothing. A writable file bypasses the
   * page cache (FOPEN_DIRECT_IO, as qemu-storage-daemon's export does): every open of
   * it alike, so no reader holds pages a writer made stale. A write is then one copy
   * from the writer's buffer into the request, not a copy into page cache pages first:
   * measured 1.6-2x on 1 MiB sequential writes. Readers of a writable file get
   * requests as large as their read(2) calls instead of readahead.
   *
   * A read-only file larger than an eighth of the memory bypasses it too: reading it
   * through the page cache holds every byte twice (the image's pages and the flat
   * file's), and a scan of a 4 GiB image then evicted the image's own pages mid-read
   * (0.4-1.4 GB/s through the page cache against 2.6-3.7 GB/s direct, same run).
   */
  private openFlags(writable: boolean, size: number): number {
    const direct = this.cfg.pageCache === 'direct' || (this.cfg.pageCache === 'auto' && (writable || size > os.totalmem() / 8));
    return direct ? FOPEN_DIRECT_IO : FOPEN_KEEP_CACHE;
  }

  private async readdir(nodeid: number, body: Buffer, unique: number): Promise<void> {
    const path = this.pathOf(nodeid);
    const offset = u64(body, 8);
    const size = body.readUInt32LE(16);
    const names = await this.ops.readdir(path);
    const out = Buffer.alloc(OUT_HEADER + size);
    let pos = OUT_HEADER;
    for (let i = offset; i < names.length; i++) {
      const name = Buffer.from(names[i]!);
      const rec = 24 + name.length;
      const padded = (rec + 7) & ~7;
      if (pos + padded > out.length) break;
      const isDir = names[i] === '.' || names[i] === '..';
      putU64(out, pos, isDir ? 1 : this.idOf(path === '/' ? `/${names[i]}` : `${path}/${names[i]}`));
      putU64(out, pos + 8, i + 1); // the offset of the next entry
      out.writeUInt32LE(name.length, pos + 16);
      out.writeUInt32LE(isDir ? DT_DIR : DT_REG, pos + 20);
      name.copy(out, pos + 24);
      pos += padded;
    }
    this.send(out, unique, 0, pos);
  }
}

/** Mount `mountpoint` and serve it from this process's event loop. */
export async function mountDev(mountpoint: string, ops: FsOps, opts: MountOptions): Promise<FuseMount> {
  const cfg = configure(opts);
  const st = fs.statSync(mountpoint);
  let fd: number;
  let session: Session;
  // TSMOUNT_FUSE=fusermount takes the unprivileged path as root too (tests).
  const helper = process.getuid?.() === 0 && process.env.TSMOUNT_FUSE !== 'fusermount' ? undefined : fusermountHelper();
  if (helper) {
    try {
      fd = await mountWithFusermount(helper, mountpoint, opts.fsname, cfg);
    } catch (err) {
      throw new Error(`${mountpoint}: mount failed: ${messageOf(err)}`);
    }
  } else try {
    fd = fs.openSync('/dev/fuse', fs.constants.O_RDWR); // close-on-exec, as Node opens everything
    const data = [
      `fd=${fd}`,
      `rootmode=${(st.mode & 0o170000).toString(8)}`,
      `user_id=${process.getuid?.() ?? 0}`,
      `group_id=${process.getgid?.() ?? 0}`,
      ...cfg.kernelOptions,
    ].join(',');
    try {
      sysMount(opts.fsname, mountpoint, 'fuse.tsmount', cfg.flags, data);
    } catch (err) {
      fs.closeSync(fd);
      throw err;
    }
  } catch (err) {
    throw new Error(`${mountpoint}: mount failed: ${messageOf(err)}`);
  }
  const undo = (): void => {
    try {
      unmountFuse(mountpoint, true);
    } catch {
      /* gone already */
    }
  };
  try {
    session = new Session(mountpoint, fd, ops, cfg);
  } catch (err) {
    undo();
    fs.closeSync(fd);
    throw err;
  }
  let timer: NodeJS.Timeout | undefined;
  try {
    await Promise.race([
      session.initialized,
      new Promise((_, reject) => (timer = setTimeout(() => reject(new Error(`${mountpoint}: the kernel did not start the FUSE session`)), 10_000))),
    ]);
  } catch (err) {
    undo();
    session.close();
    throw err;
  } finally {
    clearTimeout(timer);
  }
  return session;
}

