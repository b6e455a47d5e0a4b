// Table entries with flag bits (qcow2.txt, "Cluster mapping" and "Host cluster
// management"). A 64-bit entry is read as two u32 halves so no bit is lost: host
// offsets are bits 9-55, the flags sit in the high half.
import { CorruptImageError } from '../../errors.js';

const TWO32 = 2 ** 32;

/** Bits of the high u32 of an L1/L2 entry. */
export const HI = {
  copied: 0x80000000, // bit 63: refcount is exactly one
  compressed: 0x40000000, // bit 62 (L2 only)
  offsetMask: 0x00ffffff, // bits 32-55 of the host offset
  l1Reserved: 0x7f000000, // L1 bits 56-62
  l2Reserved: 0x3f000000, // L2 bits 56-61
} as const;

/** Bits of the low u32. */
export const LO = {
  zero: 0x1, // bit 0 of a standard cluster descriptor: reads as zeros
  l2Reserved: 0x1fe, // bits 1-8
  l1Reserved: 0x1ff, // bits 0-8
  offsetMask: 0xfffffe00, // bits 9-31 of the host offset
} as const;

export type ClusterKind = 'data' | 'zero' | 'unallocated' | 'compressed';

/** How one L2 table's entries are laid out (qcow2.txt, "Extended L2 Entries"). */
export interface L2Layout {
  clusterBits: number;
  /** 16-byte entries with subcluster bitmaps. */
  extended: boolean;
  /** Upper bound for data cluster offsets (the file, or the external data file). */
  dataLimit: number;
  /**
   * Data clusters are in an external data file, where host offset 0 is valid: an
   * entry with offset 0 and COPIED set is allocated (QEMU's qcow2_get_cluster_type).
   */
  externalData?: boolean;
}

export interface L2Entry {
  /**
   * Standard entries: the cluster's kind. Extended entries: 'data' when a host
   * cluster is set (each subcluster may still be unallocated or zero, see the
   * bitmaps), 'unallocated' when none is, 'compressed'.
   */
  kind: ClusterKind;
  /** Host offset of the cluster (data, and zero clusters with a preallocation); 0 otherwise. */
  host: number;
  copied: boolean;
  /** Extended L2: subclusters allocated in this layer (bit i: subcluster i). */
  alloc: number;
  /** Extended L2: subclusters that read as zeros. */
  zeros: number;
  /** Compressed clusters: byte offset and length of the compressed data. */
  cOffset: number;
  cLength: number;
}

export const SUBCLUSTERS = 32;
export const ALL_SUBCLUSTERS = 0xffffffff;

export function hostOffsetOf(hi: number, lo: number): number {
  return (hi & HI.offsetMask) * TWO32 + ((lo & LO.offsetMask) >>> 0);
}

/**
 * Decode the L2 entry at `index` of a table. `where` names the guest offset in
 * messages; `layout.dataLimit` bounds data clusters (a cluster starting past the
 * end of the file is corrupt, one that the file ends inside reads zeros past the end).
 */
export function decodeL2(dv: DataView, index: number, layout: L2Layout, name: string, where: number): L2Entry {
  const clusterSize = 2 ** layout.clusterBits;
  const at = index * (layout.extended ? 16 : 8);
  const hi = dv.getUint32(at, false);
  const lo = dv.getUint32(at + 4, false);
  // Messages are made only when thrown: this runs for every cluster a walk of the map passes.
  if (hi & HI.compressed) {
    // qcow2.txt "Compressed Clusters Descriptor": x = 62 - (cluster_bits - 8).
    const x = 62 - (layout.clusterBits - 8);
    const v = dv.getBigUint64(at, false);
    const cOffset = Number(v & ((1n << BigInt(x)) - 1n));
    const sectors = Number((v >> BigInt(x)) & ((1n << BigInt(62 - x)) - 1n)) + 1;
    const cLength = sectors * 512 - (cOffset % 512);
    if (cOffset === 0 || cOffset >= layout.dataLimit) throw new CorruptImageError(`${l2Where(name, where)} points compressed data past the end of the file`);
    if (layout.extended && (dv.getUint32(at + 8, false) | dv.getUint32(at + 12, false)) !== 0) {
      throw new CorruptImageError(`${l2Where(name, where)} is compressed but has a subcluster bitmap`);
    }
    return { kind: 'compressed', host: 0, copied: false, alloc: 0, zeros: 0, cOffset, cLength };
  }
  // Reserved bits are left out of the offset and otherwise ignored, as QEMU reads them
  // (qcow2_get_cluster_type, L2E_OFFSET_MASK); check counts them (l2ReservedBits).
  const host = hostOffsetOf(hi, lo);
  const copied = (hi & HI.copied) !== 0;
  const allocated = host !== 0 || (copied && layout.externalData === true);
  if (host % clusterSize !== 0) throw new CorruptImageError(`${l2Where(name, where)} is not cluster aligned`);
  if (host >= layout.dataLimit) throw new CorruptImageError(`${l2Where(name, where)} points past the end of the file`);
  if (layout.extended) {
    const zeros = dv.getUint32(at + 8, false);
    const alloc = dv.getUint32(at + 12, false);
    if ((zeros & alloc) !== 0) throw new CorruptImageError(`${l2Where(name, where)} has subclusters both allocated and zero`);
    if (!allocated && alloc !== 0) throw new CorruptImageError(`${l2Where(name, where)} has allocated subclusters but no host cluster`);
    return { kind: allocated ? 'data' : 'unallocated', host, copied: allocated && copied, alloc, zeros, cOffset: 0, cLength: 0 };
  }
  const kind: ClusterKind = lo & LO.zero ? 'zero' : allocated ? 'data' : 'unallocated';
  return { kind, host, copied: kind === 'unallocated' ? false : copied, alloc: 0, zeros: 0, cOffset: 0, cLength: 0 };
}

function l2Where(name: string, where: number): string {
  return `${name}: qcow2 L2 entry for guest offset 0x${where.toString(16)}`;
}

/** What subcluster `s` of an entry reads as (standard entries: the whole cluster). */
export function subclusterKind(e: L2Entry, extended: boolean, s: number): ClusterKind {
  if (!extended || e.kind === 'compressed') return e.kind;
  if ((e.alloc >>> s) & 1) return 'data';
  if ((e.zeros >>> s) & 1) return 'zero';
  return 'unallocated';
}

/** Bits s0..s1-1 of a subcluster bitmap, as an unsigned 32-bit number. */
export function bitRange(s0: number, s1: number): number {
  return ((2 ** (s1 - s0) - 1) * 2 ** s0) >>> 0;
}

export function encodeL2(dv: DataView, index: number, host: number, copied: boolean, zero: boolean): void {
  dv.setUint32(index * 8, ((copied ? HI.copied : 0) | Math.floor(host / TWO32)) >>> 0, false);
  dv.setUint32(index * 8 + 4, ((host >>> 0) | (zero ? LO.zero : 0)) >>> 0, false);
}

/**
 * A compressed cluster's L2 entry (qcow2.txt, "Compressed Clusters Descriptor"): bit 62
 * set, COPIED clear, the byte offset in bits 0..x-1 and the 512-byte sectors it
 * reaches into, less one, in bits x..61 (x = 62 - (cluster_bits - 8)); an extended
 * entry's bitmaps are zero. `length` is the compressed stream's length in bytes.
 */
export function encodeL2Compressed(dv: DataView, index: number, extended: boolean, clusterBits: number, offset: number, length: number): void {
  const x = BigInt(62 - (clusterBits - 8));
  // QEMU's qcow2_alloc_compressed_cluster_offset: sectors from the first byte's to the last byte's, less one.
  const extra = BigInt(Math.floor((offset + length - 1) / 512) - Math.floor(offset / 512));
  const at = index * (extended ? 16 : 8);
  dv.setBigUint64(at, (1n << 62n) | (extra << x) | BigInt(offset), false);
  if (extended) dv.setBigUint64(at + 8, 0n, false);
}

/** An extended L2 entry (16 bytes): descriptor, then zero bitmap (high) and allocation bitmap (low). */
export function encodeL2Ext(dv: DataView, index: number, host: number, copied: boolean, alloc: number, zeros: number): void {
  dv.setUint32(index * 16, ((copied ? HI.copied : 0) | Math.floor(host / TWO32)) >>> 0, false);
  dv.setUint32(index * 16 + 4, host >>> 0, false);
  dv.setUint32(index * 16 + 8, zeros >>> 0, false);
  dv.setUint32(index * 16 + 12, alloc >>> 0, false);
}

/**
 * The L2 table offset in an L1 entry, validated; 0 when unallocated. `entry` is the
 * entry's number in its table, for messages (`index` when dv holds the whole table).
 */
export function decodeL1(dv: DataView, index: number, clusterSize: number, fileSize: number, name: string, entry = index): { offset: number; copied: boolean } {
  const hi = dv.getUint32(index * 8, false);
  const lo = dv.getUint32(index * 8 + 4, false);
  // Reserved bits are masked off as QEMU's reads do (L1E_OFFSET_MASK); check counts them (l1ReservedBits).
  const offset = hostOffsetOf(hi, lo);
  if (offset === 0) return { offset: 0, copied: false };
  if (offset % clusterSize !== 0) throw new CorruptImageError(`${name}: qcow2 L1 entry ${entry} is not cluster aligned`);
  if (offset >= fileSize) throw new CorruptImageError(`${name}: qcow2 L1 entry ${entry} points past the end of the file`);
  return { offset, copied: (hi & HI.copied) !== 0 };
}

/**
 * The entry as QEMU's check prints it ("found L1 entry with reserved bits set: %x"),
 * when any of its reserved bits is set (L1E_RESERVED_MASK); else undefined.
 */
export function l1ReservedBits(dv: DataView, index: number): string | undefined {
  const hi = dv.getUint32(index * 8, false);
  const lo = dv.getUint32(index * 8 + 4, false);
  return hi & HI.l1Reserved || lo & LO.l1Reserved ? entryHex(hi, lo) : undefined;
}

/** The same for a standard cluster descriptor (L2E_STD_RESERVED_MASK; compressed ones have none). */
export function l2ReservedBits(dv: DataView, index: number, extended: boolean): string | undefined {
  const at = index * (extended ? 16 : 8);
  const hi = dv.getUint32(at, false);
  const lo = dv.getUint32(at + 4, false);
  if (hi & HI.compressed) return undefined;
  return hi & HI.l2Reserved || lo & LO.l2Reserved ? entryHex(hi, lo) : undefined;
}

function entryHex(hi: number, lo: number): string {
  return hi === 0 ? (lo >>> 0).toString(16) : (hi >>> 0).toString(16) + (lo >>> 0).toString(16).padStart(8, '0');
}

export function encodeL1(dv: DataView, index: number, offset: number, copied: boolean): void {
  dv.setUint32(index * 8, ((copied ? HI.copied : 0) | Math.floor(offset / TWO32)) >>> 0, false);
  dv.setUint32(index * 8 + 4, offset >>> 0, false);
}

/** A refcount table entry: bits 9-63 are the block offset, bits 0-8 reserved. */
export function decodeReftable(dv: DataView, index: number, clusterSize: number, fileSize: number, name: string): number {
  const hi = dv.getUint32(index * 8, false);
  const lo = dv.getUint32(index * 8 + 4, false);
  if (lo & LO.l1Reserved) throw new CorruptImageError(`${name}: qcow2 refcount table entry ${index} has reserved bits set`);
  if (hi >= 2 ** 21) throw new CorruptImageError(`${name}: qcow2 refcount table entry ${index} is out of range`);
  const offset = hi * TWO32 + lo;
  if (offset === 0) return 0;
  if (offset % clusterSize !== 0) throw new CorruptImageError(`${name}: qcow2 refcount block ${index} is not cluster aligned`);
  if (offset >= fileSize) throw new CorruptImageError(`${name}: qcow2 refcount block ${index} lies past the end of the file`);
  return offset;
}

export function encodeReftable(dv: DataView, index: number, offset: number): void {
  dv.setUint32(index * 8, Math.floor(offset / TWO32), false);
  dv.setUint32(index * 8 + 4, offset >>> 0, false);
}

/**
 * Refcount block entry i, 2^order bits wide (qcow2.txt, "Refcount block entry").
 * Sub-byte widths: bit 0 is the least significant bit of the byte.
 */
export function decodeRefcount(d: Buffer, order: number, i: number): number {
  switch (order) {
    case 3:
      return d[i]!;
    case 4:
      return d.readUInt16BE(i * 2);
    case 5:
      return d.readUInt32BE(i * 4);
    case 6:
      return d.readUInt32BE(i * 8) * TWO32 + d.readUInt32BE(i * 8 + 4);
    default: {
      const bits = 2 ** order;
      const bit = i * bits;
      return (d[bit >> 3]! >> (bit & 7)) & (2 ** bits - 1);
    }
  }
}

/** Set refcount block entry i to v (which the caller has checked fits in 2^order bits). */
export function encodeRefcount(d: Buffer, order: number, i: number, v: number): void {
  switch (order) {
    case 3:
      d[i] = v;
      return;
    case 4:
      d.writeUInt16BE(v, i * 2);
      return;
    case 5:
      d.writeUInt32BE(v, i * 4);
      return;
    case 6:
      d.writeUInt32BE(Math.floor(v / TWO32), i * 8);
      d.writeUInt32BE(v % TWO32, i * 8 + 4);
      return;
    default: {
      const bits = 2 ** order;
      const bit = i * bits;
      const shift = bit & 7;
      const byte = bit >> 3;
      d[byte] = (d[byte]! & ~((2 ** bits - 1) << shift)) | (v << shift);
    }
  }
}
