// A FUSE worker thread: it serves one cloned /dev/fuse descriptor (FUSE_DEV_IOC_CLONE,
// as QEMU's FUSE export does per iothread). It reads requests in a loop of its own,
// answers a READ whose whole range the shared read map covers (read-map-table.ts) with
// pread(2) from the host files straight into the reply and one write(2), and hands
// every other request to the main thread, which owns the file tree and the format
// drivers and writes that reply to this worker's descriptor (the kernel wants the
// reply on the descriptor the request was read from). No JS state is shared: the
// maps are shared memory with one writer, the main thread.
//
// Imports only what does not pull in the block graph; koffi (poll and read, which Node
// does not offer on a non-blocking character device) is loaded here, after the main
// thread has loaded it.
import fs from 'node:fs';
import { createRequire } from 'node:module';
import { parentPort, receiveMessageOnPort, workerData, type MessagePort } from 'node:worker_threads';
import { GRANULE, H_KIB, H_READS, lookup, tableSize } from './read-map-table.js';

export interface WorkerInit {
  /** The cloned /dev/fuse descriptor, non-blocking. */
  fd: number;
  /** The negotiated request size (max_write). */
  maxRequest: number;
  /** Shared control words (CTL_*). */
  ctl: Int32Array;
  /** Maps arrive here ({ ino, table }) while the loop runs; CTL_MAIL says when. */
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
export const CTL_WORDS = 2;

const OP_READ = 15;
const IN_HEADER = 40;
const OUT_HEADER = 16;
const READ_IN = 40;
const EINTR = 4;
const EAGAIN = 11;
const ENOENT = 2;
const POLLIN = 1;
/** poll(2) wakes this often to see whether the session was closed without an unmount. */
const POLL_MS = 200;

interface Sys {
  read(fd: number, buf: Buffer, n: number): number;
  poll(fds: Buffer, n: number, timeout: number): number;
  errno(): number;
}

function loadSys(): Sys {
  // koffi's own CommonJS entry; loaded only now, in this thread.
  const koffi = createRequire(import.meta.url)('koffi') as typeof import('koffi');
  const libc = koffi.load('libc.so.6');
  const read = libc.func('long read(int fd, _Out_ void *buf, size_t n)');
  const poll = libc.func('int poll(_Inout_ void *fds, unsigned long n, int timeout)');
  return {
    read: (fd, buf, n) => Number(read(fd, buf, n)),
    poll: (fds, n, timeout) => poll(fds, n, timeout) as number,
    errno: () => koffi.errno(),
  };
}

class Worker {
  private readonly maps = new Map<number, Int32Array>();
  /** The slots, as buffers over the shared memory; the last one is this thread's own. */
  private readonly slots: Buffer[] = [];
  /** The slot the next request is read into (SLOTS: the private buffer, every slot was handed over). */
  private slot = 0;
  private readonly reply: Buffer;
  private readonly pollfd = Buffer.alloc(8);
  private readonly hit = [0, 0];
  private mailSeen = 0;

  constructor(private readonly sys: Sys, private readonly init: WorkerInit) {
    const size = slotSize(init.maxRequest);
    for (let i = 0; i < SLOTS; i++) this.slots.push(Buffer.from(init.slots, i * size, size));
    this.slots.push(Buffer.allocUnsafe(size));
    this.reply = Buffer.allocUnsafe(OUT_HEADER + init.maxRequest);
    this.pollfd.writeInt32LE(init.fd, 0);
    this.pollfd.writeInt16LE(POLLIN, 4);
  }

  private mail(): void {
    const ctl = this.init.ctl;
    const seen = Atomics.load(ctl, CTL_MAIL);
    if (seen === this.mailSeen) return;
    this.mailSeen = seen;
    for (let m = receiveMessageOnPort(this.init.port); m; m = receiveMessageOnPort(this.init.port)) {
      const { ino, table } = m.message as { ino: number; table: Int32Array };
      this.maps.set(ino, table);
    }
  }

  /** The loop; returns the errno that ended it (0: stopped). */
  run(): number {
    const { fd, ctl, spinNs } = this.init;
    let lastServed = 0n;
    for (;;) {
      if (Atomics.load(ctl, CTL_STOP) !== 0) return 0;
      this.mail();
      // Every slot was handed over: back to one as soon as the main thread gave one back.
      if (this.slot === SLOTS) this.slot = this.freeSlot(0);
      const buf = this.slots[this.slot]!;
      const n = this.sys.read(fd, buf, buf.length);
      if (n > 0) {
        this.handle(n);
        if (spinNs > 0) lastServed = process.hrtime.bigint();
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

  private handle(n: number): void {
    const buf = this.slots[this.slot]!;
    if (n >= IN_HEADER + READ_IN && buf.readUInt32LE(4) === OP_READ && buf.readUInt32LE(0) === n && this.serveRead(buf)) return;
    this.handOver(buf, n);
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

  /** A READ from the map alone, or false to hand it to the main thread. */
  private serveRead(buf: Buffer): boolean {
    const table = this.maps.get(Number(buf.readBigUInt64LE(16)));
    if (!table) return false;
    if (this.init.denyOthers) {
      const uid = buf.readUInt32LE(24);
      if (uid !== 0 && uid !== this.init.owner) return false;
    }
    const offset = Number(buf.readBigUInt64LE(IN_HEADER + 8));
    const size = buf.readUInt32LE(IN_HEADER + 16);
    // Past the end, or larger than negotiated: the main thread answers those.
    if (size === 0 || size > this.init.maxRequest || offset + size > tableSize(table)) return false;
    const end = offset + size;
    const out = this.reply;
    const hit = this.hit;
    // Runs of granules that continue each other (zeros, or the same file contiguously) are read at once.
    let runFd = 0;
    let runHost = 0;
    let runFrom = offset;
    let pos = offset;
    let first = true;
    while (pos < end) {
      const g = Math.floor(pos / GRANULE);
      if (!lookup(table, g, hit)) return false;
      const [fd, gHost] = hit as [number, number];
      const host = gHost + (pos - g * GRANULE);
      const next = Math.min(end, (g + 1) * GRANULE);
      if (first) {
        first = false;
        runFd = fd;
        runHost = host;
      } else if (fd !== runFd || (fd >= 0 && host !== runHost + (pos - runFrom))) {
        if (!this.fill(runFd, runHost, out, OUT_HEADER + (runFrom - offset), pos - runFrom)) return false;
        runFd = fd;
        runHost = host;
        runFrom = pos;
      }
      pos = next;
    }
    if (!this.fill(runFd, runHost, out, OUT_HEADER + (runFrom - offset), end - runFrom)) return false;
    const len = OUT_HEADER + size;
    out.writeUInt32LE(len, 0);
    out.writeInt32LE(0, 4);
    buf.copy(out, 8, 8, 16); // unique
    try {
      fs.writeSync(this.init.fd, out, 0, len);
    } catch {
      // ENOENT: interrupted meanwhile, the kernel no longer waits; ENODEV: the read loop ends.
    }
    Atomics.add(table, H_READS, 1);
    Atomics.add(table, H_KIB, size >> 10);
    return true;
  }

  /** `length` bytes at `at` in out: zeros (fd < 0) or the host file's bytes; false on a short read or an error. */
  private fill(fd: number, host: number, out: Buffer, at: number, length: number): boolean {
    if (fd < 0) {
      out.fill(0, at, at + length);
      return true;
    }
    let done = 0;
    try {
      while (done < length) {
        const n = fs.readSync(fd, out, at + done, length - done, host + done);
        if (n <= 0) return false;
        done += n;
      }
    } catch {
      return false;
    }
    return true;
  }
}

function main(): void {
  const init = workerData as WorkerInit;
  let sys: Sys;
  try {
    sys = loadSys();
  } catch (err) {
    throw new Error(`koffi: ${(err as Error).message}`);
  }
  parentPort!.postMessage({ type: 'ready' } satisfies WorkerMessage);
  const errno = new Worker(sys, init).run();
  parentPort!.postMessage({ type: 'end', errno } satisfies WorkerMessage);
}

if (parentPort) main();
