// One FUSE session on a /dev/fuse descriptor: the transport. /dev/fuse is a
// non-blocking descriptor in Node's own event loop (epoll, like qemu-storage-daemon's
// export): a request is read on the JS thread, its handler runs there, and the reply is
// one write(2) from the same thread. Several requests are in flight at once because
// handlers are asynchronous; the kernel matches replies by their `unique`. Once INIT
// is answered, worker threads on cloned descriptors (fuse-worker.ts) take over the
// reading: they answer READs the read map covers themselves and hand the rest here,
// and each such reply goes back to the descriptor its request came from.
// fuse-codec.ts knows the bytes; this file knows the buffers, the event loop, which
// operation answers which request, and the page-cache policy of an open.
//
// The server must never make a synchronous file system call on its own mount: the
// only thread that could answer the kernel would be the one waiting.
import fs from 'node:fs';
import net from 'node:net';
import os, { constants as osc } from 'node:os';
import createDebug from '../drivers/util/debug.js';
import { ErrnoError, errnoOf, messageOf } from '../drivers/errors.js';
import { Worker } from 'node:worker_threads';
import { closeFd, fuseBackingClose, fuseBackingOpen, fuseDevClone, readNoBlock, SEEK_DATA, SEEK_HOLE } from '../drivers/util/sys.js';
import { INIT_OVER_IO_URING_HI, UringQueues, probe as uringProbe, refuse as uringRefuse, uringWanted } from './fuse-uring.js';
import { CTL_HANDED, CTL_MAIL, CTL_PARK, CTL_SERVED, CTL_STOP, CTL_WORDS, SLOTS, slotSize, type WorkerInit, type WorkerMessage } from './fuse-worker.js';
import {
  AttrOut, DT_DIR, DT_REG, EntryOut, FOPEN_DIRECT_IO, FOPEN_KEEP_CACHE, FOPEN_PASSTHROUGH, Fattr, InHeader, Init, InitOut, LseekOut, OpenOut, OutHeader, Op, ReadIn, StatfsOut, UNCHECKED_BY_ALLOW_ROOT, WriteIn, WriteOut,
  decodeHeader, decodeIo, decodeRequest, encodeAttrOut, encodeDirents, encodeEntryOut, encodeInitOut, encodeLseekOut,
  encodeOpenOut, encodeOutHeader, encodeStatfsOut, encodeWriteOut, newHeader, newIoRequest, opName, replyBuffer, u64,
  type DirEntryOut, type Request,
} from './fuse-codec.js';
import { ROOT_ID, type FsOps, type FuseMount, type TransportCounters } from './fuse.js';
import { koffiWorkerData } from '../drivers/util/koffi-load.js';

const debug = createDebug('tsmount:fuse');
const E = osc.errno;

export const KERNEL_MAJOR = 7;
const OUR_MINOR = 38;
export const PAGE = 4096;
/** The kernel's default fs.fuse.max_pages_limit: 256 pages, 1 MiB requests. */
const MAX_PAGES = 256;
export const DEFAULT_MAX_WRITE = MAX_PAGES * PAGE;
/** How long the kernel may trust attributes and names we return. */
const ATTR_VALID_S = 1;

/** How long spin() looks for the next request at first (TSMOUNT_FUSE_SPIN_US, 0: never). */
const SPIN_NS = BigInt(Math.round(Number(process.env.TSMOUNT_FUSE_SPIN_US ?? 50) * 1000));
/**
 * TSMOUNT_FUSE_SPIN_ADAPT=1: the window adapts (spin()) between 0 and this. Off by
 * default: on the loaded 2-core machine it gained on 4 random readers and lost about
 * 10 % on compressed sequential reads (scripts/BENCHMARKS.md, issue 21).
 */
const SPIN_MAX_NS = SPIN_NS * 4n;
/**
 * The io_uring queue threads' spin (TSMOUNT_FUSE_URING_SPIN_US, 50 us by default), and
 * each queue's thread pinned to the CPU it serves (TSMOUNT_FUSE_URING_PIN=0: not). The
 * kernel puts a request on the queue of the CPU its caller runs on. Unpinned, a queue
 * thread spinning after its reply often sat on the reader's own CPU and kept it from
 * issuing the next request (one random reader 13-14k IOPS with the spin, 27-28k without:
 * session 3). Pinned (libfuse pins its queues too), the spin pays: one random reader
 * 49-53k IOPS against 15-16k unpinned without spin, four readers and dd unchanged or
 * better (scripts/BENCHMARKS.md, session 25). An unpinned queue (its CPU outside the
 * process's affinity) does not spin.
 */
const URING_SPIN_NS = Math.round(Number(process.env.TSMOUNT_FUSE_URING_SPIN_US ?? 50) * 1000);
const URING_PIN = process.env.TSMOUNT_FUSE_URING_PIN !== '0';
/**
 * A pinned queue's spin gives the CPU away at each turn (sched_yield; TSMOUNT_FUSE_URING_YIELD=0:
 * not): the reader it waits for runs on that CPU. Four random readers 243k -> 318-355k
 * IOPS, one unchanged (rows 2ub/2u, session 25). The /dev/fuse workers and the JS
 * thread, unpinned, gained nothing from it (row 2a 38.6-40.5k against 44.0k without,
 * 2b 216-237k against 231k): their spins do not yield.
 */
const URING_YIELD = process.env.TSMOUNT_FUSE_URING_YIELD !== '0';
const SPIN_ADAPT = process.env.TSMOUNT_FUSE_SPIN_ADAPT === '1';
const SPIN_CHAIN = 64;
/** With workers, the JS thread spins on its own descriptor after a WRITE it served (spinForWrites); TSMOUNT_FUSE_JS_SPIN=0: never. */
const JS_SPIN = process.env.TSMOUNT_FUSE_JS_SPIN !== '0';
const SPIN_BACKOFF = 256;
/**
 * With workers: after this many WRITEs in a row came to the JS thread (handed over, or
 * read by its spin), it parks the workers and reads its own descriptor, as without
 * workers, until a request of another kind comes (writerMode). TSMOUNT_FUSE_PARK=0: never.
 */
const PARK_AFTER = 16;
/**
 * Parked, the workers are let go again after this many WRITEs all the same: a writer
 * that went on from allocating into clusters it may overwrite in place is theirs to serve
 * (the next streak parks them again if not; that costs an allocating writer PARK_AFTER
 * hand-overs per PARK_SPAN writes).
 */
const PARK_SPAN = 256;
const PARK = process.env.TSMOUNT_FUSE_PARK !== '0';
/**
 * Only after WRITEs up to this size (request bytes): a writer of 1 MiB blocks takes longer
 * than the spin to send its next one (dd reads its source meanwhile), and the spin only
 * took a core from it (allocating 1 MiB writes ~8 % slower with it, same loop).
 */
const SPIN_WRITE_MAX = 64 * 1024 + PAGE;
/**
 * WRITEs up to this size that this thread read itself are written around the graph
 * where the read map lets a worker do so (FsOps.writeAround): a synchronous pwrite(2)
 * on this thread, so only small ones (as drivers/protocol/file.ts writes small ones
 * synchronously). TSMOUNT_FUSE_JS_AROUND=0: never (for comparison, scripts/bench/ab.sh).
 */
const AROUND_WRITE_MAX = process.env.TSMOUNT_FUSE_JS_AROUND === '0' ? 0 : 64 * 1024;
const DONE = Promise.resolve();

/**
 * Worker threads serving cloned /dev/fuse descriptors (fuse-worker.ts): TSMOUNT_FUSE_WORKERS,
 * default one per core (at most 4); 0 serves everything on the JS thread as before.
 */
function fuseWorkerCount(): number {
  const env = process.env.TSMOUNT_FUSE_WORKERS;
  if (env !== undefined && env !== '' && Number.isInteger(Number(env))) return Math.max(0, Math.min(16, Number(env)));
  const cores = typeof os.availableParallelism === 'function' ? os.availableParallelism() : os.cpus().length;
  return Math.max(1, Math.min(4, cores));
}

/** How long a worker may take to start (load koffi, answer) before the session gives up on workers. */
const WORKER_START_MS = 10_000;

const WORKER_URL = new URL('./fuse-worker.js', import.meta.url);

/** Resolves when `thread`'s next message is `type`; rejects on another, an error, or WORKER_START_MS. */
function workerSays(thread: Worker, type: WorkerMessage['type']): Promise<void> {
  return new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => {
      void thread.terminate();
      reject(new Error('a worker did not start'));
    }, WORKER_START_MS);
    timer.unref();
    thread.once('message', (m: WorkerMessage) => {
      clearTimeout(timer);
      if (m.type === type) resolve();
      else reject(new Error(`a worker answered ${m.type}`));
    });
    thread.once('error', (err) => {
      clearTimeout(timer);
      reject(err);
    });
  });
}

/** One worker: its thread and its cloned descriptor. */
interface FuseWorker {
  thread: Worker;
  fd: number;
  port: import('node:worker_threads').MessagePort;
  /** The worker's request slots (fuse-worker.ts SLOTS) and their state words (1: being served here); io_uring queues have none. */
  slots?: Buffer[];
  slotState?: Int32Array;
  /** Retired or stopped: its descriptor is closed when its thread exits. */
  stopped?: boolean;
}

/** Reads larger than this reply from pooled buffers; at most this many are kept. */
const REPLY_POOL_MIN = 32 * 1024;
const REPLY_POOL_KEEP = 8;

/** Interrupted requests still running, at most; beyond it the oldest are forgotten. */
const INTERRUPTED_KEEP = 1024;

/**
 * How long an interrupted request may still finish normally before it is answered
 * EINTR (interrupt() says why not at once).
 */
export const INTERRUPT_GRACE_MS = 1000;

/** What the session needs of the mount's configuration (fuse-dev.ts configure()). */
export interface SessionConfig {
  maxWrite: number;
  maxReadahead: number;
  /**
   * How opens use the kernel's page cache: 'auto' keeps it for files that cannot
   * change (read-only mounts, snapshots) and bypasses it for writable ones; 'kernel'
   * and 'direct' force one way for every file (-o kernel_cache, -o direct_io).
   */
  pageCache: 'auto' | 'kernel' | 'direct';
  /**
   * FUSE passthrough (openFlags() says when): 'auto' for files that cannot change,
   * 'on' for writable ones too (-o passthrough), 'off' never (-o nopassthrough).
   */
  passthrough?: 'auto' | 'on' | 'off';
  /** INTERRUPT_GRACE_MS unless given (tests: 0). */
  interruptGraceMs?: number;
  /**
   * allow_root: the kernel lets everyone through (allow_other) and the session turns
   * away requests from users other than the mounting user and root, as libfuse does.
   */
  denyOthers?: boolean;
}

/** The pipe binding lets a non-socket descriptor live in the event loop (epoll). */
interface PipeHandle {
  open(fd: number): number;
}
interface PipeWrap {
  Pipe: new (type: number) => PipeHandle;
  constants: { SOCKET: number };
}
export function pipeWrap(): PipeWrap {
  const binding = (process as unknown as { binding(name: string): unknown }).binding;
  return binding('pipe_wrap') as PipeWrap;
}

export class Session implements FuseMount {
  private closedFlag = false;
  private readonly socket: net.Socket;
  private initDone!: (err?: Error) => void;
  readonly initialized: Promise<void>;
  private endDone!: () => void;
  readonly closed: Promise<void>;
  /** Requests being served. */
  inFlight = 0;
  /** Requests served in a row by spin() without the event loop running. */
  private spinChain = 0;
  private spinBuffer: Buffer | undefined;
  /** The current spin window (ns), and when a spin that found nothing gave up (0n: none since). */
  private spinNs = SPIN_NS;
  /** The request dispatched last was a WRITE of at most SPIN_WRITE_MAX bytes. */
  private lastWrite = false;
  /** WRITEs to serve before spinning after one again (spinForWrites). */
  private spinBackoff = 0;
  /** Requests this thread's spin read from its own descriptor while workers served (transportCounters). */
  private spinTakes = 0;
  /** WRITEs in a row that came to this thread with workers up; whether the workers are parked (writerMode), and how often they were. */
  private writeStreak = 0;
  /** CTL_SERVED when the streak was last looked at: the workers served something meanwhile, the streak starts again. */
  private servedSeen = 0;
  private parked = false;
  private parkedWrites = 0;
  private parks = 0;
  private idleSince = 0n;
  /** Reply buffers of OutHeader.SIZE + maxWrite bytes, for large reads. */
  private readonly replyPool: Buffer[] = [];
  /** Where the next request is read; undefined once a write took it. */
  private current: Buffer | undefined;
  /** Request buffers given back by finished writes. */
  private readonly requestPool: Buffer[] = [];
  /** The mounting user (allow_root lets this user and root through). */
  private readonly owner = process.getuid?.() ?? 0;
  /** Reused for every request: decoding READ and WRITE allocates nothing. */
  private readonly header = newHeader();
  private readonly io = newIoRequest();
  /** The negotiated request size (max_write, and the most a READ may ask). */
  private maxRequest: number;
  /**
   * The kernel's lookup count per node id (LOOKUP adds one, FORGET takes them back):
   * a node id the kernel still holds must keep meaning the same file.
   */
  private readonly lookups = new Map<number, number>();
  /**
   * Requests already answered EINTR after an INTERRUPT, whose handler still runs: its
   * late answer is dropped. Insertion order is age order.
   */
  private readonly interrupted = new Set<number>();
  /** Interrupted requests in their grace period: the timer that answers them EINTR. */
  private readonly graced = new Map<number, NodeJS.Timeout>();
  /** The kernel agreed to FUSE_PASSTHROUGH at INIT. */
  private passthrough = false;
  /** Backing ids by host descriptor; -1: the kernel refused that file (every open then agrees). */
  private readonly backing = new Map<number, number>();
  /** Writable files opened for passthrough: their FLUSH (close) syncs, as writes never came here. */
  private readonly passthroughWritable = new Set<number>();
  /** Worker threads on cloned descriptors; empty: this thread reads every request. */
  private workers: FuseWorker[] = [];
  /** Shared with the workers: stop flag and mail count (fuse-worker.ts CTL_*). */
  private readonly ctl = new Int32Array(new SharedArrayBuffer(CTL_WORDS * 4));
  /** Requests read from a worker's descriptor and being served here: the descriptor to answer on. */
  private readonly replyFds = new Map<number, number>();
  /** TSMOUNT_FUSE_URING=1 and the kernel agreed: the io_uring queues (fuse-uring.ts). */
  private uringQueues: UringQueues | undefined;
  /** Node ids whose read map (or its absence) the workers have been told of. */
  private readonly announced = new Set<number>();
  /**
   * While a worker's request slot is being dispatched: what gives the slot back. A WRITE
   * takes it (its data is written from the slot) and gives it back when done; for
   * anything else fromWorker gives it back once dispatch has parsed the request.
   */
  private releaseSlot: (() => void) | undefined;

  private requestBuffer(): Buffer {
    this.current ??= this.requestPool.pop() ?? Buffer.allocUnsafe(this.cfg.maxWrite + PAGE);
    return this.current;
  }

  constructor(readonly mountpoint: string, private readonly fd: number, private readonly ops: FsOps, private readonly cfg: SessionConfig) {
    this.maxRequest = cfg.maxWrite;
    this.initialized = new Promise((resolve, reject) => (this.initDone = (err) => (err ? reject(err) : resolve())));
    this.closed = new Promise((resolve) => (this.endDone = resolve));
    const { Pipe, constants } = pipeWrap();
    const handle = new Pipe(constants.SOCKET);
    const r = handle.open(fd);
    if (r !== 0) throw new ErrnoError(`/dev/fuse: cannot watch the descriptor (${r})`, E.EIO);
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
          // Spinning had stopped, and a request came soon after all: spin again.
          if (this.idleSince !== 0n) {
            if (this.spinNs === 0n && process.hrtime.bigint() - this.idleSince < SPIN_NS) this.spinNs = SPIN_NS;
            this.idleSince = 0n;
          }
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
    for (const timer of this.graced.values()) clearTimeout(timer);
    this.graced.clear();
    // Open passthrough files keep their own references; the session's go.
    for (const id of this.backing.values()) {
      try {
        if (id >= 0) fuseBackingClose(this.fd, id);
      } catch {
        /* the connection is gone, and the references with it */
      }
    }
    this.backing.clear();
    this.stopWorkers();
    this.uringQueues?.stop();
    this.initDone(new ErrnoError(`${this.mountpoint}: the FUSE session ended before it started`, E.ENODEV));
    this.socket.destroy();
    this.endDone();
  }

  close(): void {
    this.end();
  }

  /** Write one reply; the errno of write(2), 0 when it went out. */
  private writeReply(b: Buffer, unique: number, error: number, len: number, fd = this.fd): number {
    if (this.closedFlag) return E.ENODEV;
    encodeOutHeader(b, len, error, unique);
    // A request that came through an io_uring queue: its worker commits the reply.
    if (fd < 0 && this.uringQueues) return this.uringQueues.reply(fd, b, len);
    try {
      fs.writeSync(fd, b, 0, len);
      return 0;
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      // ENOENT: the request was interrupted and the kernel no longer waits for it.
      if (code !== 'ENOENT' && code !== 'ENODEV') debug('reply to %d failed: %s', unique, messageOf(err));
      return errnoOf(err);
    }
  }

  /**
   * Answer request `unique` on the descriptor it was read from: the kernel looks a reply
   * up in that descriptor's own list of requests being processed.
   */
  private send(b: Buffer, unique: number, error = 0, len = b.length): void {
    let fd = this.fd;
    if (this.replyFds.size !== 0) {
      const to = this.replyFds.get(unique);
      if (to !== undefined) {
        fd = to;
        this.replyFds.delete(unique);
      }
    }
    if (this.graced.size !== 0) this.ungrace(unique);
    // Answered EINTR already: the kernel has moved on, this late answer is dropped.
    if (this.interrupted.size !== 0 && this.interrupted.delete(unique)) return;
    this.writeReply(b, unique, error, len, fd);
  }

  private sendError(unique: number, errno: number): void {
    this.send(Buffer.alloc(OutHeader.SIZE), unique, errno);
  }

  /** Parse one request out of the shared buffer, synchronously; serve it asynchronously. */
  private dispatch(buf: Buffer, n: number, fromFd = this.fd): boolean {
    const h = this.header;
    try {
      if (!decodeHeader(buf, n, h)) return true;
    } catch (err) {
      this.sendError(h.unique, errnoOf(err));
      return true;
    }
    const unique = h.unique;
    const nodeid = h.nodeid;
    const body = buf.subarray(InHeader.SIZE, n);
    const opcode = h.opcode;
    this.lastWrite = opcode === Op.WRITE && n <= SPIN_WRITE_MAX;
    if (this.workers.length !== 0) this.writerMode(opcode === Op.WRITE);
    // Read by a worker: every reply to it goes back to that worker's descriptor. FORGET
    // and INTERRUPT get none (an INTERRUPT's EINTR goes where its request came from).
    if (fromFd !== this.fd && opcode !== Op.FORGET && opcode !== Op.BATCH_FORGET && opcode !== Op.INTERRUPT) this.replyFds.set(unique, fromFd);
    if (this.cfg.denyOthers && h.uid !== 0 && h.uid !== this.owner && !UNCHECKED_BY_ALLOW_ROOT.has(opcode)) {
      this.sendError(unique, E.EACCES);
      return true;
    }
    // DEBUG=tsmount:fuse: every request; the check keeps the hot path free when off.
    if (debug.enabled) {
      const io = (opcode === Op.READ || opcode === Op.WRITE) && body.length >= ReadIn.SIZE ? ` at ${u64(body, ReadIn.offset)}+${body.readUInt32LE(ReadIn.size)}` : '';
      debug('request %d: %s node %d%s', unique, opName(opcode), nodeid, io);
    }
    if (opcode === Op.READ || opcode === Op.WRITE) {
      const io = this.io;
      try {
        decodeIo(opcode, body, this.maxRequest, io);
      } catch (err) {
        this.sendError(unique, errnoOf(err));
        return true;
      }
      if (opcode === Op.READ) {
        this.serve(unique, this.read(nodeid, io.fh, io.offset, io.size, unique));
        return true;
      }
      // Read here (the spin, or this descriptor while the workers are parked): an overwrite
      // the map lets a worker write in place is written so now (a worker's read came here
      // because it could not be).
      if (fromFd === this.fd && io.size <= AROUND_WRITE_MAX && this.workers.length !== 0 && this.ops.writeAround?.(nodeid, io.offset, body, WriteIn.SIZE, io.size) === true) {
        const out = replyBuffer(WriteOut.SIZE);
        this.send(out, unique, 0, encodeWriteOut(out, io.size));
        // Finished as the others are (a spin after it), a turn later.
        this.serve(unique, DONE);
        return true;
      }
      const data = body.subarray(WriteIn.SIZE, WriteIn.SIZE + io.size);
      // A worker's request is a buffer of its own, or its slot until the write is done: no copy.
      if (fromFd !== this.fd) {
        const release = this.releaseSlot;
        this.releaseSlot = undefined;
        this.serve(unique, release ? this.write(nodeid, io.fh, io.offset, data, unique).finally(release) : this.write(nodeid, io.fh, io.offset, data, unique));
        return true;
      }
      if (io.size < REPLY_POOL_MIN || (buf !== this.current && buf !== this.spinBuffer)) {
        // Small: a copy is cheaper than a buffer of a megabyte.
        this.serve(unique, this.write(nodeid, io.fh, io.offset, Buffer.from(data), unique));
        return true;
      }
      // Large: the write keeps the request buffer (the event loop's or the spin poll's);
      // it comes back when the write is done. A fresh megabyte for each copy instead cost
      // its page faults every time (issue 21).
      if (buf === this.current) this.current = undefined;
      else this.spinBuffer = undefined;
      this.serve(unique, this.write(nodeid, io.fh, io.offset, data, unique).finally(() => {
        if (this.requestPool.length < REPLY_POOL_KEEP) this.requestPool.push(buf);
      }));
      return true;
    }
    let req: Request;
    try {
      req = decodeRequest(opcode, nodeid, body);
    } catch (err) {
      this.sendError(unique, errnoOf(err));
      return true;
    }
    switch (req.kind) {
      case 'forget':
        // No reply.
        for (const { nodeid: id, nlookup } of req.items) this.forget(id, nlookup);
        return true;
      case 'interrupt':
        this.interrupt(req.unique);
        return true;
      case 'init':
        this.init(req, unique);
        return true;
      default:
        this.serve(unique, this.other(req, nodeid, unique));
        return true;
    }
  }

  /** Takes the handler's promise (already started), not a closure: nothing more per request. */
  private serve(unique: number, p: Promise<void>): void {
    this.inFlight++;
    p.then(
      () => this.finished(),
      (err: unknown) => {
        const errno = errnoOf(err);
        if (errno !== E.ENOENT && errno !== E.ENOSYS && errno !== E.ENXIO) debug('request %d failed: %s', unique, messageOf(err));
        this.sendError(unique, errno);
        this.finished();
      },
    );
  }

  /**
   * With workers: whether to spin after a small WRITE this thread served (SPIN_WRITE_MAX),
   * for the writer's next one. Read here, it is not handed over by a worker (a message and a wake-up per
   * request: random allocating writes 7.5k IOPS, 11-12k with the spin, 16-18k with no
   * workers at all). What a spin takes is whatever comes next: when that was not a
   * WRITE (readers beside the writer, which the workers serve better), no spin for the
   * next SPIN_BACKOFF writes (a random read/write mix at 4 jobs halved without it).
   */
  private spinForWrites(): boolean {
    if (!JS_SPIN || !this.lastWrite) return false;
    if (this.spinBackoff > 0) {
      this.spinBackoff--;
      return false;
    }
    return true;
  }

  private finished(): void {
    if (--this.inFlight === 0 && SPIN_NS > 0 && !this.closedFlag && (this.workers.length === 0 || this.parked || this.spinForWrites())) this.spin();
  }

  /**
   * With workers: a writer whose every WRITE comes here (allocating writes, which only
   * this thread may serve) gains nothing from them: each WRITE is read by a worker and
   * handed over (a message and a wake-up), or raced for by this thread's spin while the
   * polling workers wake for nothing. After PARK_AFTER WRITEs in a row, the workers wait
   * on CTL_PARK and this thread reads its own descriptor (epoll and the spin), as with
   * no workers: 1 MiB allocating writes ~1.2x, 4 KiB ones 1.2-1.6x (scripts/BENCHMARKS.md,
   * session 13). A request the workers answered themselves meanwhile starts the count
   * again (a random read/write mix, parked at every 8th write, lost a quarter); the
   * first request of another kind that comes here (a READ, an FSYNC), or PARK_SPAN
   * writes, let them go. Correct either way: every request is answered on the
   * descriptor it was read from, whoever read it.
   */
  private writerMode(write: boolean): void {
    if (!write) {
      this.writeStreak = 0;
      if (this.parked) this.unpark();
      return;
    }
    if (this.parked) {
      if (++this.parkedWrites >= PARK_SPAN) this.unpark();
      return;
    }
    // Only a writer alone: READs (or overwrites) the workers served between these WRITEs start the count again.
    const served = Atomics.load(this.ctl, CTL_SERVED);
    if (served !== this.servedSeen) {
      this.servedSeen = served;
      this.writeStreak = 0;
    }
    if (++this.writeStreak < PARK_AFTER || !PARK || this.closedFlag) return;
    this.parked = true;
    this.parkedWrites = 0;
    this.parks++;
    Atomics.store(this.ctl, CTL_PARK, 1);
    this.socket.resume();
  }

  private unpark(): void {
    if (!this.parked) return;
    this.parked = false;
    this.writeStreak = 0;
    Atomics.store(this.ctl, CTL_PARK, 0);
    Atomics.notify(this.ctl, CTL_PARK);
    if (this.workers.length !== 0) this.socket.pause();
  }

  /**
   * INTERRUPT: a signal reached the process waiting for request `unique`. A fatal
   * signal needs nothing from us (the kernel lets the process die without our answer);
   * this is a signal the process handles, and EINTR makes read(2) or write(2) fail with
   * EINTR even under SA_RESTART, which programs rarely expect from a regular file. So a
   * request that finishes within INTERRUPT_GRACE_MS is answered normally; one that
   * does not (a hung remote image) is answered EINTR then, the handler runs on (its
   * effect on the image may still happen, as with a signal during any write) and its
   * late answer is dropped. If the answer went out already, the kernel refuses our
   * EINTR (ENOENT) and nothing is remembered.
   */
  private interrupt(unique: number): void {
    const grace = this.cfg.interruptGraceMs ?? INTERRUPT_GRACE_MS;
    if (grace <= 0) return this.answerInterrupted(unique);
    if (this.graced.has(unique) || this.graced.size >= INTERRUPTED_KEEP) return;
    const timer = setTimeout(() => {
      this.graced.delete(unique);
      this.answerInterrupted(unique);
    }, grace);
    timer.unref();
    this.graced.set(unique, timer);
  }

  private ungrace(unique: number): void {
    const timer = this.graced.get(unique);
    if (timer === undefined) return;
    clearTimeout(timer);
    this.graced.delete(unique);
  }

  private answerInterrupted(unique: number): void {
    // A request a worker answers itself is not known here: it is answered within
    // microseconds anyway, and EINTR on the main descriptor would only be refused.
    const fd = this.replyFds.get(unique) ?? this.fd;
    const errno = this.writeReply(Buffer.alloc(OutHeader.SIZE), unique, E.EINTR, OutHeader.SIZE, fd);
    if (errno !== 0) return;
    debug('request %d interrupted: answered EINTR', unique);
    if (this.interrupted.size >= INTERRUPTED_KEEP) {
      const oldest = this.interrupted.values().next();
      if (!oldest.done) this.interrupted.delete(oldest.value);
    }
    this.interrupted.add(unique);
  }

  /** FORGET/BATCH_FORGET: the kernel gives back `n` of the node's lookups. */
  private forget(ino: number, n: number): void {
    if (ino === ROOT_ID) return;
    const left = (this.lookups.get(ino) ?? 0) - n;
    if (left > 0) {
      this.lookups.set(ino, left);
      return;
    }
    this.lookups.delete(ino);
    this.ops.forget?.(ino);
  }

  /**
   * With workers: the requests they handed to this thread (a message and a wake-up
   * each), those this thread's spin read from its own descriptor instead (after a small
   * WRITE it served: spinForWrites, or while parked), and the parks (writerMode).
   * Undefined while no worker serves.
   */
  transportCounters(): TransportCounters | undefined {
    if (this.workers.length === 0) return undefined;
    return { handedOver: Atomics.load(this.ctl, CTL_HANDED) >>> 0, spinTakes: this.spinTakes, writerParks: this.parks };
  }

  /** The kernel's lookup count of `ino` (tests). */
  lookupCount(ino: number): number {
    return this.lookups.get(ino) ?? 0;
  }

  /**
   * The last reply is out and nothing else is being served: look for the next request
   * for a few microseconds before going back to epoll. A reader that waits on each
   * reply (psync, dd) sends its next request within that time, and this thread is then
   * still running when it comes: no wake-up of an idle CPU, which on these VMs cost
   * more than serving a 4 KiB request. After SPIN_CHAIN requests in a row the event
   * loop gets its turn (timers, the thread pool) before spinning again.
   *
   * With TSMOUNT_FUSE_SPIN_ADAPT=1 the window adapts: it doubles (up to 4x TSMOUNT_FUSE_SPIN_US) when a request came
   * within it, halves when none did, and reaches zero on an idle mount, which then
   * costs no CPU after a reply; a request that arrives through epoll within the base
   * window of the last reply starts spinning again.
   */
  private spin(): void {
    if (this.spinChain >= SPIN_CHAIN) {
      this.spinChain = 0;
      return;
    }
    const start = process.hrtime.bigint();
    if (this.spinNs === 0n) {
      this.idleSince = start;
      return;
    }
    const deadline = start + this.spinNs;
    // Its own buffer: the event loop's (this.current) may be read into at any time. A
    // large write keeps this one (dispatch), and the next spin takes another from the pool.
    const buf = (this.spinBuffer ??= this.requestPool.pop() ?? Buffer.allocUnsafe(this.cfg.maxWrite + PAGE));
    // With workers: a request a worker read meanwhile waits for this thread's event loop.
    const handed = Atomics.load(this.ctl, CTL_HANDED);
    const workers = this.workers.length !== 0;
    do {
      const n = readNoBlock(this.fd, buf);
      if (n > 0) {
        if (workers) {
          this.spinTakes++;
          if (n < InHeader.SIZE || buf.readUInt32LE(4) !== Op.WRITE) this.spinBackoff = SPIN_BACKOFF;
        }
        this.spinChain++;
        if (SPIN_ADAPT && this.spinNs < SPIN_MAX_NS) this.spinNs *= 2n;
        this.dispatch(buf, n);
        return;
      }
      // ENODEV and the like: the event loop's read sees them too and ends the session.
      if (n !== -E.EAGAIN) return;
      if (workers && Atomics.load(this.ctl, CTL_HANDED) !== handed) break;
    } while (process.hrtime.bigint() < deadline);
    this.spinChain = 0;
    if (SPIN_ADAPT) {
      this.spinNs /= 2n;
      if (this.spinNs < SPIN_NS / 8n) this.spinNs = 0n;
      this.idleSince = process.hrtime.bigint();
    }
  }

  private init(req: Extract<Request, { kind: 'init' }>, unique: number): void {
    const { major, minor } = req;
    const out = replyBuffer(InitOut.SIZE);
    if (major !== KERNEL_MAJOR) {
      if (major < KERNEL_MAJOR) {
        this.sendError(unique, E.EPROTO);
        this.initDone(new ErrnoError(`the kernel speaks FUSE ${major}.${minor}, tsmount needs 7.x`, E.EPROTO));
        return;
      }
      // A newer major: answer with ours (major and minor only) and wait for the kernel
      // to offer it again.
      out.fill(0);
      out.writeUInt32LE(KERNEL_MAJOR, OutHeader.SIZE + InitOut.major);
      out.writeUInt32LE(OUR_MINOR, OutHeader.SIZE + InitOut.minor);
      this.send(out, unique, 0, OutHeader.SIZE + 8);
      return;
    }
    const want = Init.ASYNC_READ | Init.BIG_WRITES | Init.ASYNC_DIO | Init.PARALLEL_DIROPS | Init.MAX_PAGES;
    const flags = (want & req.flags) | (req.flags & Init.INIT_EXT);
    // Shared mmap of a direct_io file (FUSE_DIRECT_IO_ALLOW_MMAP, Linux 6.6+): without
    // it, mmap of a writable flat file would fail with ENODEV.
    // Passthrough (Linux 6.9+) as root: registering a backing file needs CAP_SYS_ADMIN.
    const wantPassthrough = (this.cfg.passthrough ?? 'auto') !== 'off' && this.owner === 0 ? Init.PASSTHROUGH_HI : 0;
    // FUSE over io_uring (TSMOUNT_FUSE_URING=1, an experiment): offered only when a ring can be made here.
    const wantUring = uringWanted() && (req.flags2 & INIT_OVER_IO_URING_HI) !== 0 && uringProbe() ? INIT_OVER_IO_URING_HI : 0;
    const flags2 = req.flags2 & (Init.DIRECT_IO_ALLOW_MMAP_HI | wantPassthrough | wantUring);
    this.passthrough = (flags2 & Init.PASSTHROUGH_HI) !== 0;
    // Without FUSE_MAX_PAGES (kernels before 4.20) the kernel caps requests at 32 pages.
    const maxWrite = flags & Init.MAX_PAGES ? this.cfg.maxWrite : Math.min(this.cfg.maxWrite, 32 * PAGE);
    this.maxRequest = maxWrite;
    const len = encodeInitOut(out, {
      major: KERNEL_MAJOR,
      minor: Math.min(minor, OUR_MINOR),
      maxReadahead: Math.min(req.maxReadahead, this.cfg.maxReadahead),
      flags,
      maxBackground: 16, // readahead and other async requests in flight
      congestionThreshold: 12,
      maxWrite,
      timeGran: 1, // nanoseconds
      maxPages: Math.ceil(maxWrite / PAGE),
      flags2,
      // Backing files on a stacked file system (overlayfs) are refused (ELOOP) and served here.
      maxStackDepth: this.passthrough ? 1 : 0,
    }, minor);
    this.send(out, unique, 0, len);
    debug('FUSE %d.%d, flags %s/%s, max_write %d', major, minor, flags.toString(16), flags2.toString(16), maxWrite);
    this.initDone();
    const n = fuseWorkerCount();
    if (flags2 & INIT_OVER_IO_URING_HI) {
      this.startUring();
    } else if (n > 0) {
      this.startWorkers(n).catch((err: unknown) => {
        debug('FUSE workers not used, serving on the JS thread: %s', messageOf(err));
        this.stopWorkers();
      });
    }
  }

  /**
   * The io_uring queues instead of the workers (fuse-uring.ts). This thread keeps
   * reading /dev/fuse: FORGET and INTERRUPT still come that way. If the queues do not
   * start, the kernel is told (a refused REGISTER), and /dev/fuse serves as before.
   */
  private startUring(): void {
    const q = new UringQueues(this.fd, this.maxRequest, this.ctl, !!this.cfg.denyOthers, this.owner, { spinNs: URING_SPIN_NS, spinYield: URING_YIELD, pin: URING_PIN });
    this.uringQueues = q;
    q.start((w, m) => this.fromWorker(w, m)).then(
      (ws) => {
        if (this.closedFlag) return q.stop();
        this.workers = ws;
        debug('FUSE over io_uring: %d queues', ws.length);
      },
      (err: unknown) => {
        debug('FUSE over io_uring not used: %s', messageOf(err));
        q.stop();
        this.uringQueues = undefined;
        uringRefuse(this.fd);
        const n = fuseWorkerCount();
        if (n > 0 && !this.closedFlag) {
          this.startWorkers(n).catch((e: unknown) => {
            debug('FUSE workers not used, serving on the JS thread: %s', messageOf(e));
            this.stopWorkers();
          });
        }
      },
    );
  }

  /** Worker threads running (tests). */
  get workerCount(): number {
    return this.workers.length;
  }

  /**
   * Start `n` workers, one at a time (koffi loading in two threads at once crashed
   * once: decode-pool.ts), each on a clone of this session's descriptor. This is the
   * self-test too: a clone that fails, a worker that does not start, and the session
   * stays on this thread alone. Each serves as soon as it is up, and with the first
   * this thread stops reading its own descriptor (the workers read every request, and
   * hand here what they do not serve).
   */
  private async startWorkers(n: number): Promise<void> {
    const started: FuseWorker[] = [];
    const { MessageChannel } = await import('node:worker_threads');
    try {
      for (let i = 0; i < n; i++) {
        if (this.closedFlag) throw new Error('the session ended');
        const fd = fs.openSync('/dev/fuse', fs.constants.O_RDWR | fs.constants.O_NONBLOCK);
        try {
          fuseDevClone(fd, this.fd);
        } catch (err) {
          closeFd(fd);
          throw err;
        }
        const { port1, port2 } = new MessageChannel();
        const size = slotSize(this.maxRequest);
        const memory = new SharedArrayBuffer(SLOTS * size);
        const slotState = new Int32Array(new SharedArrayBuffer(SLOTS * 4));
        const init: WorkerInit = {
          fd, maxRequest: this.maxRequest, ctl: this.ctl, port: port2, denyOthers: !!this.cfg.denyOthers, owner: this.owner,
          spinNs: Number(SPIN_NS), slots: memory, slotState,
        };
        const thread = new Worker(WORKER_URL, { workerData: { ...init, ...koffiWorkerData() }, transferList: [port2] });
        const slots = Array.from({ length: SLOTS }, (_, i) => Buffer.from(memory, i * size, size));
        const w: FuseWorker = { thread, fd, port: port1, slots, slotState };
        started.push(w);
        await workerSays(thread, 'ready');
        thread.on('message', (m: WorkerMessage) => this.fromWorker(w, m));
        thread.on('error', (err) => this.workerLost(w, err.message));
        thread.on('exit', (code) => this.workerLost(w, `exited with code ${code}`));
        // Kept referenced: with this thread's descriptor paused, the workers are what
        // keeps the process serving. stopWorkers() lets go of them.
        if (this.closedFlag) throw new Error('the session ended');
        // Serving from now on, with every read map announced so far: a READ right after
        // the mount need not wait for the other workers.
        this.workers.push(w);
        for (const nodeid of this.announced) {
          const share = this.ops.readMapFor?.(nodeid);
          if (share) w.port.postMessage({ ino: nodeid, ...share });
        }
        Atomics.add(this.ctl, CTL_MAIL, 1);
        // The workers read every request from the first on: this thread's spin and epoll stop.
        if (this.workers.length === 1) this.socket.pause();
      }
    } catch (err) {
      this.workers = this.workers.filter((w) => !started.includes(w));
      if (this.workers.length === 0) this.socket.resume();
      // stopWorkers() took care of those it saw (the session ended meanwhile).
      for (const w of started) if (!w.stopped) this.retire(w);
      if (this.closedFlag) return;
      throw err;
    }
    debug('FUSE: %d worker threads on cloned descriptors', started.length);
  }

  private fromWorker(w: FuseWorker, m: WorkerMessage): void {
    if (m.type === 'request') {
      if ('buf' in m) {
        this.dispatch(Buffer.from(m.buf), m.buf.byteLength, w.fd);
        return;
      }
      const { slot } = m;
      const { slots, slotState } = w;
      if (!slots || !slotState) return;
      this.releaseSlot = () => Atomics.store(slotState, slot, 0);
      try {
        this.dispatch(slots[slot]!, m.n, w.fd);
      } finally {
        // Not taken by a write: the request was parsed, the slot is the worker's again.
        const release = this.releaseSlot;
        this.releaseSlot = undefined;
        release?.();
      }
      return;
    }
    if (m.type === 'ahead') {
      this.ops.mapMiss?.(m.ino, m.offset, 1);
      return;
    }
    if (m.type === 'end') {
      // ENODEV: unmounted; every worker and this thread see it.
      if (m.errno !== E.ENODEV && m.errno !== 0) debug('/dev/fuse worker: errno %d', m.errno);
      this.end();
    }
  }

  /** A worker died (a bug): the requests it held are lost, later ones are served here again. */
  private workerLost(w: FuseWorker, why: string): void {
    if (this.closedFlag || !this.workers.includes(w)) return;
    debug('FUSE worker %s: back to the JS thread', why);
    this.workers = this.workers.filter((x) => x !== w);
    this.retire(w);
    if (this.workers.length === 0) this.socket.resume();
  }

  private retire(w: FuseWorker): void {
    w.stopped = true;
    w.thread.removeAllListeners('exit');
    w.thread.on('exit', () => closeFd(w.fd));
    void w.thread.terminate().catch(() => undefined);
    w.port.close();
  }

  private stopWorkers(): void {
    Atomics.store(this.ctl, CTL_STOP, 1);
    this.parked = false;
    Atomics.store(this.ctl, CTL_PARK, 0);
    Atomics.notify(this.ctl, CTL_PARK);
    const all = this.workers;
    this.workers = [];
    for (const w of all) {
      w.stopped = true;
      // The loop sees the stop flag within its poll timeout and returns; its descriptor is closed once it has.
      w.thread.removeAllListeners('exit');
      w.thread.removeAllListeners('error');
      w.thread.on('error', () => undefined);
      w.thread.on('exit', () => closeFd(w.fd));
      w.thread.unref();
      w.port.close();
    }
  }

  /** Tell the workers about node `nodeid`'s read map, once (again at a later READ while it cannot be made yet). */
  private announce(nodeid: number): void {
    const share = this.ops.readMapFor?.(nodeid);
    if (share === undefined && this.ops.readMapFor) return;
    this.announced.add(nodeid);
    if (!share) return;
    for (const w of this.workers) w.port.postMessage({ ino: nodeid, ...share });
    Atomics.add(this.ctl, CTL_MAIL, 1);
  }

  private async read(nodeid: number, fh: number, offset: number, size: number, unique: number): Promise<void> {
    // The data goes straight into the reply: no copy. Large replies reuse buffers, as
    // fresh megabyte buffers for every readahead request kept the GC busy (18 % of the
    // JS thread reading 1 GiB). A buffer goes back only after a read that succeeded:
    // then nothing below still writes into it.
    const big = size > REPLY_POOL_MIN;
    const out = big ? (this.replyPool.pop() ?? Buffer.allocUnsafe(OutHeader.SIZE + this.cfg.maxWrite)) : Buffer.allocUnsafe(OutHeader.SIZE + size);
    const got = await this.ops.read(nodeid, fh, out.subarray(OutHeader.SIZE, OutHeader.SIZE + size), size, offset);
    this.send(out, unique, 0, OutHeader.SIZE + got);
    // Served here: publish the map that lets the workers serve the next ones.
    this.served(nodeid, offset, got);
    if (big && this.replyPool.length < REPLY_POOL_KEEP) this.replyPool.push(out);
  }

  private async write(nodeid: number, fh: number, offset: number, data: Buffer, unique: number): Promise<void> {
    const n = await this.ops.write(nodeid, fh, data, data.length, offset);
    const out = replyBuffer(WriteOut.SIZE);
    this.send(out, unique, 0, encodeWriteOut(out, n));
    // An overwrite there may be the workers' next time (read-map.ts).
    this.served(nodeid, offset, n, true);
  }

  /** A READ or WRITE served here: with workers, announce the file's map and publish it around the request. */
  private served(nodeid: number, offset: number, length: number, write = false): void {
    if (this.workers.length === 0) return;
    if (!this.announced.has(nodeid)) this.announce(nodeid);
    this.ops.mapMiss?.(nodeid, offset, length, write);
  }

  private async attrReply(unique: number, nodeid: number): Promise<void> {
    const st = await this.ops.getattr(nodeid);
    const out = replyBuffer(AttrOut.SIZE);
    this.send(out, unique, 0, encodeAttrOut(out, nodeid, st, ATTR_VALID_S));
  }

  private ok(unique: number): void {
    this.send(replyBuffer(0), unique);
  }

  private async other(req: Request, nodeid: number, unique: number): Promise<void> {
    switch (req.kind) {
      case 'lookup': {
        const { ino, attr } = await this.ops.lookup(nodeid, req.name);
        const out = replyBuffer(EntryOut.SIZE);
        const len = encodeEntryOut(out, ino, attr, ATTR_VALID_S);
        this.lookups.set(ino, (this.lookups.get(ino) ?? 0) + 1);
        this.send(out, unique, 0, len);
        return;
      }
      case 'getattr':
        return this.attrReply(unique, nodeid);
      case 'setattr': {
        const v = req.valid;
        if (v & Fattr.SIZE) await this.ops.truncate(nodeid, req.size);
        if (v & Fattr.MODE) await this.ops.chmod(nodeid, req.mode);
        if (v & (Fattr.UID | Fattr.GID)) await this.ops.chown(nodeid, v & Fattr.UID ? req.uid : -1, v & Fattr.GID ? req.gid : -1);
        if (v & (Fattr.ATIME | Fattr.MTIME)) await this.ops.utimens(nodeid);
        return this.attrReply(unique, nodeid);
      }
      case 'open': {
        const opened = await this.ops.open(nodeid, req.flags);
        const out = replyBuffer(OpenOut.SIZE);
        const backingId = this.backingFor(opened);
        if (backingId !== undefined) {
          if (opened.writable) this.passthroughWritable.add(opened.fh);
          this.send(out, unique, 0, encodeOpenOut(out, opened.fh, FOPEN_PASSTHROUGH, backingId));
          return;
        }
        this.send(out, unique, 0, encodeOpenOut(out, opened.fh, this.openFlags(opened.writable, opened.size)));
        return;
      }
      case 'release':
        this.passthroughWritable.delete(req.fh);
        await this.ops.release(nodeid, req.fh);
        return this.ok(unique);
      case 'flush':
        // A close after passthrough writes: they went to the image file without us, so
        // the flush a close makes of a written file here is an fsync.
        if (this.passthroughWritable.has(req.fh)) await this.ops.fsync(nodeid, req.fh, true);
        else await this.ops.flush(nodeid, req.fh);
        return this.ok(unique);
      case 'fsync':
        await this.ops.fsync(nodeid, req.fh, req.datasync);
        return this.ok(unique);
      case 'fallocate':
        if (!this.ops.fallocate) throw new ErrnoError('fallocate', E.EOPNOTSUPP);
        await this.ops.fallocate(nodeid, req.fh, req.mode, req.offset, req.length);
        return this.ok(unique);
      case 'lseek': {
        // The kernel asks only for SEEK_DATA and SEEK_HOLE; ENOSYS makes it treat the
        // whole file as data from then on.
        if (!this.ops.lseek || (req.whence !== SEEK_DATA && req.whence !== SEEK_HOLE)) throw new ErrnoError('lseek', E.ENOSYS);
        const at = await this.ops.lseek(nodeid, req.fh, req.offset, req.whence);
        const out = replyBuffer(LseekOut.SIZE);
        this.send(out, unique, 0, encodeLseekOut(out, at));
        return;
      }
      case 'statfs': {
        const s = await this.ops.statfs(nodeid);
        const out = replyBuffer(StatfsOut.SIZE);
        const len = encodeStatfsOut(out, {
          blocks: s.blocks ?? 0, bfree: s.bfree ?? 0, bavail: s.bavail ?? 0, files: s.files ?? 0, ffree: s.ffree ?? 0,
          bsize: s.bsize ?? PAGE, namelen: s.namemax ?? 255, frsize: s.frsize ?? PAGE,
        });
        this.send(out, unique, 0, len);
        return;
      }
      case 'opendir': {
        const st = await this.ops.getattr(nodeid);
        if ((st.mode & 0o170000) !== 0o040000) throw new ErrnoError('not a directory', E.ENOTDIR);
        const out = replyBuffer(OpenOut.SIZE);
        this.send(out, unique, 0, encodeOpenOut(out, 0, 0));
        return;
      }
      case 'readdir':
        return this.readdir(nodeid, req.offset, req.size, unique);
      case 'releasedir':
      case 'fsyncdir':
      case 'access':
        return this.ok(unique);
      case 'destroy':
        // The kernel waits for this answer before the unmount completes: write first.
        await this.ops.destroy?.();
        return this.ok(unique);
      case 'changesNames':
        // The set of files is fixed: no creating, linking, renaming or removing.
        throw new ErrnoError(`opcode ${req.opcode}: the files of a tsmount mount are fixed`, E.EPERM);
      case 'unsupported':
        // Everything else (xattrs, statx, ioctl, copy_file_range...): ENOSYS tells the
        // kernel not to ask again where it can, and it falls back to what it does
        // itself (copy_file_range becomes reads and writes).
        throw new ErrnoError(`opcode ${req.opcode}`, E.ENOSYS);
      case 'forget':
      case 'interrupt':
      case 'init':
        // Handled in dispatch, without a reply of this kind.
        return;
    }
  }

  /**
   * The backing id for an open the kernel should serve itself (FUSE passthrough), or
   * undefined to serve it here. Only where the flat file is one host file 1:1 (a raw
   * image on a local file, nothing in the graph that must see the I/O), and by
   * default only for files that cannot change: a passthrough write past the end of
   * the disk would grow the image file where tsmount answers ENOSPC, and writes skip
   * st_blocks' recount, so writable files take it only with -o passthrough. The pages
   * are the image file's own (no second copy in the flat file's page cache), so
   * -o kernel_cache changes nothing and -o direct_io turns it off. Every open of a
   * file agrees, as the kernel requires: a refused file is remembered.
   */
  private backingFor(opened: { writable: boolean; passthroughFd?: number }): number | undefined {
    const fd = opened.passthroughFd;
    const mode = this.cfg.passthrough ?? 'auto';
    if (!this.passthrough || fd === undefined || mode === 'off') return undefined;
    if (mode === 'auto' && (opened.writable || this.cfg.pageCache === 'direct')) return undefined;
    let id = this.backing.get(fd);
    if (id === undefined) {
      try {
        id = fuseBackingOpen(this.fd, fd);
        debug('passthrough: host descriptor %d is backing file %d', fd, id);
      } catch (err) {
        debug('passthrough refused for host descriptor %d: %s', fd, messageOf(err));
        id = -1;
      }
      this.backing.set(fd, id);
    }
    return id >= 0 ? id : undefined;
  }

  /**
   * A file that cannot change keeps its pages across opens (FOPEN_KEEP_CACHE): reads
   * get the kernel's readahead and re-reads cost nothing. A writable file bypasses the
   * page cache (FOPEN_DIRECT_IO, as qemu-storage-daemon's export does): every open of
   * it alike, so no reader holds pages a writer made stale. A write is then one copy
   * from the writer's buffer into the request, not a copy into page cache pages first:
   * measured 1.6-2x on 1 MiB sequential writes. Readers of a writable file get
   * requests as large as their read(2) calls instead of readahead. The kernel's
   * writeback cache (FUSE_WRITEBACK_CACHE: the writer returns once its pages are dirty,
   * the server writes them back meanwhile) was no faster on 1 MiB writes here
   * (scripts/BENCHMARKS.md, session 16) and would let a write past the end of the disk
   * succeed until the write-back fails: not offered.
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

  private async readdir(nodeid: number, offset: number, size: number, unique: number): Promise<void> {
    const children = await this.ops.readdir(nodeid);
    const entries: DirEntryOut[] = [
      { name: '.', ino: nodeid, type: DT_DIR },
      { name: '..', ino: ROOT_ID, type: DT_DIR },
      ...children.map((c) => ({ name: c.name, ino: c.ino, type: c.dir ? DT_DIR : DT_REG })),
    ];
    // The kernel asks for at most a page; never allocate more than a request's worth.
    const out = Buffer.alloc(OutHeader.SIZE + Math.min(size, this.cfg.maxWrite));
    this.send(out, unique, 0, encodeDirents(out, entries, offset));
  }
}
