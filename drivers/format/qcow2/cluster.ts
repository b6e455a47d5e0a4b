// Guest offset -> host mapping through the L1 and L2 tables (qcow2.txt, "Cluster
// mapping"; QEMU's qcow2-cluster.c). Mapping only: no data I/O happens here.
import type { BlockNode } from '../../types.js';
import type { Table, TableCache } from '../../../cache/table-cache.js';
import { decodeL1, decodeL2, encodeL1, type ClusterKind, type L2Entry } from './entries.js';

/** A stretch of guest bytes that one kind of I/O answers. */
export interface Run {
  guest: number;
  length: number;
  kind: ClusterKind;
  /** Host offset of `guest` for data runs (contiguous on disk over the whole run). */
  host: number;
  /** Every cluster of a data run has refcount one (may be written in place). */
  copied: boolean;
}

export interface ClusterMapOptions {
  file: BlockNode;
  name: string;
  clusterBits: number;
  l1: Buffer;
  l1Offset: number;
  l2Cache: TableCache;
}

export class ClusterMap {
  readonly clusterSize: number;
  /** Entries per L2 table. */
  readonly l2Entries: number;
  /** Guest bytes one L2 table maps. */
  readonly l2Span: number;
  private readonly file: BlockNode;
  private readonly name: string;
  private readonly l1: Buffer;
  private readonly l1View: DataView;
  private readonly l1Offset: number;
  readonly l2Cache: TableCache;

  constructor(o: ClusterMapOptions) {
    this.file = o.file;
    this.name = o.name;
    this.clusterSize = 2 ** o.clusterBits;
    this.l2Entries = this.clusterSize / 8;
    this.l2Span = this.clusterSize * this.l2Entries;
    this.l1 = o.l1;
    this.l1View = new DataView(o.l1.buffer, o.l1.byteOffset, o.l1.byteLength);
    this.l1Offset = o.l1Offset;
    this.l2Cache = o.l2Cache;
  }

  /** The L2 table offset for L1 index i (0: none), validated. */
  l1Entry(i: number): { offset: number; copied: boolean } {
    return decodeL1(this.l1View, i, this.clusterSize, this.file.size, this.name);
  }

  /** Point L1 entry i at an L2 table: on disk first, then in memory. */
  async setL1Entry(i: number, offset: number, copied: boolean): Promise<void> {
    const entry = Buffer.alloc(8);
    encodeL1(new DataView(entry.buffer, entry.byteOffset, 8), 0, offset, copied);
    await this.file.write(this.l1Offset + i * 8, entry);
    entry.copy(this.l1, i * 8);
  }

  /** Decode entry `index` of an L2 table that maps guest cluster `guestCluster`. */
  entry(table: Table, index: number, guestCluster: number): L2Entry {
    return decodeL2(table.view(), index, this.clusterSize, this.file.size, this.name, guestCluster * this.clusterSize);
  }

  /**
   * The runs covering [offset, offset + length), merging neighbouring clusters of
   * one kind (and data clusters that are contiguous on disk). One await per L2 table.
   */
  async map(offset: number, length: number): Promise<Run[]> {
    const cs = this.clusterSize;
    const runs: Run[] = [];
    const end = offset + length;
    let pos = offset;
    while (pos < end) {
      const l1i = Math.floor(pos / this.l2Span);
      const tableEnd = Math.min(end, (l1i + 1) * this.l2Span);
      const { offset: l2Offset } = this.l1Entry(l1i);
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
        const next = Math.min(tableEnd, (gc + 1) * cs);
        const e = decodeL2(dv, index, cs, this.file.size, this.name, gc * cs);
        const host = e.kind === 'data' ? e.host + (pos - gc * cs) : 0;
        push(runs, pos, next - pos, e.kind, host, e.copied);
        pos = next;
        gc++;
        index++;
      }
    }
    return runs;
  }
}

function push(runs: Run[], guest: number, length: number, kind: ClusterKind, host: number, copied: boolean): void {
  const last = runs[runs.length - 1];
  if (
    last &&
    last.kind === kind &&
    kind !== 'compressed' &&
    (kind !== 'data' || (last.copied === copied && last.host + last.length === host))
  ) {
    last.length += length;
    return;
  }
  runs.push({ guest, length, kind, host, copied: kind === 'data' ? copied : false });
}
