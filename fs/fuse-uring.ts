// FUSE over io_uring (Linux 6.14+, CONFIG_FUSE_IO_URING, fuse.enable_uring=Y): an
// experiment behind TSMOUNT_FUSE_URING=1, off by default (scripts/BENCHMARKS.md, issue 21).
//
// The kernel keeps one queue per possible CPU and sends a request to the queue of the
// CPU its caller runs on. Each queue here is a worker thread owning an io_uring: it
// registers a few entries (FUSE_IO_URING_CMD_REGISTER, each a 288-byte header buffer
// and a payload buffer of max_write), a request arrives as the completion of such an
// entry, and its reply is written into the same buffers and committed by the command
// that also fetches the next request (FUSE_IO_URING_CMD_COMMIT_AND_FETCH): one
// io_uring_enter(2) per request instead of a read(2) and a write(2). Until every queue
// has an entry the kernel keeps using /dev/fuse; afterwards /dev/fuse carries only
// FORGET and INTERRUPT, which the main thread goes on reading.
//
// A worker answers READs the shared read map covers (read-map-table.ts) with pread(2)
// straight into the entry's payload (decrypting ciphertext, as fuse-worker.ts: ThreadCiphers), and writes WRITEs it publishes as writable in
// place from the payload (read-map-runs.ts writeInPlace), as fuse-worker.ts does, and hands every other
// request to the main thread in the /dev/fuse layout; the main thread's reply comes
// back by message, and an eventfd read armed in the ring wakes the worker for it.
//
// The kernel blocks every request after INIT until all queues are registered, so a
// failure must be told to it: a REGISTER that the kernel refuses turns io_uring off
// for the connection and wakes the waiters (dev_uring.c, fuse_uring_cmd), and
// refuse() sends one. INIT offers io_uring only after probe() made a ring here.
//
// Memory: the rings and the buffers are mmap(2)ed through koffi, so their addresses
// are stable and known; JS sees them through koffi.view (ArrayBuffers over that
// memory). Ring heads and tails are read and written with Atomics.
import fs from 'node:fs';
import { parentPort, receiveMessageOnPort, Worker, workerData, type MessagePort } from 'node:worker_threads';
import { countServed, granuleOf, tableSize } from './read-map-table.js';
import { fillRuns, NEED_CIPHERS, readRuns, registerLog, ThreadCiphers, writeInPlace, type MapShare } from './read-map-runs.js';
import { koffiWorkerData, loadKoffi } from '../drivers/util/koffi-load.js';

/** FUSE_OVER_IO_URING is bit 41 of the INIT flags: bit 9 of flags2. */
export const INIT_OVER_IO_URING_HI = 1 << 9;
const CMD_REGISTER = 1;
const CMD_COMMIT_AND_FETCH = 2;

const SYS_IO_URING_SETUP = 425;
const SYS_IO_URING_ENTER = 426;
const IORING_SETUP_SQE128 = 1 << 10;
const IORING_ENTER_GETEVENTS = 1;
const IORING_FEAT_SINGLE_MMAP = 1;
const IORING_OFF_SQES = 0x10000000;
const IORING_OP_READ = 22;
const IORING_OP_URING_CMD = 46;
const SQE_SIZE = 128;
const CQE_SIZE = 16;
const PARAMS_SIZE = 120;

const PROT_RW = 3;
const MAP_SHARED_POPULATE = 0x01 | 0x8000;
const MAP_PRIVATE_ANON = 0x02 | 0x20;
const EFD_CLOEXEC = 0x80000;

/** struct fuse_uring_req_header: in_out[128], op_in[128], fuse_uring_ent_in_out (32 bytes). */
const HDR_OP_IN = 128;
const HDR_ENT = 256;
const HDR_SLOT = 512;
const IN_HEADER = 40;
const OUT_HEADER = 16;
const OP_READ = 15;
const READ_IN = 40;
const OP_WRITE = 16;
const WRITE_IN = 40;
const WRITE_OUT = 8;
/** Entries per queue: requests each queue can hold at once (readahead keeps several busy). */
const DEPTH = 8;
/** user_data of the eventfd read. */
const WAKE = 0xffff;

const EINTR = 4;
const ENOTCONN = 107;
const ECANCELED = 125;
const ENODEV = 19;
const EIO = 5;

export interface UringInit {
  fuseUring: true;
  /** A /dev/fuse descriptor of the session (a clone). */
  fd: number;
  qid: number;
  maxPayload: number;
  /** The session's control words: [1] counts read-map mail (fuse-worker.ts CTL_MAIL). */
  ctl: Int32Array;
  /** This transport's own stop word: stopping it must not stop a /dev/fuse worker started after. */
  stop: Int32Array;
  port: MessagePort;
  /** Written by the main thread after each reply it posts. */
  wakeFd: number;
  denyOthers: boolean;
  owner: number;
  /** How long to look for the next completion before sleeping (ns; 0: never); only a queue pinned to its CPU spins. */
  spinNs: number;
  /** sched_yield between looks (fuse-session.ts URING_YIELD): the reader this queue waits for runs on the same CPU. */
  spinYield: boolean;
  /** Bind the queue's thread to the CPU it serves (queue qid serves CPU qid), as libfuse does. */
  pin: boolean;
}

/** How the queue threads wait: UringInit's spinNs, spinYield and pin. */
export type UringSpin = Pick<UringInit, 'spinNs' | 'spinYield' | 'pin'>;

export type UringMessage =
  | { type: 'ready' }
  | { type: 'request'; buf: ArrayBuffer }
  | { type: 'end'; errno: number };

interface Sys {
  koffi: typeof import('koffi');
  setup(entries: number, params: Buffer): number;
  enter(fd: number, toSubmit: number, minComplete: number, flags: number): number;
  mmap(len: number, prot: number, flags: number, fd: number, off: number): unknown;
  eventfd(init: number, flags: number): number;
  close(fd: number): number;
  yield(): number;
  /** Bind the calling thread to one CPU it may already run on (sched_setaffinity); false if not allowed or refused. */
  pin(cpu: number): boolean;
  errno(): number;
}

let sysCache: Sys | undefined;
function sys(): Sys {
  if (sysCache) return sysCache;
  const koffi = loadKoffi();
  const libc = koffi.load('libc.so.6');
  // syscall(2) is variadic; glibc's x86_64/aarch64 syscall only moves registers, so
  // fixed prototypes per call are safe there and cheaper than koffi's variadic calls.
  const setup = libc.func('long syscall(long nr, uint32_t entries, _Inout_ void *params)');
  const enter = libc.func('long syscall(long nr, int fd, uint32_t submit, uint32_t complete, uint32_t flags, void *arg, size_t argsz)');
  const mmap = libc.func('void *mmap(void *addr, size_t len, int prot, int flags, int fd, int64_t off)');
  const eventfd = libc.func('int eventfd(unsigned int init, int flags)');
  const close = libc.func('int close(int fd)');
  const schedYield = libc.func('int sched_yield()');
  // pid 0: the calling thread. The mask is a cpu_set_t of 1024 CPUs (glibc's size).
  const setaffinity = libc.func('int sched_setaffinity(int pid, size_t size, const uint8_t *mask)');
  const getaffinity = libc.func('int sched_getaffinity(int pid, size_t size, _Out_ uint8_t *mask)');
  sysCache = {
    koffi,
    setup: (entries, params) => Number(setup(SYS_IO_URING_SETUP, entries, params)),
    enter: (fd, toSubmit, minComplete, flags) => Number(enter(SYS_IO_URING_ENTER, fd, toSubmit, minComplete, flags, null, 0)),
    mmap: (len, prot, flags, fd, off) => mmap(null, len, prot, flags, fd, off),
    eventfd: (init, flags) => eventfd(init, flags) as number,
    close: (fd) => close(fd) as number,
    yield: () => schedYield() as number,
    pin: (cpu) => {
      if (cpu < 0 || cpu >= 1024) return false;
      const mask = Buffer.alloc(128);
      // Never outside the CPUs the process was given (taskset, a cpuset): pin within them only.
      if (getaffinity(0, mask.length, mask) !== 0 || (mask[cpu >> 3]! & (1 << (cpu & 7))) === 0) return false;
      mask.fill(0);
      mask[cpu >> 3] = 1 << (cpu & 7);
      return setaffinity(0, mask.length, mask) === 0;
    },
    errno: () => koffi.errno(),
  };
  return sysCache;
}

/** TSMOUNT_FUSE_URING=1 asks for it. */
export function uringWanted(): boolean {
  return process.env.TSMOUNT_FUSE_URING === '1';
}

/** The kernel's queue count: num_possible_cpus() (/sys/devices/system/cpu/possible, "0-1,4"). */
export function possibleCpus(): number {
  try {
    const text = fs.readFileSync('/sys/devices/system/cpu/possible', 'utf8').trim();
    let n = 0;
    for (const part of text.split(',')) {
      const [a, b] = part.split('-').map(Number);
      n += b === undefined ? 1 : b! - a! + 1;
    }
    return n > 0 ? n : 1;
  } catch {
    return 1;
  }
}

/** One io_uring with 128-byte SQEs, mapped; the submission side is this thread's alone. */
class Ring {
  readonly fd: number;
  private readonly u32: Uint32Array;
  private readonly sqes: Buffer;
  private readonly cqes: Buffer;
  private readonly sqMask: number;
  private readonly cqMask: number;
  private readonly sqTail: number;
  private readonly sqArray: number;
  private readonly cqHead: number;
  private readonly cqTail: number;
  private tail: number;
  private queued = 0;

  constructor(private readonly s: Sys, entries: number) {
    const p = Buffer.alloc(PARAMS_SIZE);
    p.writeUInt32LE(IORING_SETUP_SQE128, 8);
    const fd = s.setup(entries, p);
    if (fd < 0) throw new Error(`io_uring_setup: errno ${s.errno()}`);
    this.fd = fd;
    try {
      const sqEntries = p.readUInt32LE(0);
      const cqEntries = p.readUInt32LE(4);
      if (!(p.readUInt32LE(20) & IORING_FEAT_SINGLE_MMAP)) throw new Error('io_uring without IORING_FEAT_SINGLE_MMAP');
      const sq = (i: number) => p.readUInt32LE(40 + i * 4);
      const cq = (i: number) => p.readUInt32LE(80 + i * 4);
      const ringSize = Math.max(sq(6) + sqEntries * 4, cq(5) + cqEntries * CQE_SIZE);
      const ring = this.map(ringSize, fd, 0);
      this.u32 = new Uint32Array(ring);
      this.sqes = Buffer.from(this.map(sqEntries * SQE_SIZE, fd, IORING_OFF_SQES));
      this.cqes = Buffer.from(ring, cq(5), cqEntries * CQE_SIZE);
      this.sqTail = sq(1) / 4;
      this.sqMask = this.u32[sq(2) / 4]!;
      this.sqArray = sq(6) / 4;
      this.cqHead = cq(0) / 4;
      this.cqTail = cq(1) / 4;
      this.cqMask = this.u32[cq(2) / 4]!;
      this.tail = Atomics.load(this.u32, this.sqTail);
    } catch (err) {
      s.close(fd);
      throw err;
    }
  }

  private map(len: number, fd: number, off: number): ArrayBuffer {
    const ptr = this.s.mmap(len, PROT_RW, MAP_SHARED_POPULATE, fd, off);
    if (this.s.koffi.address(ptr) === 0xffffffffffffffffn) throw new Error(`mmap of the ring: errno ${this.s.errno()}`);
    return this.s.koffi.view(ptr, len);
  }

  /** A zeroed SQE queued for the next enter(); its offset in sqes. */
  sqe(opcode: number, fd: number, userData: number): { b: Buffer; o: number } {
    const idx = this.tail & this.sqMask;
    const o = idx * SQE_SIZE;
    const b = this.sqes;
    b.fill(0, o, o + SQE_SIZE);
    b[o] = opcode;
    b.writeInt32LE(fd, o + 4);
    b.writeBigUInt64LE(BigInt(userData), o + 32);
    this.u32[this.sqArray + idx] = idx;
    this.tail = (this.tail + 1) >>> 0;
    this.queued++;
    return { b, o };
  }

  /** Submit what is queued and wait for `wait` completions; -errno on failure. */
  enter(wait: number): number {
    Atomics.store(this.u32, this.sqTail, this.tail);
    const n = this.s.enter(this.fd, this.queued, wait, wait > 0 ? IORING_ENTER_GETEVENTS : 0);
    if (n < 0) return -this.s.errno();
    this.queued -= Math.min(this.queued, n);
    return n;
  }

  /** SQEs queued and not yet submitted. */
  pending(): number {
    return this.queued;
  }

  /** A completion is waiting. */
  ready(): boolean {
    return Atomics.load(this.u32, this.cqTail) !== Atomics.load(this.u32, this.cqHead);
  }

  /** Hand each completion to fn(userData, res), then give the slots back. */
  reap(fn: (userData: number, res: number) => void): void {
    let head = Atomics.load(this.u32, this.cqHead);
    const tail = Atomics.load(this.u32, this.cqTail);
    while (head !== tail) {
      const o = (head & this.cqMask) * CQE_SIZE;
      const userData = Number(this.cqes.readBigUInt64LE(o));
      const res = this.cqes.readInt32LE(o + 8);
      head = (head + 1) >>> 0;
      Atomics.store(this.u32, this.cqHead, head);
      fn(userData, res);
    }
  }

  close(): void {
    this.s.close(this.fd);
  }
}

/**
 * Can this process make the ring the transport needs? Asked before INIT offers
 * FUSE_OVER_IO_URING: once offered, the kernel waits for the queues.
 */
export function probe(): boolean {
  try {
    new Ring(sys(), 2).close();
    return true;
  } catch {
    return false;
  }
}

/**
 * Tell the kernel io_uring will not come: a REGISTER it refuses (no buffers) clears
 * fc->io_uring and wakes the requests waiting for the ring; /dev/fuse serves them.
 */
export function refuse(devFd: number): void {
  try {
    const ring = new Ring(sys(), 2);
    const { b, o } = ring.sqe(IORING_OP_URING_CMD, devFd, 0);
    b.writeUInt32LE(CMD_REGISTER, o + 8);
    // Issued inline by the submit: the refusal has happened when enter returns.
    ring.enter(0);
    ring.close();
  } catch {
    /* no ring at all: probe() said so before INIT, nothing was offered */
  }
}

/** A new eventfd (main thread: the worker's wake-up). */
export function newEventFd(): number {
  const fd = sys().eventfd(0, EFD_CLOEXEC);
  if (fd < 0) throw new Error(`eventfd: errno ${sys().errno()}`);
  return fd;
}

const ONE = Buffer.from([1, 0, 0, 0, 0, 0, 0, 0]);

/** Main thread: send a worker the reply to one of its requests (b: /dev/fuse layout, `len` bytes). */
export function postReply(port: MessagePort, wakeFd: number, b: Buffer, len: number): number {
  const copy = new ArrayBuffer(len);
  b.copy(new Uint8Array(copy), 0, 0, len);
  port.postMessage({ reply: copy }, [copy]);
  try {
    fs.writeSync(wakeFd, ONE);
  } catch {
    return ENODEV;
  }
  return 0;
}

/** A queue worker as the session sees it (the shape of fuse-session.ts's FuseWorker). */
export interface UringWorker {
  thread: Worker;
  /** Not a descriptor: -1 - qid, the key replies are routed by (UringQueues.reply). */
  fd: number;
  port: MessagePort;
}

/** How long a queue worker may take to start before the session gives up on io_uring. */
const START_MS = 10_000;

/** Main thread: the queue workers of one session. */
export class UringQueues {
  private readonly wakeFds: number[] = [];
  private readonly stopWord = new Int32Array(new SharedArrayBuffer(4));
  readonly workers: UringWorker[] = [];

  constructor(private readonly devFd: number, private readonly maxPayload: number, private readonly ctl: Int32Array,
    private readonly denyOthers: boolean, private readonly owner: number, private readonly spin: UringSpin) {}

  /**
   * One worker per possible CPU, started one after the other (koffi loading in two
   * threads at once crashed once: decode-pool.ts). The kernel switches to the ring
   * when the last one has registered; requests may reach onMessage before this resolves.
   */
  async start(onMessage: (w: UringWorker, m: UringMessage) => void): Promise<UringWorker[]> {
    const { MessageChannel } = await import('node:worker_threads');
    const url = new URL('./fuse-uring.js', import.meta.url);
    const n = possibleCpus();
    for (let qid = 0; qid < n; qid++) {
      const wakeFd = newEventFd();
      this.wakeFds.push(wakeFd);
      const { port1, port2 } = new MessageChannel();
      const init: UringInit = {
        fuseUring: true, fd: this.devFd, qid, maxPayload: this.maxPayload, ctl: this.ctl, stop: this.stopWord, port: port2, wakeFd,
        denyOthers: this.denyOthers, owner: this.owner, ...this.spin,
      };
      const thread = new Worker(url, { workerData: { ...init, ...koffiWorkerData() }, transferList: [port2] });
      const w: UringWorker = { thread, fd: -1 - qid, port: port1 };
      this.workers.push(w);
      // Listening before 'ready': once the last queue registers, requests may follow it at
      // once. Once stopped, a worker's last words ('end') are not the session's end.
      let started = false;
      thread.on('message', (m: UringMessage) => {
        if (m.type !== 'ready' && Atomics.load(this.stopWord, 0) === 0) onMessage(w, m);
      });
      // A queue thread that dies (a bug) strands its CPU's requests, and the kernel
      // cannot go back to /dev/fuse once the ring runs: the session ends (EIO), as it
      // does when a worker reports an error.
      thread.on('error', () => {
        if (started && Atomics.load(this.stopWord, 0) === 0) onMessage(w, { type: 'end', errno: EIO });
      });
      await new Promise<void>((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error('an io_uring queue worker did not start')), START_MS);
        thread.once('message', (m: UringMessage) => {
          clearTimeout(timer);
          if (m.type === 'ready') resolve();
          else reject(new Error(`an io_uring queue worker answered ${m.type}`));
        });
        thread.once('error', (err) => {
          clearTimeout(timer);
          reject(err);
        });
      });
      started = true;
    }
    return this.workers;
  }

  /** Send reply b (out header and body, `len` bytes) to the queue behind key `fd`; an errno, 0 when sent. */
  reply(fd: number, b: Buffer, len: number): number {
    const qid = -1 - fd;
    const w = this.workers[qid];
    if (!w) return ENODEV;
    return postReply(w.port, this.wakeFds[qid]!, b, len);
  }

  /** Stop every worker and close the eventfds (the rings go with their threads' descriptors). */
  stop(): void {
    Atomics.store(this.stopWord, 0, 1);
    // A worker waits in io_uring_enter(2), where terminate() cannot reach it: the
    // eventfd wakes it, and it returns on seeing the stop flag.
    for (const fd of this.wakeFds.splice(0)) {
      try {
        fs.writeSync(fd, ONE);
      } catch {
        /* gone already */
      }
      sys().close(fd);
    }
    for (const w of this.workers) w.thread.unref();
  }
}

/** The queue worker. */
class Queue {
  private readonly ring: Ring;
  private readonly headers: Buffer;
  private readonly payloads: Buffer[] = [];
  private readonly wakeBuf: Buffer;
  private readonly ctlBase: bigint;
  private readonly maps = new Map<number, Int32Array>();
  /** Per file, the ciphers its map names. */
  readonly ciphers = new ThreadCiphers();
  /** Requests handed to the main thread: unique -> entry. */
  private readonly pending = new Map<number, number>();
  private readonly hit = [0, 0, 0, 0, 0];
  private readonly runs: number[] = [];
  /** The file and range of the request target() looked at. */
  private ino = 0;
  private offset = 0;
  private size = 0;
  private mailSeen = 0;
  private ended = 0;
  /** Completions start() saw, for run(). */
  private readonly early: [number, number][] = [];
  /** Set by main(): the thread runs on the CPU whose requests it gets. */
  pinned = false;

  constructor(private readonly s: Sys, private readonly init: UringInit) {
    this.ring = new Ring(s, 2 * DEPTH + 2);
    // Control page: DEPTH header slots, then DEPTH iovec pairs, then the eventfd's 8 bytes.
    const ctlLen = DEPTH * HDR_SLOT + DEPTH * 32 + 4096;
    const ctlPtr = s.mmap(ctlLen, PROT_RW, MAP_PRIVATE_ANON, -1, 0);
    this.ctlBase = s.koffi.address(ctlPtr);
    if (this.ctlBase === 0xffffffffffffffffn) throw new Error('mmap failed');
    this.headers = Buffer.from(s.koffi.view(ctlPtr, ctlLen));
    this.wakeBuf = this.headers.subarray(DEPTH * HDR_SLOT + DEPTH * 32, DEPTH * HDR_SLOT + DEPTH * 32 + 8);
    const payloadLen = init.maxPayload;
    for (let i = 0; i < DEPTH; i++) {
      const ptr = s.mmap(payloadLen, PROT_RW, MAP_PRIVATE_ANON, -1, 0);
      const addr = s.koffi.address(ptr);
      if (addr === 0xffffffffffffffffn) throw new Error('mmap failed');
      this.payloads.push(Buffer.from(s.koffi.view(ptr, payloadLen)));
      const iov = DEPTH * HDR_SLOT + i * 32;
      this.headers.writeBigUInt64LE(this.ctlBase + BigInt(i * HDR_SLOT), iov);
      this.headers.writeBigUInt64LE(BigInt(HDR_SLOT), iov + 8);
      this.headers.writeBigUInt64LE(addr, iov + 16);
      this.headers.writeBigUInt64LE(BigInt(payloadLen), iov + 24);
    }
  }

  /** Register every entry and arm the wake-up; 0 or -errno. */
  start(): number {
    for (let i = 0; i < DEPTH; i++) {
      const { b, o } = this.ring.sqe(IORING_OP_URING_CMD, this.init.fd, i);
      b.writeUInt32LE(CMD_REGISTER, o + 8);
      b.writeBigUInt64LE(this.ctlBase + BigInt(DEPTH * HDR_SLOT + i * 32), o + 16);
      b.writeUInt32LE(2, o + 24);
      b.writeUInt16LE(this.init.qid, o + 64);
    }
    this.armWake();
    const n = this.ring.enter(0);
    if (n < 0) return n;
    // A refused REGISTER completes at once, inside that enter: look before saying ready.
    // Anything else that came already waits for run().
    let refused = 0;
    this.ring.reap((ud, res) => {
      if (ud !== WAKE && res < 0) refused = res;
      else this.early.push([ud, res]);
    });
    return refused;
  }

  private armWake(): void {
    const { b, o } = this.ring.sqe(IORING_OP_READ, this.init.wakeFd, WAKE);
    b.writeBigUInt64LE(this.ctlBase + BigInt(DEPTH * HDR_SLOT + DEPTH * 32), o + 16);
    b.writeUInt32LE(8, o + 24);
  }

  run(): number {
    for (const [ud, res] of this.early.splice(0)) this.complete(ud, res);
    // Only a queue pinned to its CPU spins (fs/fuse-session.ts, URING_SPIN_NS): unpinned,
    // the spinning thread often sat on the CPU of the very reader it waited for.
    const spinNs = this.pinned ? BigInt(this.init.spinNs) : 0n;
    for (;;) {
      if (Atomics.load(this.init.stop, 0) !== 0) return 0;
      // A reader that waits on each reply sends its next request within microseconds:
      // submit the commits and look at the completion ring a little while before
      // sleeping in io_uring_enter (fuse-worker.ts does the same with read(2)).
      let n = 0;
      if (spinNs > 0n) {
        if (this.ring.pending() > 0) n = this.ring.enter(0);
        const deadline = process.hrtime.bigint() + spinNs;
        const y = this.init.spinYield;
        while (!this.ring.ready() && process.hrtime.bigint() < deadline) if (y) this.s.yield();
      }
      if (n >= 0 && !this.ring.ready()) n = this.ring.enter(1);
      if (n < 0 && n !== -EINTR) return -n;
      this.ring.reap((ud, res) => this.complete(ud, res));
      if (this.ended) return this.ended;
      if (this.ciphers.waiting) return NEED_CIPHERS;
    }
  }

  private complete(ud: number, res: number): void {
    if (ud === WAKE) {
      this.mail();
      this.armWake();
      return;
    }
    if (res < 0) {
      // ENOTCONN/ECANCELED: the connection is going away (unmount or abort).
      this.ended = res === -ENOTCONN || res === -ECANCELED ? ENODEV : -res;
      return;
    }
    this.request(ud);
  }

  private mail(): void {
    for (let m = receiveMessageOnPort(this.init.port); m; m = receiveMessageOnPort(this.init.port)) {
      const msg = m.message as { reply?: ArrayBuffer; ino?: number } & Partial<MapShare>;
      if (msg.reply) this.replyFromMain(Buffer.from(msg.reply));
      else if (msg.table) {
        this.maps.set(msg.ino!, msg.table);
        this.ciphers.got(msg.ino!, msg.ciphers);
        registerLog({ table: msg.table, log: msg.log });
      }
    }
    this.mailSeen = Atomics.load(this.init.ctl, 1);
  }

  private request(ent: number): void {
    if (Atomics.load(this.init.ctl, 1) !== this.mailSeen) this.mail();
    const h = this.headers;
    const at = ent * HDR_SLOT;
    const len = h.readUInt32LE(at);
    const opcode = h.readUInt32LE(at + 4);
    const unique = Number(h.readBigUInt64LE(at + 8));
    const payloadSz = h.readUInt32LE(at + HDR_ENT + 16);
    // The op header's size is not in the entry; the in header's len covers all three parts.
    const opSize = Math.max(0, Math.min(128, len - IN_HEADER - payloadSz));
    if (opcode === OP_READ && opSize >= READ_IN && this.serveRead(ent, unique)) return;
    if (opcode === OP_WRITE && opSize >= WRITE_IN && this.serveWrite(ent, unique, payloadSz)) return;
    const n = IN_HEADER + opSize + payloadSz;
    const copy = new ArrayBuffer(n);
    const c = Buffer.from(copy);
    h.copy(c, 0, at, at + IN_HEADER);
    c.writeUInt32LE(n, 0);
    h.copy(c, IN_HEADER, at + HDR_OP_IN, at + HDR_OP_IN + opSize);
    this.payloads[ent]!.copy(c, IN_HEADER + opSize, 0, payloadSz);
    this.pending.set(unique, ent);
    parentPort!.postMessage({ type: 'request', buf: copy } satisfies UringMessage, [copy]);
  }

  /** The main thread's reply (out header and body) into the entry, committed. */
  private replyFromMain(b: Buffer): void {
    const unique = Number(b.readBigUInt64LE(8));
    const ent = this.pending.get(unique);
    if (ent === undefined) return;
    this.pending.delete(unique);
    const body = Math.max(0, b.length - OUT_HEADER);
    b.copy(this.payloads[ent]!, 0, OUT_HEADER, OUT_HEADER + body);
    this.commit(ent, unique, b.readInt32LE(4), body);
  }

  private commit(ent: number, unique: number, error: number, payloadLen: number): void {
    const h = this.headers;
    const at = ent * HDR_SLOT;
    h.writeUInt32LE(OUT_HEADER + payloadLen, at);
    h.writeInt32LE(error, at + 4);
    h.writeBigUInt64LE(BigInt(unique), at + 8);
    h.writeUInt32LE(payloadLen, at + HDR_ENT + 16);
    const { b, o } = this.ring.sqe(IORING_OP_URING_CMD, this.init.fd, ent);
    b.writeUInt32LE(CMD_COMMIT_AND_FETCH, o + 8);
    b.writeBigUInt64LE(this.ctlBase + BigInt(DEPTH * HDR_SLOT + ent * 32), o + 16);
    b.writeUInt32LE(2, o + 24);
    b.writeBigUInt64LE(BigInt(unique), o + 56);
    b.writeUInt16LE(this.init.qid, o + 64);
  }

  close(): void {
    this.ring.close();
  }

  /**
   * The map of entry `ent`'s READ or WRITE (their arguments start alike), its range in
   * `offset` and `size`; undefined to hand it on (as fuse-worker.ts target()).
   */
  private target(ent: number): Int32Array | undefined {
    const h = this.headers;
    const at = ent * HDR_SLOT;
    const table = this.maps.get((this.ino = Number(h.readBigUInt64LE(at + 16))));
    if (!table) return undefined;
    if (this.init.denyOthers) {
      const uid = h.readUInt32LE(at + 24);
      if (uid !== 0 && uid !== this.init.owner) return undefined;
    }
    const offset = (this.offset = Number(h.readBigUInt64LE(at + HDR_OP_IN + 8)));
    const size = (this.size = h.readUInt32LE(at + HDR_OP_IN + 16));
    return size === 0 || size > this.init.maxPayload || offset + size > tableSize(table) ? undefined : table;
  }

  /** A WRITE in place (as fuse-worker.ts: read-map-runs.ts writeInPlace), or false to hand it on. */
  private serveWrite(ent: number, unique: number, payloadSz: number): boolean {
    const table = this.target(ent);
    if (!table) return false;
    const { offset, size } = this;
    if (size !== payloadSz) return false;
    const payload = this.payloads[ent]!;
    if (!writeInPlace(table, offset, size, payload, 0, this.hit, this.runs, this.ciphers.of(this.ino))) return false;
    // struct fuse_write_out: the size written, and padding.
    payload.writeUInt32LE(size, 0);
    payload.writeUInt32LE(0, 4);
    this.commit(ent, unique, 0, WRITE_OUT);
    return true;
  }

  /** A READ from the read map alone (as fuse-worker.ts), or false to hand it on. */
  private serveRead(ent: number, unique: number): boolean {
    const table = this.target(ent);
    if (!table) return false;
    const { offset, size } = this;
    const out = this.payloads[ent]!;
    const runs = this.runs;
    const count = readRuns(table, offset, size, this.hit, runs);
    if (count < 0 || !fillRuns(runs, count, out, 0, this.ciphers.of(this.ino), granuleOf(table))) return false;
    this.commit(ent, unique, 0, size);
    countServed(table, size, false);
    return true;
  }
}

async function main(): Promise<void> {
  const init = workerData as UringInit;
  // Tests only: this queue fails to start, as a real failure would (the fallback's test).
  if (process.env.TSMOUNT_FUSE_URING_FAIL_QUEUE === String(init.qid)) throw new Error(`queue ${init.qid}: failure asked for by TSMOUNT_FUSE_URING_FAIL_QUEUE`);
  const s = sys();
  const pinned = init.pin && s.pin(init.qid);
  const q = new Queue(s, init);
  q.pinned = pinned;
  const r = q.start();
  if (r < 0) {
    q.close();
    throw new Error(`FUSE_IO_URING_CMD_REGISTER of queue ${init.qid}: errno ${-r}`);
  }
  parentPort!.postMessage({ type: 'ready' } satisfies UringMessage);
  let errno = q.run();
  for (; errno === NEED_CIPHERS; errno = q.run()) await q.ciphers.load();
  q.close();
  parentPort!.postMessage({ type: 'end', errno } satisfies UringMessage);
}

if (parentPort && (workerData as Partial<UringInit> | null)?.fuseUring === true) void main();
