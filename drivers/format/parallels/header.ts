// The Parallels disk header (docs/interop/parallels.txt; QEMU's block/parallels.c),
// little-endian, 64 bytes, followed by the BAT (one u32 per cluster). Two versions:
// "WithoutFreeSpace" (BAT entries in sectors, 32-bit sector count) and
// "WithouFreSpacExt" (BAT entries in clusters, 64-bit sector count).
import { CorruptImageError, UnsupportedError } from '../../errors.js';

export const MAGIC_V1 = 'WithoutFreeSpace';
export const MAGIC_V2 = 'WithouFreSpacExt';
export const HEADER_VERSION = 2;
export const INUSE_MAGIC = 0x746f6e59;

/** Byte offsets of the header fields. */
export const HDR = {
  magic: 0, // char[16]
  version: 16, // u32
  heads: 20, // u32
  cylinders: 24, // u32
  tracks: 28, // u32: sectors per cluster
  batEntries: 32, // u32
  nbSectors: 36, // u64
  inuse: 44, // u32
  dataOff: 48, // u32, sectors
  flags: 52, // u32
  extOff: 56, // u64
} as const;
export const HEADER_BYTES = 64;
export const SECTOR = 512;
export const DEFAULT_CLUSTER_SIZE = 1024 * 1024;
/** parallels_co_create: a disk of at most 2^32 clusters. */
export const MAX_IMAGE_FACTOR = 2 ** 32;

export interface ParallelsHeader {
  ext: boolean;
  tracks: number;
  batEntries: number;
  /** Guest size in sectors. */
  sectors: number;
  inuse: number;
  dataOff: number;
}

export function magicOf(buf: Uint8Array): string {
  return Buffer.from(buf.buffer, buf.byteOffset, Math.min(16, buf.length)).toString('latin1');
}

export function parseHeader(buf: Uint8Array, fileSize: number, name: string): ParallelsHeader {
  const bad = (msg: string): never => {
    throw new CorruptImageError(`${name}: ${msg}`);
  };
  if (buf.length < HEADER_BYTES) bad('file too short for a parallels header');
  const dv = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  const magic = magicOf(buf);
  if (magic !== MAGIC_V1 && magic !== MAGIC_V2) bad('not a parallels image (bad magic)');
  const version = dv.getUint32(HDR.version, true);
  if (version !== HEADER_VERSION) throw new UnsupportedError(`${name}: parallels header version ${version} is not supported`);
  const ext = magic === MAGIC_V2;
  const tracks = dv.getUint32(HDR.tracks, true);
  if (tracks === 0) bad('invalid parallels image: zero sectors per track');
  if (tracks > Math.floor(0x7fffffff / 513)) bad('invalid parallels image: too big cluster');
  const batEntries = dv.getUint32(HDR.batEntries, true);
  if (batEntries > Math.floor(0x7fffffff / 4)) bad(`parallels catalog too large (${batEntries} entries, at most ${Math.floor(0x7fffffff / 4)})`);
  // As QEMU: the BAT must lie in the file, so a header cannot claim more table than the file holds.
  const batEnd = HEADER_BYTES + batEntries * 4;
  if (batEnd > fileSize) bad(`parallels BAT of ${batEntries} entries (${batEnd} bytes with the header) does not fit in the file (${fileSize} bytes)`);
  let sectors64 = dv.getBigUint64(HDR.nbSectors, true);
  if (!ext) sectors64 &= 0xffffffffn;
  if (sectors64 * 512n > BigInt(Number.MAX_SAFE_INTEGER)) bad(`parallels disk of ${sectors64} sectors is too large`);
  return {
    ext,
    tracks,
    batEntries,
    sectors: Number(sectors64),
    inuse: dv.getUint32(HDR.inuse, true),
    dataOff: dv.getUint32(HDR.dataOff, true),
  };
}
