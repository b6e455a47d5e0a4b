// VHD (Virtual PC) on-disk structures: the hard disk footer, the dynamic disk
// header, their checksums, and the CHS geometry rules of QEMU's block/vpc.c.
// All fields are big-endian ("Virtual Hard Disk Image Format Specification", 2006).
import crypto from 'node:crypto';

export const SECTOR = 512;
export const FOOTER_SIZE = 512;
export const DYN_HEADER_SIZE = 1024;

export const DISK_FIXED = 2;
export const DISK_DYNAMIC = 3;
export const DISK_DIFFERENCING = 4;

/** Seconds between 1970-01-01 and 2000-01-01 (VHD timestamps count from 2000). */
const VHD_TIMESTAMP_BASE = 946684800;

export const CHS_MAX_C = 65535;
export const CHS_MAX_H = 16;
export const CHS_MAX_S = 255;
/** 2040 GiB in sectors: QEMU's limit for any VHD. */
export const VHD_MAX_SECTORS = 0xff000000;
export const VHD_MAX_GEOMETRY = CHS_MAX_C * CHS_MAX_H * CHS_MAX_S;

/** Hard disk footer (spec "Hard Disk Footer Format"). */
export const FOOTER = {
  cookie: 0, // "conectix"
  features: 8,
  version: 12,
  dataOffset: 16, // u64, 0xffffffffffffffff for fixed disks
  timestamp: 24,
  creatorApp: 28, // 4 chars
  creatorVersion: 32,
  creatorOs: 36,
  originalSize: 40, // u64
  currentSize: 48, // u64
  cylinders: 56, // u16
  heads: 58, // u8
  sectorsPerTrack: 59, // u8
  diskType: 60,
  checksum: 64,
  uniqueId: 68, // 16 bytes
  savedState: 84,
} as const;

/** Dynamic disk header (spec "Dynamic Disk Header Format"). */
export const DYN = {
  cookie: 0, // "cxsparse"
  dataOffset: 8, // u64, unused (all ones)
  tableOffset: 16, // u64: the BAT
  version: 24,
  maxTableEntries: 28,
  blockSize: 32,
  checksum: 36,
} as const;

export function dv(b: Uint8Array): DataView {
  return new DataView(b.buffer, b.byteOffset, b.byteLength);
}

export function ascii(b: Uint8Array, off: number, len: number): string {
  return String.fromCharCode(...b.subarray(off, off + len));
}

/** One's complement of the byte sum, with the checksum field counted as zero. */
export function vpcChecksum(b: Uint8Array, checksumAt: number): number {
  let sum = 0;
  for (let i = 0; i < b.length; i++) {
    if (i >= checksumAt && i < checksumAt + 4) continue;
    sum = (sum + b[i]!) >>> 0;
  }
  return ~sum >>> 0;
}

export interface Footer {
  creatorApp: string;
  dataOffset: bigint;
  currentSize: bigint;
  cylinders: number;
  heads: number;
  sectorsPerTrack: number;
  diskType: number;
  checksum: number;
  computedChecksum: number;
}

export function parseFooter(b: Uint8Array): Footer {
  const v = dv(b);
  return {
    creatorApp: ascii(b, FOOTER.creatorApp, 4),
    dataOffset: v.getBigUint64(FOOTER.dataOffset, false),
    currentSize: v.getBigUint64(FOOTER.currentSize, false),
    cylinders: v.getUint16(FOOTER.cylinders, false),
    heads: v.getUint8(FOOTER.heads),
    sectorsPerTrack: v.getUint8(FOOTER.sectorsPerTrack),
    diskType: v.getUint32(FOOTER.diskType, false),
    checksum: v.getUint32(FOOTER.checksum, false),
    computedChecksum: vpcChecksum(b.subarray(0, FOOTER_SIZE), FOOTER.checksum),
  };
}

/**
 * The guest-visible size in sectors, as QEMU 7.2's vpc_open computes it. Virtual PC
 * (and QEMU before "qem2") size the disk by its CHS geometry; Hyper-V, disk2vhd,
 * XenServer, XenConverter and QEMU with force_size use current_size. A geometry at
 * the CHS maximum always means current_size.
 */
export function diskSectors(f: Footer): number {
  const chs = f.cylinders * f.heads * f.sectorsPerTrack;
  const usesCurrentSize = ['win ', 'qem2', 'd2v ', 'CTXS', 'tap\0'].includes(f.creatorApp);
  if (usesCurrentSize || chs === VHD_MAX_GEOMETRY) return Number(f.currentSize / BigInt(SECTOR));
  return chs;
}

export interface Geometry {
  cylinders: number;
  heads: number;
  sectorsPerTrack: number;
}

/**
 * CHS for a sector count: the algorithm of the VHD specification's appendix, with
 * QEMU's extension to 255 sectors per track above 127 GiB. Integer widths follow
 * QEMU's (u8 heads and sectors, u32 cylinders times heads, u16 cylinders).
 */
export function calculateGeometry(totalSectors: number): Geometry {
  const total = Math.min(totalSectors, VHD_MAX_GEOMETRY);
  let secs: number;
  let heads: number;
  let cth: number;
  if (total >= 65535 * 16 * 63) {
    secs = 255;
    heads = 16;
    cth = Math.floor(total / secs);
  } else {
    secs = 17;
    cth = Math.floor(total / secs);
    heads = Math.ceil(cth / 1024) & 0xff;
    if (heads < 4) heads = 4;
    if (cth >= heads * 1024 || heads > 16) {
      secs = 31;
      heads = 16;
      cth = Math.floor(total / secs);
    }
    if (cth >= heads * 1024) {
      secs = 63;
      heads = 16;
      cth = Math.floor(total / secs);
    }
  }
  return { cylinders: Math.floor(cth / heads) & 0xffff, heads, sectorsPerTrack: secs };
}

/**
 * QEMU's calculate_rounded_image_size: the smallest geometry that holds the
 * requested size, and the sector count it gives; undefined when too large.
 */
export function roundedImageSize(sizeBytes: number, forceSize: boolean): { geometry: Geometry; totalSectors: number } | undefined {
  let g: Geometry = { cylinders: 0, heads: 0, sectorsPerTrack: 0 };
  if (forceSize) {
    g = { cylinders: CHS_MAX_C, heads: CHS_MAX_H, sectorsPerTrack: CHS_MAX_S };
  } else {
    const want = Math.min(VHD_MAX_GEOMETRY, Math.floor(sizeBytes / SECTOR));
    for (let i = 0; want > g.cylinders * g.heads * g.sectorsPerTrack; i++) g = calculateGeometry(want + i);
  }
  const chs = g.cylinders * g.heads * g.sectorsPerTrack;
  if (chs === VHD_MAX_GEOMETRY) {
    const totalSectors = Math.floor(sizeBytes / SECTOR);
    if (totalSectors > VHD_MAX_SECTORS) return undefined;
    return { geometry: g, totalSectors };
  }
  return { geometry: g, totalSectors: chs };
}

/** A new footer as QEMU's vpc_co_create writes it. */
export function encodeFooter(o: { sizeBytes: number; geometry: Geometry; fixed: boolean; forceSize: boolean }): Buffer {
  const b = Buffer.alloc(FOOTER_SIZE);
  const v = dv(b);
  b.write('conectix', FOOTER.cookie, 'latin1');
  v.setUint32(FOOTER.features, 0x02, false);
  v.setUint32(FOOTER.version, 0x00010000, false);
  v.setBigUint64(FOOTER.dataOffset, o.fixed ? 0xffffffffffffffffn : BigInt(FOOTER_SIZE), false);
  v.setUint32(FOOTER.timestamp, (Math.floor(Date.now() / 1000) - VHD_TIMESTAMP_BASE) >>> 0, false);
  b.write(o.forceSize ? 'qem2' : 'qemu', FOOTER.creatorApp, 'latin1');
  // Virtual PC 2007's version, as QEMU writes.
  v.setUint16(FOOTER.creatorVersion, 5, false);
  v.setUint16(FOOTER.creatorVersion + 2, 3, false);
  b.write('Wi2k', FOOTER.creatorOs, 'latin1');
  v.setBigUint64(FOOTER.originalSize, BigInt(o.sizeBytes), false);
  v.setBigUint64(FOOTER.currentSize, BigInt(o.sizeBytes), false);
  v.setUint16(FOOTER.cylinders, o.geometry.cylinders, false);
  v.setUint8(FOOTER.heads, o.geometry.heads);
  v.setUint8(FOOTER.sectorsPerTrack, o.geometry.sectorsPerTrack);
  v.setUint32(FOOTER.diskType, o.fixed ? DISK_FIXED : DISK_DYNAMIC, false);
  crypto.randomFillSync(b, FOOTER.uniqueId, 16);
  v.setUint32(FOOTER.checksum, vpcChecksum(b, FOOTER.checksum), false);
  return b;
}

export interface DynHeader {
  tableOffset: bigint;
  maxTableEntries: number;
  blockSize: number;
}

export function parseDynHeader(b: Uint8Array): DynHeader | undefined {
  if (ascii(b, DYN.cookie, 8) !== 'cxsparse') return undefined;
  const v = dv(b);
  return {
    tableOffset: v.getBigUint64(DYN.tableOffset, false),
    maxTableEntries: v.getUint32(DYN.maxTableEntries, false),
    blockSize: v.getUint32(DYN.blockSize, false),
  };
}

export function encodeDynHeader(o: { tableOffset: number; maxTableEntries: number; blockSize: number }): Buffer {
  const b = Buffer.alloc(DYN_HEADER_SIZE);
  const v = dv(b);
  b.write('cxsparse', DYN.cookie, 'latin1');
  // The spec says 0xFFFFFFFF, but Microsoft's tools expect all 64 bits set (QEMU's note).
  v.setBigUint64(DYN.dataOffset, 0xffffffffffffffffn, false);
  v.setBigUint64(DYN.tableOffset, BigInt(o.tableOffset), false);
  v.setUint32(DYN.version, 0x00010000, false);
  v.setUint32(DYN.maxTableEntries, o.maxTableEntries, false);
  v.setUint32(DYN.blockSize, o.blockSize, false);
  v.setUint32(DYN.checksum, vpcChecksum(b, DYN.checksum), false);
  return b;
}
