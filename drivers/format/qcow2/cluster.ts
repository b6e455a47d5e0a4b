// Guest offset -> host mapping through the L1 and L2 tables (qcow2.txt, "Cluster
// mapping" and "Extended L2 Entries"; QEMU's qcow2-cluster.c). Mapping only: no
// data I/O happens here.
import type { BlockNode } from '../../types.js';
import type { Table, TableCache, TableTail } from '../../../cache/table-cache.js';
import { indexRuns } from '../../util/index-runs.js';
import { decodeL1, decodeL2, encodeL1, HI, hostOffsetOf, LO, SUBCLUSTERS, subclusterKind, type ClusterKind, type L2Entry, type L2Layout } from './entries.js';

/** A stretch of guest bytes that one kind of I/O answers. */
export interface Run {
  guest: number;
  length: number;
  kind: ClusterKind;
  /** Host offset of `guest` for data runs (contiguous on disk over the whole run). */
  host: number;
  /** Every cluster of a data run has refcount one (may be written in place). */
  copied: boolean;
  /** Compressed runs (one cluster or less): where the compressed data lies. */
  cOffset: number;
  cLength: number;
  /** Compressed runs: the guest offset of the cluster's start. */
  clusterGuest: number;
}

export interface ClusterMapOptions {
  file: BlockNode;
  name: string;
  clusterBits: number;
  extendedL2: boolean;
  /** Bound for data cluster offsets (the image file's size, or unbounded for a data file). */
  dataLimit: () => number;
  /** Data clusters live in an external data file. */
  externalData?: boolean;
  /** The L1 table, held in memory (the active layer). */
  l1?: Buffer;
  /**
   * Without `l1`: the number of L1 entries at l1Offset, read on demand through
   * l2Cache a cluster at a time (snapshot views: QEMU too reads a snapshot's L1
   * only when the snapshot is used, and 32 MiB per snapshot must not be held).
   */
  l1Entries?: number;
  l1Offset: number;
  l2Cache: TableCache;
}

export class ClusterMap {
  readonly clusterSize: number;
  readonly clusterBits: number;
  readonly extended: boolean;
  /** Bytes per subcluster (the cluster size without extended L2). */
  readonly subclusterSize: number;
  /** Entries per L2 table. */
  readonly l2Entries: number;
  /** Guest bytes one L2 table maps. */
  readonly l2Span: number;
  private readonly file: BlockNode;
  private readonly name: string;
  private l1: Buffer;
  private l1View: DataView;
  private l1Offset: number;
  /** L1 entries changed in memory and not yet written (setL1EntryLater). */
  private readonly pendingL1 = new Set<number>();
  /** Entries of an L1 table read on demand (see ClusterMapOptions.l1Entries), else undefined. */
  private readonly lazyEntries: number | undefined;
  private readonly dataLimit: () => number;
  private readonly externalData: boolean;
  readonly l2Cache: TableCache;

  constructor(o: ClusterMapOptions) {
    this.file = o.file;
    this.name = o.name;
    this.clusterBits = o.clusterBits;
    this.clusterSize = 2 ** o.clusterBits;
    this.extended = o.extendedL2;
    this.subclusterSize = o.extendedL2 ? this.clusterSize / SUBCLUSTERS : this.clusterSize;
    this.l2Entries = this.clusterSize / (o.extendedL2 ? 16 : 8);
    this.l2Span = this.clusterSize * this.l2Entries;
    this.l1 = o.l1 ?? Buffer.alloc(0);
    this.l1View = new DataView(this.l1.buffer, this.l1.byteOffset, this.l1.byteLength);
    this.lazyEntries = o.l1 ? undefined : (o.l1Entries ?? 0);
    this.l1Offset = o.l1Offset;
    this.dataLimit = o.dataLimit;
    this.externalData = o.externalData ?? false;
    this.l2Cache = o.l2Cache;
  }

  get l1Size(): number {
    return this.lazyEntries ?? this.l1.length / 8;
  }

  get l1TableOffset(): number {
    return this.l1Offset;
  }

  /** A copy of the in-memory L1 table, as on disk (no entry waits to be written). */
  l1Copy(): Buffer {
    this.assertNoPendingL1('copied');
    return Buffer.from(this.l1);
  }

  /** Switch to a new (larger) L1 table, already on disk and in the header. */
  replaceL1(l1: Buffer, offset: number): void {
    this.assertNoPendingL1('replaced');
    this.l1 = l1;
    this.l1View = new DataView(l1.buffer, l1.byteOffset, l1.byteLength);
    this.l1Offset = offset;
  }

  layout(): L2Layout {
    return { clusterBits: this.clusterBits, extended: this.extended, dataLimit: this.dataLimit(), externalData: this.externalData };
  }

  /** The L2 table offset for L1 index i (0: none), validated. */
  l1Entry(i: number): { offset: number; copied: boolean } {
    if (this.lazyEntries !== undefined) throw new Error(`${this.name}: L1 entries of a snapshot are read with l1EntryAsync`);
    if (i >= this.l1Size) return { offset: 0, copied: false };
    return decodeL1(this.l1View, i, this.clusterSize, this.file.size, this.name);
  }

  /** L1 entry i, from memory or (lazy L1) from the file through the table cache. */
  async l1EntryAsync(i: number): Promise<{ offset: number; copied: boolean }> {
    if (this.lazyEntries === undefined) return this.l1Entry(i);
    if (i >= this.lazyEntries) return { offset: 0, copied: false };
    const cs = this.clusterSize;
    const at = this.l1Offset + i * 8;
    const cluster = Math.floor(at / cs) * cs;
    if (cluster + cs <= this.file.size) {
      const table = await this.l2Cache.get(cluster);
      return decodeL1(table.view(), (at - cluster) / 8, cs, this.file.size, this.name, i);
    }
    // The table's last cluster is cut short by the end of the file: read just the entry.
    const entry = Buffer.alloc(8);
    await this.file.read(at, entry);
    return decodeL1(new DataView(entry.buffer, entry.byteOffset, 8), 0, cs, this.file.size, this.name, i);
  }

  /** Point L1 entry i at an L2 table: on disk first, then in memory. */
  async setL1Entry(i: number, offset: number, copied: boolean): Promise<void> {
    const entry = Buffer.alloc(8);
    encodeL1(new DataView(entry.buffer, entry.byteOffset, 8), 0, offset, copied);
    await this.file.write(this.l1Offset + i * 8, entry);
    entry.copy(this.l1, i * 8);
    this.pendingL1.delete(i);
  }

  /**
   * Point L1 entry i at a new L2 table in memory now; the entry reaches the file
   * with the L2 cache's next flush, after the tables and a barrier (l1Tail), so no
   * flush is paid per new table.
   */
  setL1EntryLater(i: number, offset: number, copied: boolean): void {
    encodeL1(this.l1View, i, offset, copied);
    this.pendingL1.add(i);
  }

  /** The L2 cache's tail (cache/table-cache.ts TableTail): the L1 entries setL1EntryLater changed. */
  l1Tail(): TableTail {
    return {
      pending: () => this.pendingL1.size > 0,
      take: () => {
        if (this.pendingL1.size === 0) return undefined;
        const taken = [...this.pendingL1].map((index) => ({ index, bytes: Buffer.from(this.l1.subarray(index * 8, index * 8 + 8)) }));
        return async () => {
          // A run of neighbouring entries is one write, at the table's offset as it is now.
          for (const run of indexRuns(taken)) await this.file.write(this.l1Offset + run[0]!.index * 8, Buffer.concat(run.map((t) => t.bytes)));
          // An entry changed again meanwhile is written by the next flush.
          for (const t of taken) if (this.l1.subarray(t.index * 8, t.index * 8 + 8).equals(t.bytes)) this.pendingL1.delete(t.index);
        };
      },
    };
  }

  /** Forget entries that will never be written (a corrupt image writes no table). */
  dropPendingL1(): boolean {
    const had = this.pendingL1.size > 0;
    this.pendingL1.clear();
    return had;
  }

  private assertNoPendingL1(what: string): void {
    if (this.pendingL1.size > 0) throw new Error(`${this.name}: internal error: the L1 table ${what} with ${this.pendingL1.size} entries not yet written`);
  }

  /** Decode entry `index` of an L2 table that maps guest cluster `guestCluster`. */
  entry(table: Table, index: number, guestCluster: number): L2Entry {
    return decodeL2(table.view(), index, this.layout(), this.name, guestCluster * this.clusterSize);
  }

  /**
   * The runs covering [offset, offset + length), merging neighbouring clusters of
   * one kind (and data clusters that are contiguous on disk). One await per L2 table.
   */
  async map(offset: number, length: number): Promise<Run[]> {
    const cs = this.clusterSize;
    const runs: Run[] = [];
    const end = offset + length;
    const layout = this.layout();
    let pos = offset;
    while (pos < end) {
      const l1i = Math.floor(pos / this.l2Span);
      const tableEnd = Math.min(end, (l1i + 1) * this.l2Span);
      const { offset: l2Offset } = this.lazyEntries === undefined ? this.l1Entry(l1i) : await this.l1EntryAsync(l1i);
      if (l2Offset === 0) {
        push(runs, pos, tableEnd - pos, 'unallocated', 0, false);
        pos = tableEnd;
        continue;
      }
      const table = await this.l2Cache.get(l2Offset);
      const dv = table.view();
      let gc = Math.floor(pos / cs);
      let index = gc - l1i * this.l2Entries;
      while (pos < tableEnd) {
        const cstart = gc * cs;
        if (!this.extended && dv.getUint32(index * 8) === 0 && dv.getUint32(index * 8 + 4) === 0) {
          // Empty entries (most of a sparse disk) need no decoding: one run for all in a row,
          // found by zeroBytes (a few memcmp calls, not a JavaScript step per entry).
          const entries = Math.ceil((tableEnd - cstart) / cs);
          const k = index + Math.max(1, zeroBytes(table.data, index * 8, (index + entries) * 8) / 8);
          const stop = Math.min(tableEnd, cstart + (k - index) * cs);
          push(runs, pos, stop - pos, 'unallocated', 0, false);
          pos = stop;
          gc += k - index;
          index = k;
          continue;
        }
        const next = Math.min(tableEnd, cstart + cs);
        if (!this.extended) {
          // A plain data cluster, the usual entry, without an L2Entry made for it (a walk
          // of the read map passes 1024 of them): decodeL2 checks the same and names what is wrong.
          const hi = dv.getUint32(index * 8);
          const lo = dv.getUint32(index * 8 + 4);
          const host = hostOffsetOf(hi, lo);
          if ((hi & (HI.compressed | HI.l2Reserved)) === 0 && (lo & (LO.l2Reserved | LO.zero)) === 0 && host !== 0 && host % cs === 0 && host < layout.dataLimit) {
            push(runs, pos, next - pos, 'data', host + (pos - cstart), (hi & HI.copied) !== 0);
            pos = next;
            gc++;
            index++;
            continue;
          }
        }
        const e = decodeL2(dv, index, layout, this.name, cstart);
        if (e.kind === 'compressed') {
          runs.push({ guest: pos, length: next - pos, kind: 'compressed', host: 0, copied: false, cOffset: e.cOffset, cLength: e.cLength, clusterGuest: cstart });
        } else if (!this.extended) {
          // A preallocated zero cluster keeps its host offset (qemu-img map shows it). A data
          // cluster may lie at host 0 (the first cluster of an external data file): its
          // offset is still where in it the run starts.
          const host = e.kind === 'data' || (e.kind === 'zero' && e.host !== 0) ? e.host + (pos - cstart) : 0;
          push(runs, pos, next - pos, e.kind, host, e.copied);
        } else {
          // One run per subcluster, merged by push().
          const scs = this.subclusterSize;
          let p = pos;
          while (p < next) {
            const s = Math.floor((p - cstart) / scs);
            const sEnd = Math.min(next, cstart + (s + 1) * scs);
            const kind = subclusterKind(e, true, s);
            push(runs, p, sEnd - p, kind, kind === 'data' ? e.host + (p - cstart) : 0, e.copied);
            p = sEnd;
          }
        }
        pos = next;
        gc++;
        index++;
      }
    }
    return runs;
  }
}

const ZEROS = Buffer.alloc(64 * 1024);

/**
 * How many bytes of `data` from `from` (up to `to`) are zeros, in whole 8-byte
 * entries: spans are compared with zeros natively, halved where one is not all zeros.
 * A one-shot walk (tsimg map of a sparse 1 TiB disk: 200 L2 tables of 8192 entries)
 * runs mostly before the JIT has compiled an entry-by-entry loop; this makes it some
 * twenty native calls a table.
 */
export function zeroBytes(data: Buffer, from: number, to: number): number {
  const stop = Math.min(to, data.length);
  let pos = from;
  let n = Math.min(stop - pos, ZEROS.length);
  while (n >= 8 && pos < stop) {
    n = Math.min(n, stop - pos, ZEROS.length);
    if (data.compare(ZEROS, 0, n, pos, pos + n) === 0) pos += n;
    else n = Math.floor(n / 16) * 8;
  }
  return pos - from;
}

function push(runs: Run[], guest: number, length: number, kind: ClusterKind, host: number, copied: boolean): void {
  const last = runs[runs.length - 1];
  if (
    last &&
    last.kind === kind &&
    kind !== 'compressed' &&
    (kind === 'unallocated' ||
      (kind === 'zero' && (last.host === 0) === (host === 0) && (host === 0 || last.host + last.length === host)) ||
      (kind === 'data' && last.copied === copied && last.host + last.length === host))
  ) {
    last.length += length;
    return;
  }
  runs.push({ guest, length, kind, host, copied: kind === 'data' ? copied : false, cOffset: 0, cLength: 0, clusterGuest: 0 });
}
