// The read map of one flat file, main-thread side: which granules of the file (64 KiB,
// finer for small clusters: granuleShift) are plain data in one host file (or zeros),
// published into shared memory (read-map-table.ts) so the FUSE worker threads
// (fuse-worker.ts) can answer a READ with pread(2) from the host file, without the main
// thread. The format driver keeps
// its one owner: the map is computed here from block status down the backing chain
// (extents.ts chainExtents and each layer's BlockNode.hostFd), never by a worker.
//
// Writes by the main thread: every entry a write, zero or resize may change is
// invalidated before the change starts, and a window walked while a change of it was
// in flight (or that started since) is thrown away, not published. Writes pass straight
// down to the image file (the cluster cache keeps no dirty data), so once a write is
// answered the host file has its bytes and a later miss publishes them.
//
// Writes by the workers: a granule the top layer's block status calls writable in place
// (Extent.inPlace: an overwrite that changes nothing in the format, under a graph that
// lets writes go around it, BlockNode.inPlaceWrites) is published so, and a worker
// writes it with pwrite(2) itself. Such a write never runs while the main thread
// changes the file (H_CHANGING, and each change waits for the workers' writes in
// flight), and a change that moved host space (BlockNode.layoutGeneration: a table
// allocated, which a corrupt image may put where a data cluster was, or a cluster freed;
// not a data cluster a write allocated, which holds data only) starts a new epoch,
// in which no entry published before is written in place (nor one a walk found while
// host space moved: its block status may predate the move). The main thread drops its
// cached data when workers wrote (workerWrites), and flushes a file they wrote (takeDirty).
import createDebug from '../drivers/util/debug.js';
import { messageOf } from '../drivers/errors.js';
import type { BlockNode, CompressedCluster, HostCipher } from '../drivers/types.js';
import { chainExtents } from './extents.js';
import { MAX_COMPRESSED, registerLog, VMDK_MARKER, type MapShare } from './read-map-runs.js';
import {
  lookup, invalidate, invalidateAll, newTable, publish, setTableSize, tableSize, capacityOf, H_READS, H_SPLICED, servedBytes, WINDOW,
  H_CHANGING, H_DIRTY, H_WRITABLE, H_WRITES, H_WRITES_IN_FLIGHT, newEpoch, writtenBytes, GRANULE_SHIFT, MIN_GRANULE_SHIFT, STREAM_DEFLATE_RAW, STREAM_VMDK_GRAIN, STREAM_ZSTD,
} from './read-map-table.js';

const debug = createDebug('tsmount:fuse');

/**
 * Writes in a row that started no epoch (the main thread served them) before a window
 * walked in an epoch since ended is walked again whole: with epochs ending among the
 * writes each walk is out of date at the next one (random 4 KiB writes into a
 * half-allocated qcow2 ran at a third of the speed when every overwrite walked, while
 * each new data cluster still started an epoch).
 */
const STALE_WALK_AFTER = 16;
/** Runs of granules a change touched in a window past which a miss walks the whole window again instead. */
const MEND_RUNS = 64;
/** A change over more windows than this counts as one of the whole file (a resize, a huge zero). */
const MAX_TRACKED_WINDOWS = 16;
/**
 * Whether compressed clusters go into the map, for the reading threads to inflate
 * (Extent.compressed); TSMOUNT_FUSE_INFLATE=0 leaves them to the main thread and its
 * inflate pool (for comparison: scripts/BENCHMARKS.md).
 */
const INFLATE_IN_THREADS = process.env.TSMOUNT_FUSE_INFLATE !== '0';

/** A compressed cluster's stream kind as the map's entries name it (read-map-table.ts). */
const STREAMS: Record<CompressedCluster['stream'], number> = { 'deflate-raw': STREAM_DEFLATE_RAW, 'vmdk-grain': STREAM_VMDK_GRAIN, zstd: STREAM_ZSTD };

/** A change in flight (beginWrite), which endWrite ends. */
export interface MapChange {
  /** Its windows, or first > last for a change of the whole file. */
  first: number;
  last: number;
  /** The top node's layoutGeneration and allocationGeneration when it began. */
  layout: number | undefined;
  allocations: number | undefined;
}

interface Span {
  offset: number;
  end: number;
  /** -1: zeros. */
  fd: number;
  host: number;
  /** A worker may write it in place (fs/read-map-table.ts). */
  inPlace: boolean;
  /** 0, the number of the cipher whose ciphertext lies at `host` (ciphers), or -n: a compressed cluster's stream in the n bytes there. */
  cipher: number;
  /** The stream's kind (read-map-table.ts STREAM_*), for a compressed cluster. */
  stream: number;
}

export class ReadMap {
  readonly table: Int32Array;
  /** The map's unit (granuleShift) and the granules of a window. */
  private readonly granule: number;
  private readonly perWindow: number;
  /**
   * Windows whose map was published: the granules that could be (`bits`), and those a
   * change touched since (`dirty`, bit per granule), which a miss walks again alone
   * instead of the whole window (a file of small clusters written at random, qcow's
   * 4 KiB, walked 64 MiB of its map per write the main thread served). A change marks
   * the allocation units it touches (BlockNode.allocationUnit: a new 1 MiB vdi block
   * maps more than the granules written). The whole window is walked again instead when
   * it was walked in an epoch since ended (so that the workers may write its overwrites
   * again), or when its touched granules are many runs.
   */
  private readonly windows = new Map<number, { bits: Uint8Array; dirty: Uint8Array; dirtyCount: number }>();
  /** Windows being walked, and the walk. */
  private readonly busy = new Map<number, Promise<void>>();
  /** Windows whose dirty granules are being walked again, and the walk. */
  private readonly mending = new Map<number, Promise<void>>();
  /**
   * Windows published at least once (a write then refreshes only its own granules:
   * wrote), each with the epoch (`moves`) it was walked in, or -1 if the workers could
   * not write in place then (a file read before its first write: qcow2 takes writes
   * around it only once its first change ran). A window walked so, or in an epoch
   * since ended, has no entry a worker may write: wrote() walks it again whole.
   */
  private readonly walked = new Map<number, number>();
  /** Walks of written granules in flight (wrote). */
  private readonly refreshing = new Set<Promise<boolean>>();
  /**
   * Changes in flight per window, and per window a count bumped at each start and end:
   * a walk of a window that saw either move is stale. Changes of the whole file count
   * in `everywhere` and `gen` instead.
   */
  private readonly changing = new Map<number, number>();
  private readonly touched = new Map<number, number>();
  private everywhere = 0;
  private gen = 0;
  /** Changes in flight on the file. */
  private inFlight = 0;
  /** The change that ended last started an epoch (wrote() then refreshes nothing, and its streak starts again). */
  private lastMoved = false;
  /** The change that ended last allocated or freed host space, data clusters too (wrote() then refreshes nothing). */
  private lastAllocated = false;
  /** Changes that allocated or freed host space so far (each started an epoch). */
  private moves = 0;
  /** Writes the main thread served since the last one that moved host space (wrote). */
  private overwrites = 0;
  private readonly hit = [0, 0, 0, 0, 0];
  /**
   * The encrypted layers of the chain that can be read around the graph
   * (BlockNode.hostCipher): an entry of ciphertext names its layer's by number, its
   * index plus one. The reading threads get them with the table (share).
   */
  private readonly ciphers: HostCipher[] = [];

  constructor(private readonly top: BlockNode) {
    for (let n: BlockNode | undefined = top, i = 0; n && i < 64; n = n.backing, i++) {
      const c = n.encrypted ? n.hostCipher : undefined;
      if (c && !this.ciphers.includes(c)) this.ciphers.push(c);
    }
    const shift = granuleShift(top);
    this.table = newTable(shift);
    this.granule = 2 ** shift;
    this.perWindow = WINDOW / this.granule;
    setTableSize(this.table, top.size);
    Atomics.store(this.table, H_WRITABLE, 1);
  }

  /** What the reading threads are given: the table, and the ciphers its entries name (the keys go to those threads, in this process). */
  share(): MapShare {
    const log = this.top.writeLog;
    const share: MapShare = this.ciphers.length === 0 ? { table: this.table } : { table: this.table, ciphers: this.ciphers.map((c) => ({ spec: c.cipher.spec, ivBase: c.ivBase })) };
    if (log) share.log = log;
    // This thread writes around the graph too (flatfs.ts writeAround).
    registerLog(share);
    return share;
  }

  /** Reads the workers answered, their bytes, how many by splice; writes they wrote and their bytes (the server's counters). */
  served(): { reads: number; bytes: number; spliced: number; writes: number; bytesWritten: number } {
    const t = this.table;
    return { reads: Atomics.load(t, H_READS) >>> 0, bytes: servedBytes(t), spliced: Atomics.load(t, H_SPLICED) >>> 0, writes: Atomics.load(t, H_WRITES) >>> 0, bytesWritten: writtenBytes(t) };
  }

  /** How many writes the workers wrote so far: when it moved, data cached by the main thread may be stale. */
  workerWrites(): number {
    return Atomics.load(this.table, H_WRITES);
  }

  /** Whether workers wrote since the last call (the file needs a flush at its close). */
  takeDirty(): boolean {
    return Atomics.exchange(this.table, H_DIRTY, 0) !== 0;
  }

  /** A change failed: the image may be marked corrupt now, so workers write nothing more. */
  stopWorkerWrites(): void {
    Atomics.store(this.table, H_WRITABLE, 0);
  }

  /**
   * A READ the main thread served: publish what would let the next ones be served by a
   * worker, and the window after it (a sequential reader is there next). Also what a
   * worker asks for ahead of its reads (fuse-worker.ts lookAhead, with length 1).
   */
  miss(offset: number, length: number): void {
    if (this.everywhere !== 0 || length <= 0) return;
    const first = Math.floor(offset / this.granule);
    const last = Math.floor((offset + length - 1) / this.granule);
    const lastW = Math.floor(last / this.perWindow);
    for (let w = Math.floor(first / this.perWindow); w <= lastW; w++) this.want(w, Math.max(first, w * this.perWindow));
    const next = (lastW + 1) * this.perWindow;
    if (next * this.granule < tableSize(this.table)) this.want(lastW + 1, next);
  }

  /**
   * Granule `a` of window `w` was missed: walk again what a change touched in the window
   * since it was published (mend); else walk the whole window unless it is published
   * with granule `a` (or being walked).
   */
  private want(w: number, a: number): void {
    const win = this.windows.get(w);
    if (win) {
      if (win.dirtyCount > 0) {
        if (this.top.inPlaceWrites === true && this.walked.get(w) !== this.moves) return this.walkWindow(w);
        return this.mend(w, win.dirty);
      }
      // Published already: again only if a granule that could be served was overwritten in its slot.
      if (!bitAt(win.bits, a - w * this.perWindow) || lookup(this.table, a, this.hit)) return;
    }
    this.walkWindow(w);
  }

  private walkWindow(w: number): void {
    if ((this.changing.get(w) ?? 0) !== 0) return;
    if (!this.busy.has(w)) this.busy.set(w, this.publishWindow(w).finally(() => this.busy.delete(w)));
  }

  /** Walk the granules of published window `w` a change touched (`dirty`) again, run by run; the whole window if they are many runs. */
  private mend(w: number, dirty: Uint8Array): void {
    if ((this.changing.get(w) ?? 0) !== 0 || this.busy.has(w) || this.mending.has(w)) return;
    const runs: [number, number][] = [];
    for (let i = 0; i < this.perWindow; i++) {
      if (dirty[i >> 3] === 0) {
        i |= 7;
        continue;
      }
      if (!bitAt(dirty, i)) continue;
      const last = runs[runs.length - 1];
      if (last && last[1] === w * this.perWindow + i - 1) last[1]++;
      else runs.push([w * this.perWindow + i, w * this.perWindow + i]);
    }
    if (runs.length > MEND_RUNS) return this.walkWindow(w);
    const size = tableSize(this.table);
    const walk = (async () => {
      for (const [lo, hi] of runs) {
        const start = lo * this.granule;
        if (start >= size) return;
        const published: number[] = [];
        if (!(await this.publishRange(start, Math.min((hi + 1) * this.granule, size) - start, w, w, (g) => published.push(g)))) return;
        this.settle(w, lo, hi, published);
      }
    })();
    this.mending.set(w, walk.finally(() => this.mending.delete(w)));
  }

  /** Granules [lo, hi] of window `w` were walked again: `published` are in the map, the rest could not be. */
  private settle(w: number, lo: number, hi: number, published: number[]): void {
    const win = this.windows.get(w);
    if (!win) return;
    for (let g = lo; g <= hi; g++) {
      const i = g - w * this.perWindow;
      if (bitAt(win.dirty, i)) win.dirtyCount--;
      win.dirty[i >> 3]! &= ~(1 << (i & 7));
      win.bits[i >> 3]! &= ~(1 << (i & 7));
    }
    for (const g of published) {
      if (g < lo || g > hi) continue;
      const i = g - w * this.perWindow;
      win.bits[i >> 3]! |= 1 << (i & 7);
    }
  }

  /** Resolves when every walk started so far has published (or dropped) its map (tests). */
  async idle(): Promise<void> {
    await Promise.all([...this.busy.values(), ...this.mending.values(), ...this.refreshing]);
  }

  /**
   * Before a write, zero or discard of [offset, offset + length): nothing there may be
   * read from the map, and no worker writes while it runs. Returns the change, and a
   * promise when workers' writes are in flight, which the change must wait for.
   */
  beginWrite(offset: number, length: number): { change: MapChange; drained: Promise<void> | undefined } {
    const first = Math.floor(offset / this.granule);
    const last = Math.floor((offset + Math.max(1, length) - 1) / this.granule);
    const firstW = Math.floor(first / this.perWindow);
    const lastW = Math.floor(last / this.perWindow);
    const whole = lastW - firstW + 1 > MAX_TRACKED_WINDOWS;
    const change = this.begin(whole ? 1 : firstW, whole ? 0 : lastW);
    if (last - first + 1 >= capacityOf(this.table)) {
      invalidateAll(this.table);
      this.windows.clear();
    } else {
      for (let g = first; g <= last; g++) invalidate(this.table, g);
      // What the next miss walks again: the allocation units the change touched (an allocating write may map them whole),
      // a window at most (the unit comes from the image's header: a parallels cluster may claim 2 GiB).
      const unit = Math.min(WINDOW, Math.max(this.granule, this.top.allocationUnit ?? 0));
      const from = Math.floor((Math.floor(offset / unit) * unit) / this.granule);
      const to = Math.min(Math.ceil(tableSize(this.table) / this.granule), Math.ceil((Math.ceil((offset + Math.max(1, length)) / unit) * unit) / this.granule)) - 1;
      for (let w = Math.floor(from / this.perWindow); w <= Math.floor(to / this.perWindow); w++) {
        const win = this.windows.get(w);
        if (!win) continue;
        const end = Math.min(to, (w + 1) * this.perWindow - 1) - w * this.perWindow;
        for (let i = Math.max(from, w * this.perWindow) - w * this.perWindow; i <= end; i++) {
          if (bitAt(win.dirty, i)) continue;
          win.dirty[i >> 3]! |= 1 << (i & 7);
          win.dirtyCount++;
        }
      }
    }
    return { change, drained: this.drain() };
  }

  /** Before a resize: the whole map goes (a shrink or growth moves the end of the disk). */
  beginResize(): { change: MapChange; drained: Promise<void> | undefined } {
    const change = this.begin(1, 0);
    invalidateAll(this.table);
    this.windows.clear();
    return { change, drained: this.drain() };
  }

  private begin(first: number, last: number): MapChange {
    // First the word the workers look at, then their count (drain): see read-map-table.ts.
    this.inFlight++;
    Atomics.store(this.table, H_CHANGING, this.inFlight);
    if (first > last) {
      this.everywhere++;
      this.gen++;
    } else {
      for (let w = first; w <= last; w++) {
        this.changing.set(w, (this.changing.get(w) ?? 0) + 1);
        this.touched.set(w, (this.touched.get(w) ?? 0) + 1);
      }
    }
    return { first, last, layout: this.top.layoutGeneration, allocations: this.top.allocationGeneration };
  }

  /** Resolves when no worker's write is in flight; undefined when none is now. */
  private drain(): Promise<void> | undefined {
    if (Atomics.load(this.table, H_WRITES_IN_FLIGHT) === 0) return undefined;
    // A worker's write is one pwrite(2): look again at the next turn of the event loop.
    return new Promise<void>((resolve) => {
      const look = (): void => {
        if (Atomics.load(this.table, H_WRITES_IN_FLIGHT) === 0) resolve();
        else setImmediate(look);
      };
      setImmediate(look);
    });
  }

  /** The change ended (`failed`: with an error, and the image may be marked corrupt now). */
  endWrite(change: MapChange, failed = false): void {
    if (failed) this.stopWorkerWrites();
    // A table allocated or space freed: what was writable in place may not be any more.
    this.lastMoved = this.top.layoutGeneration !== change.layout;
    this.lastAllocated = this.lastMoved || this.top.allocationGeneration !== change.allocations;
    if (this.lastMoved) {
      this.moves++;
      newEpoch(this.table);
    }
    if (change.first > change.last) {
      this.everywhere--;
      this.gen++;
    } else {
      for (let w = change.first; w <= change.last; w++) {
        const n = (this.changing.get(w) ?? 1) - 1;
        if (n === 0) this.changing.delete(w);
        else this.changing.set(w, n);
        this.touched.set(w, (this.touched.get(w) ?? 0) + 1);
      }
    }
    this.inFlight--;
    Atomics.store(this.table, H_CHANGING, this.inFlight);
  }

  endResize(change: MapChange, failed = false): void {
    setTableSize(this.table, this.top.size);
    this.endWrite(change, failed);
  }

  /** The node at `depth` of the chain below the top (0: the top). */
  private layer(depth: number): BlockNode | undefined {
    let n: BlockNode | undefined = this.top;
    for (let i = 0; i < depth && n; i++) n = n.backing;
    return n;
  }

  private async publishWindow(w: number): Promise<void> {
    const size = tableSize(this.table);
    const start = w * WINDOW;
    if (start >= size) return;
    const bits = new Uint8Array(this.perWindow / 8);
    const stamp = this.top.inPlaceWrites === true ? this.moves : -1;
    const done = await this.publishRange(start, Math.min(WINDOW, size - start), w, w, (g) => {
      const i = g - w * this.perWindow;
      bits[i >> 3]! |= 1 << (i & 7);
    });
    if (done) {
      this.windows.set(w, { bits, dirty: new Uint8Array(this.perWindow / 8), dirtyCount: 0 });
      this.walked.set(w, stamp);
    }
  }

  /**
   * A write the main thread served: an overwrite there may be the workers' next time.
   * Its window is walked the first time (the map of a file only ever written fills
   * as a read's does), and again whole once its walk was read-only, or is of an epoch
   * that ended and STALE_WALK_AFTER overwrites came in a row (`walked`); otherwise only
   * its own granules are (a walk of a whole window after every write made 4 KiB random
   * writes 4x slower), and none after a write that allocated (1 MiB allocating writes
   * were 4 % slower for it). Only where writes can go around the graph at all.
   */
  wrote(offset: number, length: number): void {
    if (this.everywhere !== 0 || length <= 0 || this.top.inPlaceWrites !== true) return;
    this.overwrites = this.lastMoved ? 0 : this.overwrites + 1;
    const size = tableSize(this.table);
    const first = Math.floor(offset / this.granule);
    const last = Math.floor((Math.min(offset + length, size) - 1) / this.granule);
    let all = true;
    for (let w = Math.floor(first / this.perWindow); w <= Math.floor(last / this.perWindow); w++) {
      const stamp = this.walked.get(w);
      if (stamp === this.moves || (stamp !== undefined && stamp >= 0 && this.overwrites < STALE_WALK_AFTER)) continue;
      all = false;
      this.walkWindow(w);
    }
    // An allocating write (a sequential writer's, mostly) is seldom overwritten next: not worth a walk each.
    if (!all || this.lastAllocated) return;
    const firstW = Math.floor(first / this.perWindow);
    const lastW = Math.floor(last / this.perWindow);
    for (let w = firstW; w <= lastW; w++) if ((this.changing.get(w) ?? 0) !== 0) return;
    const start = first * this.granule;
    const published: number[] = [];
    const p = this.publishRange(start, Math.min((last + 1) * this.granule, size) - start, firstW, lastW, (g) => published.push(g));
    void p.then((done) => {
      if (done) for (let w = firstW; w <= lastW; w++) this.settle(w, Math.max(first, w * this.perWindow), Math.min(last, (w + 1) * this.perWindow - 1), published);
    });
    this.refreshing.add(p);
    void p.finally(() => this.refreshing.delete(p));
  }

  /**
   * Walk [start, start + length) (windows firstW..lastW) and publish its whole
   * granules (`each` is told of every one); false when the walk was stale or failed.
   */
  private async publishRange(start: number, length: number, firstW: number, lastW: number, each: (g: number) => void): Promise<boolean> {
    const size = tableSize(this.table);
    const gen = this.gen;
    const touched: number[] = [];
    for (let w = firstW; w <= lastW; w++) touched.push(this.touched.get(w) ?? 0);
    // Asked now, before the walk: a graph that stops letting writes around it never gains an entry that does.
    const moves = this.moves;
    let writable = this.top.inPlaceWrites === true;
    try {
      const runs = await chainExtents(this.top, start, length, { ciphertext: this.ciphers.length > 0, compressed: INFLATE_IN_THREADS, elsewhere: true });
      // A change of these windows (or of the whole file) started or ended meanwhile: what was walked may be stale.
      if (this.gen !== gen || this.everywhere !== 0) return false;
      // Host space moved elsewhere meanwhile (a cluster the walk saw as data may be a table now): read-only entries.
      if (this.moves !== moves) writable = false;
      for (let w = firstW; w <= lastW; w++) if ((this.touched.get(w) ?? 0) !== touched[w - firstW] || (this.changing.get(w) ?? 0) !== 0) return false;
      const spans: Span[] = [];
      for (const r of runs) {
        let fd = -1;
        let host = 0;
        let inPlace = false;
        let cipher = 0;
        // A hole of the top layer's own file that a write may fill in place (a raw image's)
        // is published as that file's bytes: they read as zeros all the same, and a worker's
        // write there is read back by every thread (an entry that said zeros would not be).
        const hole = r.kind === 'zero' && writable && r.depth === 0 && r.inPlace === true && r.host !== undefined;
        if (r.compressed) {
          // A compressed cluster that is one whole granule: the threads read its stream and inflate it.
          const layer = this.layer(r.depth);
          const c = r.compressed;
          if (!layer || layer.encrypted || layer.hostFd === undefined || r.length !== this.granule || r.offset % this.granule !== 0) continue;
          if (c.length <= 0 || c.length > MAX_COMPRESSED * this.granule + (c.stream === 'vmdk-grain' ? VMDK_MARKER : 0)) continue;
          spans.push({ offset: r.offset, end: r.offset + r.length, fd: layer.hostFd, host: c.host, inPlace: false, cipher: -c.length, stream: STREAMS[c.stream] });
          continue;
        }
        if (r.kind === 'data' || hole) {
          const layer = this.layer(r.depth);
          if (!layer) continue;
          if (layer.encrypted) {
            // Ciphertext of a cipher the threads were given: they decrypt it.
            const c = layer.hostCipher;
            cipher = c ? this.ciphers.indexOf(c) + 1 : 0;
            if (!c || cipher === 0 || r.kind !== 'data' || r.zeroData || r.cipherHost === undefined) continue;
            fd = c.fd;
            host = r.cipherHost;
            // A writer thread encrypts with its own copy of the cipher (read-map-runs.ts writeInPlace).
            inPlace = writable && r.depth === 0 && r.inPlace === true;
          } else {
            // In the layer's own file, or in another of its files (a vmdk extent's).
            const at = r.host !== undefined && layer.hostFd !== undefined ? { fd: layer.hostFd, host: r.host } : r.elsewhere;
            if (!at) continue;
            fd = at.fd;
            host = at.host;
            // Data that reads as zeros (a hole of the file) is published as the file's bytes
            // too, so a write there in place is read back as written: the layer says inPlace.
            inPlace = writable && r.depth === 0 && r.inPlace === true;
          }
        }
        const end = r.offset + r.length;
        const last = spans[spans.length - 1];
        // Zeros from any layer, and data that continues in the same file (and cipher), make one span.
        if (last && last.cipher >= 0 && last.end === r.offset && last.fd === fd && last.inPlace === inPlace && last.cipher === cipher && (fd < 0 || last.host + (last.end - last.offset) === host)) last.end = end;
        else spans.push({ offset: r.offset, end, fd, host, inPlace, cipher, stream: 0 });
      }
      for (const s of spans) {
        // Whole granules only; the disk's last granule counts as whole when the span reaches the end.
        const first = Math.ceil(s.offset / this.granule);
        const stop = s.end >= size ? Math.ceil(size / this.granule) : Math.floor(s.end / this.granule);
        for (let g = first; g < stop; g++) {
          const at = g * this.granule;
          publish(this.table, g, s.fd, s.fd < 0 ? 0 : s.host + (at - s.offset), s.inPlace, s.cipher, s.stream);
          each(g);
        }
      }
      return true;
    } catch (err) {
      debug('%s: read map at %d not published: %s', this.top.name, start, messageOf(err));
      return false;
    }
  }
}

/**
 * The granule a map of `top` needs: 64 KiB, or the smallest allocation unit of a layer
 * that can be read around the graph, down to a page. A granule is served from the map
 * only if it is one run in one host file: 4 KiB qcow clusters allocated at random
 * seldom make 64 KiB runs, and their requests all stayed the main thread's.
 */
export function granuleShift(top: BlockNode): number {
  let shift = GRANULE_SHIFT;
  for (let n: BlockNode | undefined = top, i = 0; n && i < 64; n = n.backing, i++) {
    const unit = n.allocationUnit;
    if (!aroundGraph(n) || unit === undefined || !(unit > 0)) continue;
    shift = Math.min(shift, Math.max(MIN_GRANULE_SHIFT, Math.floor(Math.log2(unit))));
  }
  return shift;
}

function bitAt(bits: Uint8Array, i: number): boolean {
  return (bits[i >> 3]! & (1 << (i & 7))) !== 0;
}

/** Whether a layer's data can be read around the graph: plain (hostFd) or encrypted (hostCipher). */
function aroundGraph(n: BlockNode): boolean {
  return n.encrypted ? n.hostCipher !== undefined : n.hostFd !== undefined;
}

/** Whether any layer of `node`'s chain can be read around the graph. */
export function readableAround(node: BlockNode): boolean {
  for (let n: BlockNode | undefined = node, i = 0; n && i < 64; n = n.backing, i++) if (aroundGraph(n)) return true;
  return false;
}
