// Host cluster allocation and refcounts (qcow2.txt, "Host cluster management";
// QEMU's qcow2-refcount.c). Callers hold the node's allocation mutex.
//
// Crash safety, by the order in which things reach the disk:
// - a refcount is incremented (in the cache) before anything points at the cluster,
//   and the L2 cache depends on this cache, so the increment lands first;
// - a new refcount block is placed at the first cluster of the range it describes
//   (so it counts itself), written, and only then entered in the refcount table;
// - a grown refcount table is written complete, with the blocks that count it,
//   before the header points at it; the old table is freed after that;
// - decrements wait until the L2 change that dropped the reference is on disk
//   (queueFree / takeFrees / applyFrees, driven by the node's flush).
import type { BlockNode } from '../../types.js';
import { CorruptImageError, IoError } from '../../errors.js';
import type { Table, TableCache, TableTail } from '../../../cache/table-cache.js';
import { constants as osc } from 'node:os';
import { decodeRefcount, decodeReftable, encodeRefcount, encodeReftable } from './entries.js';
import { encodeRefcountTableFields, HDR, LIMITS } from './header.js';
import { OL, type MetadataGuard } from './overlap.js';

/** Frees queued until the L2 change that dropped them is on disk. */
export interface PendingFrees {
  clusters: number[];
  /** Those to give back to the file once free. */
  discard: number[];
}

export interface RefcountOptions {
  file: BlockNode;
  name: string;
  clusterBits: number;
  refcountOrder: number;
  table: Buffer;
  tableOffset: number;
  cache: TableCache;
  /** Flush the file between dependent writes (false for cache=unsafe). */
  barriers: boolean;
  /** Told of every refcount block and table this class allocates or frees (overlap checks). */
  guard?: MetadataGuard;
}

export class Refcounts {
  private readonly file: BlockNode;
  private readonly name: string;
  private readonly clusterSize: number;
  private readonly order: number;
  private readonly bits: number;
  /** 2^bits - 1; for 64-bit refcounts only compared against, never reached. */
  readonly maxRefcount: number;
  /** Refcounts lowered so far: whoever keeps a cluster index across awaits sees a free happen. */
  decrements = 0;
  /** Refcounts set so far: host space allocated or freed (BlockNode.allocationGeneration). */
  changes = 0;
  /**
   * Of `changes`, those of data clusters allocate() handed out for guest data: unlike
   * the rest (tables, refcount blocks, frees), one cannot turn a range that was
   * writable in place into metadata (BlockNode.layoutGeneration leaves them out).
   */
  dataChanges = 0;
  /** Refcounts per block. */
  readonly perBlock: number;
  private table: Buffer;
  private tableView: DataView;
  private tableOffset: number;
  private readonly cache: TableCache;
  private readonly barriers: boolean;
  private readonly guard: MetadataGuard | undefined;
  /** No free cluster below this index. */
  private freeHint = 0;
  private pendingFrees: number[] = [];
  /** Those of pendingFrees a guest's unmap freed (QEMU's QCOW2_DISCARD_REQUEST): given back to the file once free. */
  private pendingDiscards: number[] = [];
  /**
   * Refcount table entries of new blocks, set in memory and written with the
   * refcount cache's next flush, after the blocks and a barrier (reftableTail).
   */
  private readonly newBlocks = new Set<number>();

  constructor(o: RefcountOptions) {
    this.file = o.file;
    this.name = o.name;
    this.clusterSize = 2 ** o.clusterBits;
    this.order = o.refcountOrder;
    this.bits = 2 ** o.refcountOrder;
    this.maxRefcount = 2 ** this.bits - 1;
    this.perBlock = (this.clusterSize * 8) / this.bits;
    this.table = o.table;
    this.tableView = viewOf(o.table);
    this.tableOffset = o.tableOffset;
    this.cache = o.cache;
    this.barriers = o.barriers;
    this.guard = o.guard;
    this.cache.setTail(this.reftableTail());
  }

  get tableEntries(): number {
    return this.table.length / 8;
  }

  /** The refcount of one host cluster. */
  async refcount(cluster: number): Promise<number> {
    const r = Math.floor(cluster / this.perBlock);
    const block = await this.block(r);
    return block ? this.entry(block, cluster - r * this.perBlock) : 0;
  }

  /**
   * Allocate up to `max` contiguous free clusters (at least one) and count them;
   * returns the first cluster index and how many were allocated. `data`: they will
   * hold guest data and nothing else (counted in dataChanges; a refcount block or a
   * larger table this needs still counts as a change of the layout). `from`: search
   * from this cluster on instead of the lowest free one (new space past the file's end).
   */
  async allocate(max: number, data = false, from?: number): Promise<{ start: number; count: number }> {
    let c = from ?? this.freeHint;
    for (;;) {
      const r = Math.floor(c / this.perBlock);
      if (r >= this.tableEntries) await this.grow(r);
      const block = (await this.block(r)) ?? this.createBlock(r);
      const base = r * this.perBlock;
      const end = base + this.perBlock;
      while (c < end && this.entry(block, c - base) !== 0) c++;
      if (c === end) continue;
      let n = 1;
      while (n < max && c + n < end && this.entry(block, c + n - base) === 0) n++;
      for (let i = 0; i < n; i++) this.setEntry(block, c + i - base, 1);
      if (data) this.dataChanges += n;
      this.cache.markDirty(block);
      // Searched from elsewhere: the free clusters below were not looked at.
      if (from === undefined) this.freeHint = c + n;
      return { start: c, count: n };
    }
  }

  /** Allocate exactly `n` contiguous clusters (for tables); returns the first index. */
  async allocateContiguous(n: number): Promise<number> {
    if (n > this.perBlock) throw new IoError(`${this.name}: qcow2 table of ${n} clusters is larger than one refcount block covers`, osc.errno.EFBIG);
    const skipped: number[] = [];
    try {
      for (;;) {
        const got = await this.allocate(n);
        if (got.count === n) return got.start;
        for (let i = 0; i < got.count; i++) skipped.push(got.start + i);
      }
    } finally {
      // Never referenced: give the too-short runs straight back.
      for (const c of skipped) await this.adjust(c, -1);
    }
  }

  /**
   * The last cluster below `clusters` with a refcount, or -1 (QEMU's
   * qcow2_get_last_cluster): ranges without a refcount block are skipped whole.
   */
  async lastInUse(clusters: number): Promise<number> {
    for (let r = Math.min(this.tableEntries, Math.ceil(clusters / this.perBlock)) - 1; r >= 0; r--) {
      const block = await this.block(r);
      if (!block) continue;
      for (let i = Math.min(this.perBlock, clusters - r * this.perBlock) - 1; i >= 0; i--) if (this.entry(block, i) !== 0) return r * this.perBlock + i;
    }
    return -1;
  }

  /**
   * Drop the refcount blocks that count nothing but maybe themselves (QEMU's
   * qcow2_shrink_reftable, after a shrink freed what they counted): the table is
   * written without them, then their clusters are free. Pending changes go first.
   */
  async shrinkTable(): Promise<void> {
    const cs = this.clusterSize;
    const unused: { r: number; offset: number }[] = [];
    for (let r = 0; r < this.tableEntries; r++) {
      const block = await this.block(r);
      if (!block) continue;
      const offset = decodeReftable(this.tableView, r, cs, Number.MAX_SAFE_INTEGER, this.name);
      const own = offset / cs - r * this.perBlock;
      let empty = true;
      for (let i = 0; i < this.perBlock && empty; i++) if (i !== own && this.entry(block, i) !== 0) empty = false;
      if (empty) unused.push({ r, offset });
    }
    if (unused.length === 0) return;
    await this.cache.flush();
    for (const u of unused) encodeReftable(this.tableView, u.r, 0);
    await this.file.write(this.tableOffset, this.table);
    await this.barrier();
    for (const u of unused) {
      this.cache.drop(u.offset);
      this.guard?.remove(u.offset, OL.refcountBlock);
      // A block counted in another one gives that reference back; one that counted itself is gone with it.
      const c = u.offset / cs;
      if (Math.floor(c / this.perBlock) !== u.r && (await this.refcount(c)) > 0) await this.adjust(c, -1);
    }
    this.freeHint = Math.min(this.freeHint, ...unused.map((u) => u.r * this.perBlock));
  }

  /** Add `delta` to the refcount of cluster (whose block must exist). */
  async adjust(cluster: number, delta: number): Promise<void> {
    const r = Math.floor(cluster / this.perBlock);
    const block = await this.block(r);
    if (!block) throw new CorruptImageError(`${this.name}: qcow2 cluster 0x${(cluster * this.clusterSize).toString(16)} is in use but has no refcount block`);
    const i = cluster - r * this.perBlock;
    const v = this.entry(block, i) + delta;
    if (v < 0) throw new CorruptImageError(`${this.name}: qcow2 refcount of cluster 0x${(cluster * this.clusterSize).toString(16)} would drop below zero`);
    if (v > this.maxRefcount) throw new IoError(`${this.name}: qcow2 refcount overflow for cluster 0x${(cluster * this.clusterSize).toString(16)}`, osc.errno.EOVERFLOW);
    this.setEntry(block, i, v);
    this.cache.markDirty(block);
    if (delta < 0) this.decrements++;
    if (v === 0 && cluster < this.freeHint) this.freeHint = cluster;
  }

  /**
   * Remember a host cluster to free once the reference dropped from it is on disk;
   * `discard`: the guest asked for the space back (an unmap), so once the cluster is
   * free its bytes are given back to the file too (applyFrees).
   */
  queueFree(hostOffset: number, discard = false): void {
    const c = hostOffset / this.clusterSize;
    this.pendingFrees.push(c);
    if (discard) this.pendingDiscards.push(c);
  }

  hasPendingFrees(): boolean {
    return this.pendingFrees.length > 0;
  }

  takeFrees(): PendingFrees {
    const f = { clusters: this.pendingFrees, discard: this.pendingDiscards };
    this.pendingFrees = [];
    this.pendingDiscards = [];
    return f;
  }

  /** The decrements; returns the clusters to discard that are now free (in order). */
  async applyFrees(f: PendingFrees): Promise<number[]> {
    for (const c of f.clusters) await this.adjust(c, -1);
    const free: number[] = [];
    for (const c of new Set(f.discard)) if ((await this.refcount(c)) === 0) free.push(c);
    return free.sort((a, b) => a - b);
  }

  private async block(r: number): Promise<Table | undefined> {
    if (r >= this.tableEntries) return undefined;
    // A new block may lie past the end of the file until the cache writes it.
    const limit = this.newBlocks.has(r) ? Number.MAX_SAFE_INTEGER : this.file.size;
    const off = decodeReftable(this.tableView, r, this.clusterSize, limit, this.name);
    return off === 0 ? undefined : this.cache.get(off);
  }

  /** A block for range r, at the first cluster of that range (so it counts itself). */
  private createBlock(r: number): Table {
    const off = r * this.perBlock * this.clusterSize;
    this.guard?.add(off, this.clusterSize, OL.refcountBlock);
    const block = this.cache.getNew(off);
    this.setEntry(block, 0, 1);
    this.cache.markDirty(block);
    encodeReftable(this.tableView, r, off);
    this.newBlocks.add(r);
    return block;
  }

  /**
   * The refcount cache's tail (cache/table-cache.ts TableTail): the table entries of
   * new blocks, written after the blocks and a barrier. QEMU's alloc_refcount_block
   * flushes the file twice per new block instead (with 512-byte clusters and 16-bit
   * refcounts, once per 128 KiB of new data). The L2 cache depends on this cache, so
   * no L2 entry reaches the disk before the counts of what it names are reachable.
   */
  private reftableTail(): TableTail {
    return {
      pending: () => this.newBlocks.size > 0,
      take: () => {
        if (this.newBlocks.size === 0) return undefined;
        const taken = [...this.newBlocks].sort((a, b) => a - b);
        return async () => {
          // At the table's offset as it is when written: grow() may have moved it (its copy holds these entries too).
          for (const r of taken) await this.file.write(this.tableOffset + r * 8, Buffer.from(this.table.subarray(r * 8, r * 8 + 8)));
          for (const r of taken) this.newBlocks.delete(r);
        };
      },
    };
  }

  /**
   * Grow the refcount table so that entry `needed` exists. The new table and the
   * blocks that count it go right after the clusters the old table covers (all free).
   */
  private async grow(needed: number): Promise<void> {
    const cs = this.clusterSize;
    const oldEntries = this.tableEntries;
    const base = oldEntries * this.perBlock;
    let want = Math.max(needed + 1, Math.ceil(oldEntries * 1.5));
    let tableClusters = 0;
    let blocks = 0;
    for (;;) {
      tableClusters = Math.ceil((want * 8) / cs);
      blocks = 1;
      while (blocks * this.perBlock < tableClusters + blocks) blocks++;
      const entries = (tableClusters * cs) / 8;
      if (entries >= oldEntries + blocks && entries >= needed + 1) break;
      want = Math.max(oldEntries + blocks, needed + 1);
    }
    if (tableClusters * cs > LIMITS.maxRefcountTableBytes) {
      throw new IoError(`${this.name}: qcow2 image has outgrown the 8 MiB refcount table limit`, osc.errno.ENOSPC);
    }
    const newTable = Buffer.alloc(tableClusters * cs);
    this.table.copy(newTable);
    const newView = viewOf(newTable);
    const metaEnd = base + tableClusters + blocks;
    for (let b = 0; b < blocks; b++) {
      const r = oldEntries + b;
      const blockCluster = base + tableClusters + b;
      this.guard?.add(blockCluster * cs, cs, OL.refcountBlock);
      const block = this.cache.getNew(blockCluster * cs);
      const from = Math.max(base, r * this.perBlock);
      const to = Math.min(metaEnd, (r + 1) * this.perBlock);
      for (let c = from; c < to; c++) this.setEntry(block, c - r * this.perBlock, 1);
      this.cache.markDirty(block);
      encodeReftable(newView, r, blockCluster * cs);
    }
    const newOffset = base * cs;
    // Free by the refcounts is not proof in a corrupt image: the new table must overlap nothing.
    await this.guard?.check(newOffset, newTable.length);
    this.guard?.add(newOffset, newTable.length, OL.refcountTable);
    await this.cache.flush();
    await this.file.write(newOffset, newTable);
    await this.barrier();
    await this.file.write(HDR.refcountTableOffset, encodeRefcountTableFields(newOffset, tableClusters));
    await this.barrier();

    const oldOffset = this.tableOffset;
    const oldClusters = this.table.length / cs;
    this.table = newTable;
    this.tableView = newView;
    this.tableOffset = newOffset;
    this.guard?.remove(oldOffset, OL.refcountTable);
    // The header no longer points at the old table: free it now.
    for (let i = 0; i < oldClusters; i++) await this.adjust(oldOffset / cs + i, -1);
  }

  private async barrier(): Promise<void> {
    if (this.barriers) await this.file.flush();
  }

  /** Refcount entry i of a block. */
  private entry(block: Table, i: number): number {
    return decodeRefcount(block.data, this.order, i);
  }

  private setEntry(block: Table, i: number, v: number): void {
    encodeRefcount(block.data, this.order, i, v);
    this.changes++;
  }
}

function viewOf(b: Buffer): DataView {
  return new DataView(b.buffer, b.byteOffset, b.byteLength);
}
