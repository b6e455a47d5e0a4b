// A FUSE worker thread: it serves one cloned /dev/fuse descriptor (FUSE_DEV_IOC_CLONE,
// as QEMU's FUSE export does per iothread). It reads requests in a loop of its own,
// answers a READ whose whole range the shared read map covers (read-map-table.ts) with
// pread(2) from the host files straight into the reply and one write(2) (or, with
// TSMOUNT_FUSE_SPLICE, splice(2) through a pipe: Splicer below), writes a WRITE whose
// whole range the map says is writable in place with pwrite(2) (an overwrite of
// clusters the format would only overwrite too), and hands
// every other request to the main thread, which owns the file tree and the format
// drivers and writes that reply to this worker's descriptor (the kernel wants the
// reply on the descriptor the request was read from). No JS state is shared: the
// maps are shared memory with one writer, the main thread.
//
// Imports only what does not pull in the block graph; koffi (poll and read, which Node
// does not offer on a non-blocking character device) is loaded here, after the main
// thread has loaded it.
import fs from 'node:fs';
import { parentPort, receiveMessageOnPort, workerData, type MessagePort } from 'node:worker_threads';
import { countServed, GRANULE, granuleOf, lookup, tableSize, WINDOW } from './read-map-table.js';
import { fillRuns, NEED_CIPHERS, readRuns, registerLog, RUN, ThreadCiphers, writeInPlace, type MapShare } from './read-map-runs.js';
import { INFLATE_SLACK } from '../drivers/util/raw-inflater.js';
import { loadKoffi } from '../drivers/util/koffi-load.js';

export interface WorkerInit {
  /** The cloned /dev/fuse descriptor, non-blocking. */
  fd: number;
  /** The negotiated request size (max_write). */
  maxRequest: number;
  /** Shared control words (CTL_*). */
  ctl: Int32Array;
  /** Maps arrive here ({ ino, ...MapShare }) while the loop runs; CTL_MAIL says when. */
  port: MessagePort;
  /** allow_root: only these users' READs are served here, the rest go to the main thread. */
  denyOthers: boolean;
  owner: number;
  /** How long to look for the next request before sleeping in poll(2). */
  spinNs: number;
  /**
   * Request slots shared with the main thread: SLOTS buffers of maxRequest + 4096 bytes,
   * laid end to end, and one state word per slot (0: the worker's, 1: handed over).
   */
  slots: SharedArrayBuffer;
  slotState: Int32Array;
}

export type WorkerMessage =
  | { type: 'ready' }
  /** A request the main thread serves: in slot `slot` (n bytes), or copied into `buf`. */
  | { type: 'request'; slot: number; n: number }
  | { type: 'request'; buf: ArrayBuffer }
  /** The map lacks what lies a window past a READ this thread served: publish around `offset`. */
  | { type: 'ahead'; ino: number; offset: number }
  | { type: 'end'; errno: number };

/**
 * Request slots per worker. A request handed to the main thread stays in its slot
 * until served (a WRITE's data is written from there), so this many can be in flight
 * from one worker without a copy; past that a request is copied out.
 */
export const SLOTS = 8;
/** Requests smaller than this are copied into the message instead: a slot is a megabyte. */
export const SLOT_MIN = 16 * 1024;

/** The size of one request slot (a request's header, its arguments and up to maxRequest bytes of data). */
export function slotSize(maxRequest: number): number {
  return maxRequest + 4096;
}

export const CTL_STOP = 0;
export const CTL_MAIL = 1;
/** Requests handed to the main thread so far: its spin stops when this moves. */
export const CTL_HANDED = 2;
/**
 * 1: the main thread reads its own descriptor for a writer whose every WRITE is its to
 * serve (fuse-session.ts writerMode); workers wait on this word instead of reading. 0: serve.
 */
export const CTL_PARK = 3;
/** Requests the workers answered themselves so far: a writer the main thread parks for sees none. */
export const CTL_SERVED = 4;
export const CTL_WORDS = 5;

const OP_READ = 15;
const OP_WRITE = 16;
const IN_HEADER = 40;
const OUT_HEADER = 16;
const READ_IN = 40;
const WRITE_IN = 40;
const WRITE_OUT = 8;
const EINTR = 4;
const EAGAIN = 11;
const ENOENT = 2;
const ENODEV = 19;
const POLLIN = 1;
/** poll(2) wakes this often to see whether the session was closed without an unmount. */
const POLL_MS = 200;

const PAGE = 4096;
const O_NONBLOCK = 0o4000;
const O_CLOEXEC = 0o2000000;
const F_SETPIPE_SZ = 1031;

/**
 * Answer a worker's READ of at least SPLICE_MIN bytes by splicing the host file's
 * pages through a pipe into /dev/fuse (one copy, kernel to kernel) instead of pread
 * into a JS buffer and write (two copies): 1.4x on 1 MiB sequential reads, 45 % less
 * worker CPU (scripts/BENCHMARKS.md, "Splice (issue 21)"). TSMOUNT_FUSE_SPLICE=0 turns
 * it off. Smaller reads keep pread: splice costs a system call more per reply, and
 * what it saves is a copy of the data. Read here, not in the session: a worker
 * inherits the server's environment.
 */
const SPLICE = process.env.TSMOUNT_FUSE_SPLICE !== '0';
const SPLICE_MIN = GRANULE;

interface Sys {
  read(fd: number, buf: Buffer, n: number): number;
  poll(fds: Buffer, n: number, timeout: number): number;
  errno(): number;
  pipe2(fds: Buffer, flags: number): number;
  fcntl(fd: number, cmd: number, arg: number): number;
  /** splice(2) with the input offset in `offIn` (an int64, advanced by the kernel) or none. */
  splice(fdIn: number, offIn: Buffer | null, fdOut: number, len: number, flags: number): number;
  close(fd: number): number;
}

function loadSys(): Sys {
  // koffi's own CommonJS entry; loaded only now, in this thread.
  const koffi = loadKoffi();
  const libc = koffi.load('libc.so.6');
  const read = libc.func('long read(int fd, _Out_ void *buf, size_t n)');
  const poll = libc.func('int poll(_Inout_ void *fds, unsigned long n, int timeout)');
  const pipe2 = libc.func('int pipe2(_Out_ void *fds, int flags)');
  // fcntl is variadic; its third argument is an int for F_SETPIPE_SZ, passed as one.
  const fcntl = libc.func('int fcntl(int fd, int cmd, int arg)');
  const splice = libc.func('long splice(int fd_in, _Inout_ void *off_in, int fd_out, void *off_out, size_t len, unsigned int flags)');
  const close = libc.func('int close(int fd)');
  return {
    read: (fd, buf, n) => Number(read(fd, buf, n)),
    poll: (fds, n, timeout) => poll(fds, n, timeout) as number,
    errno: () => koffi.errno(),
    pipe2: (fds, flags) => pipe2(fds, flags) as number,
    fcntl: (fd, cmd, arg) => fcntl(fd, cmd, arg) as number,
    splice: (fdIn, offIn, fdOut, len, flags) => Number(splice(fdIn, offIn, fdOut, null, len, flags)),
    close: (fd) => close(fd) as number,
  };
}

/**
 * The splice path of one worker, as libfuse's splice mode: the reply header is
 * written into a pipe, each run of the READ is spliced from its host file into the
 * pipe (references to the host file's page cache pages, no copy), and the pipe is
 * spliced into /dev/fuse, where the kernel copies the pages into the reply once. The
 * pipe must hold a whole reply (the kernel takes a reply from a pipe only whole):
 * header + max_write needs more than the 1 MiB /proc/sys/fs/pipe-max-size allows by
 * default, which only CAP_SYS_RESOURCE may pass (root in a container may lack it); a
 * READ that would not fit takes the pread path. Without SPLICE_F_MOVE: for readahead the kernel would steal
 * the spliced pages out of the image file's own page cache into the flat file's.
 *
 * Both ends are non-blocking, so a pipe that is fuller than counted fails (EAGAIN)
 * rather than hangs. Whatever goes wrong halfway (a short splice at the end of the
 * host file, an error) leaves part of a reply in the pipe: the pipe is then closed
 * and a fresh one made, and the READ takes the pread path.
 */
class Splicer {
  private r = -1;
  private w = -1;
  /** Pipe buffers (one page each) the pipe holds. */
  private slots = 0;
  private readonly off = Buffer.alloc(8);
  private readonly zeros = Buffer.alloc(GRANULE);

  constructor(private readonly sys: Sys, private readonly maxRequest: number) {}

  /** Make the pipe; false when the system gives none big enough for one granule. */
  open(): boolean {
    const fds = Buffer.alloc(8);
    if (this.sys.pipe2(fds, O_NONBLOCK | O_CLOEXEC) !== 0) return false;
    this.r = fds.readInt32LE(0);
    this.w = fds.readInt32LE(4);
    // Header and data of the largest request, with room for runs that start mid-page
    // (the kernel rounds up to a power of two pages); a user past pipe-max-size gets
    // EPERM: try smaller, down to what holds one granule.
    for (let want = 2 * this.maxRequest; want >= 2 * GRANULE; want >>= 1) {
      const got = this.sys.fcntl(this.w, F_SETPIPE_SZ, want);
      if (got > 0) {
        this.slots = Math.floor(got / PAGE);
        return true;
      }
    }
    this.close();
    return false;
  }

  close(): void {
    if (this.r >= 0) this.sys.close(this.r);
    if (this.w >= 0) this.sys.close(this.w);
    this.r = this.w = -1;
    this.slots = 0;
  }

  /** A pipe that may hold part of a reply is no use: start with a fresh one. */
  private reset(): void {
    this.close();
    this.open();
  }

  /**
   * Whether the runs fit the pipe: one buffer for the header, one per page a file run
   * touches, and for zeros (written, so they fill up the last written buffer first)
   * one per page and one more.
   */
  fits(runs: number[], count: number): boolean {
    if (this.slots === 0) return false;
    let need = 1;
    for (let i = 0; i < count; i += RUN) {
      const fd = runs[i]!;
      const host = runs[i + 1]!;
      const length = runs[i + 2]!;
      // Ciphertext is decrypted in a buffer, never spliced.
      if (runs[i + 3] !== 0) return false;
      need += fd < 0 ? Math.ceil(length / PAGE) + 1 : Math.floor((host + length - 1) / PAGE) - Math.floor(host / PAGE) + 1;
    }
    return need <= this.slots;
  }

  /**
   * Send the reply `header` (16 bytes, its length the whole reply) and the runs
   * (read-map-runs.ts readRuns, none encrypted: fits) on `fuseFd`. False: nothing was sent.
   */
  send(fuseFd: number, header: Buffer, runs: number[], count: number, total: number): boolean {
    const sys = this.sys;
    if (!this.fill(header, runs, count)) {
      this.reset();
      return false;
    }
    const n = sys.splice(this.r, null, fuseFd, total, 0);
    if (n !== total) {
      const e = n < 0 ? sys.errno() : 0;
      this.reset();
      // ENOENT: the request was interrupted and the kernel no longer waits for it (as
      // the write path, nothing more to do); ENODEV: the read loop ends. Anything else
      // (EINVAL: the kernel took nothing): the pread path answers.
      return e === ENOENT || e === ENODEV;
    }
    return true;
  }

  private fill(header: Buffer, runs: number[], count: number): boolean {
    const sys = this.sys;
    try {
      if (fs.writeSync(this.w, header, 0, OUT_HEADER) !== OUT_HEADER) return false;
    } catch {
      return false;
    }
    for (let i = 0; i < count; i += RUN) {
      const fd = runs[i]!;
      let host = runs[i + 1]!;
      let left = runs[i + 2]!;
      if (fd < 0) {
        // Zeros are rare on this path (a sparse region inside a read of data): written.
        while (left > 0) {
          const n = Math.min(left, this.zeros.length);
          try {
            if (fs.writeSync(this.w, this.zeros, 0, n) !== n) return false;
          } catch {
            return false;
          }
          left -= n;
        }
        continue;
      }
      while (left > 0) {
        this.off.writeBigInt64LE(BigInt(host), 0);
        const n = sys.splice(fd, this.off, this.w, left, 0);
        if (n > 0) {
          host += n;
          left -= n;
          continue;
        }
        // 0: the host file ended early; EAGAIN: the pipe is full after all.
        if (n < 0 && sys.errno() === EINTR) continue;
        return false;
      }
    }
    return true;
  }
}

class Worker {
  private readonly maps = new Map<number, Int32Array>();
  /** The slots, as buffers over the shared memory; the last one is this thread's own. */
  private readonly slots: Buffer[] = [];
  /** The slot the next request is read into (SLOTS: the private buffer, every slot was handed over). */
  private slot = 0;
  private readonly reply: Buffer;
  private readonly writeReply = Buffer.alloc(OUT_HEADER + WRITE_OUT);
  /** The file and range of the request target() looked at. */
  private ino = 0;
  private offset = 0;
  private size = 0;
  private readonly pollfd = Buffer.alloc(8);
  private readonly hit = [0, 0, 0, 0, 0];
  /** The runs of the READ being served (read-map-runs.ts readRuns). */
  private readonly runs: number[] = [];
  /** Per file, the ciphers its map names. */
  readonly ciphers = new ThreadCiphers();
  private readonly splicer: Splicer | undefined;
  private mailSeen = 0;
  /** Per file, the window this thread last asked the main thread to publish (lookAhead). */
  private readonly asked = new Map<number, number>();

  constructor(private readonly sys: Sys, private readonly init: WorkerInit) {
    const size = slotSize(init.maxRequest);
    for (let i = 0; i < SLOTS; i++) this.slots.push(Buffer.from(init.slots, i * size, size));
    this.slots.push(Buffer.allocUnsafe(size));
    // Room past the largest reply: a compressed cluster at its end inflates in place (read-map-runs.ts inflateRun).
    this.reply = Buffer.allocUnsafe(OUT_HEADER + init.maxRequest + INFLATE_SLACK);
    this.pollfd.writeInt32LE(init.fd, 0);
    this.pollfd.writeInt16LE(POLLIN, 4);
    if (SPLICE) {
      const sp = new Splicer(sys, init.maxRequest);
      this.splicer = sp.open() ? sp : undefined;
    }
  }

  close(): void {
    this.splicer?.close();
  }

  private mail(): void {
    const ctl = this.init.ctl;
    const seen = Atomics.load(ctl, CTL_MAIL);
    if (seen === this.mailSeen) return;
    this.mailSeen = seen;
    for (let m = receiveMessageOnPort(this.init.port); m; m = receiveMessageOnPort(this.init.port)) {
      const share = m.message as MapShare & { ino: number };
      this.maps.set(share.ino, share.table);
      this.ciphers.got(share.ino, share.ciphers);
      registerLog(share);
    }
  }

  /** The loop; returns the errno that ended it (0: stopped), or NEED_CIPHERS (ciphers.load(), then run again). */
  run(): number {
    const { fd, ctl, spinNs } = this.init;
    let lastServed = 0n;
    for (;;) {
      if (Atomics.load(ctl, CTL_STOP) !== 0) return 0;
      if (Atomics.load(ctl, CTL_PARK) !== 0) {
        // A request read while parking began is served as usual; from here on, none until
        // the main thread lets go (a notify), or the timeout looks at the stop flag again.
        Atomics.wait(ctl, CTL_PARK, 1, POLL_MS);
        lastServed = 0n;
        continue;
      }
      this.mail();
      if (this.ciphers.waiting) return NEED_CIPHERS;
      // Every slot was handed over: back to one as soon as the main thread gave one back.
      if (this.slot === SLOTS) this.slot = this.freeSlot(0);
      const buf = this.slots[this.slot]!;
      const n = this.sys.read(fd, buf, buf.length);
      if (n > 0) {
        // Only after a reply of its own: a request handed over is answered by the main
        // thread, and a reader that waits for that answer sends nothing meanwhile, so
        // spinning then only took a core from the main thread (random 4 KiB writes).
        if (this.handle(n)) {
          Atomics.add(ctl, CTL_SERVED, 1);
          if (spinNs > 0) lastServed = process.hrtime.bigint();
        }
        continue;
      }
      const e = n < 0 ? this.sys.errno() : 0;
      if (e === EAGAIN) {
        // A reader that waits on each reply sends its next request within microseconds:
        // look for it a little while before sleeping (fuse-session.ts spin()).
        if (spinNs > 0 && process.hrtime.bigint() - lastServed < BigInt(spinNs)) continue;
        this.sys.poll(this.pollfd, 1, POLL_MS);
        continue;
      }
      // ENOENT: a request was interrupted before it could be read.
      if (e === EINTR || e === ENOENT) continue;
      // ENODEV: unmounted or aborted, the normal end.
      return e || 5;
    }
  }

  /** Serve or hand over the request just read; true if this thread answered it. */
  private handle(n: number): boolean {
    const buf = this.slots[this.slot]!;
    if (n >= IN_HEADER + READ_IN && buf.readUInt32LE(0) === n) {
      const op = buf.readUInt32LE(4);
      if (op === OP_READ && this.serveRead(buf)) return true;
      if (op === OP_WRITE && this.serveWrite(buf, n)) return true;
    }
    this.handOver(buf, n);
    return false;
  }

  /**
   * The main thread serves this request. A large one (a WRITE's data) stays where it was
   * read: its slot is handed over and given back when served (slotState), and the next
   * request goes into another free slot. Fresh memory for each request instead (a new
   * ArrayBuffer, transferred) cost page faults and zeroing of a megabyte per WRITE:
   * about 5 ms each here, writes 7x slower than on the JS thread alone (issue 21).
   */
  private handOver(buf: Buffer, n: number): void {
    const state = this.init.slotState;
    Atomics.add(this.init.ctl, CTL_HANDED, 1);
    if (n >= SLOT_MIN && this.slot < SLOTS) {
      const slot = this.slot;
      Atomics.store(state, slot, 1);
      parentPort!.postMessage({ type: 'request', slot, n } satisfies WorkerMessage);
      this.slot = this.freeSlot(slot + 1);
      return;
    }
    const copy = new ArrayBuffer(n);
    buf.copy(new Uint8Array(copy), 0, 0, n);
    parentPort!.postMessage({ type: 'request', buf: copy } satisfies WorkerMessage, [copy]);
  }

  /** The first slot from `from` on (round) that is this thread's, or SLOTS (the private buffer). */
  private freeSlot(from: number): number {
    const state = this.init.slotState;
    for (let i = 0; i < SLOTS; i++) {
      const j = (from + i) % SLOTS;
      if (Atomics.load(state, j) === 0) return j;
    }
    return SLOTS;
  }

  /**
   * The map of a READ's or WRITE's file (their arguments start alike: offset, size),
   * with the range in `offset` and `size`; undefined to hand the request on (no map,
   * another user under allow_root, empty, larger than negotiated, past the end).
   */
  private target(buf: Buffer): Int32Array | undefined {
    const table = this.maps.get((this.ino = Number(buf.readBigUInt64LE(16))));
    if (!table) return undefined;
    if (this.init.denyOthers) {
      const uid = buf.readUInt32LE(24);
      if (uid !== 0 && uid !== this.init.owner) return undefined;
    }
    const offset = (this.offset = Number(buf.readBigUInt64LE(IN_HEADER + 8)));
    const size = (this.size = buf.readUInt32LE(IN_HEADER + 16));
    return size === 0 || size > this.init.maxRequest || offset + size > tableSize(table) ? undefined : table;
  }

  /** A READ from the map alone, or false to hand it to the main thread. */
  private serveRead(buf: Buffer): boolean {
    const table = this.target(buf);
    if (!table) return false;
    const { offset, size } = this;
    const out = this.reply;
    const runs = this.runs;
    const count = readRuns(table, offset, size, this.hit, runs);
    if (count < 0) return false;
    const len = OUT_HEADER + size;
    out.writeUInt32LE(len, 0);
    out.writeInt32LE(0, 4);
    buf.copy(out, 8, 8, 16); // unique
    const sp = this.splicer;
    const spliced = !!sp && size >= SPLICE_MIN && sp.fits(runs, count) && sp.send(this.init.fd, out, runs, count, len);
    if (!spliced) {
      if (!fillRuns(runs, count, out, OUT_HEADER, this.ciphers.of(this.ino), granuleOf(table))) return false;
      try {
        fs.writeSync(this.init.fd, out, 0, len);
      } catch {
        // ENOENT: interrupted meanwhile, the kernel no longer waits; ENODEV: the read loop ends.
      }
    }
    countServed(table, size, spliced);
    this.lookAhead(this.ino, table, offset + size);
    return true;
  }

  /** A WRITE straight into the host files (read-map-runs.ts writeInPlace), or false to hand it to the main thread. */
  private serveWrite(buf: Buffer, n: number): boolean {
    const table = this.target(buf);
    if (!table) return false;
    const { offset, size } = this;
    if (n !== IN_HEADER + WRITE_IN + size) return false;
    if (!writeInPlace(table, offset, size, buf, IN_HEADER + WRITE_IN, this.hit, this.runs, this.ciphers.of(this.ino))) return false;
    const out = this.writeReply;
    out.writeUInt32LE(OUT_HEADER + WRITE_OUT, 0);
    out.writeInt32LE(0, 4);
    buf.copy(out, 8, 8, 16); // unique
    out.writeUInt32LE(size, OUT_HEADER);
    try {
      fs.writeSync(this.init.fd, out, 0, OUT_HEADER + WRITE_OUT);
    } catch {
      // ENOENT: interrupted meanwhile; ENODEV: the read loop ends.
    }
    return true;
  }

  /**
   * A window past a READ this thread served, not in the map: ask the main thread to
   * publish it (once per window), so that a sequential reader, which only this thread
   * sees, never reaches a part of the file the map does not hold yet. Without it each
   * new 64 MiB window cost its first 10-40 reads on the main thread (vmdk: half the reads).
   */
  private lookAhead(ino: number, table: Int32Array, end: number): void {
    const at = end + WINDOW;
    if (at >= tableSize(table)) return;
    const w = Math.floor(at / WINDOW);
    if (this.asked.get(ino) === w || lookup(table, Math.floor(at / granuleOf(table)), this.hit)) return;
    this.asked.set(ino, w);
    parentPort!.postMessage({ type: 'ahead', ino, offset: at } satisfies WorkerMessage);
  }
}

async function main(): Promise<void> {
  const init = workerData as WorkerInit;
  let sys: Sys;
  try {
    sys = loadSys();
  } catch (err) {
    throw new Error(`koffi: ${(err as Error).message}`);
  }
  parentPort!.postMessage({ type: 'ready' } satisfies WorkerMessage);
  const worker = new Worker(sys, init);
  let errno = worker.run();
  for (; errno === NEED_CIPHERS; errno = worker.run()) await worker.ciphers.load();
  // The pipe goes with the loop: a server in a test process mounts many times.
  worker.close();
  parentPort!.postMessage({ type: 'end', errno } satisfies WorkerMessage);
}

if (parentPort) void main();
