// The one cache of metadata tables (qcow2 L2 tables and refcount blocks, qcow L2
// tables, qed table pages, vmdk grain tables, the pages of flat block maps),
// modelled on QEMU's qcow2-cache.c. Tables are fixed-size (a page of a larger table
// counts as one), keyed by their offset in the file, within a byte budget.
//
// Two ways to change a table: write-back (qcow2: markDirty, written by flush or when
// evicted) and write-through (every other format: writeThrough puts the bytes in
// the cached table and in the file; patch records bytes that reached the file some
// other way). A table with a write-through in flight is pinned, so it cannot be
// evicted and read again from a file that does not hold the new bytes yet; a load
// that raced such a change is not cached.
//
// Crash safety comes from ordering, not from syncing everything: a cache may depend
// on another (L2 tables depend on refcount blocks). Before any dirty table of this
// cache reaches the file, every dirty table of the cache it depends on is written
// and, unless the mode is unsafe, the file is flushed. So a cluster is never
// referenced on disk before its refcount is; killing the process at any moment
// leaks clusters at worst. A cache may also have a tail (TableTail): the entries
// of a higher table that point at its new tables (qcow2's L1 entries of new L2
// tables, refcount table entries of new refcount blocks), written after its tables
// and a flush, so creating a table costs no flush of its own.
import { LRUCache } from 'lru-cache';
import createDebug from '../drivers/util/debug.js';
import type { BlockNode } from '../drivers/types.js';

const debug = createDebug('tsmount:table-cache');

export class Table {
  /** Bumped on every change, so a write-out can tell if it raced a modification. */
  generation = 0;
  /** The generation that is on disk. */
  savedGeneration = 0;
  constructor(readonly offset: number, readonly data: Buffer) {}
  get dirty(): boolean {
    return this.generation !== this.savedGeneration;
  }
  view(): DataView {
    return new DataView(this.data.buffer, this.data.byteOffset, this.data.byteLength);
  }
}

export interface TableCacheOptions {
  /** For log messages: "l2", "refcount". */
  name: string;
  file: BlockNode;
  tableSize: number;
  maxBytes: number;
  /** Flush the file between writing the dependency and this cache (false for cache=unsafe). */
  barriers: boolean;
  /** Tables kept whatever maxBytes says, so one request never thrashes (default 4). */
  minTables?: number;
}

/**
 * What must reach the file after a cache's tables, behind a barrier: the entries
 * that name its new tables. take() snapshots the pending entries together with the
 * tables a flush writes (an entry made later waits for the next flush, as its table
 * may not be in this one) and returns their write, or undefined when none wait.
 */
export interface TableTail {
  pending(): boolean;
  take(): (() => Promise<void>) | undefined;
}

export class TableCache {
  private readonly lru: LRUCache<number, Table>;
  /** Dirty or pinned tables pushed out of the LRU; still served by get(). */
  private readonly spilled = new Map<number, Table>();
  private readonly loading = new Map<number, { load: Promise<Table>; epoch: number }>();
  /** Write-through changes in flight, by table offset. */
  private readonly pins = new Map<number, number>();
  /** Bumped by every write-through change, so a load that raced one is neither cached nor joined. */
  private epoch = 0;
  private dependency: TableCache | undefined;
  private tail: TableTail | undefined;
  /** One flush at a time; a second caller waits for the first and then runs its own. */
  private flushing: Promise<void> = Promise.resolve();
  private spillWriter: Promise<void> | undefined;
  /** The first write-back error, reported by the next flush (as fsync reports EIO). */
  private pendingError: unknown;

  constructor(private readonly opts: TableCacheOptions) {
    // Keep at least a few tables, whatever the budget says.
    const max = Math.max(opts.maxBytes, opts.tableSize * (opts.minTables ?? 4));
    this.lru = new LRUCache<number, Table>({
      maxSize: max,
      sizeCalculation: () => opts.tableSize,
      dispose: (table, offset, reason) => {
        if (reason !== 'evict') return;
        if (table.dirty || this.pins.has(offset)) this.spilled.set(offset, table);
        if (table.dirty) this.scheduleSpillWrite();
      },
    });
  }

  get tableSize(): number {
    return this.opts.tableSize;
  }

  /** Tables of this cache reach the disk only after every dirty table of `other`. */
  dependOn(other: TableCache): void {
    this.dependency = other;
  }

  /** Entries that point at this cache's new tables, written after them (TableTail). */
  setTail(tail: TableTail): void {
    this.tail = tail;
  }

  /**
   * The table at `offset`, read from the file on a miss: `length` bytes (the last
   * page of a table may be shorter than tableSize).
   */
  async get(offset: number, length = this.opts.tableSize): Promise<Table> {
    const hit = this.lru.get(offset) ?? this.takeSpilled(offset);
    if (hit) return hit;
    const inFlight = this.loading.get(offset);
    if (inFlight && inFlight.epoch === this.epoch) return inFlight.load;
    const epoch = this.epoch;
    const load = (async () => {
      const data = Buffer.allocUnsafe(length);
      await this.opts.file.read(offset, data);
      const table = new Table(offset, data);
      // A getNew() for the same offset may have won the race while we read.
      const raced = this.lru.get(offset) ?? this.takeSpilled(offset);
      if (raced) return raced;
      // A write-through change while we read: these bytes may predate it.
      if (this.epoch === epoch) this.lru.set(offset, table);
      return table;
    })();
    const entry = { load, epoch };
    this.loading.set(offset, entry);
    try {
      return await load;
    } finally {
      if (this.loading.get(offset) === entry) this.loading.delete(offset);
    }
  }

  /** The cached table at `offset`, without reading or touching the LRU order. */
  peek(offset: number): Table | undefined {
    return this.lru.peek(offset) ?? this.spilled.get(offset);
  }

  /**
   * Write-through: `bytes` at byte `at` of the table at `offset`, in the cached
   * table (if any) first and then in the file; the table stays pinned until the
   * file has them. On failure the cached copy is dropped, to be read again.
   */
  async writeThrough(offset: number, at: number, bytes: Uint8Array): Promise<void> {
    this.patch(offset, at, bytes);
    this.pins.set(offset, (this.pins.get(offset) ?? 0) + 1);
    try {
      await this.opts.file.write(offset + at, bytes);
    } catch (err) {
      this.drop(offset);
      throw err;
    } finally {
      const n = this.pins.get(offset)! - 1;
      if (n > 0) this.pins.set(offset, n);
      else {
        this.pins.delete(offset);
        const t = this.spilled.get(offset);
        if (t && !t.dirty) this.spilled.delete(offset);
      }
    }
  }

  /** A whole table whose bytes are on disk already (written whole when it was made): cache it clean. */
  put(offset: number, data: Buffer): Table {
    this.epoch++;
    const table = new Table(offset, data);
    this.spilled.delete(offset);
    this.lru.set(offset, table);
    return table;
  }

  /** `bytes` at byte `at` of the table at `offset` reached the file some other way: update the cached copy. */
  patch(offset: number, at: number, bytes: Uint8Array): void {
    this.epoch++;
    this.peek(offset)?.data.set(bytes, at);
  }

  /** A zero-filled table for a freshly allocated cluster: nothing is read. It starts dirty. */
  getNew(offset: number): Table {
    const table = new Table(offset, Buffer.alloc(this.opts.tableSize));
    table.generation = 1;
    this.spilled.delete(offset);
    this.lru.set(offset, table);
    return table;
  }

  markDirty(table: Table): void {
    table.generation++;
    // A table modified after it was spilled must still be written.
    if (!this.lru.has(table.offset) && !this.spilled.has(table.offset)) {
      this.spilled.set(table.offset, table);
      this.scheduleSpillWrite();
    }
  }

  /** Forget a table whose cluster was freed; its contents no longer matter. */
  drop(offset: number): void {
    this.lru.delete(offset);
    this.spilled.delete(offset);
  }

  hasDirty(): boolean {
    for (const t of this.spilled.values()) if (t.dirty) return true;
    for (const t of this.lru.values()) if (t.dirty) return true;
    return this.tail?.pending() ?? false;
  }

  /**
   * Write every dirty table (after the dependency's), then the tail behind a
   * barrier, without flushing the file afterwards: the caller decides when the file
   * itself must be durable.
   */
  flush(): Promise<void> {
    const run = this.flushing.then(() => this.writeDirty());
    this.flushing = run.catch(() => undefined);
    return run;
  }

  private async writeDirty(): Promise<void> {
    const dirty: Table[] = [...this.spilled.values()].filter((t) => t.dirty);
    for (const t of this.lru.values()) if (t.dirty) dirty.push(t);
    if (this.pendingError !== undefined) {
      const err = this.pendingError;
      this.pendingError = undefined;
      throw err;
    }
    const tail = this.tail?.take();
    if (dirty.length === 0 && !tail) return;
    dirty.sort((a, b) => a.offset - b.offset);
    // Snapshot before writing the dependency: a table change made while the
    // dependency is being written (a new L2 entry whose refcount was raised after
    // the refcount blocks were taken) must not reach the disk in this round.
    // Everything the dependency held when a snapshot was taken is written first.
    const snapshots = dirty.map((t) => ({ table: t, generation: t.generation, data: Buffer.from(t.data) }));
    await this.flushDependency();
    await Promise.all(snapshots.map((s) => this.writeSnapshot(s.table, s.generation, s.data)));
    if (tail) {
      if (this.opts.barriers) await this.opts.file.flush();
      await tail();
    }
  }

  private async flushDependency(): Promise<void> {
    const dep = this.dependency;
    if (!dep || !dep.hasDirty()) return;
    await dep.flush();
    if (this.opts.barriers) await this.opts.file.flush();
  }

  /**
   * Write a copy taken at `generation`, so that a change made after the copy is not
   * half-written and stays marked dirty.
   */
  private async writeSnapshot(table: Table, generation: number, snapshot: Buffer): Promise<void> {
    await this.opts.file.write(table.offset, snapshot);
    if (generation > table.savedGeneration) table.savedGeneration = generation;
    if (!table.dirty && !this.pins.has(table.offset) && this.spilled.get(table.offset) === table) this.spilled.delete(table.offset);
  }

  private takeSpilled(offset: number): Table | undefined {
    const t = this.spilled.get(offset);
    if (!t) return undefined;
    this.spilled.delete(offset);
    this.lru.set(offset, t);
    return t;
  }

  private scheduleSpillWrite(): void {
    if (this.spillWriter) return;
    this.spillWriter = (async () => {
      // Let the current request finish its updates before writing anything.
      await new Promise<void>((resolve) => setImmediate(resolve));
      try {
        await this.flush();
      } catch (err) {
        debug('%s: write-back of evicted tables failed: %s', this.opts.name, String(err));
        this.pendingError ??= err;
      } finally {
        this.spillWriter = undefined;
      }
    })();
  }
}
