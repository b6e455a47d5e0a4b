// A write-back cache of fixed-size metadata tables (qcow2 L2 tables and refcount
// blocks, and the like for other formats), modelled on QEMU's qcow2-cache.c.
//
// Crash safety comes from ordering, not from syncing everything: a cache may depend
// on another (L2 tables depend on refcount blocks). Before any dirty table of this
// cache reaches the file, every dirty table of the cache it depends on is written
// and, unless the mode is unsafe, the file is flushed. So a cluster is never
// referenced on disk before its refcount is; killing the process at any moment
// leaks clusters at worst.
import { LRUCache } from 'lru-cache';
import createDebug from 'debug';
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
}

export class TableCache {
  private readonly lru: LRUCache<number, Table>;
  /** Dirty tables pushed out of the LRU that are not yet on disk; still served by get(). */
  private readonly spilled = new Map<number, Table>();
  private readonly loading = new Map<number, Promise<Table>>();
  private dependency: TableCache | undefined;
  /** One flush at a time; a second caller waits for the first and then runs its own. */
  private flushing: Promise<void> = Promise.resolve();
  private spillWriter: Promise<void> | undefined;
  /** The first write-back error, reported by the next flush (as fsync reports EIO). */
  private pendingError: unknown;

  constructor(private readonly opts: TableCacheOptions) {
    // Keep at least a few tables, whatever the budget says.
    const max = Math.max(opts.maxBytes, opts.tableSize * 4);
    this.lru = new LRUCache<number, Table>({
      maxSize: max,
      sizeCalculation: () => opts.tableSize,
      dispose: (table, offset, reason) => {
        if (reason === 'evict' && table.dirty) {
          this.spilled.set(offset, table);
          this.scheduleSpillWrite();
        }
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

  /** The table at `offset`, read from the file on a miss. */
  async get(offset: number): Promise<Table> {
    const hit = this.lru.get(offset) ?? this.takeSpilled(offset);
    if (hit) return hit;
    const inFlight = this.loading.get(offset);
    if (inFlight) return inFlight;
    const load = (async () => {
      const data = Buffer.allocUnsafe(this.opts.tableSize);
      await this.opts.file.read(offset, data);
      const table = new Table(offset, data);
      // A getNew() for the same offset may have won the race while we read.
      const raced = this.lru.get(offset) ?? this.takeSpilled(offset);
      if (raced) return raced;
      this.lru.set(offset, table);
      return table;
    })();
    this.loading.set(offset, load);
    try {
      return await load;
    } finally {
      this.loading.delete(offset);
    }
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
    if (this.spilled.size > 0) return true;
    for (const t of this.lru.values()) if (t.dirty) return true;
    return false;
  }

  /**
   * Write every dirty table (after the dependency's), without flushing the file
   * afterwards: the caller decides when the file itself must be durable.
   */
  flush(): Promise<void> {
    const run = this.flushing.then(() => this.writeDirty());
    this.flushing = run.catch(() => undefined);
    return run;
  }

  private async writeDirty(): Promise<void> {
    const dirty: Table[] = [...this.spilled.values()];
    for (const t of this.lru.values()) if (t.dirty) dirty.push(t);
    if (this.pendingError !== undefined) {
      const err = this.pendingError;
      this.pendingError = undefined;
      throw err;
    }
    if (dirty.length === 0) return;
    dirty.sort((a, b) => a.offset - b.offset);
    // Snapshot before writing the dependency: a table change made while the
    // dependency is being written (a new L2 entry whose refcount was raised after
    // the refcount blocks were taken) must not reach the disk in this round.
    // Everything the dependency held when a snapshot was taken is written first.
    const snapshots = dirty.map((t) => ({ table: t, generation: t.generation, data: Buffer.from(t.data) }));
    await this.flushDependency();
    await Promise.all(snapshots.map((s) => this.writeSnapshot(s.table, s.generation, s.data)));
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
    if (!table.dirty && this.spilled.get(table.offset) === table) this.spilled.delete(table.offset);
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
