// Rebuilding refcounts of an image whose dirty bit is set (lazy_refcounts=on and not
// closed cleanly): QEMU runs `qemu-img check -r all`'s repair on a writable open
// (qcow2_do_open -> qcow2_check). The references are counted from every structure
// that holds a host cluster, and the refcount blocks are rewritten with the counts.
import type { BlockNode } from '../../types.js';
import { CorruptImageError, UnsupportedError } from '../../errors.js';
import { decodeL1, decodeL2, decodeReftable, decodeRefcount, encodeRefcount, l1ReservedBits, l2ReservedBits, type L2Layout } from './entries.js';
import type { SnapshotEntry } from './snapshot.js';

export interface RepairInput {
  file: BlockNode;
  name: string;
  clusterBits: number;
  refcountOrder: number;
  extendedL2: boolean;
  /** Data clusters live in an external data file and are not counted. */
  externalData: boolean;
  l1: Buffer;
  l1Offset: number;
  reftable: Buffer;
  reftableOffset: number;
  snapshots: SnapshotEntry[];
  snapshotTableOffset: number;
  snapshotTableBytes: number;
  /** Other byte ranges that hold a reference each (bitmap directory and tables, crypto header). */
  extraRanges: { offset: number; length: number }[];
  /** Corruptions found while listing them (bitmap table entries QEMU refuses): counted by check. */
  extraCorruptions?: string[];
}

/** Clusters one rebuild may track: 2^27 (1 GiB of counters at most 512 MiB). */
const MAX_TRACKED = 2 ** 27;

/** What every structure of the image references, cluster by cluster (qemu's calculate_refcounts). */
export interface References {
  /** References per host cluster, for every cluster of the file. */
  counts: Float64Array;
  /** Refcount block offsets, by reftable index (0: none). */
  blocks: number[];
  /** Clusters of the file. */
  tracked: number;
  /** Data clusters in use (allocated-clusters), and those compressed. */
  dataClusters: number;
  compressedClusters: number;
  /** Active data clusters not right after the one before them (qemu's fragmented_clusters). */
  fragmentedClusters: number;
  /** Active L2 tables and data clusters with their COPIED flag (refcount one), for qemu's OFLAG_COPIED check. */
  copied: { host: number; copied: boolean; what: 'L2 cluster' | 'data cluster' }[];
  /**
   * Entries with reserved bits set (corruptions QEMU's check counts and its reads go
   * through): how many, and QEMU's line for the first MAX_RESERVED_LINES of them.
   */
  reserved: { count: number; lines: string[] };
}

/** Lines kept for entries with reserved bits: a hostile image could set them in every entry. */
const MAX_RESERVED_LINES = 10_000;

export async function countReferences(r: RepairInput): Promise<References> {
  const cs = 2 ** r.clusterBits;
  const reftableEntries = r.reftable.length / 8;
  const fileClusters = Math.ceil(r.file.size / cs);
  const tracked = Math.max(fileClusters, 1);
  if (tracked > MAX_TRACKED) throw new UnsupportedError(`${r.name}: qcow2 image too large to rebuild its refcounts; run 'qemu-img check -r all'`);
  const counts = new Float64Array(tracked);
  const ref = (offset: number, length: number): void => {
    if (length <= 0) return;
    const a = Math.floor(offset / cs);
    const b = Math.floor((offset + length - 1) / cs);
    for (let c = a; c <= b; c++) {
      if (c >= tracked) throw new CorruptImageError(`${r.name}: qcow2 metadata points past the end of the file (0x${(c * cs).toString(16)})`);
      counts[c]! += 1;
    }
  };
  ref(0, cs);
  ref(r.reftableOffset, r.reftable.length);
  const rtView = new DataView(r.reftable.buffer, r.reftable.byteOffset, r.reftable.byteLength);
  const blocks: number[] = [];
  for (let i = 0; i < reftableEntries; i++) {
    const off = decodeReftable(rtView, i, cs, r.file.size, r.name);
    blocks.push(off);
    if (off) ref(off, cs);
  }
  ref(r.snapshotTableOffset, r.snapshotTableBytes);
  for (const x of r.extraRanges) ref(x.offset, x.length);

  const layout: L2Layout = { clusterBits: r.clusterBits, extended: r.extendedL2, dataLimit: r.externalData ? Number.MAX_SAFE_INTEGER : r.file.size, externalData: r.externalData };
  const l2Buf = Buffer.alloc(cs);
  let dataClusters = 0;
  let compressedClusters = 0;
  let fragmentedClusters = 0;
  let nextContiguous = 0;
  const copied: References['copied'] = [];
  const reserved: References['reserved'] = { count: 0, lines: [] };
  const noteReserved = (line: string): void => {
    if (reserved.count++ < MAX_RESERVED_LINES) reserved.lines.push(line);
  };
  const walkL1 = async (l1: Buffer, l1Offset: number, active: boolean): Promise<void> => {
    ref(l1Offset, l1.length);
    const dv = new DataView(l1.buffer, l1.byteOffset, l1.byteLength);
    const entries = cs / (r.extendedL2 ? 16 : 8);
    for (let i = 0; i < l1.length / 8; i++) {
      const l1Bits = l1ReservedBits(dv, i);
      if (l1Bits) noteReserved(`ERROR found L1 entry with reserved bits set: ${l1Bits}`);
      const { offset, copied: l1Copied } = decodeL1(dv, i, cs, r.file.size, r.name);
      if (offset === 0) continue;
      if (active) copied.push({ host: offset, copied: l1Copied, what: 'L2 cluster' });
      ref(offset, cs);
      await r.file.read(offset, l2Buf);
      const l2 = new DataView(l2Buf.buffer, l2Buf.byteOffset, l2Buf.byteLength);
      for (let k = 0; k < entries; k++) {
        const l2Bits = l2ReservedBits(l2, k, r.extendedL2);
        if (l2Bits) noteReserved(`ERROR found l2 entry with reserved bits set: ${l2Bits}`);
        const e = decodeL2(l2, k, layout, r.name, (i * entries + k) * cs);
        if (e.kind === 'compressed') ref(e.cOffset, e.cLength);
        else if (e.host !== 0 && !r.externalData) ref(e.host, cs);
        // Allocated as QEMU's qcow2_get_cluster_type says: a data cluster (at host 0 too in a
        // data file: decodeL2), a zero cluster that keeps its place (ZERO_ALLOC), compressed.
        if (!active || e.kind === 'unallocated' || (e.kind === 'zero' && e.host === 0)) continue;
        // qemu's check_refcounts_l2 with CHECK_FRAG_INFO: compressed clusters count as fragmented.
        dataClusters++;
        if (e.kind === 'compressed') {
          compressedClusters++;
          fragmentedClusters++;
          continue;
        }
        if (dataClusters > 1 && e.host !== nextContiguous) fragmentedClusters++;
        nextContiguous = e.host + cs;
        if (!r.externalData) copied.push({ host: e.host, copied: e.copied, what: 'data cluster' });
      }
    }
  };
  await walkL1(r.l1, r.l1Offset, true);
  for (const s of r.snapshots) {
    const l1 = Buffer.alloc(s.l1Size * 8);
    if (l1.length) await r.file.read(s.l1TableOffset, l1);
    await walkL1(l1, s.l1TableOffset, false);
  }
  return { counts, blocks, tracked, dataClusters, compressedClusters, fragmentedClusters, copied, reserved };
}

/**
 * Write every refcount as the references count it. `leaksOnly` (qemu-img check -r
 * leaks) lowers refcounts that are too high and leaves those too low as they are.
 */
export async function rebuildRefcounts(r: RepairInput, leaksOnly = false): Promise<void> {
  const cs = 2 ** r.clusterBits;
  const bits = 2 ** r.refcountOrder;
  const perBlock = (cs * 8) / bits;
  const covered = (r.reftable.length / 8) * perBlock;
  const { counts, blocks, tracked } = await countReferences(r);

  // Every used cluster needs a refcount block; one missing would need a new block
  // (and maybe a larger table): leave that to qemu-img.
  const maxRef = 2 ** bits - 1;
  for (let c = 0; c < tracked; c++) {
    if (counts[c] === 0) continue;
    if (c >= covered || blocks[Math.floor(c / perBlock)] === 0) {
      throw new UnsupportedError(`${r.name}: qcow2 refcounts need new refcount blocks to repair; run 'qemu-img check -r all'`);
    }
    if (counts[c]! > maxRef) throw new UnsupportedError(`${r.name}: qcow2 refcount overflow while repairing; run 'qemu-img check -r all'`);
  }
  const block = Buffer.alloc(cs);
  for (let i = 0; i < blocks.length; i++) {
    const off = blocks[i]!;
    if (!off) continue;
    block.fill(0);
    const base = i * perBlock;
    if (leaksOnly) await r.file.read(off, block);
    for (let k = 0; k < perBlock && base + k < tracked; k++) {
      encodeRefcount(block, r.refcountOrder, k, leaksOnly ? Math.min(counts[base + k]!, decodeRefcount(block, r.refcountOrder, k)) : counts[base + k]!);
    }
    await r.file.write(off, block);
  }
  await r.file.flush();
}
