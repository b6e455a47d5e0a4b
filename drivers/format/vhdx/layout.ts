// VHDX on-disk structures (VHDX Format Specification v1.0, and QEMU's block/vhdx.h).
// Everything is little-endian; GUIDs are Microsoft GUIDs (first three fields LE).
import crypto from 'node:crypto';
import { crc32cExcluding } from '../../util/crc32c.js';

export const KiB = 1024;
export const MiB = 1024 * KiB;
export const GiB = 1024 * MiB;
export const TiB = 1024 * GiB;

/** Section 2.1: the header section is the first 1 MiB, in 64 KiB structures. */
export const HEADER_BLOCK = 64 * KiB;
export const HEADER1_OFFSET = 64 * KiB;
export const HEADER2_OFFSET = 128 * KiB;
export const REGION1_OFFSET = 192 * KiB;
export const REGION2_OFFSET = 256 * KiB;
export const HEADER_SECTION_END = MiB;
/** The header checksum covers the first 4 KiB of its 64 KiB block. */
export const HEADER_SIZE = 4 * KiB;

export const BLOCK_SIZE_MIN = MiB;
export const BLOCK_SIZE_MAX = 256 * MiB;
export const MAX_IMAGE_SIZE = 64 * TiB;
export const DEFAULT_LOG_SIZE = MiB;
export const LOG_SECTOR = 4 * KiB;
/** Section 2.6.1: 2^23 sectors per chunk of payload blocks sharing one bitmap block. */
export const MAX_SECTORS_PER_BLOCK = 1 << 23;

/** Section 2.5.1.1: payload block states (the low 3 bits of a BAT entry). */
export const PAYLOAD = {
  notPresent: 0,
  undefined: 1,
  zero: 2,
  unmapped: 3,
  /** The value of "unmapped" in the v0.95 draft, still read by QEMU. */
  unmappedV095: 5,
  fullyPresent: 6,
  partiallyPresent: 7,
} as const;
/** Section 2.5.1.2: a sector bitmap block that is in the file. */
export const SB_BLOCK_PRESENT = 6;
/** Section 2.4: every sector bitmap block is 1 MiB. */
export const SECTOR_BITMAP_BLOCK = 1 << 20;
/** The file offset of a BAT entry, in MiB units in its upper 44 bits. */
export const BAT_OFFSET_MASK = 0xfffffffffff00000n;

/** A Microsoft GUID in its on-disk byte order, from its text form. */
export function guid(text: string): Buffer {
  const h = text.replace(/-/g, '');
  const b = Buffer.from(h, 'hex');
  b.subarray(0, 4).reverse();
  b.subarray(4, 6).reverse();
  b.subarray(6, 8).reverse();
  return b;
}

export const GUIDS = {
  bat: guid('2DC27766-F623-4200-9D64-115E9BFD4A08'),
  metadata: guid('8B7CA206-4790-4B9A-B8FE-575F050F886E'),
  fileParameters: guid('CAA16737-FA36-4D43-B3B6-33F0AA44E76B'),
  virtualDiskSize: guid('2FA54224-CD1B-4876-B211-5DBED83BF4B8'),
  page83: guid('BECA12AB-B2E6-4523-93EF-C309E000C746'),
  logicalSectorSize: guid('8141BF1D-A96F-4709-BA47-F233A8FAAB5F'),
  physicalSectorSize: guid('CDA348C7-445D-4471-9CC9-E9885251C556'),
  parentLocator: guid('A8D35F2D-B30B-454D-ABF7-D3D84834AB0C'),
  /** Section 2.6.2.6.3: the locator type of a VHDX parent. */
  vhdxParentType: guid('B04AEFB7-D19E-4A81-B789-25B8E9445913'),
} as const;

/** A GUID's text form (lowercase, no braces) from its on-disk bytes; the inverse of guid(). */
export function guidText(b: Uint8Array): string {
  const h = Buffer.from(b.subarray(0, 16));
  h.subarray(0, 4).reverse();
  h.subarray(4, 6).reverse();
  h.subarray(6, 8).reverse();
  const x = h.toString('hex');
  return `${x.slice(0, 8)}-${x.slice(8, 12)}-${x.slice(12, 16)}-${x.slice(16, 20)}-${x.slice(20)}`;
}

export function dv(b: Uint8Array): DataView {
  return new DataView(b.buffer, b.byteOffset, b.byteLength);
}

export function ascii(b: Uint8Array, off: number, len: number): string {
  return String.fromCharCode(...b.subarray(off, off + len));
}

export function isZero(b: Uint8Array): boolean {
  for (let i = 0; i < b.length; i++) if (b[i] !== 0) return false;
  return true;
}

export function newGuid(): Buffer {
  return crypto.randomBytes(16);
}

/** Set the CRC-32C at `crcAt` over the whole buffer. */
export function sealChecksum(b: Uint8Array, crcAt: number): void {
  dv(b).setUint32(crcAt, crc32cExcluding(b, crcAt), true);
}

export function checksumValid(b: Uint8Array, crcAt: number): boolean {
  return dv(b).getUint32(crcAt, true) === crc32cExcluding(b, crcAt);
}

/** Section 2.2.2: the header (80 bytes used of 4 KiB). */
export const HDR = {
  signature: 0, // "head"
  checksum: 4,
  sequenceNumber: 8, // u64
  fileWriteGuid: 16,
  dataWriteGuid: 32,
  logGuid: 48,
  logVersion: 64, // u16
  version: 66, // u16
  logLength: 68, // u32
  logOffset: 72, // u64
  size: 80,
} as const;

export interface Header {
  sequenceNumber: bigint;
  fileWriteGuid: Buffer;
  dataWriteGuid: Buffer;
  logGuid: Buffer;
  logVersion: number;
  version: number;
  logLength: number;
  logOffset: bigint;
  /** The 80 defined bytes as on disk (QEMU compares headers of equal sequence by these). */
  raw: Buffer;
}

/** A header if its checksum, signature and version are right (QEMU's vhdx_parse_header). */
export function parseHeader(block: Uint8Array): Header | undefined {
  if (!checksumValid(block, HDR.checksum)) return undefined;
  if (ascii(block, HDR.signature, 4) !== 'head') return undefined;
  const v = dv(block);
  if (v.getUint16(HDR.version, true) !== 1) return undefined;
  const raw = Buffer.from(block.subarray(0, HDR.size));
  return {
    sequenceNumber: v.getBigUint64(HDR.sequenceNumber, true),
    fileWriteGuid: raw.subarray(HDR.fileWriteGuid, HDR.fileWriteGuid + 16),
    dataWriteGuid: raw.subarray(HDR.dataWriteGuid, HDR.dataWriteGuid + 16),
    logGuid: raw.subarray(HDR.logGuid, HDR.logGuid + 16),
    logVersion: v.getUint16(HDR.logVersion, true),
    version: 1,
    logLength: v.getUint32(HDR.logLength, true),
    logOffset: v.getBigUint64(HDR.logOffset, true),
    raw,
  };
}

/** The 80 header bytes, checksummed over 4 KiB whose rest is `rest` (or zeros). */
export function encodeHeader(h: Omit<Header, 'raw'>, rest?: Uint8Array): Buffer {
  const b = Buffer.alloc(HEADER_SIZE);
  if (rest) b.set(rest.subarray(0, HEADER_SIZE));
  b.fill(0, 0, HDR.size);
  const v = dv(b);
  b.write('head', HDR.signature, 'latin1');
  v.setBigUint64(HDR.sequenceNumber, h.sequenceNumber, true);
  b.set(h.fileWriteGuid, HDR.fileWriteGuid);
  b.set(h.dataWriteGuid, HDR.dataWriteGuid);
  b.set(h.logGuid, HDR.logGuid);
  v.setUint16(HDR.logVersion, h.logVersion, true);
  v.setUint16(HDR.version, h.version, true);
  v.setUint32(HDR.logLength, h.logLength, true);
  v.setBigUint64(HDR.logOffset, h.logOffset, true);
  sealChecksum(b, HDR.checksum);
  return b;
}

/** Section 2.2.3: region table header (16 bytes) and 32-byte entries. */
export const REGION = {
  signature: 0, // "regi"
  checksum: 4,
  entryCount: 8,
  entries: 16,
  entrySize: 32,
  maxEntries: 2047,
  requiredBit: 1,
} as const;

export interface RegionEntry {
  guid: Buffer;
  fileOffset: bigint;
  length: number;
  required: boolean;
}

/** Section 2.6.1: metadata table header (32 bytes) and 32-byte entries. */
export const META = {
  signature: 0, // "metadata"
  entryCount: 10, // u16
  entries: 32,
  entrySize: 32,
  maxEntries: 2047,
  isUser: 1,
  isVirtualDisk: 2,
  isRequired: 4,
} as const;

export const FILE_PARAMS = {
  leaveBlocksAllocated: 1,
  hasParent: 2,
} as const;

/** Section 2.3.1: log entry header (64 bytes), descriptors (32 bytes), data sectors (4 KiB). */
export const LOGE = {
  signature: 0, // "loge"
  checksum: 4,
  entryLength: 8,
  tail: 12,
  sequenceNumber: 16, // u64
  descriptorCount: 24,
  reserved: 28,
  logGuid: 32,
  flushedFileOffset: 48, // u64
  lastFileOffset: 56, // u64
  size: 64,
} as const;

export const DESC = {
  signature: 0, // "desc" or "zero"
  trailingBytes: 4, // data: bytes 4092..4096 of the sector
  leadingBytes: 8, // data: bytes 0..8; zero: length to zero (u64)
  fileOffset: 16, // u64
  sequenceNumber: 24, // u64
  size: 32,
} as const;

export const DATA_SECTOR = {
  signature: 0, // "data"
  sequenceHigh: 4,
  data: 8, // 4084 bytes: bytes 8..4092 of the sector
  sequenceLow: 4092,
} as const;

/** Sectors holding the entry header and `count` descriptors (QEMU's vhdx_compute_desc_sectors). */
export function descSectors(count: number): number {
  return Math.ceil((count + 2) / 128);
}
