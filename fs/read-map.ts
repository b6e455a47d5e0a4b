// The read map of one flat file, main-thread side: which 64 KiB granules of the file
// are plain data in one host file (or zeros), published into shared memory
// (read-map-table.ts) so the FUSE worker threads (fuse-worker.ts) can answer a READ
// with pread(2) from the host file, without the main thread. The format driver keeps
// its one owner: the map is computed here from block status down the backing chain
// (extents.ts chainExtents and each layer's BlockNode.hostFd), never by a worker.
//
// Writes: every entry a write, zero or resize may change is invalidated before the
// change starts, and a map computed while any change was in flight (or that started
// since) is thrown away, not published. Writes pass straight down to the image file
// (the cluster cache keeps no dirty data), so once a write is answered the host file
// has its bytes and a later miss publishes them.
import createDebug from '../drivers/util/debug.js';
import { messageOf } from '../drivers/errors.js';
import type { BlockNode } from '../drivers/types.js';
import { chainExtents } from './extents.js';
import { GRANULE, lookup, invalidate, invalidateAll, newTable, publish, setTableSize, tableSize, CAPACITY, H_READS, H_SPLICED, servedBytes, WINDOW } from './read-map-table.js';

const debug = createDebug('tsmount:fuse');

const PER_WINDOW = WINDOW / GRANULE;

interface Span {
  offset: number;
  end: number;
  /** -1: zeros. */
  fd: number;
  host: number;
}

export class ReadMap {
  readonly table = newTable();
  /** Windows whose map was published, with the granules that could be (bit per granule). */
  private readonly windows = new Map<number, Uint8Array>();
  /** Windows being walked, and the walk. */
  private readonly busy = new Map<number, Promise<void>>();
  /** Changes in flight, and a count bumped at each start and end: a walk that saw either move is stale. */
  private writes = 0;
  private gen = 0;
  private readonly hit = [0, 0];

  constructor(private readonly top: BlockNode) {
    setTableSize(this.table, top.size);
  }

  /** Reads the workers answered, their KiB, and how many of them by splice (the server's counters). */
  served(): { reads: number; bytes: number; spliced: number } {
    return { reads: Atomics.load(this.table, H_READS) >>> 0, bytes: servedBytes(this.table), spliced: Atomics.load(this.table, H_SPLICED) >>> 0 };
  }

  /**
   * A READ the main thread served: publish what would let the next ones be served by a
   * worker, and the window after it (a sequential reader is there next). Also what a
   * worker asks for ahead of its reads (fuse-worker.ts lookAhead, with length 1).
   */
  miss(offset: number, length: number): void {
    if (this.writes !== 0 || length <= 0) return;
    const first = Math.floor(offset / GRANULE);
    const last = Math.floor((offset + length - 1) / GRANULE);
    let lastWindow = -1;
    for (let g = first; g <= last; g++) {
      const w = Math.floor(g / PER_WINDOW);
      if (w === lastWindow) continue;
      lastWindow = w;
      this.want(w, g);
    }
    const next = (lastWindow + 1) * PER_WINDOW;
    if (next * GRANULE < tableSize(this.table)) this.want(lastWindow + 1, next);
  }

  /** Walk window `w` unless it is published with granule `g` (or being walked). */
  private want(w: number, g: number): void {
    const bits = this.windows.get(w);
    // Published already: again only if a granule that could be served was overwritten in its slot.
    if (bits) {
      const i = g - w * PER_WINDOW;
      if (!(bits[i >> 3]! & (1 << (i & 7))) || lookup(this.table, g, this.hit)) return;
    }
    if (!this.busy.has(w)) this.busy.set(w, this.publishWindow(w).finally(() => this.busy.delete(w)));
  }

  /** Resolves when every walk started so far has published (or dropped) its map (tests). */
  async idle(): Promise<void> {
    await Promise.all(this.busy.values());
  }

  /** Before a write, zero or discard of [offset, offset + length): nothing there may be read from the map. */
  beginWrite(offset: number, length: number): void {
    this.writes++;
    this.gen++;
    const first = Math.floor(offset / GRANULE);
    const last = Math.floor((offset + Math.max(1, length) - 1) / GRANULE);
    if (last - first + 1 >= CAPACITY) {
      invalidateAll(this.table);
      this.windows.clear();
      return;
    }
    for (let g = first; g <= last; g++) invalidate(this.table, g);
    for (let w = Math.floor(first / PER_WINDOW); w <= Math.floor(last / PER_WINDOW); w++) this.windows.delete(w);
  }

  endWrite(): void {
    this.writes--;
    this.gen++;
  }

  /** Before a resize: the whole map goes (a shrink or growth moves the end of the disk). */
  beginResize(): void {
    this.writes++;
    this.gen++;
    invalidateAll(this.table);
    this.windows.clear();
  }

  endResize(): void {
    setTableSize(this.table, this.top.size);
    this.endWrite();
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
    const length = Math.min(WINDOW, size - start);
    const gen = this.gen;
    try {
      const runs = await chainExtents(this.top, start, length);
      // A change started or ended meanwhile: what was walked may be stale.
      if (this.gen !== gen || this.writes !== 0) return;
      const spans: Span[] = [];
      for (const r of runs) {
        let fd = -1;
        let host = 0;
        if (r.kind === 'data') {
          const layer = this.layer(r.depth);
          if (r.host === undefined || !layer || layer.encrypted || layer.hostFd === undefined) continue;
          fd = layer.hostFd;
          host = r.host;
        }
        const end = r.offset + r.length;
        const last = spans[spans.length - 1];
        // Zeros from any layer, and data that continues in the same file, make one span.
        if (last && last.end === r.offset && last.fd === fd && (fd < 0 || last.host + (last.end - last.offset) === host)) last.end = end;
        else spans.push({ offset: r.offset, end, fd, host });
      }
      const bits = new Uint8Array(PER_WINDOW / 8);
      for (const s of spans) {
        // Whole granules only; the disk's last granule counts as whole when the span reaches the end.
        const first = Math.ceil(s.offset / GRANULE);
        const stop = s.end >= size ? Math.ceil(size / GRANULE) : Math.floor(s.end / GRANULE);
        for (let g = first; g < stop; g++) {
          const at = g * GRANULE;
          publish(this.table, g, s.fd, s.fd < 0 ? 0 : s.host + (at - s.offset));
          const i = g - w * PER_WINDOW;
          bits[i >> 3]! |= 1 << (i & 7);
        }
      }
      this.windows.set(w, bits);
    } catch (err) {
      debug('%s: read map at %d not published: %s', this.top.name, start, messageOf(err));
    }
  }
}

/** Whether any layer of `node`'s chain can be read around the graph. */
export function hasHostFd(node: BlockNode): boolean {
  for (let n: BlockNode | undefined = node, i = 0; n && i < 64; n = n.backing, i++) if (n.hostFd !== undefined) return true;
  return false;
}
