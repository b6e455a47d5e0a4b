// Sparse extent headers: VMware 4 ("KDMV", VMDK spec 1.1 §"Hosted Sparse Extent
// Header"), VMware 3 ("COWD") and the streamOptimized footer, checked as QEMU 7.2's
// vmdk_open_vmdk4 / vmdk_open_vmfs_sparse / vmdk_add_extent check them.
import type { BlockNode } from '../../types.js';
import { CorruptImageError, UnsupportedError } from '../../errors.js';

export const VMDK4_MAGIC = 0x4b444d56; // "KDMV"
export const VMDK3_MAGIC = 0x434f5744; // "COWD"

export const FLAG_NL_DETECT = 1 << 0;
export const FLAG_RGD = 1 << 1;
export const FLAG_ZERO_GRAIN = 1 << 2;
export const FLAG_COMPRESS = 1 << 16;
export const FLAG_MARKER = 1 << 17;
export const COMPRESSION_DEFLATE = 1;

/** Byte offsets of the VMDK4 header fields, magic included (VMDK4Header is packed). */
export const H4 = {
  magic: 0,
  version: 4,
  flags: 8,
  capacity: 12,
  granularity: 20,
  descOffset: 28,
  descSize: 36,
  numGtesPerGt: 44,
  rgdOffset: 48,
  gdOffset: 56,
  grainOffset: 64,
  filler: 72,
  checkBytes: 73,
  compressAlgorithm: 77,
  end: 79,
} as const;

/** VMDK3Header: ten little-endian u32 after the magic. */
const H3 = { diskSectors: 12, granularity: 16, l1dirOffset: 20, l1dirSize: 24 } as const;

export const MARKER_EOS = 0;
export const MARKER_GT = 1;
export const MARKER_GD = 2;
export const MARKER_FOOTER = 3;

const GD_AT_END = 0xffffffffffffffffn;
/** QEMU's limits: a grain of 1 GiB is not realistic; an L1 of 32M entries is 8 TB with tiny grains. */
const MAX_GRAIN_SECTORS = 0x200000;
const MAX_L1_ENTRIES = 32 * 1024 * 1024;
const MAX_SECTORS = Math.floor(Number.MAX_SAFE_INTEGER / 512);

export interface SparseHeader {
  magic: 'KDMV' | 'COWD';
  version: number;
  flags: number;
  /** Virtual size of the extent, sectors. */
  sectors: number;
  grainSectors: number;
  /** Grain table entries per table. */
  gtEntries: number;
  /** Grain directory (L1) offset in bytes, and its backup (0: none). */
  gdOffset: number;
  rgdOffset: number;
  l1Size: number;
  /** Sectors; the file must be at least this long. */
  grainOffset: number;
  descOffset: number;
  compressed: boolean;
  /** The header came from a streamOptimized footer (grain directory at the end). */
  gdAtEnd: boolean;
}

export function dv(b: Uint8Array): DataView {
  return new DataView(b.buffer, b.byteOffset, b.byteLength);
}

/** What a VMDK4 header says before any check; capacity 0 with a descriptor means "see the descriptor". */
export function peekVmdk4(head: Uint8Array): { capacity: bigint; descOffset: bigint; gdOffset: bigint } {
  const v = dv(head);
  return { capacity: v.getBigUint64(H4.capacity, true), descOffset: v.getBigUint64(H4.descOffset, true), gdOffset: v.getBigUint64(H4.gdOffset, true) };
}

function sectorsToBytes(n: bigint, what: string, name: string): number {
  if (n > BigInt(MAX_SECTORS)) throw new CorruptImageError(`${name}: VMDK ${what} ${n} is out of range`);
  return Number(n) * 512;
}

/** The header sector of a VMDK4 extent: from offset 0, or from the footer when the grain directory is at the end. */
export async function readVmdk4Header(file: BlockNode, head: Uint8Array, name: string): Promise<SparseHeader> {
  let h = head.subarray(0, H4.end);
  let gdAtEnd = false;
  if (dv(h).getBigUint64(H4.gdOffset, true) === GD_AT_END) {
    // Footer marker, footer header, end-of-stream marker: the last three sectors.
    const end = Math.ceil(file.size / 512) * 512;
    if (end < 1536 + 512) throw new CorruptImageError(`${name}: streamOptimized VMDK is too short for its footer`);
    const footer = new Uint8Array(1536);
    await file.read(end - 1536, footer);
    const f = dv(footer);
    const ok =
      f.getUint32(512, false) === VMDK4_MAGIC &&
      f.getUint32(8, true) === 0 &&
      f.getUint32(12, true) === MARKER_FOOTER &&
      f.getBigUint64(1024, true) === 0n &&
      f.getUint32(1024 + 8, true) === 0 &&
      f.getUint32(1024 + 12, true) === MARKER_EOS;
    if (!ok) throw new CorruptImageError(`${name}: invalid streamOptimized VMDK footer`);
    h = footer.subarray(512, 512 + H4.end);
    gdAtEnd = true;
  }
  const v = dv(h);
  const version = v.getUint32(H4.version, true);
  const flags = v.getUint32(H4.flags, true);
  const compressed = v.getUint16(H4.compressAlgorithm, true) === COMPRESSION_DEFLATE;
  if (version > 3) throw new UnsupportedError(`${name}: unsupported VMDK version ${version}`);
  const gtEntries = v.getUint32(H4.numGtesPerGt, true);
  if (gtEntries > 512) throw new CorruptImageError(`${name}: VMDK grain table size too big (${gtEntries} entries)`);
  const granularity = v.getBigUint64(H4.granularity, true);
  if (granularity > BigInt(MAX_GRAIN_SECTORS)) throw new CorruptImageError(`${name}: invalid VMDK granularity ${granularity}, image may be corrupt`);
  const grainSectors = Number(granularity);
  const l1EntrySectors = gtEntries * grainSectors;
  if (l1EntrySectors === 0) throw new CorruptImageError(`${name}: VMDK grain directory entry size is invalid`);
  const sectors = sectorsToBytes(v.getBigUint64(H4.capacity, true), 'capacity', name) / 512;
  const l1Size = Math.ceil(sectors / l1EntrySectors);
  if (l1Size > MAX_L1_ENTRIES) throw new CorruptImageError(`${name}: VMDK grain directory too big`);
  const rgdOffset = flags & FLAG_RGD ? sectorsToBytes(v.getBigUint64(H4.rgdOffset, true), 'redundant grain directory offset', name) : 0;
  const grainOffset = sectorsToBytes(v.getBigUint64(H4.grainOffset, true), 'grain offset', name) / 512;
  if (Math.ceil(file.size / 512) < grainOffset) throw new CorruptImageError(`${name}: file truncated, expecting at least ${grainOffset * 512} bytes`);
  return {
    magic: 'KDMV',
    version,
    flags,
    sectors,
    grainSectors,
    gtEntries,
    gdOffset: sectorsToBytes(v.getBigUint64(H4.gdOffset, true), 'grain directory offset', name),
    rgdOffset,
    l1Size,
    grainOffset,
    descOffset: sectorsToBytes(v.getBigUint64(H4.descOffset, true), 'descriptor offset', name),
    compressed,
    gdAtEnd,
  };
}

export function parseVmdk3Header(head: Uint8Array, name: string): SparseHeader {
  if (head.length < 44) throw new CorruptImageError(`${name}: VMDK3 header truncated`);
  const v = dv(head);
  const grainSectors = v.getUint32(H3.granularity, true);
  if (grainSectors === 0 || grainSectors > MAX_GRAIN_SECTORS) throw new CorruptImageError(`${name}: invalid VMDK granularity ${grainSectors}, image may be corrupt`);
  const l1Size = v.getUint32(H3.l1dirSize, true);
  if (l1Size > MAX_L1_ENTRIES) throw new CorruptImageError(`${name}: VMDK grain directory too big`);
  return {
    magic: 'COWD',
    version: v.getUint32(4, true),
    flags: v.getUint32(8, true),
    sectors: v.getUint32(H3.diskSectors, true),
    grainSectors,
    gtEntries: 4096,
    gdOffset: v.getUint32(H3.l1dirOffset, true) * 512,
    rgdOffset: 0,
    l1Size,
    grainOffset: 0,
    descOffset: 0,
    compressed: false,
    gdAtEnd: false,
  };
}
