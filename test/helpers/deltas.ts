// Generators for the snapshot deltas no tool here can make (issue 14, "Beyond QEMU's
// readers"): ESXi seSparse extents, laid out as QEMU 7.2's block/vmdk.c reads them,
// and Hyper-V differencing VHDX files (.avhdx), made from a qemu-img vhdx by adding
// the parent locator of the VHDX specification (section 2.6.2.6) and the payload and
// sector bitmap blocks of a differencing file (sections 2.4, 2.5).
import fs from 'node:fs';
import path from 'node:path';
import { createImage } from './qemu.js';
import { pattern, readBytes } from './images.js';

const KiB = 1024;
const MiB = 1024 * KiB;

// ---------------------------------------------------------------- seSparse

/** What a grain of the delta holds. */
export type SeGrain = { kind: 'data'; seed: number } | { kind: 'zero' } | { kind: 'unmapped' } | { kind: 'raw'; entry: bigint };

export interface SeSparseSpec {
  /** Virtual size in bytes (a multiple of 4 KiB). */
  size: number;
  /** Grain index (4 KiB units) -> content; the rest are unallocated (read from the parent). */
  grains: Map<number, SeGrain>;
  /** Grain tables to leave out of the directory (their 16 MiB read from the parent). */
  absentTables?: number[];
  /** Edit the bytes before they are written (corruption tests). */
  mutate?: (file: Buffer, layout: SeSparseLayout) => void;
}

export interface SeSparseLayout {
  gdSector: number;
  gtSector: number;
  grainsSector: number;
  /** Grain table slot of each directory entry that has one. */
  tableSlot: Map<number, number>;
}

const SE_GRAIN = 4 * KiB;
const SE_GT_ENTRIES = 4096;
const SE_GT_BYTES = SE_GT_ENTRIES * 8;

/** A grain table entry for grain number n (QEMU's decoding, inverted). */
export function seAllocatedEntry(n: bigint): bigint {
  return (3n << 60n) | ((n & 0xfffn) << 48n) | (n >> 12n);
}

/**
 * An seSparse extent file: const header, volatile header, grain directory, the grain
 * tables (in a different order from the directory), and grains numbered sparsely
 * (above 4096, so both parts of the grain number are used). Returns the data of each
 * allocated grain by grain index.
 */
export function writeSeSparse(file: string, spec: SeSparseSpec): Map<number, Buffer> {
  const capacity = spec.size / 512;
  const tables = Math.ceil(spec.size / (SE_GT_ENTRIES * SE_GRAIN));
  const gdSectors = Math.max(1, Math.ceil((tables * 8) / 512));
  const gdSector = 2048;
  const gtSector = gdSector + gdSectors + 7;
  const used = [...new Set([...spec.grains.keys()].map((g) => Math.floor(g / SE_GT_ENTRIES)))].filter((t) => !(spec.absentTables ?? []).includes(t));
  // Slots in reverse order of the directory: the directory entry, not the order, finds a table.
  const tableSlot = new Map(used.sort((a, b) => b - a).map((t, i) => [t, i]));
  const grainsSector = gtSector + Math.max(1, tableSlot.size) * 64 + 64;
  const layout: SeSparseLayout = { gdSector, gtSector, grainsSector, tableSlot };

  const data = new Map<number, Buffer>();
  const entries = new Map<number, bigint>();
  let n = 5000n;
  const grainAt = new Map<bigint, Buffer>();
  for (const [g, c] of [...spec.grains.entries()].sort((a, b) => a[0] - b[0])) {
    if (c.kind === 'data') {
      const bytes = pattern(SE_GRAIN, c.seed);
      data.set(g, bytes);
      entries.set(g, seAllocatedEntry(n));
      grainAt.set(n, bytes);
      n += 3n;
    } else if (c.kind === 'zero') {
      entries.set(g, 2n << 60n);
    } else if (c.kind === 'unmapped') {
      entries.set(g, 1n << 60n);
    } else {
      entries.set(g, c.entry);
    }
  }
  const end = (grainsSector + Number(n) * 8) * 512;
  const buf = Buffer.alloc(grainsSector * 512);
  const h = buf.subarray(0, 512);
  const put = (at: number, v: bigint | number): void => void h.writeBigUInt64LE(BigInt(v), at);
  put(0, 0xcafebaben);
  put(8, 0x0000000200000001n);
  put(16, capacity);
  put(24, 8);
  put(32, 64);
  put(80, 1); // volatile header
  put(88, 1);
  put(96, 2); // journal header
  put(104, 2);
  put(112, 4); // journal
  put(120, 1024);
  put(128, gdSector);
  put(136, gdSectors);
  put(144, gtSector);
  put(152, tables * 64);
  put(160, gdSector - 8); // free bitmap (not read)
  put(168, 4);
  put(176, gdSector - 4); // backmap (not read)
  put(184, 4);
  put(192, grainsSector);
  put(200, Number(n) * 8);
  buf.writeBigUInt64LE(0xcafecafen, 512);
  buf.writeBigUInt64LE(1n, 512 + 8);
  buf.writeBigUInt64LE(1n, 512 + 16);
  for (const [t, slot] of tableSlot) {
    buf.writeBigUInt64LE((0x10000000n << 32n) | BigInt(slot), gdSector * 512 + t * 8);
  }
  for (const [g, e] of entries) {
    const slot = tableSlot.get(Math.floor(g / SE_GT_ENTRIES));
    if (slot === undefined) continue;
    buf.writeBigUInt64LE(e, gtSector * 512 + slot * SE_GT_BYTES + (g % SE_GT_ENTRIES) * 8);
  }
  spec.mutate?.(buf, layout);
  fs.writeFileSync(file, buf);
  // Grains far apart: the file is sparse.
  const fd = fs.openSync(file, 'r+');
  try {
    for (const [k, bytes] of grainAt) fs.writeSync(fd, bytes, 0, bytes.length, (grainsSector + Number(k) * 8) * 512);
    fs.ftruncateSync(fd, Math.max(end, buf.length));
  } finally {
    fs.closeSync(fd);
  }
  return data;
}

/** The CID in a vmdk's descriptor (a descriptor file, or the one inside a sparse file). */
export function vmdkCid(file: string): string {
  const text = readBytes(file, 0, Math.min(fs.statSync(file).size, 64 * KiB)).toString('latin1');
  const m = /\nCID=([0-9a-fA-F]+)/.exec(text);
  if (!m) throw new Error(`${file}: no CID`);
  return m[1]!;
}

/** The text descriptor of an seSparse delta over `parent` (a vmdk beside it). */
export function seSparseDescriptor(o: { size: number; extent: string; parent?: string; parentCid?: string }): string {
  return [
    '# Disk DescriptorFile',
    'version=1',
    'encoding="UTF-8"',
    'CID=6a1c2e3f',
    `parentCID=${o.parentCid ?? 'ffffffff'}`,
    'createType="seSparse"',
    ...(o.parent !== undefined ? [`parentFileNameHint="${o.parent}"`] : []),
    '',
    '# Extent description',
    `RW ${o.size / 512} SESPARSE "${o.extent}"`,
    '',
    '# The Disk Data Base',
    '#DDB',
    '',
    'ddb.adapterType = "lsilogic"',
    'ddb.grain = "8"',
    'ddb.longContentID = "00000000000000000000000000000000"',
    'ddb.virtualHWVersion = "14"',
    '',
  ].join('\n');
}

/**
 * A parent vmdk (qemu-img, filled by `fill`), and a seSparse delta over it in the
 * same folder: `child.vmdk` naming `child-sesparse.vmdk`. Returns the paths.
 */
export async function makeSeSparseChain(
  dir: string,
  o: { size: number; subformat?: string; grains: Map<number, SeGrain>; absentTables?: number[]; mutate?: SeSparseSpec['mutate']; fillParent: (parent: string) => Promise<void> },
): Promise<{ parent: string; child: string; extent: string }> {
  const parent = path.join(dir, 'parent.vmdk');
  await createImage(parent, 'vmdk', o.size, o.subformat ? { subformat: o.subformat } : {});
  await o.fillParent(parent);
  const extent = path.join(dir, 'child-sesparse.vmdk');
  writeSeSparse(extent, { size: o.size, grains: o.grains, absentTables: o.absentTables, mutate: o.mutate });
  const child = path.join(dir, 'child.vmdk');
  fs.writeFileSync(child, seSparseDescriptor({ size: o.size, extent: 'child-sesparse.vmdk', parent: 'parent.vmdk', parentCid: vmdkCid(parent) }));
  return { parent, child, extent };
}

