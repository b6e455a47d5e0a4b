// The qcow (version 1) header, big-endian, 48 bytes (QEMU's block/qcow.c, QCowHeader).
// Sizes and offsets are validated as qcow_open does, before anything is allocated.
import { CorruptImageError, UnsupportedError } from '../../errors.js';

export const QCOW_MAGIC = 0x514649fb; // "QFI\xfb"
export const QCOW_VERSION = 1;

/** Byte offsets of the header fields. */
export const HDR = {
  magic: 0, // u32
  version: 4, // u32
  backingFileOffset: 8, // u64
  backingFileSize: 16, // u32
  mtime: 20, // u32
  size: 24, // u64
  clusterBits: 32, // u8
  l2Bits: 33, // u8
  padding: 34, // u16
  cryptMethod: 36, // u32
  l1TableOffset: 40, // u64
} as const;
export const HEADER_BYTES = 48;

export const CRYPT = { none: 0, aes: 1 } as const;

/** L2 entry flag: the cluster is deflate-compressed (QCOW_OFLAG_COMPRESSED). */
export const COMPRESSED = 1n << 63n;

export const LIMITS = {
  minClusterBits: 9,
  maxClusterBits: 16,
  minL2Bits: 6,
  maxL2Bits: 13,
  maxBackingNameLength: 1023,
  /** Bytes of L1 table read into memory at open. */
  maxL1Bytes: 256 * 1024 * 1024,
} as const;

export interface QcowHeader {
  backingFileOffset: number;
  backingFileSize: number;
  mtime: number;
  size: number;
  clusterBits: number;
  l2Bits: number;
  cryptMethod: number;
  l1TableOffset: number;
  l1Size: number;
}

export function parseHeader(buf: Uint8Array, fileSize: number, name: string): QcowHeader {
  const bad = (msg: string): never => {
    throw new CorruptImageError(`${name}: ${msg}`);
  };
  if (buf.length < HEADER_BYTES) bad('file too short for a qcow header');
  const dv = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  if (dv.getUint32(HDR.magic, false) !== QCOW_MAGIC) bad('not a qcow image (bad magic)');
  const version = dv.getUint32(HDR.version, false);
  if (version !== QCOW_VERSION) throw new UnsupportedError(`${name}: qcow version ${version} is not supported`);
  const size64 = dv.getBigUint64(HDR.size, false);
  if (size64 <= 1n) bad('qcow image size is too small (must be at least 2 bytes)');
  if (size64 > BigInt(Number.MAX_SAFE_INTEGER)) bad(`qcow image size ${size64} is out of range`);
  const size = Number(size64);
  const clusterBits = dv.getUint8(HDR.clusterBits);
  if (clusterBits < LIMITS.minClusterBits || clusterBits > LIMITS.maxClusterBits) bad('qcow cluster size must be between 512 and 64k');
  const l2Bits = dv.getUint8(HDR.l2Bits);
  // The L2 table must be 512 bytes to 64 KiB (qcow_open).
  if (l2Bits < LIMITS.minL2Bits || l2Bits > LIMITS.maxL2Bits) bad('qcow L2 table size must be between 512 and 64k');
  const cryptMethod = dv.getUint32(HDR.cryptMethod, false);
  if (cryptMethod > CRYPT.aes) bad(`qcow encryption method ${cryptMethod} is invalid`);
  const shift = clusterBits + l2Bits;
  const l1Size = Math.ceil(size / 2 ** shift);
  if (l1Size * 8 > LIMITS.maxL1Bytes) bad(`qcow image of ${size} bytes needs an L1 table larger than ${LIMITS.maxL1Bytes} bytes`);
  const l1 = dv.getBigUint64(HDR.l1TableOffset, false);
  if (l1 > BigInt(Number.MAX_SAFE_INTEGER)) bad('qcow L1 table offset is out of range');
  const l1TableOffset = Number(l1);
  if (l1TableOffset + l1Size * 8 > fileSize) bad(`qcow L1 table (0x${l1TableOffset.toString(16)}, ${l1Size} entries) lies outside the file`);
  const bfo = dv.getBigUint64(HDR.backingFileOffset, false);
  const backingFileSize = dv.getUint32(HDR.backingFileSize, false);
  let backingFileOffset = 0;
  if (bfo !== 0n) {
    if (backingFileSize > LIMITS.maxBackingNameLength) bad('qcow backing file name too long');
    if (bfo + BigInt(backingFileSize) > BigInt(fileSize)) bad('qcow backing file name lies outside the file');
    backingFileOffset = Number(bfo);
  }
  return {
    backingFileOffset,
    backingFileSize,
    mtime: dv.getUint32(HDR.mtime, false),
    size,
    clusterBits,
    l2Bits,
    cryptMethod,
    l1TableOffset,
    l1Size,
  };
}

export function encodeHeader(h: QcowHeader): Buffer {
  const b = Buffer.alloc(HEADER_BYTES);
  b.writeUInt32BE(QCOW_MAGIC, HDR.magic);
  b.writeUInt32BE(QCOW_VERSION, HDR.version);
  b.writeBigUInt64BE(BigInt(h.backingFileOffset), HDR.backingFileOffset);
  b.writeUInt32BE(h.backingFileSize, HDR.backingFileSize);
  b.writeUInt32BE(h.mtime, HDR.mtime);
  b.writeBigUInt64BE(BigInt(h.size), HDR.size);
  b.writeUInt8(h.clusterBits, HDR.clusterBits);
  b.writeUInt8(h.l2Bits, HDR.l2Bits);
  b.writeUInt32BE(h.cryptMethod, HDR.cryptMethod);
  b.writeBigUInt64BE(BigInt(h.l1TableOffset), HDR.l1TableOffset);
  return b;
}
