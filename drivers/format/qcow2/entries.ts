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

export interface L2Entry {
  kind: ClusterKind;
  /** Host offset of the cluster (data, and zero clusters with a preallocation); 0 otherwise. */
  host: number;
  copied: boolean;
}

export function hostOffsetOf(hi: number, lo: number): number {
  return (hi & HI.offsetMask) * TWO32 + ((lo & LO.offsetMask) >>> 0);
}

/**
 * Decode the L2 entry at `index` of a table. `where` names the guest offset in
 * messages; `fileSize` bounds data clusters (a cluster starting past the end of
 * the file is corrupt, one that the file ends inside reads zeros past the end).
 */
export function decodeL2(dv: DataView, index: number, clusterSize: number, fileSize: number, name: string, where: number): L2Entry {
  const hi = dv.getUint32(index * 8, false);
  const lo = dv.getUint32(index * 8 + 4, false);
  if (hi & HI.compressed) return { kind: 'compressed', host: 0, copied: false };
  if (hi & HI.l2Reserved || lo & LO.l2Reserved) {
    throw new CorruptImageError(`${name}: qcow2 L2 entry for guest offset 0x${where.toString(16)} has reserved bits set`);
  }
  const host = hostOffsetOf(hi, lo);
  const copied = (hi & HI.copied) !== 0;
  if (host % clusterSize !== 0) {
    throw new CorruptImageError(`${name}: qcow2 L2 entry for guest offset 0x${where.toString(16)} is not cluster aligned`);
  }
  if (lo & LO.zero) return { kind: 'zero', host, copied };
  if (host === 0) return { kind: 'unallocated', host: 0, copied: false };
  if (host >= fileSize) {
    throw new CorruptImageError(`${name}: qcow2 L2 entry for guest offset 0x${where.toString(16)} points past the end of the file`);
  }
  return { kind: 'data', host, copied };
}

export function encodeL2(dv: DataView, index: number, host: number, copied: boolean, zero: boolean): void {
  dv.setUint32(index * 8, ((copied ? HI.copied : 0) | Math.floor(host / TWO32)) >>> 0, false);
  dv.setUint32(index * 8 + 4, ((host >>> 0) | (zero ? LO.zero : 0)) >>> 0, false);
}

/** The L2 table offset in an L1 entry, validated; 0 when unallocated. */
export function decodeL1(dv: DataView, index: number, clusterSize: number, fileSize: number, name: string): { offset: number; copied: boolean } {
  const hi = dv.getUint32(index * 8, false);
  const lo = dv.getUint32(index * 8 + 4, false);
  if (hi & HI.l1Reserved || lo & LO.l1Reserved) throw new CorruptImageError(`${name}: qcow2 L1 entry ${index} has reserved bits set`);
  const offset = hostOffsetOf(hi, lo);
  if (offset === 0) return { offset: 0, copied: false };
  if (offset % clusterSize !== 0) throw new CorruptImageError(`${name}: qcow2 L1 entry ${index} is not cluster aligned`);
  if (offset >= fileSize) throw new CorruptImageError(`${name}: qcow2 L1 entry ${index} points past the end of the file`);
  return { offset, copied: (hi & HI.copied) !== 0 };
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
