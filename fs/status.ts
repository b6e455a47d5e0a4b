// What `tsmount --list` shows of a live mount beyond the kernel's table: the files, each
// image's chain, and the server's counters, which the server publishes into its state
// file (fs/mounts.ts) once a second while they change. The hot path only adds to
// integers (drivers/filters/counting.ts, the cluster cache's hits and misses).
import type { BlockNode } from '../drivers/types.js';
import { formatOf } from '../drivers/open.js';
import type { IoCounters } from '../drivers/filters/counting.js';
import type { TransportCounters } from './fuse.js';
import { shownImage, updateStateAsync, type MountState } from './mounts.js';

export interface MountCounters extends IoCounters {
  cacheHits: number;
  cacheMisses: number;
  /** Of `reads`, those a FUSE worker thread answered from a read map (their bytes counted in whole KiB). */
  workerReads?: number;
  /** Of `workerReads`, those answered by splice(2) (on unless TSMOUNT_FUSE_SPLICE=0). */
  splicedReads?: number;
  /** Of `writes`, those a FUSE worker thread wrote in place (fs/read-map.ts). */
  workerWrites?: number;
  /** Requests (of any kind) a FUSE worker read and handed to the JS thread, which owns the graph. */
  handedOver?: number;
  /** Requests the JS thread read from its own descriptor while workers served (its spin after a small WRITE). */
  spinTakes?: number;
  /** Times a writer's WRITEs made the JS thread park the workers and read its own descriptor (fs/fuse-session.ts writerMode). */
  writerParks?: number;
}

/** What the FUSE worker threads served without the graph (FlatFs.workerIo). */
export type WorkerIo = () => { reads: number; bytes: number; spliced?: number; writes?: number; bytesWritten?: number } & Partial<TransportCounters>;

export interface FileDetails {
  name: string;
  writable: boolean;
  /** For a partition file: its number, and its GPT name if it has one. */
  partition?: { number: number; scheme: string; name?: string };
}

export interface MountDetails {
  /** Per image: each layer from the top down, its file and format. */
  chains: { file: string; format: string }[][];
  files: FileDetails[];
  /** The overlay the mount writes into (--overlay), or 'temporary' (--snapshot). */
  overlay?: string;
  counters?: MountCounters;
  /** When the counters were published (ISO time). */
  updated?: string;
}

/** The layers of an opened image, top first. */
export function chainOf(node: BlockNode, top: string): { file: string; format: string }[] {
  const out: { file: string; format: string }[] = [];
  let name = top;
  for (let n: BlockNode | undefined = node, depth = 0; n && depth < 300; n = n.backing, depth++) {
    out.push({ file: name, format: formatOf(n) ?? 'unknown' });
    name = n.backing ? shownImage(n.backing.name) : '';
  }
  return out;
}

/** The server's request counters with its cluster caches' hits and misses summed. */
export function mountCounters(io: IoCounters, caches: readonly { hits: number; misses: number }[], workers?: WorkerIo): MountCounters {
  let cacheHits = 0;
  let cacheMisses = 0;
  for (const c of caches) {
    cacheHits += c.hits;
    cacheMisses += c.misses;
  }
  if (!workers) return { ...io, cacheHits, cacheMisses };
  const w = workers();
  return {
    ...io,
    reads: io.reads + w.reads,
    bytesRead: io.bytesRead + w.bytes,
    writes: io.writes + (w.writes ?? 0),
    bytesWritten: io.bytesWritten + (w.bytesWritten ?? 0),
    cacheHits,
    cacheMisses,
    workerReads: w.reads,
    ...(w.spliced ? { splicedReads: w.spliced } : {}),
    ...(w.writes ? { workerWrites: w.writes } : {}),
    ...(w.handedOver !== undefined ? { handedOver: w.handedOver, spinTakes: w.spinTakes ?? 0, writerParks: w.writerParks ?? 0 } : {}),
  };
}

export class StatusPublisher {
  private timer: NodeJS.Timeout | undefined;
  private last = '';
  private writing: Promise<void> | undefined;
  private stopped = false;

  constructor(
    private readonly file: string,
    private readonly state: MountState,
    private readonly io: IoCounters,
    private readonly caches: { hits: number; misses: number }[],
    private readonly workers?: WorkerIo,
  ) {}

  counters(): MountCounters {
    return mountCounters(this.io, this.caches, this.workers);
  }

  /**
   * Write the counters into the state file if they changed since the last time, off
   * this thread (updateStateAsync); while a write is in flight, the next tick's waits.
   */
  publish(): void {
    if (this.writing || this.stopped) return;
    const counters = this.counters();
    const key = JSON.stringify(counters);
    if (key === this.last) return;
    this.last = key;
    const details = this.state.details ? { ...this.state.details, counters, updated: new Date().toISOString() } : undefined;
    this.writing = updateStateAsync(this.file, { ...this.state, details }, () => this.stopped).finally(() => (this.writing = undefined));
  }

  start(intervalMs = 1000): void {
    this.timer = setInterval(() => this.publish(), intervalMs);
    this.timer.unref();
  }

  /** No more writes; resolves once the one in flight, if any, is done. */
  stop(): Promise<void> {
    if (this.timer) clearInterval(this.timer);
    this.timer = undefined;
    this.stopped = true;
    return this.writing ?? Promise.resolve();
  }
}
