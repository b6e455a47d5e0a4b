// Persistent dirty bitmaps (qcow2.txt, "Bitmaps extension", "Bitmap directory", "Bitmap
// table", "Bitmap data", "Dirty tracking bitmaps"), kept as QEMU keeps them
// (block/qcow2-bitmap.c): before the first change to an image every consistent bitmap is
// loaded into memory and marked in use in the file; every change of the disk sets the
// bits of the enabled ("auto") ones; at close they are written back and the in-use flag
// cleared. A process killed meanwhile leaves them in use, which QEMU reads as
// inconsistent, as after a QEMU that crashed. A bitmap this cannot load (a reserved flag
// or type, extra data, a damaged table, already in use) is only marked in use, as before.
import type { BitmapBits, BlockNode, WriteLog } from '../../types.js';
import { CorruptImageError, UsageError } from '../../errors.js';
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
/** Bytes the write log of one image may take (one bit per granule of its finest enabled bitmap). */
const MAX_LOG_BYTES = 64 << 20;
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

/**
 * Every byte range the bitmaps hold a reference to: directory, tables, data clusters.
 * A table entry QEMU's check_table_entry refuses (reserved bits, an unaligned offset)
 * references nothing and is one corruption in `corrupt` (qcow2_check_bitmaps_refcounts).
 */
export async function bitmapRanges(file: BlockNode, dir: BitmapDirectory, clusterSize: number, name: string, corrupt?: string[]): Promise<{ offset: number; length: number }[]> {
  const out = [{ offset: dir.offset, length: dir.data.length }];
  for (const [k, t] of dir.tables.entries()) {
    if (t.entries === 0) continue;
    if (t.entries * 8 > 64 * 1024 * 1024 || t.offset + t.entries * 8 > file.size) throw new CorruptImageError(`${name}: qcow2 bitmap table lies outside the file`);
    out.push({ offset: t.offset, length: t.entries * 8 });
    const table = Buffer.alloc(t.entries * 8);
    await file.read(t.offset, table);
    for (let i = 0; i < t.entries; i++) {
      const v = table.readBigUInt64BE(i * 8);
      const off = v & TABLE_OFFSET;
      if (badEntry(v, clusterSize)) {
        corrupt?.push(`ERROR bitmap '${dir.entries[k]?.name ?? k}': table entry ${i} is invalid (0x${v.toString(16)})`);
        continue;
      }
      if (off !== 0n) out.push({ offset: Number(off), length: clusterSize });
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
  /** qcow2 v3 (v2 has no autoclear bits, so no bitmaps can be stored there). */
  v3: boolean;
  refcounts: Refcounts;
  /** Refcount blocks to the file, behind a barrier (before anything names the new clusters). */
  flushRefcounts(): Promise<void>;
  guard?: MetadataGuard;
}

/** One bitmap held in memory. */
interface Loaded {
  name: string;
  enabled: boolean;
  /** Disk bytes per bit, as a power of two. */
  bits: number;
  /** Bits that cover the disk. */
  nbits: number;
  /** Where the table is in the file; 0 for none yet (a new bitmap, or one whose table must move). */
  tableOffset: number;
  table: bigint[];
  /** The table as it was in the file when it must go (moved or removed), with its clusters. */
  oldTable?: { offset: number; entries: bigint[] };
  /** Serialized bits (qcow2.txt "Bitmap data": LSB first), whole clusters. */
  data: Buffer;
  /** Table entries whose cluster of bits changed. */
  changed: Uint8Array;
}

/** A directory entry: a bitmap held in memory, or one left as it is (in use, or one this cannot load). */
type Slot = { name: string; loaded: Loaded } | { name: string; raw: Buffer; table: { offset: number; entries: number } };

/** Table entries a bitmap of `bits` granularity needs over `size` bytes (QEMU's serialization: whole 64-bit words). */
function tableEntries(size: number, bits: number, cs: number): number {
  const nbits = Math.ceil(size / 2 ** bits);
  return Math.ceil((Math.ceil(nbits / 64) * 8) / cs);
}

/** QEMU's error for a bitmap it holds as inconsistent (on one line). */
function inconsistent(name: string): UsageError {
  return new UsageError(`Bitmap '${name}' is inconsistent and cannot be used (only --remove can delete it)`);
}

/**
 * The persistent bitmaps of a writable qcow2 node. load() runs before the first change
 * (the node's beforeFirstChange); mark() after every change of the disk; resize() with
 * the disk; add/remove/clear/enable/disable/merge for tsimg bitmap; store() at close.
 */
export class BitmapTracker {
  private slots: Slot[] = [];
  /** Tables (and their clusters) of bitmaps removed or moved: freed once the directory no longer names them. */
  private readonly dropped: { offset: number; entries: bigint[] }[] = [];
  private started = false;
  /** Something to write back at close. */
  private dirty = false;
  /**
   * What the FUSE workers write around the node, one bit per granule of the finest
   * bitmap that may be enabled (made at open, before any read map shares it); folded
   * into the bitmaps at close. Given up (and writes around the node with it) once it
   * cannot say enough: a resize, or a bitmap added or enabled (tsimg, no workers).
   */
  private readonly log: WriteLog | undefined;
  private logUsable = true;
  constructor(
    private dir: BitmapDirectory | undefined,
    private readonly img: BitmapImage,
    private size: number,
  ) {
    const enabled = (dir?.entries ?? []).filter((e) => (e.flags & (BME_FLAG_IN_USE | BME_FLAG_AUTO)) === BME_FLAG_AUTO).map((e) => e.granularityBits);
    if (enabled.length === 0) return;
    const bits = Math.min(...enabled);
    const words = Math.ceil(Math.ceil(size / 2 ** bits) / 32);
    if (words * 4 <= MAX_LOG_BYTES) this.log = { words: new Int32Array(new SharedArrayBuffer(Math.max(4, words * 4))), granuleBits: bits };
  }

  /** Some enabled bitmap records changes (so every change must come through mark() or the log). */
  get tracking(): boolean {
    return this.slots.some((s) => 'loaded' in s && s.loaded.enabled);
  }

  /** Writes may go around the node: nothing records changes, or what does reads the log. */
  get aroundWrites(): boolean {
    return !this.tracking || (this.log !== undefined && this.logUsable);
  }

  /** The log the writers around the node keep (BlockNode.writeLog). */
  get writeLog(): WriteLog | undefined {
    return this.logUsable ? this.log : undefined;
  }

  /** What was written around the node, into the bitmaps (each logged granule lies within the bits it sets). */
  private foldLog(): void {
    const log = this.log;
    if (!log) return;
    const g = 2 ** log.granuleBits;
    for (let i = 0; i < log.words.length; i++) {
      const v = Atomics.exchange(log.words, i, 0);
      if (v === 0) continue;
      for (let k = 0; k < 32; k++) if ((v >>> k) & 1) this.mark((i * 32 + k) * g, g);
    }
  }

  /** The log stops here: folded, and no more writes around the node while a bitmap records. */
  private retireLog(): void {
    this.foldLog();
    this.logUsable = false;
  }

  /** The image has bitmaps (loaded or not): QEMU refuses to revert it to a snapshot. */
  get any(): boolean {
    return this.started ? this.slots.length > 0 : (this.dir?.entries.length ?? 0) > 0;
  }

  /**
   * Load every consistent bitmap and mark all of them in use in the file (QEMU's
   * qcow2_load_dirty_bitmaps on a writable open); one this cannot load is marked in use
   * and left as it is.
   */
  async load(): Promise<void> {
    if (this.started) return;
    const dir = this.dir;
    if (!dir) {
      this.started = true;
      return;
    }
    const { file, clusterSize: cs } = this.img;
    let budget = MAX_LOADED_BYTES;
    const loaded = new Map<BitmapEntry, Loaded>();
    for (let i = 0; i < dir.entries.length; i++) {
      const e = dir.entries[i]!;
      const t = dir.tables[i]!;
      if (e.flags & BME_FLAG_IN_USE || t.entries * cs > budget) continue;
      const l = await this.loadOne(e, t, cs, file).catch(() => undefined);
      if (!l) continue;
      loaded.set(e, l);
      budget -= l.data.length;
    }
    // Flags last: an entry this loaded becomes in use together with every other one.
    let changed = false;
    for (const e of dir.entries) {
      if (e.flags & BME_FLAG_IN_USE) continue;
      e.flags |= BME_FLAG_IN_USE;
      dir.data.writeUInt32BE(e.flags >>> 0, e.pos + DIR.flags);
      changed = true;
    }
    if (changed) await this.writeDirectoryInPlace(dir.offset, dir.data);
    this.slots = dir.entries.map((e, i) => {
      const l = loaded.get(e);
      const end = i + 1 < dir.entries.length ? dir.entries[i + 1]!.pos : dir.data.length;
      return l ? { name: e.name, loaded: l } : { name: e.name, raw: Buffer.from(dir.data.subarray(e.pos, end)), table: dir.tables[i]! };
    });
    this.dirty = loaded.size > 0;
    this.started = true;
  }

  private async loadOne(e: BitmapEntry, t: { offset: number; entries: number }, cs: number, file: BlockNode): Promise<Loaded | undefined> {
    // QEMU's check_dir_entry and bitmap_list_load: anything it would refuse is left alone.
    if ((e.flags & ~(BME_FLAG_IN_USE | BME_FLAG_AUTO)) !== 0 || e.type !== 1 || e.extraDataSize !== 0) return undefined;
    const got = await readBits(file, t, e.granularityBits, cs, this.size);
    if (!got) return undefined;
    return { name: e.name, enabled: (e.flags & BME_FLAG_AUTO) !== 0, bits: e.granularityBits, nbits: got.nbits, tableOffset: t.offset, table: got.table, data: got.data, changed: new Uint8Array(got.table.length) };
  }

  /** The disk changed over [offset, offset + length): the bits of every enabled bitmap. */
  mark(offset: number, length: number): void {
    for (const s of this.slots) if ('loaded' in s && s.loaded.enabled) this.setRange(s.loaded, offset, length);
  }

  private setRange(b: Loaded, offset: number, length: number): void {
    if (length <= 0) return;
    const end = Math.min(offset + length, this.size);
    if (offset >= end) return;
    const cs = this.img.clusterSize;
    const g = 2 ** b.bits;
    const from = Math.floor(offset / g);
    const to = Math.floor((end - 1) / g) + 1;
    setBits(b.data, from, to);
    b.changed.fill(1, Math.floor(from / 8 / cs), Math.floor((to - 1) / 8 / cs) + 1);
  }

  /** Every bitmap follows the disk to `size` (QEMU's bdrv_dirty_bitmap_truncate: new bits clean). */
  resize(size: number): void {
    this.retireLog();
    const cs = this.img.clusterSize;
    for (const s of this.slots) {
      if (!('loaded' in s)) continue;
      const b = s.loaded;
      const n = tableEntries(size, b.bits, cs);
      const nbits = Math.ceil(size / 2 ** b.bits);
      const data = Buffer.alloc(n * cs);
      b.data.copy(data, 0, 0, Math.min(b.data.length, data.length));
      clearBits(data, nbits, data.length * 8);
      this.moveTable(b);
      const table = b.table.slice(0, n);
      while (table.length < n) table.push(0n);
      b.table = table;
      b.nbits = nbits;
      b.data = data;
      // The cluster that held the old end may have lost bits, and every entry goes to a new table.
      b.changed = new Uint8Array(n).fill(1);
    }
    this.size = size;
    this.dirty = true;
  }

  /** The bitmap's table must be written elsewhere; the one in the file goes once the directory names the new one. */
  private moveTable(b: Loaded): void {
    if (b.tableOffset !== 0) b.oldTable = { offset: b.tableOffset, entries: b.table.slice() };
    b.tableOffset = 0;
  }

  private find(name: string): Slot {
    const s = this.slots.find((x) => x.name === name);
    if (!s) throw new UsageError(`Dirty bitmap '${name}' not found`);
    return s;
  }

  private usable(name: string): Loaded {
    const s = this.find(name);
    if (!('loaded' in s)) throw inconsistent(name);
    return s.loaded;
  }

  /** qemu-img bitmap --add: a new enabled bitmap, empty (QEMU's default granularity: the cluster size within 4 KiB..64 KiB). */
  add(name: string, granularity?: number): void {
    const cs = this.img.clusterSize;
    const where = `Can't make bitmap '${name}' persistent in '${this.img.name}'`;
    if (this.slots.some((s) => s.name === name)) throw new UsageError(`Bitmap already exists: ${name}`);
    const g = granularity ?? Math.min(65536, Math.max(4096, cs));
    if (!Number.isSafeInteger(g) || g < 512 || g > 2 ** 31 || (g & (g - 1)) !== 0) throw new UsageError('Granularity must be power of 2 and at least 512');
    if (!this.img.v3) throw new UsageError(`${where}: Cannot store dirty bitmaps in qcow2 v2 files`);
    if (Buffer.byteLength(name) > 1023) throw new UsageError(`${where}: Name length exceeds maximum (1023 characters)`);
    if (this.slots.length >= MAX_BITMAPS) throw new UsageError(`${where}: Maximum number of persistent bitmaps is already reached`);
    const bits = Math.log2(g);
    const n = tableEntries(this.size, bits, cs);
    if (n * cs > MAX_PHYS_BYTES || n > MAX_TABLE_ENTRIES || Math.ceil(this.size / g / 8) > MAX_PHYS_BYTES) throw new UsageError(`${where}: Too much space will be occupied by the bitmap. Use larger granularity`);
    const loadedBytes = this.slots.reduce((a, s) => a + ('loaded' in s ? s.loaded.data.length : 0), 0);
    if (loadedBytes + n * cs > MAX_LOADED_BYTES) throw new UsageError(`${where}: the image's bitmaps would take more than ${MAX_LOADED_BYTES} bytes of memory`);
    this.retireLog();
    this.slots.push({ name, loaded: { name, enabled: true, bits, nbits: Math.ceil(this.size / g), tableOffset: 0, table: new Array<bigint>(n).fill(0n), data: Buffer.alloc(n * cs), changed: new Uint8Array(n) } });
    this.dirty = true;
  }

  /** qemu-img bitmap --remove (an inconsistent bitmap too). */
  remove(name: string): void {
    const s = this.find(name);
    this.slots = this.slots.filter((x) => x !== s);
    if ('loaded' in s) {
      const b = s.loaded;
      this.moveTable(b);
      if (b.oldTable) this.dropped.push(b.oldTable);
    } else {
      this.rawToDrop.push(s.table);
    }
    this.dirty = true;
  }

  /** Tables of removed bitmaps this did not load: their clusters are freed only where the table reads back valid. */
  private readonly rawToDrop: { offset: number; entries: number }[] = [];

  clear(name: string): void {
    const b = this.usable(name);
    b.data.fill(0);
    b.changed.fill(1);
    this.dirty = true;
  }

  enable(name: string, on: boolean): void {
    const b = this.usable(name);
    if (on && !b.enabled) this.retireLog();
    b.enabled = on;
    this.dirty = true;
  }

  /** The bits of a bitmap of this image, for a merge. */
  bitsOf(name: string): BitmapBits {
    const b = this.usable(name);
    this.foldLog();
    return { size: this.size, granularityBits: b.bits, data: b.data };
  }

  /** qemu-img bitmap --merge: every granule `source` has set is set in `target` too (any granularities). */
  merge(target: string, source: () => Promise<BitmapBits>): Promise<void> {
    const t = this.usable(target);
    return source().then((src) => {
      if (src.size !== this.size) throw new UsageError(`Bitmaps are of different sizes (destination size is ${this.size}, source size is ${src.size}) and can't be merged`);
      const g = 2 ** src.granularityBits;
      const nbits = Math.ceil(src.size / g);
      for (let byte = 0; byte * 8 < nbits; byte++) {
        const v = src.data[byte]!;
        if (v === 0) continue;
        for (let k = 0; k < 8; k++) if (v & (1 << k)) this.setRange(t, (byte * 8 + k) * g, g);
      }
      this.dirty = true;
    });
  }

  /**
   * Write the bitmaps back and clear their in-use flags (QEMU's
   * qcow2_store_persistent_dirty_bitmaps, but in place where it can: changed clusters
   * rewritten where they are, a cluster of zeros that gained bits allocated, a table
   * moved only when its length changed, the directory rewritten where it is when its
   * size is the same). The caller holds the node's mutex and has flushed the node.
   */
  async store(): Promise<void> {
    if (!this.started) return;
    this.foldLog();
    if (!this.dirty) return;
    const { file, clusterSize: cs, refcounts, guard } = this.img;
    const frees: number[] = [];
    const loaded = this.slots.flatMap((s) => ('loaded' in s ? [s.loaded] : []));
    for (const b of loaded) {
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
      b.changed.fill(0);
    }
    // The new clusters counted before the tables name them.
    await this.img.flushRefcounts();
    for (const b of loaded) {
      const raw = Buffer.alloc(b.table.length * 8);
      b.table.forEach((v, i) => raw.writeBigUInt64BE(v, i * 8));
      if (b.tableOffset === 0) {
        const clusters = Math.ceil(raw.length / cs);
        b.tableOffset = (await refcounts.allocateContiguous(clusters)) * cs;
        await guard?.check(b.tableOffset, clusters * cs);
        guard?.add(b.tableOffset, raw.length, OL.bitmapTable);
        if (b.oldTable) this.dropped.push(b.oldTable);
        b.oldTable = undefined;
      }
      await file.write(b.tableOffset, raw);
    }
    await this.img.flushRefcounts();
    await this.writeDirectory();
    // Nothing names them now: the tables of removed and moved bitmaps, and their clusters no table keeps.
    const stillUsed = new Set(loaded.flatMap((b) => b.table.map((v) => Number(v & TABLE_OFFSET) / cs)));
    for (const t of this.dropped) {
      guard?.remove(t.offset, OL.bitmapTable);
      for (const v of t.entries) {
        const off = Number(v & TABLE_OFFSET);
        if (off !== 0 && !stillUsed.has(off / cs)) frees.push(off / cs);
      }
      if (t.entries.length > 0) for (let c = 0; c < Math.ceil((t.entries.length * 8) / cs); c++) frees.push(t.offset / cs + c);
    }
    for (const t of this.rawToDrop) {
      guard?.remove(t.offset, OL.bitmapTable);
      // Only a table that reads back valid is trusted to say which clusters are its own (else they leak).
      const got = await readTable(file, t, cs).catch(() => undefined);
      if (!got) continue;
      for (const v of got) if ((v & TABLE_OFFSET) !== 0n) frees.push(Number(v & TABLE_OFFSET) / cs);
      for (let c = 0; c < Math.ceil((t.entries * 8) / cs); c++) frees.push(t.offset / cs + c);
    }
    this.dropped.length = 0;
    this.rawToDrop.length = 0;
    for (const c of frees) await refcounts.adjust(c, -1);
    await this.img.flushRefcounts();
    this.dirty = false;
  }

  /**
   * The new directory. Where it differs from the one on disk only in entries' flags (the
   * bits were stored into the same tables), those words are rewritten in place: each is
   * 4 bytes in one page, so a kill leaves every bitmap either in use or consistent with
   * what was stored, and a command that changed nothing leaves the file as it was.
   * Anything else goes to new clusters named by a rewritten header, as QEMU's
   * update_ext_header_and_dir: a kill before the header write leaves the old directory
   * (its bitmaps in use), after it the new one. Rewriting a changed directory in place
   * behind the autoclear dance would lose every bitmap to a kill between its steps
   * (found by test/crash-bitmap-store.test.ts); QEMU does that only to mark bitmaps in
   * use at load.
   */
  private async writeDirectory(): Promise<void> {
    const { file, clusterSize: cs, refcounts } = this.img;
    const parts = this.slots.map((s) => {
      if (!('loaded' in s)) return s.raw;
      const b = s.loaded;
      const name = Buffer.from(b.name, 'utf8');
      const e = Buffer.alloc(Math.ceil((DIR.fixed + name.length) / 8) * 8);
      e.writeBigUInt64BE(BigInt(b.tableOffset), DIR.tableOffset);
      e.writeUInt32BE(b.table.length, DIR.tableSize);
      e.writeUInt32BE(b.enabled ? BME_FLAG_AUTO : 0, DIR.flags);
      e[DIR.type] = 1;
      e[DIR.granularityBits] = b.bits;
      e.writeUInt16BE(name.length, DIR.nameSize);
      name.copy(e, DIR.fixed);
      return e;
    });
    const data = Buffer.concat(parts);
    const old = this.dir;
    if (data.length > MAX_DIRECTORY) throw new UsageError(`${this.img.name}: Bitmap directory is too large`);
    if (old && old.offset % 8 === 0 && onlyFlagsDiffer(old, data)) {
      await file.write(old.offset, data);
      await file.flush();
      data.copy(old.data);
      return;
    }
    const { rewriteHeader } = await import('./amend.js');
    let offset = 0;
    if (data.length > 0) {
      const clusters = Math.ceil(data.length / cs);
      offset = (await refcounts.allocateContiguous(clusters)) * cs;
      await this.img.guard?.check(offset, clusters * cs);
      await file.write(offset, data);
      await this.img.flushRefcounts();
    }
    await rewriteHeader(file, cs, { bitmaps: data.length > 0 ? { count: this.slots.length, directorySize: data.length, directoryOffset: offset } : null });
    this.img.guard?.remove(old?.offset ?? 0, OL.bitmapDirectory);
    if (data.length > 0) this.img.guard?.add(offset, data.length, OL.bitmapDirectory);
    // The old directory's clusters, where it starts on one (QEMU allocates it so; a hostile one just leaks).
    if (old && old.offset % cs === 0) for (let c = 0; c < Math.ceil(old.data.length / cs); c++) await refcounts.adjust(old.offset / cs + c, -1);
    // Freed: a later store must not free it again (it may leak the new one instead).
    this.dir = undefined;
  }

  /**
   * The directory rewritten in place, as QEMU's update_ext_header_and_dir_in_place: the
   * autoclear bit off (a torn directory is then ignored, not trusted), the directory,
   * the bit on again, each behind a flush.
   */
  private async writeDirectoryInPlace(offset: number, data: Buffer): Promise<void> {
    const { file } = this.img;
    const now = Buffer.alloc(8);
    await file.read(HDR.autoclearFeatures, now);
    const bits = now.readBigUInt64BE(0);
    await file.write(HDR.autoclearFeatures, encodeAutoclear(bits & ~AUTOCLEAR.bitmaps));
    await file.flush();
    await file.write(offset, data);
    await file.flush();
    await file.write(HDR.autoclearFeatures, encodeAutoclear(bits | AUTOCLEAR.bitmaps));
    await file.flush();
  }
}

/** Whether `data` is `dir` with nothing but its entries' flag words changed. */
function onlyFlagsDiffer(dir: BitmapDirectory, data: Buffer): boolean {
  if (data.length !== dir.data.length) return false;
  const masked = Buffer.from(dir.data);
  for (const e of dir.entries) data.copy(masked, e.pos + DIR.flags, e.pos + DIR.flags, e.pos + DIR.flags + 4);
  return masked.equals(data);
}

/** QEMU's check_table_entry: reserved bits set, or an offset with the all-ones bit or off a cluster boundary. */
function badEntry(v: bigint, cs: number): boolean {
  const off = v & TABLE_OFFSET;
  return (v & TABLE_RESERVED) !== 0n || (off !== 0n && ((v & TABLE_ALL_ONES) !== 0n || off % BigInt(cs) !== 0n));
}

/** A bitmap table read and checked as QEMU's bitmap_table_load (reserved bits, alignment, inside the file). */
async function readTable(file: BlockNode, t: { offset: number; entries: number }, cs: number): Promise<bigint[] | undefined> {
  const n = t.entries;
  if (n === 0 || n > MAX_TABLE_ENTRIES || n * cs > MAX_PHYS_BYTES || t.offset % cs !== 0 || t.offset === 0 || t.offset + n * 8 > file.size) return undefined;
  const raw = Buffer.alloc(n * 8);
  await file.read(t.offset, raw);
  const table: bigint[] = [];
  for (let i = 0; i < n; i++) {
    const v = raw.readBigUInt64BE(i * 8);
    const off = v & TABLE_OFFSET;
    if (badEntry(v, cs) || (off !== 0n && Number(off) + cs > file.size)) return undefined;
    table.push(v);
  }
  return table;
}

/** One bitmap's table and bits (whole clusters), or undefined where QEMU would not load it. */
async function readBits(file: BlockNode, t: { offset: number; entries: number }, bits: number, cs: number, size: number): Promise<{ table: bigint[]; data: Buffer; nbits: number } | undefined> {
  if (t.entries !== tableEntries(size, bits, cs)) return undefined;
  const table = await readTable(file, t, cs);
  if (!table) return undefined;
  const n = table.length;
  const data = Buffer.alloc(n * cs);
  const nbits = Math.ceil(size / 2 ** bits);
  for (let i = 0; i < n; i++) {
    const v = table[i]!;
    const off = Number(v & TABLE_OFFSET);
    if (off !== 0) await file.read(off, data.subarray(i * cs, (i + 1) * cs));
    else if (v & TABLE_ALL_ONES) setBits(data, i * cs * 8, Math.min(nbits, (i + 1) * cs * 8));
  }
  // Bits past the disk's end must be zero (qcow2.txt); a writer that left some is not trusted.
  clearBits(data, nbits, data.length * 8);
  return { table, data, nbits };
}

/** A bitmap of a qcow2 image opened read-only (tsimg bitmap --merge -b): its bits, as QEMU would load them. */
export async function readBitmapBits(file: BlockNode, dir: BitmapDirectory | undefined, name: string, cs: number, size: number): Promise<BitmapBits> {
  const i = dir ? dir.entries.findIndex((e) => e.name === name) : -1;
  if (!dir || i < 0) throw new UsageError(`Dirty bitmap '${name}' not found`);
  const e = dir.entries[i]!;
  if (e.flags & BME_FLAG_IN_USE) throw inconsistent(name);
  const got = (e.flags & ~(BME_FLAG_IN_USE | BME_FLAG_AUTO)) === 0 && e.type === 1 && e.extraDataSize === 0 ? await readBits(file, dir.tables[i]!, e.granularityBits, cs, size) : undefined;
  if (!got) throw new CorruptImageError(`${file.name}: bitmap '${name}' cannot be read (a reserved flag, extra data or a damaged table)`);
  return { size, granularityBits: e.granularityBits, data: got.data };
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
