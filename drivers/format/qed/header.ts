// The QED header (docs/interop/qed_spec.txt, "Header"): little-endian, 64 bytes at
// offset 0. Every size and offset is validated here as QEMU's bdrv_qed_do_open does.
import { CorruptImageError, UnsupportedError } from '../../errors.js';

export const QED_MAGIC = 0x00444551; // "QED\0" little-endian

/** Byte offsets of the header fields (qed_spec.txt, "Header"). */
export const HDR = {
  magic: 0, // u32
  clusterSize: 4, // u32
  tableSize: 8, // u32, in clusters
  headerSize: 12, // u32, in clusters
  features: 16, // u64
  compatFeatures: 24, // u64
  autoclearFeatures: 32, // u64
  l1TableOffset: 40, // u64
  imageSize: 48, // u64
  backingFilenameOffset: 56, // u32
  backingFilenameSize: 60, // u32
} as const;
export const HEADER_BYTES = 64;

/** Feature bits (qed_spec.txt, "Feature bits"). */
export const FEATURE = {
  backingFile: 1n,
  needCheck: 2n,
  backingFormatNoProbe: 4n,
} as const;
const KNOWN_FEATURES = FEATURE.backingFile | FEATURE.needCheck | FEATURE.backingFormatNoProbe;

/** QEMU's limits (block/qed.h). */
export const LIMITS = {
  minClusterSize: 4 * 1024,
  maxClusterSize: 64 * 1024 * 1024,
  minTableSize: 1,
  maxTableSize: 16,
  defaultClusterSize: 64 * 1024,
  defaultTableSize: 4,
  maxBackingNameLength: 1023,
} as const;

/** L2 entry values below a cluster size with a meaning of their own. */
export const ENTRY = { unallocated: 0, zero: 1 } as const;

export interface QedHeader {
  clusterSize: number;
  tableSize: number;
  headerSize: number;
  features: bigint;
  compatFeatures: bigint;
  autoclearFeatures: bigint;
  l1TableOffset: number;
  imageSize: number;
  backingFilenameOffset: number;
  backingFilenameSize: number;
}

const isPow2 = (n: number): boolean => n > 0 && (n & (n - 1)) === 0;

export function validClusterSize(n: number): boolean {
  return isPow2(n) && n >= LIMITS.minClusterSize && n <= LIMITS.maxClusterSize;
}

export function validTableSize(n: number): boolean {
  return isPow2(n) && n >= LIMITS.minTableSize && n <= LIMITS.maxTableSize;
}

/** Entries per table times entries per table times cluster size (qed_max_image_size). */
export function maxImageSize(clusterSize: number, tableSize: number): number {
  const entries = (clusterSize * tableSize) / 8;
  return entries * entries * clusterSize;
}

function u64(dv: DataView, off: number, what: string, name: string): number {
  const v = dv.getBigUint64(off, true);
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw new CorruptImageError(`${name}: qed ${what} ${v} is out of range`);
  return Number(v);
}

/** Parse and validate the header; `fileSize` bounds the L1 table. */
export function parseHeader(buf: Uint8Array, fileSize: number, name: string): QedHeader {
  if (buf.length < HEADER_BYTES) throw new CorruptImageError(`${name}: file too short for a qed header`);
  const dv = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  const bad = (msg: string): never => {
    throw new CorruptImageError(`${name}: ${msg}`);
  };
  if (dv.getUint32(HDR.magic, true) !== QED_MAGIC) bad('not a qed image (bad magic)');
  const features = dv.getBigUint64(HDR.features, true);
  if (features & ~KNOWN_FEATURES) {
    throw new UnsupportedError(`${name}: unsupported qed features 0x${(features & ~KNOWN_FEATURES).toString(16)}`);
  }
  const clusterSize = dv.getUint32(HDR.clusterSize, true);
  if (!validClusterSize(clusterSize)) bad(`qed cluster size ${clusterSize} is not a power of two from 4 KiB to 64 MiB`);
  const tableSize = dv.getUint32(HDR.tableSize, true);
  if (!validTableSize(tableSize)) bad(`qed table size ${tableSize} is not a power of two from 1 to 16`);
  const imageSize = u64(dv, HDR.imageSize, 'image size', name);
  if (imageSize % 512 !== 0 || imageSize > maxImageSize(clusterSize, tableSize)) bad(`qed image size ${imageSize} is invalid for this cluster and table size`);
  const headerSize = dv.getUint32(HDR.headerSize, true);
  if (headerSize === 0 || headerSize * clusterSize > 0xffffffff) bad(`qed header size ${headerSize} clusters is invalid`);
  const l1TableOffset = u64(dv, HDR.l1TableOffset, 'L1 table offset', name);
  const tableBytes = clusterSize * tableSize;
  if (!validTableOffset(l1TableOffset, clusterSize, headerSize, tableBytes, fileSize)) {
    bad(`qed L1 table offset 0x${l1TableOffset.toString(16)} is invalid or outside the file`);
  }
  const backingFilenameOffset = dv.getUint32(HDR.backingFilenameOffset, true);
  const backingFilenameSize = dv.getUint32(HDR.backingFilenameSize, true);
  if (features & FEATURE.backingFile) {
    if (backingFilenameOffset + backingFilenameSize > clusterSize * headerSize) bad('qed backing file name lies outside the header');
    if (backingFilenameSize > LIMITS.maxBackingNameLength) bad(`qed backing file name is ${backingFilenameSize} bytes long`);
  }
  return {
    clusterSize,
    tableSize,
    headerSize,
    features,
    compatFeatures: dv.getBigUint64(HDR.compatFeatures, true),
    autoclearFeatures: dv.getBigUint64(HDR.autoclearFeatures, true),
    l1TableOffset,
    imageSize,
    backingFilenameOffset,
    backingFilenameSize,
  };
}

/** qed_check_table_offset: aligned, past the header, and the whole table inside the file. */
export function validTableOffset(offset: number, clusterSize: number, headerSize: number, tableBytes: number, fileSize: number): boolean {
  if (offset % clusterSize !== 0 || offset < headerSize * clusterSize) return false;
  const fileClusters = Math.floor(fileSize / clusterSize) * clusterSize;
  return offset + tableBytes <= fileClusters;
}

/** The header as bytes (64), for create and for feature updates. */
export function encodeHeader(h: QedHeader): Buffer {
  const b = Buffer.alloc(HEADER_BYTES);
  b.writeUInt32LE(QED_MAGIC, HDR.magic);
  b.writeUInt32LE(h.clusterSize, HDR.clusterSize);
  b.writeUInt32LE(h.tableSize, HDR.tableSize);
  b.writeUInt32LE(h.headerSize, HDR.headerSize);
  b.writeBigUInt64LE(h.features, HDR.features);
  b.writeBigUInt64LE(h.compatFeatures, HDR.compatFeatures);
  b.writeBigUInt64LE(h.autoclearFeatures, HDR.autoclearFeatures);
  b.writeBigUInt64LE(BigInt(h.l1TableOffset), HDR.l1TableOffset);
  b.writeBigUInt64LE(BigInt(h.imageSize), HDR.imageSize);
  b.writeUInt32LE(h.backingFilenameOffset, HDR.backingFilenameOffset);
  b.writeUInt32LE(h.backingFilenameSize, HDR.backingFilenameSize);
  return b;
}

/** The features field alone (header bytes 16-23). */
export function encodeFeatures(features: bigint): Buffer {
  const b = Buffer.alloc(8);
  b.writeBigUInt64LE(features);
  return b;
}
