// Compressed clusters decompressed in a few worker threads. Node's async
// zlib.inflateRaw makes a zlib stream object per cluster, which costs the main thread
// 45-120 µs a cluster; fzstd is pure JS and would run on the main thread. Here the
// clusters of one request go to the workers in one message per worker, inflated
// synchronously there (inflate-worker.ts), and come back in one transferred buffer.
//
// The pool is shared by every node of the process: acquireInflatePool() counts its
// users and the workers end when the last one releases it. Idle workers are unref'd
// and never keep the process alive. If the workers cannot start or die, clusters are
// decompressed in-thread with decompressCluster, as before. Workers are ended by a
// message between jobs, never terminated in the middle of one (worker-pools.ts).
import os from 'node:os';
import { Worker } from 'node:worker_threads';
import createDebug from '../../util/debug.js';
import { COMPRESSION, INFLATE_SLACK, decompressCluster } from './compress.js';
import type { InflateJob, InflateResult } from './inflate-worker.js';
import { zstdNativeNow } from '../../util/native-codecs.js';
import { koffiWorkerData } from '../../util/koffi-load.js';
import { Busy, endWorker, noteExit, registerPool } from '../../util/worker-pools.js';

const debug = createDebug('tsmount:inflate');

/** At most this many workers (they share the machine with the main thread and libuv's pool). */
const MAX_WORKERS = 4;

/** Workers to start: TSMOUNT_INFLATE_WORKERS if set (0 turns the pool off), else the cores, 1..MAX_WORKERS. */
function poolSize(): number {
  const env = process.env.TSMOUNT_INFLATE_WORKERS;
  if (env !== undefined && env !== '' && Number.isInteger(Number(env))) return Math.max(0, Math.min(MAX_WORKERS, Number(env)));
  const cores = typeof os.availableParallelism === 'function' ? os.availableParallelism() : os.cpus().length;
  return Math.max(1, Math.min(MAX_WORKERS, cores));
}

interface Pending {
  resolve: (r: InflateResult) => void;
  reject: (err: Error) => void;
  clusters: number;
}

class Slot {
  readonly jobs = new Map<number, Pending>();
  /** Clusters sent and not yet back. */
  load = 0;
  /** Batches inside the worker, including those whose promises were rejected at the end. */
  readonly busy = new Busy();
  constructor(readonly worker: Worker) {}
}

class Pool {
  private readonly slots: Slot[] = [];
  private nextId = 1;
  broken = false;

  constructor(n: number) {
    const url = new URL('./inflate-worker.js', import.meta.url);
    for (let i = 0; i < n; i++) {
      // Its koffi (libdeflate) loads under the process's lock.
      const worker = new Worker(url, { workerData: koffiWorkerData() });
      const slot = new Slot(worker);
      worker.unref();
      // Node 20 refs a worker's port again when it comes online: an idle pool must not
      // keep the process alive (mocha without --exit hung on this).
      worker.once('online', () => {
        if (slot.jobs.size === 0) worker.unref();
      });
      worker.on('message', (r: InflateResult) => {
        slot.busy.done();
        this.done(slot, r);
      });
      worker.on('error', (err) => this.fail(err));
      worker.on('exit', (code) => {
        noteExit(code);
        slot.busy.gone();
        this.fail(new Error(`inflate worker exited with code ${code}`));
      });
      this.slots.push(slot);
    }
  }

  /** Send one batch to the least loaded worker. */
  run(job: Omit<InflateJob, 'id'>, transfer: ArrayBuffer[]): Promise<InflateResult> {
    let slot = this.slots[0]!;
    for (const s of this.slots) if (s.load < slot.load) slot = s;
    const id = this.nextId++;
    const clusters = job.ranges.length / 2;
    return new Promise<InflateResult>((resolve, reject) => {
      if (slot.jobs.size === 0) slot.worker.ref();
      slot.jobs.set(id, { resolve, reject, clusters });
      slot.load += clusters;
      slot.busy.start();
      slot.worker.postMessage({ ...job, id }, transfer);
    });
  }

  get size(): number {
    return this.slots.length;
  }

  private done(slot: Slot, r: InflateResult): void {
    const p = slot.jobs.get(r.id);
    if (!p) return;
    slot.jobs.delete(r.id);
    slot.load -= p.clusters;
    if (slot.jobs.size === 0) slot.worker.unref();
    p.resolve(r);
  }

  /** A worker failed: every batch in flight is redone in-thread, and so is every later one. */
  private fail(err: Error): void {
    if (!this.broken) debug('inflate workers unusable, decompressing in-thread: %s', err.message);
    this.broken = true;
    disabled = true;
    if (pool === this) pool = undefined;
    this.end(err);
  }

  /**
   * Reject what is pending and ask every worker to end after the batch it runs (a
   * worker stopped inside a batch can abort the process: worker-pools.ts).
   */
  end(err = new Error('inflate pool closed')): void {
    for (const s of this.slots) {
      for (const p of s.jobs.values()) p.reject(err);
      s.jobs.clear();
      s.load = 0;
      endWorker(s.worker, s.busy);
    }
    this.slots.length = 0;
  }

  /** Resolves when no worker of this pool runs a batch. */
  idle(): Promise<void> {
    return Promise.all(this.slots.map((s) => s.busy.idle())).then(() => undefined);
  }
}

let pool: Pool | undefined;
let users = 0;
/** Set once the workers failed: the process decompresses in-thread from then on. */
let disabled = false;

registerPool(() => pool?.idle() ?? Promise.resolve());

/** Count a user of the pool; the returned function releases it (once). The last release ends the workers. */
export function acquireInflatePool(): () => void {
  users++;
  let released = false;
  return () => {
    if (released) return;
    released = true;
    if (--users === 0 && pool) {
      pool.end();
      pool = undefined;
    }
  };
}

function getPool(): Pool | undefined {
  if (pool || disabled || users === 0) return pool;
  const n = poolSize();
  if (n === 0) return undefined;
  try {
    pool = new Pool(n);
  } catch (err) {
    debug('inflate workers do not start, decompressing in-thread: %s', (err as Error).message);
    disabled = true;
    pool = undefined;
  }
  return pool;
}

/** One compressed cluster: its bytes are src[from, to). */
export interface ClusterPart {
  from: number;
  to: number;
  /** Names the cluster in errors (see decompressCluster). */
  what: string;
  /**
   * Called once with the cluster's bytes before its promise settles; they are valid
   * only during the call (the workers' output memory is reused right after).
   */
  use?: (bytes: Uint8Array) => void;
  /**
   * Asked after `use`: whether the promise must resolve to a copy of the bytes. When
   * it says no, the promise resolves to an empty Buffer (nobody can read it any more).
   */
  keep?: () => boolean;
}

/**
 * Output memory for the workers, reused: a new buffer per batch costs the main
 * thread more in garbage collection (external memory) than the inflate machinery
 * the workers take off it.
 */
const SLAB_BYTES = (1 << 20) + INFLATE_SLACK;
const SLABS_KEPT = 16;
const slabs: SharedArrayBuffer[] = [];
const EMPTY = Buffer.alloc(0);

/**
 * Decompress clusters whose compressed bytes lie in `src`, one promise per part, each
 * resolving to exactly clusterSize bytes or rejecting as decompressCluster would.
 * `src` must stay unchanged until every promise settles. A SharedArrayBuffer-backed
 * `src` goes to the workers without a copy.
 */
export function decompressClusters(type: number, src: Uint8Array, parts: ClusterPart[], clusterSize: number): Promise<Buffer>[] {
  const inThread = (p: ClusterPart): Promise<Buffer> => {
    counts.inThread++;
    return decompressCluster(type, src.subarray(p.from, p.to), clusterSize, p.what);
  };
  // zstd clusters go to libzstd on libuv's thread pool once it has loaded (in
  // parallel there, and many times faster than fzstd in the workers).
  const pl = type === COMPRESSION.zlib || (type === COMPRESSION.zstd && !zstdNativeNow()) ? getPool() : undefined;
  if (!pl || parts.length === 0)
    return parts.map((p) =>
      inThread(p).then((b) => {
        p.use?.(b);
        return !p.keep || p.keep() ? b : EMPTY;
      }),
    );
  // One batch per worker: contiguous slices of the parts, as even as can be.
  const k = Math.min(pl.size, parts.length);
  const out: Promise<Buffer>[] = [];
  const shared = typeof SharedArrayBuffer !== 'undefined' && src.buffer instanceof SharedArrayBuffer;
  for (let b = 0; b < k; b++) {
    const slice = parts.slice(Math.floor((b * parts.length) / k), Math.floor(((b + 1) * parts.length) / k));
    let buf: ArrayBuffer | SharedArrayBuffer;
    let base: number;
    const transfer: ArrayBuffer[] = [];
    if (shared) {
      buf = src.buffer;
      base = src.byteOffset;
    } else {
      // A copy of the slice's bytes, moved to the worker.
      let lo = Infinity;
      let hi = 0;
      for (const p of slice) {
        lo = Math.min(lo, p.from);
        hi = Math.max(hi, p.to);
      }
      const copy = new Uint8Array(Math.max(0, hi - lo));
      copy.set(src.subarray(lo, hi));
      buf = copy.buffer;
      base = -lo;
      transfer.push(copy.buffer);
    }
    const ranges: number[] = [];
    for (const p of slice) ranges.push(base + p.from, base + Math.max(p.from, p.to));
    const need = slice.length * clusterSize + INFLATE_SLACK;
    const slab = (need <= SLAB_BYTES ? slabs.pop() : undefined) ?? new SharedArrayBuffer(Math.max(need, SLAB_BYTES));
    const settle: { resolve: (b: Buffer) => void; reject: (e: unknown) => void }[] = [];
    for (const _ of slice) out.push(new Promise<Buffer>((resolve, reject) => settle.push({ resolve, reject })));
    // A cluster the workers could not decompress is done in-thread: its error (or, should
    // it after all decompress, its bytes) is decompressCluster's.
    const alone = (p: ClusterPart, i: number): void => {
      inThread(p).then((b) => {
        try {
          p.use?.(b);
        } catch (err) {
          settle[i]!.reject(err);
          return;
        }
        settle[i]!.resolve(!p.keep || p.keep() ? b : EMPTY);
      }, settle[i]!.reject);
    };
    pl.run({ type, clusterSize, buf, ranges, out: slab }, transfer).then(
      (r) => {
        // Every cluster's bytes are used or copied before the slab goes back.
        slice.forEach((p, i) => {
          if (!r.ok[i]) return alone(p, i);
          counts.workers++;
          if (r.ok[i] === 2) counts.libdeflate++;
          const bytes = new Uint8Array(slab, i * clusterSize, clusterSize);
          try {
            p.use?.(bytes);
            settle[i]!.resolve(!p.keep || p.keep() ? Buffer.from(bytes) : EMPTY);
          } catch (err) {
            settle[i]!.reject(err);
          }
        });
        if (slab.byteLength === SLAB_BYTES && slabs.length < SLABS_KEPT) slabs.push(slab);
      },
      // The worker died: its slab is not reused (it may still be written to).
      () => slice.forEach(alone),
    );
  }
  return out;
}

/** Clusters the workers decompressed (of them, through libdeflate), and clusters decompressed in-thread (no workers, or a worker could not). */
const counts = { workers: 0, libdeflate: 0, inThread: 0 };

/** Workers running now, and the counts above (for tests). */
export function inflateStats(): { running: number; workers: number; libdeflate: number; inThread: number } {
  return { running: pool?.size ?? 0, ...counts };
}
