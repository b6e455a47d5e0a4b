// Generators for the snapshot deltas no tool here can make (issue 14, "Beyond QEMU's
// readers"): ESXi seSparse extents, laid out as QEMU 7.2's block/vmdk.c reads them,
// and Hyper-V differencing VHDX files (.avhdx), made from a qemu-img vhdx by adding
// the parent locator of the VHDX specification (section 2.6.2.6) and the payload and
// sector bitmap blocks of a differencing file (sections 2.4, 2.5).
import fs from 'node:fs';
import path from 'node:path';
import { expect } from 'chai';
import { createImage } from './qemu.js';
import { tsmount, type MountTracker } from './mount.js';
import { pattern, readBytes } from './images.js';
import { guid, guidText } from '../../drivers/format/vhdx/layout.js';

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


// ---------------------------------------------------------------- VHDX differencing

/** What a payload block of the child holds. */
export type VhdxChildBlock =
  | { kind: 'full'; seed: number }
  /** Sector ranges [from, to) (logical sectors within the block) present in the child. */
  | { kind: 'partial'; seed: number; sectors: [number, number][] }
  | { kind: 'zero' }
  | { kind: 'state'; state: number };

export interface VhdxChildSpec {
  size: number;
  blockSize: number;
  blocks: Map<number, VhdxChildBlock>;
  /** Locator key/values; parent_linkage defaults to the parent's DataWriteGuid. */
  locator?: (linkage: string) => [string, string][];
  /** Edit the locator item, the BAT or the sector bitmap after they are made (corruption tests). */
  mutate?: (file: string, l: { batOffset: number; metaOffset: number; locatorOffset: number; bitmapOffset: number | undefined; chunkRatio: number }) => void;
}

const HEADER_OFFSETS = [64 * KiB, 128 * KiB];

/** The current header's DataWriteGuid of a VHDX file (the copy with the higher sequence number). */
export function vhdxDataWriteGuid(file: string): string {
  const [a, b] = HEADER_OFFSETS.map((o) => readBytes(file, o, 64));
  const cur = a!.readBigUInt64LE(8) >= b!.readBigUInt64LE(8) ? a! : b!;
  return guidText(cur.subarray(32, 48));
}

/** Offsets of the BAT and the metadata region, from the first region table. */
export function vhdxRegions(file: string): { batOffset: number; metaOffset: number } {
  const rt = readBytes(file, 192 * KiB, 64 * KiB);
  const bat = guid('2DC27766-F623-4200-9D64-115E9BFD4A08');
  const meta = guid('8B7CA206-4790-4B9A-B8FE-575F050F886E');
  let batOffset = -1;
  let metaOffset = -1;
  for (let i = 0; i < rt.readUInt32LE(8); i++) {
    const at = 16 + i * 32;
    const id = rt.subarray(at, at + 16);
    if (id.equals(bat)) batOffset = Number(rt.readBigUInt64LE(at + 16));
    if (id.equals(meta)) metaOffset = Number(rt.readBigUInt64LE(at + 16));
  }
  return { batOffset, metaOffset };
}

/** A parent locator item (section 2.6.2.6): header, 12-byte entries, UTF-16LE keys and values. */
export function parentLocatorItem(pairs: [string, string][]): Buffer {
  const head = Buffer.alloc(20 + pairs.length * 12);
  guid('B04AEFB7-D19E-4A81-B789-25B8E9445913').copy(head, 0);
  head.writeUInt16LE(pairs.length, 18);
  const strings: Buffer[] = [];
  let at = head.length;
  pairs.forEach(([k, v], i) => {
    const kb = Buffer.from(k, 'utf16le');
    const vb = Buffer.from(v, 'utf16le');
    head.writeUInt32LE(at, 20 + i * 12);
    head.writeUInt32LE(at + kb.length, 20 + i * 12 + 4);
    head.writeUInt16LE(kb.length, 20 + i * 12 + 8);
    head.writeUInt16LE(vb.length, 20 + i * 12 + 10);
    strings.push(kb, vb);
    at += kb.length + vb.length;
  });
  return Buffer.concat([head, ...strings]);
}

/**
 * A differencing VHDX over `parent` (a VHDX beside it): qemu-img makes an empty
 * dynamic VHDX (every block not present); the parent locator item is added to its
 * metadata and HasParent set; payload blocks (full and partial) and one sector bitmap
 * block are appended, the BAT pointing at them. Sectors of a partial block that are
 * not present hold 0xee, so reading them from the child instead of the parent shows.
 * Returns what the child's own present sectors hold: guest offset -> bytes.
 */
export async function makeVhdxChild(child: string, parent: string, spec: VhdxChildSpec): Promise<Map<number, Buffer>> {
  await createImage(child, 'vhdx', spec.size, { block_size: spec.blockSize, block_state_zero: 'off' });
  const linkage = `{${vhdxDataWriteGuid(parent)}}`;
  const pairs = spec.locator?.(linkage) ?? [
    ['parent_linkage', linkage],
    ['relative_path', `.\\${path.basename(parent)}`],
    ['volume_path', `\\\\?\\Volume{26a21bda-a627-11d7-9931-806e6f6e6963}\\VMs\\${path.basename(parent)}`],
    ['absolute_win32_path', `\\\\?\\D:\\VMs\\${path.basename(parent)}`],
  ];
  const { batOffset, metaOffset } = vhdxRegions(child);
  const table = readBytes(child, metaOffset, 64 * KiB);
  const count = table.readUInt16LE(10);
  const fileParams = guid('CAA16737-FA36-4D43-B3B6-33F0AA44E76B');
  let fpOffset = -1;
  for (let i = 0; i < count; i++) if (table.subarray(32 + i * 32, 48 + i * 32).equals(fileParams)) fpOffset = table.readUInt32LE(32 + i * 32 + 16);
  const item = parentLocatorItem(pairs);
  const locatorRel = 64 * KiB + 4 * KiB;
  const e = 32 + count * 32;
  guid('A8D35F2D-B30B-454D-ABF7-D3D84834AB0C').copy(table, e);
  table.writeUInt32LE(locatorRel, e + 16);
  table.writeUInt32LE(item.length, e + 20);
  table.writeUInt32LE(4, e + 24); // IsRequired
  table.writeUInt16LE(count + 1, 10);
  const fd = fs.openSync(child, 'r+');
  const data = new Map<number, Buffer>();
  let bitmapOffset: number | undefined;
  const sector = 512;
  const chunkRatio = ((1 << 23) * sector) / spec.blockSize;
  try {
    fs.writeSync(fd, table, 0, table.length, metaOffset);
    fs.writeSync(fd, item, 0, item.length, metaOffset + locatorRel);
    const bits = Buffer.alloc(4);
    fs.readSync(fd, bits, 0, 4, metaOffset + fpOffset + 4);
    bits.writeUInt32LE(bits.readUInt32LE(0) | 2, 0); // HasParent
    fs.writeSync(fd, bits, 0, 4, metaOffset + fpOffset + 4);

    let next = Math.ceil(fs.fstatSync(fd).size / MiB) * MiB;
    const bitmap = Buffer.alloc(MiB);
    const bat = (idx: number, v: bigint): void => {
      const b = Buffer.alloc(8);
      b.writeBigUInt64LE(v);
      fs.writeSync(fd, b, 0, 8, batOffset + idx * 8);
    };
    for (const [block, c] of [...spec.blocks.entries()].sort((a, b) => a[0] - b[0])) {
      const idx = block + Math.floor(block / chunkRatio);
      if (c.kind === 'zero') bat(idx, 2n);
      else if (c.kind === 'state') bat(idx, BigInt(c.state));
      else {
        const bytes = pattern(spec.blockSize, c.seed);
        if (c.kind === 'partial') {
          const mask = Buffer.alloc(spec.blockSize, 0xee);
          for (const [a, b] of c.sectors) {
            bytes.copy(mask, a * sector, a * sector, b * sector);
            data.set(block * spec.blockSize + a * sector, bytes.subarray(a * sector, b * sector));
            for (let s = a; s < b; s++) {
              const bit = (block % chunkRatio) * (spec.blockSize / sector) + s;
              bitmap[bit >> 3]! |= 1 << (bit & 7);
            }
          }
          fs.writeSync(fd, mask, 0, mask.length, next);
        } else {
          fs.writeSync(fd, bytes, 0, bytes.length, next);
          data.set(block * spec.blockSize, bytes);
        }
        bat(idx, BigInt(next) | (c.kind === 'full' ? 6n : 7n));
        next += spec.blockSize;
      }
    }
    if ([...spec.blocks.values()].some((c) => c.kind === 'partial')) {
      bitmapOffset = next;
      fs.writeSync(fd, bitmap, 0, bitmap.length, bitmapOffset);
      bat(chunkRatio, BigInt(bitmapOffset) | 6n);
    }
  } finally {
    fs.closeSync(fd);
  }
  spec.mutate?.(child, { batOffset, metaOffset, locatorOffset: metaOffset + locatorRel, bitmapOffset, chunkRatio });
  return data;
}

/**
 * `tsmount --rw image mp` fails with one line matching `rwRefusal`; a read-only mount
 * serves `flat` with exactly `want`, refuses to open it for writing, and unmounts.
 */
export async function expectMountedReadOnly(mounts: MountTracker, image: string, mp: string, flat: string, want: Buffer, rwRefusal: RegExp): Promise<void> {
  fs.mkdirSync(mp, { recursive: true });
  const rw = await tsmount(['--rw', image, mp]);
  expect(rw.code).to.not.equal(0);
  expect(rw.stderr.trim().split('\n')).to.have.length(1);
  expect(rw.stderr).to.match(rwRefusal);
  await mounts.mount([image, mp]);
  const file = path.join(mp, flat);
  expect(fs.statSync(file).size).to.equal(want.length);
  expect(fs.readFileSync(file).equals(want)).to.equal(true);
  expect(() => fs.openSync(file, 'r+')).to.throw(/EROFS|EACCES|EPERM/);
  await mounts.unmount(mp);
}
