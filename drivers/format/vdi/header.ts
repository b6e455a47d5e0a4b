// The VDI 1.1 header (VirtualBox's VDICore.h; QEMU's block/vdi.c, VdiHeader): a
// 64-byte text, then little-endian fields. VirtualBox writes a 400-byte header
// (cbHeader 0x190, with LCHS geometry), QEMU 0x180; both lay the fields out alike.
import { CorruptImageError, UnsupportedError } from '../../errors.js';

export const VDI_SIGNATURE = 0xbeda107f;
export const VDI_VERSION_1_1 = 0x00010001;
export const VDI_TEXT = '<<< QEMU VM Virtual Disk Image >>>\n';

/** Byte offsets of the header fields. */
export const HDR = {
  text: 0, // char[64]
  signature: 0x40, // u32
  version: 0x44, // u32
  headerSize: 0x48, // u32
  imageType: 0x4c, // u32
  imageFlags: 0x50, // u32
  description: 0x54, // char[256]
  offsetBmap: 0x154, // u32
  offsetData: 0x158, // u32
  cylinders: 0x15c, // u32
  heads: 0x160, // u32
  sectors: 0x164, // u32
  sectorSize: 0x168, // u32
  unused1: 0x16c, // u32
  diskSize: 0x170, // u64
  blockSize: 0x178, // u32
  blockExtra: 0x17c, // u32
  blocksInImage: 0x180, // u32
  blocksAllocated: 0x184, // u32
  uuidImage: 0x188, // 16 bytes
  uuidLastSnap: 0x198,
  uuidLink: 0x1a8,
  uuidParent: 0x1b8,
} as const;
export const HEADER_BYTES = 512;

export const IMAGE_TYPE = { dynamic: 1, static: 2 } as const;

/** Block map entries that are not block numbers. */
export const BMAP = { unallocated: 0xffffffff, discarded: 0xfffffffe } as const;

export const SECTOR = 512;
export const BLOCK_SIZE = 1024 * 1024;
/**
 * QEMU 7.2's VDI_BLOCKS_IN_IMAGE_MAX: a block map one request can read
 * (BDRV_REQUEST_MAX_BYTES / 4), so just under 2 GiB of map and 512 TiB of disk.
 */
export const MAX_BLOCKS = 0x1fffff80;
/** QEMU's VDI_DISK_SIZE_MAX. */
export const MAX_DISK_SIZE = MAX_BLOCKS * BLOCK_SIZE;

export interface VdiHeader {
  imageType: number;
  offsetBmap: number;
  offsetData: number;
  /** Rounded up to a sector, as QEMU does for VBoxManage's odd sizes. */
  diskSize: number;
  blockSize: number;
  blocksInImage: number;
  blocksAllocated: number;
}

function isNull(buf: Uint8Array, off: number): boolean {
  for (let i = 0; i < 16; i++) if (buf[off + i] !== 0) return false;
  return true;
}

export function parseHeader(buf: Uint8Array, fileSize: number, name: string): VdiHeader {
  const bad = (msg: string): never => {
    throw new CorruptImageError(`${name}: ${msg}`);
  };
  const unsupported = (msg: string): never => {
    throw new UnsupportedError(`${name}: unsupported VDI image (${msg})`);
  };
  if (buf.length < HEADER_BYTES) bad('file too short for a VDI header');
  const hex = (v: number | bigint): string => `0x${v.toString(16)}`;
  const dv = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  if (dv.getUint32(HDR.signature, true) !== VDI_SIGNATURE) bad('not a VDI image (bad signature)');
  const version = dv.getUint32(HDR.version, true);
  const size64 = dv.getBigUint64(HDR.diskSize, true);
  // vdi_open checks the size first, with this message.
  if (size64 > BigInt(MAX_DISK_SIZE)) {
    throw new UnsupportedError(`${name}: Unsupported VDI image size (size is ${hex(size64)}, max supported is ${hex(MAX_DISK_SIZE)})`);
  }
  if (version !== VDI_VERSION_1_1) unsupported(`version ${version >>> 16}.${version & 0xffff}`);
  const offsetBmap = dv.getUint32(HDR.offsetBmap, true);
  const offsetData = dv.getUint32(HDR.offsetData, true);
  if (offsetBmap % SECTOR !== 0) unsupported(`unaligned block map offset 0x${offsetBmap.toString(16)}`);
  if (offsetData % SECTOR !== 0) unsupported(`unaligned data offset 0x${offsetData.toString(16)}`);
  const sectorSize = dv.getUint32(HDR.sectorSize, true);
  if (sectorSize !== SECTOR) unsupported(`sector size ${sectorSize} is not ${SECTOR}`);
  const blockSize = dv.getUint32(HDR.blockSize, true);
  if (blockSize !== BLOCK_SIZE) unsupported(`block size ${blockSize} is not ${BLOCK_SIZE}`);
  const blocksInImage = dv.getUint32(HDR.blocksInImage, true);
  if (blocksInImage > MAX_BLOCKS) unsupported(`too many blocks ${blocksInImage}, max is ${MAX_BLOCKS}`);
  if (size64 > BigInt(blocksInImage) * BigInt(blockSize)) {
    unsupported(`disk size ${size64}, image bitmap has room for ${BigInt(blocksInImage) * BigInt(blockSize)}`);
  }
  if (!isNull(buf, HDR.uuidLink)) unsupported('non-NULL link UUID');
  if (!isNull(buf, HDR.uuidParent)) unsupported('non-NULL parent UUID');
  if (offsetBmap + blocksInImage * 4 > fileSize) bad(`VDI block map (0x${offsetBmap.toString(16)}, ${blocksInImage} entries) lies outside the file`);
  return {
    imageType: dv.getUint32(HDR.imageType, true),
    offsetBmap,
    offsetData,
    diskSize: Math.ceil(Number(size64) / SECTOR) * SECTOR,
    blockSize,
    blocksInImage,
    blocksAllocated: dv.getUint32(HDR.blocksAllocated, true),
  };
}
