// Persistent dirty bitmaps (qcow2.txt, "Bitmaps extension", "Bitmap directory", "Bitmap
// table", "Bitmap data", "Dirty tracking bitmaps"), kept as QEMU keeps them
// (block/qcow2-bitmap.c): before the first change to an image every consistent bitmap is
// loaded into memory and marked in use in the file; every change of the disk sets the
// bits of the enabled ("auto") ones; at close they are written back and the in-use flag
// cleared. A process killed meanwhile leaves them in use, which QEMU reads as
// inconsistent, as after a QEMU that crashed. A bitmap this cannot load (a reserved flag
// or type, extra data, a damaged table, already in use) is only marked in use, as before.
import type { BlockNode } from '../../types.js';
import { CorruptImageError } from '../../errors.js';
import type { MetadataGuard } from './overlap.js';
import { OL } from './overlap.js';
import type { Refcounts } from './refcount.js';
import { AUTOCLEAR, encodeAutoclear, HDR } from './header.js';

/** Bitmaps extension layout. */
const EXT = { nbBitmaps: 0, directorySize: 8, directoryOffset: 16, length: 24 } as const;
/** Bitmap directory entry layout. */
const DIR = { tableOffset: 0, tableSize: 8, flags: 12, type: 16, granularityBits: 17, nameSize: 18, extraDataSize: 20, fixed: 24 } as const;
export const BME_FLAG_IN_USE = 1;
const BME_FLAG_AUTO = 2;
/** QEMU's QCOW2_MAX_BITMAPS and QCOW2_MAX_BITMAP_DIRECTORY_SIZE. */
const MAX_BITMAPS = 65535;
const MAX_DIRECTORY = 65535 * 1024;
/** QEMU's BME_MAX_TABLE_SIZE and BME_MAX_PHYS_SIZE (the bytes of one bitmap in memory). */
const MAX_TABLE_ENTRIES = 0x8000000;
const MAX_PHYS_BYTES = 0x20000000;
/** Bytes all loaded bitmaps of one image may take (QEMU has no such limit: a hostile image could ask for 65535 x 512 MiB). */
const MAX_LOADED_BYTES = 0x40000000;
/** Bitmap table entries: bits 1-8 and 56-63 reserved, 9-55 the offset, bit 0 "all ones" where there is none. */
const TABLE_RESERVED = 0xff000000000001fen;
const TABLE_OFFSET = 0x00fffffffffffe00n;
const TABLE_ALL_ONES = 1n;

/** One directory entry's fields (qcow2.txt "Structure of a bitmap directory entry"). */
export interface BitmapEntry {
  /** Where the entry starts within the directory bytes. */
  pos: number;
  flags: number;
  type: number;
  granularityBits: number;
  extraDataSize: number;
  name: string;
}

export interface BitmapDirectory {
  offset: number;
  /** The directory bytes as on disk. */
  data: Buffer;
  /** Byte offsets of each entry's flags field within `data`. */
  flagOffsets: number[];
  entries: BitmapEntry[];
  /** Each bitmap's table: offset and entry count. */
  tables: { offset: number; entries: number }[];
  /** Each bitmap as qemu-img info lists it (QEMU's flag names, in-use before auto). */
  bitmaps: { flags: string[]; name: string; granularity: number }[];
}

/** Every byte range the bitmaps hold a reference to: directory, tables, data clusters. */
export async function bitmapRanges(file: BlockNode, dir: BitmapDirectory, clusterSize: number, name: string): Promise<{ offset: number; length: number }[]> {
  const out = [{ offset: dir.offset, length: dir.data.length }];
  for (const t of dir.tables) {
    if (t.entries === 0) continue;
    if (t.entries * 8 > 64 * 1024 * 1024 || t.offset + t.entries * 8 > file.size) throw new CorruptImageError(`${name}: qcow2 bitmap table lies outside the file`);
    out.push({ offset: t.offset, length: t.entries * 8 });
    const table = Buffer.alloc(t.entries * 8);
    await file.read(t.offset, table);
    for (let i = 0; i < t.entries; i++) {
      const off = Number(table.readBigUInt64BE(i * 8) & 0x00fffffffffffe00n);
      if (off !== 0) out.push({ offset: off, length: clusterSize });
    }
  }
  return out;
}

/** The bitmap directory, from the extension bytes of the header cluster. */
export async function readBitmapDirectory(file: BlockNode, ext: Uint8Array, name: string): Promise<BitmapDirectory | undefined> {
  const bad = (msg: string): never => {
    throw new CorruptImageError(`${name}: qcow2 bitmaps extension: ${msg}`);
  };
  if (ext.length < EXT.length) bad('too short');
  const dv = new DataView(ext.buffer, ext.byteOffset, ext.byteLength);
  const nb = dv.getUint32(EXT.nbBitmaps, false);
  const size = dv.getBigUint64(EXT.directorySize, false);
  const offset = dv.getBigUint64(EXT.directoryOffset, false);
  if (nb === 0) return undefined;
  if (nb > MAX_BITMAPS) bad(`${nb} bitmaps`);
  if (size > BigInt(MAX_DIRECTORY) || size < BigInt(DIR.fixed)) bad(`directory size ${size}`);
  if (offset + size > BigInt(file.size)) bad('directory lies outside the file');
  const data = Buffer.alloc(Number(size));
  await file.read(Number(offset), data);
  const flagOffsets: number[] = [];
  const entries: BitmapEntry[] = [];
  const tables: { offset: number; entries: number }[] = [];
  const bitmaps: BitmapDirectory['bitmaps'] = [];
  let pos = 0;
  for (let i = 0; i < nb; i++) {
    if (pos + DIR.fixed > data.length) bad(`entry ${i} runs past the directory`);
    const nameSize = data.readUInt16BE(pos + DIR.nameSize);
    const extra = data.readUInt32BE(pos + DIR.extraDataSize);
    const end = pos + DIR.fixed + extra + nameSize;
    if (end > data.length) bad(`entry ${i} runs past the directory`);
    flagOffsets.push(pos + DIR.flags);
    const t = data.readBigUInt64BE(pos);
    if (t >= 2n ** 53n) bad(`entry ${i} has a table offset out of range`);
    tables.push({ offset: Number(t), entries: data.readUInt32BE(pos + 8) });
    const flags = data.readUInt32BE(pos + DIR.flags);
    const bits = data[pos + DIR.granularityBits]!;
    // QEMU refuses granularities outside 2^9..2^31 (BME_MIN/MAX_GRANULARITY_BITS).
    if (bits < 9 || bits > 31) bad(`entry ${i} has granularity bits ${bits}`);
    const bmName = data.toString('utf8', end - nameSize, end);
    entries.push({ pos, flags, type: data[pos + DIR.type]!, granularityBits: bits, extraDataSize: extra, name: bmName });
    bitmaps.push({
      flags: [...(flags & BME_FLAG_IN_USE ? ['in-use'] : []), ...(flags & BME_FLAG_AUTO ? ['auto'] : [])],
      name: bmName,
      granularity: 2 ** bits,
    });
    pos = Math.ceil(end / 8) * 8;
  }
  return { offset: Number(offset), data, flagOffsets, entries, tables, bitmaps };
}

/** What a bitmap store needs of the image (the node's refcounts, caches and guard). */
export interface BitmapImage {
  file: BlockNode;
  name: string;
  clusterSize: number;
  refcounts: Refcounts;
  /** Refcount blocks to the file, behind a barrier (before anything names the new clusters). */
  flushRefcounts(): Promise<void>;
  /** The image's autoclear bits as they are on disk (bit 0: the bitmaps extension is consistent). */
  autoclear(): bigint;
  guard?: MetadataGuard;
}

/** One bitmap held in memory. */
interface Loaded {
  entry: BitmapEntry;
  enabled: boolean;
  /** Disk bytes per bit, as a power of two. */
  bits: number;
  /** Bits that cover the disk. */
  nbits: number;
  tableOffset: number;
  /** The table as in the file; a new one (`moved`) when the disk's size changed its length. */
  table: bigint[];
  oldTable?: { offset: number; entries: bigint[] };
  /** Serialized bits (qcow2.txt "Bitmap data": LSB first), whole clusters. */
  data: Buffer;
  /** Table entries whose cluster of bits changed. */
  changed: Uint8Array;
}

/** Table entries a bitmap of `bits` granularity needs over `size` bytes (QEMU's serialization: whole 64-bit words). */
function tableEntries(size: number, bits: number, cs: number): number {
  const nbits = Math.ceil(size / 2 ** bits);
  return Math.ceil((Math.ceil(nbits / 64) * 8) / cs);
}

/**
 * The persistent bitmaps of a writable qcow2 node. load() runs before the first change
 * (the node's beforeFirstChange); mark() after every change of the disk; resize() with
 * the disk; store() at close.
 */
export class BitmapTracker {
  private readonly loaded: Loaded[] = [];
  private started = false;
  constructor(
    private readonly dir: BitmapDirectory,
    private readonly img: BitmapImage,
    private size: number,
  ) {}

  /** Some enabled bitmap records changes (so every change must come through mark()). */
  get tracking(): boolean {
    return this.loaded.some((b) => b.enabled);
  }

  /**
   * Load every consistent bitmap and mark all of them in use in the file (QEMU's
   * qcow2_load_dirty_bitmaps on a writable open); one this cannot load is marked in use
   * and left as it is.
   */
  async load(): Promise<void> {
    if (this.started) return;
    const { file, clusterSize: cs } = this.img;
    let budget = MAX_LOADED_BYTES;
    for (let i = 0; i < this.dir.entries.length; i++) {
      const e = this.dir.entries[i]!;
      const t = this.dir.tables[i]!;
      if (e.flags & BME_FLAG_IN_USE || t.entries * cs > budget) continue;
      const l = await this.loadOne(e, t, cs, file).catch(() => undefined);
      if (!l) continue;
      this.loaded.push(l);
      budget -= l.data.length;
    }
    // Flags last: an entry this loaded becomes in use together with every other one.
    let changed = false;
    for (const e of this.dir.entries) {
      if (e.flags & BME_FLAG_IN_USE) continue;
      e.flags |= BME_FLAG_IN_USE;
      this.dir.data.writeUInt32BE(e.flags >>> 0, e.pos + DIR.flags);
      changed = true;
    }
    if (changed) await this.writeDirectory();
    this.started = true;
  }

  private async loadOne(e: BitmapEntry, t: { offset: number; entries: number }, cs: number, file: BlockNode): Promise<Loaded | undefined> {
    // QEMU's check_dir_entry and bitmap_list_load: anything it would refuse is left alone.
    if ((e.flags & ~(BME_FLAG_IN_USE | BME_FLAG_AUTO)) !== 0 || e.type !== 1 || e.extraDataSize !== 0) return undefined;
    const n = tableEntries(this.size, e.granularityBits, cs);
    if (t.entries !== n || n === 0 || n > MAX_TABLE_ENTRIES || n * cs > MAX_PHYS_BYTES || t.offset % cs !== 0 || t.offset === 0) return undefined;
    if (t.offset + n * 8 > file.size) return undefined;
    const raw = Buffer.alloc(n * 8);
    await file.read(t.offset, raw);
    const table: bigint[] = [];
    const data = Buffer.alloc(n * cs);
    for (let i = 0; i < n; i++) {
      const v = raw.readBigUInt64BE(i * 8);
      const off = v & TABLE_OFFSET;
      if ((v & TABLE_RESERVED) !== 0n || (off !== 0n && ((v & TABLE_ALL_ONES) !== 0n || off % BigInt(cs) !== 0n))) return undefined;
      if (off !== 0n && Number(off) + cs > file.size) return undefined;
      table.push(v);
    }
    const nbits = Math.ceil(this.size / 2 ** e.granularityBits);
    for (let i = 0; i < n; i++) {
      const v = table[i]!;
      const off = Number(v & TABLE_OFFSET);
      if (off !== 0) await file.read(off, data.subarray(i * cs, (i + 1) * cs));
      else if (v & TABLE_ALL_ONES) setBits(data, i * cs * 8, Math.min(nbits, (i + 1) * cs * 8));
    }
    // Bits past the disk's end must be zero (qcow2.txt); a writer that left some is not trusted.
    clearBits(data, nbits, data.length * 8);
    return { entry: e, enabled: (e.flags & BME_FLAG_AUTO) !== 0, bits: e.granularityBits, nbits, tableOffset: t.offset, table, data, changed: new Uint8Array(n) };
  }

  /** The disk changed over [offset, offset + length): the bits of every enabled bitmap. */
  mark(offset: number, length: number): void {
    if (length <= 0) return;
    const end = Math.min(offset + length, this.size);
    if (offset >= end) return;
    const cs = this.img.clusterSize;
    for (const b of this.loaded) {
      if (!b.enabled) continue;
      const g = 2 ** b.bits;
      const from = Math.floor(offset / g);
      const to = Math.floor((end - 1) / g) + 1;
      setBits(b.data, from, to);
      b.changed.fill(1, Math.floor(from / 8 / cs), Math.floor((to - 1) / 8 / cs) + 1);
    }
  }

  /** Every bitmap follows the disk to `size` (QEMU's bdrv_dirty_bitmap_truncate: new bits clean). */
  resize(size: number): void {
    const cs = this.img.clusterSize;
    for (const b of this.loaded) {
      const n = tableEntries(size, b.bits, cs);
      const nbits = Math.ceil(size / 2 ** b.bits);
      const data = Buffer.alloc(n * cs);
      b.data.copy(data, 0, 0, Math.min(b.data.length, data.length));
      clearBits(data, nbits, data.length * 8);
      b.oldTable ??= { offset: b.tableOffset, entries: b.table };
      const table = b.table.slice(0, n);
      while (table.length < n) table.push(0n);
      const changed = new Uint8Array(n);
      changed.set(b.changed.subarray(0, n));
      // The cluster that held the old end may have lost bits, and the table's place changes.
      changed.fill(1);
      b.table = table;
      b.nbits = nbits;
      b.data = data;
      b.changed = changed;
    }
    this.size = size;
  }

  /**
   * Write the bitmaps back and clear their in-use flags (QEMU's
   * qcow2_store_persistent_dirty_bitmaps, but in place where the table keeps its size:
   * changed clusters rewritten where they are, a cluster of zeros that gained bits
   * allocated). The caller holds the node's mutex and has flushed the node.
   */
  async store(): Promise<void> {
    if (!this.started || this.loaded.length === 0) return;
    const { file, clusterSize: cs, refcounts, guard } = this.img;
    const frees: number[] = [];
    for (const b of this.loaded) {
      for (let i = 0; i < b.table.length; i++) {
        if (!b.changed[i]) continue;
        const v = b.table[i]!;
        const chunk = b.data.subarray(i * cs, (i + 1) * cs);
        const off = Number(v & TABLE_OFFSET);
        // Still all ones (marks set only bits it has; a grow adds clean bits, which it would not say).
        if (off === 0 && (v & TABLE_ALL_ONES) !== 0n && allOnes(b.data, i * cs * 8, Math.min(b.nbits, (i + 1) * cs * 8))) continue;
        if (isZero(chunk)) {
          if (off !== 0) frees.push(off / cs);
          b.table[i] = 0n;
          continue;
        }
        let at = off;
        if (at === 0) {
          at = (await refcounts.allocate(1)).start * cs;
          await guard?.check(at, cs);
          b.table[i] = BigInt(at);
        }
        await file.write(at, chunk);
      }
    }
    // The new clusters counted before the tables name them.
    await this.img.flushRefcounts();
    for (const b of this.loaded) {
      const raw = Buffer.alloc(b.table.length * 8);
      b.table.forEach((v, i) => raw.writeBigUInt64BE(v, i * 8));
      if (b.oldTable) {
        const clusters = Math.ceil(raw.length / cs);
        const at = (await refcounts.allocateContiguous(clusters)) * cs;
        await guard?.check(at, clusters * cs);
        guard?.add(at, raw.length, OL.bitmapTable);
        b.tableOffset = at;
        // Data clusters past the new end, then the old table, once the directory names the new one.
        for (let i = b.table.length; i < b.oldTable.entries.length; i++) {
          const off = Number(b.oldTable.entries[i]! & TABLE_OFFSET);
          if (off !== 0) frees.push(off / cs);
        }
      }
      await file.write(b.tableOffset, raw);
      const pos = b.entry.pos;
      this.dir.data.writeBigUInt64BE(BigInt(b.tableOffset), pos + DIR.tableOffset);
      this.dir.data.writeUInt32BE(b.table.length, pos + DIR.tableSize);
      b.entry.flags = b.enabled ? BME_FLAG_AUTO : 0;
      this.dir.data.writeUInt32BE(b.entry.flags, pos + DIR.flags);
    }
    await this.img.flushRefcounts();
    await this.writeDirectory();
    for (const b of this.loaded) {
      if (!b.oldTable) continue;
      guard?.remove(b.oldTable.offset, OL.bitmapTable);
      const clusters = Math.ceil((b.oldTable.entries.length * 8) / cs);
      for (let c = 0; c < clusters; c++) frees.push(b.oldTable.offset / cs + c);
      this.dir.tables[this.dir.entries.indexOf(b.entry)] = { offset: b.tableOffset, entries: b.table.length };
      b.oldTable = undefined;
    }
    for (const c of frees) await refcounts.adjust(c, -1);
    await this.img.flushRefcounts();
    this.loaded.length = 0;
  }

  /**
   * The directory rewritten in place, as QEMU's update_ext_header_and_dir_in_place: the
   * autoclear bit off (a torn directory is then ignored, not trusted), the directory,
   * the bit on again, each behind a flush.
   */
  private async writeDirectory(): Promise<void> {
    const { file } = this.img;
    const bits = this.img.autoclear();
    await file.write(HDR.autoclearFeatures, encodeAutoclear(bits & ~AUTOCLEAR.bitmaps));
    await file.flush();
    await file.write(this.dir.offset, this.dir.data);
    await file.flush();
    await file.write(HDR.autoclearFeatures, encodeAutoclear(bits | AUTOCLEAR.bitmaps));
    await file.flush();
  }
}

/** Set bits [from, to) (LSB first in each byte). */
function setBits(data: Buffer, from: number, to: number): void {
  if (from >= to) return;
  let i = from;
  while (i < to && i % 8 !== 0) data[i >> 3]! |= 1 << (i & 7), i++;
  const whole = Math.floor((to - i) / 8);
  if (whole > 0) {
    data.fill(0xff, i >> 3, (i >> 3) + whole);
    i += whole * 8;
  }
  while (i < to) data[i >> 3]! |= 1 << (i & 7), i++;
}

/** Clear bits [from, to). */
function clearBits(data: Buffer, from: number, to: number): void {
  let i = from;
  while (i < to && i % 8 !== 0) data[i >> 3]! &= ~(1 << (i & 7)), i++;
  if (i < to) data.fill(0, i >> 3, Math.ceil(to / 8));
}

function isZero(b: Buffer): boolean {
  for (let i = 0; i < b.length; i++) if (b[i] !== 0) return false;
  return true;
}

/** Bits [from, to) are all set. */
function allOnes(data: Buffer, from: number, to: number): boolean {
  for (let i = from; i < to; i++) if ((data[i >> 3]! & (1 << (i & 7))) === 0) return false;
  return true;
}
