// ESXi seSparse extents (the snapshot deltas of ESXi 6.5 and later), read-only, as
// QEMU 7.2's block/vmdk.c reads them (vmdk_open_se_sparse, get_cluster_offset): a
// 512-byte constant header, a volatile header, a grain directory of 64-bit entries
// naming grain tables of 4096 64-bit entries, and 4 KiB grains. The format is not
// documented; QEMU's checks are strict and so are these.
import { TableCache } from '../../../cache/table-cache.js';
import { PagedTable } from '../table-pages.js';
import type { BlockNode, CheckReport } from '../../types.js';
import { CorruptImageError, UnsupportedError } from '../../errors.js';
import { pushRun, type MappedRun } from '../mapped.js';
import type { VmdkExtent } from './extent.js';
import { dv } from './header.js';
import { addCorruption } from '../check-report.js';

/** Little-endian u64 at the start of the extent file. */
export const SESPARSE_CONST_MAGIC = 0xcafebaben;
const SESPARSE_VOLATILE_MAGIC = 0xcafecafen;
const SESPARSE_VERSION = 0x0000000200000001n;

/** Byte offsets of VMDKSESparseConstHeader (26 little-endian u64, then 304 bytes of padding). */
const CH = {
  magic: 0,
  version: 8,
  capacity: 16,
  grainSize: 24,
  grainTableSize: 32,
  flags: 40,
  reserved: 48, // four u64
  volatileHeaderOffset: 80,
  grainDirOffset: 128,
  grainDirSize: 136,
  grainTablesOffset: 144,
  grainsOffset: 192,
  pad: 208,
} as const;
/** VMDKSESparseVolatileHeader: magic, free GT number, next txn seq, replay_journal, 480 bytes of padding. */
const VH = { magic: 0, replayJournal: 24, pad: 32 } as const;

const SECTOR = 512;
/** The only grain size QEMU accepts: 8 sectors. */
const GRAIN_SECTORS = 8n;
/** That grain in bytes (qemu-img info's extent cluster-size). */
export const SESPARSE_GRAIN = Number(GRAIN_SECTORS) * 512;
/** The only grain table size QEMU accepts: 64 sectors, 4096 entries. */
const GT_SECTORS = 64n;
const GT_ENTRIES = Number((GT_SECTORS * 512n) / 8n);
const GT_BYTES = GT_ENTRIES * 8;
/** vmdk_add_extent's bound on the grain directory (64 TiB of seSparse). */
const MAX_L1_ENTRIES = 32 * 1024 * 1024;
const MAX_SECTORS = BigInt(Math.floor(Number.MAX_SAFE_INTEGER / SECTOR));

/** Grain table entry types, the top nibble. */
const GTE = { unallocated: 0n, unmapped: 1n, zero: 2n, allocated: 3n } as const;
/** A grain directory entry that names a table has this in its top 32 bits. */
const GDE_ALLOCATED = 0x10000000n;

export interface SeSparseHeader {
  /** Virtual size of the extent, sectors. */
  sectors: number;
  gdOffset: number;
  l1Size: number;
  /** Sectors. */
  tablesOffset: bigint;
  grainsOffset: bigint;
}

const hex = (v: bigint): string => `0x${v.toString(16).padStart(16, '0')}`;

/** Whether a file starts with the seSparse constant header magic. */
export function isSeSparse(head: Uint8Array): boolean {
  return head.length >= 8 && dv(head).getBigUint64(0, true) === SESPARSE_CONST_MAGIC;
}

/** check_se_sparse_const_header and check_se_sparse_volatile_header, in QEMU's order. */
export async function readSeSparseHeader(file: BlockNode, name: string): Promise<SeSparseHeader> {
  if (file.size < SECTOR) throw new CorruptImageError(`${name}: file too short for a seSparse header`);
  const h = new Uint8Array(SECTOR);
  await file.read(0, h);
  const v = dv(h);
  const u64 = (at: number): bigint => v.getBigUint64(at, true);
  if (u64(CH.magic) !== SESPARSE_CONST_MAGIC) throw new CorruptImageError(`${name}: bad seSparse const header magic: ${hex(u64(CH.magic))}`);
  if (u64(CH.version) !== SESPARSE_VERSION) throw new UnsupportedError(`${name}: unsupported seSparse version: ${hex(u64(CH.version))}`);
  if (u64(CH.grainSize) !== GRAIN_SECTORS) throw new UnsupportedError(`${name}: unsupported seSparse grain size: ${u64(CH.grainSize)}`);
  if (u64(CH.grainTableSize) !== GT_SECTORS) throw new UnsupportedError(`${name}: unsupported seSparse grain table size: ${u64(CH.grainTableSize)}`);
  if (u64(CH.flags) !== 0n) throw new UnsupportedError(`${name}: unsupported seSparse flags: ${hex(u64(CH.flags))}`);
  for (let i = 0; i < 4; i++) {
    if (u64(CH.reserved + i * 8) !== 0n) throw new UnsupportedError(`${name}: unsupported seSparse reserved bits`);
  }
  if (h.subarray(CH.pad).some((b) => b !== 0)) throw new UnsupportedError(`${name}: unsupported non-zero seSparse const header padding`);

  const volatileAt = u64(CH.volatileHeaderOffset) * 512n;
  if (volatileAt + 512n > BigInt(file.size)) throw new CorruptImageError(`${name}: seSparse volatile header at ${volatileAt} lies outside the file`);
  const vh = new Uint8Array(SECTOR);
  await file.read(Number(volatileAt), vh);
  const vv = dv(vh);
  if (vv.getBigUint64(VH.magic, true) !== SESPARSE_VOLATILE_MAGIC) throw new CorruptImageError(`${name}: bad seSparse volatile header magic: ${hex(vv.getBigUint64(VH.magic, true))}`);
  if (vv.getBigUint64(VH.replayJournal, true) !== 0n) throw new UnsupportedError(`${name}: seSparse image is dirty; replaying its journal is not supported`);
  if (vh.subarray(VH.pad).some((b) => b !== 0)) throw new UnsupportedError(`${name}: unsupported non-zero seSparse volatile header padding`);

  const capacity = u64(CH.capacity);
  if (capacity > MAX_SECTORS) throw new CorruptImageError(`${name}: seSparse capacity ${capacity} is out of range`);
  const gdSectors = u64(CH.grainDirSize);
  if ((gdSectors * 512n) / 8n > BigInt(MAX_L1_ENTRIES)) throw new CorruptImageError(`${name}: seSparse grain directory too big (${gdSectors} sectors)`);
  const l1Size = Number((gdSectors * 512n) / 8n);
  const gdOffset = u64(CH.grainDirOffset) * 512n;
  if (gdOffset + BigInt(l1Size * 8) > BigInt(file.size)) throw new CorruptImageError(`${name}: seSparse grain directory at ${gdOffset} lies outside the file`);
  return { sectors: Number(capacity), gdOffset: Number(gdOffset), l1Size, tablesOffset: u64(CH.grainTablesOffset), grainsOffset: u64(CH.grainsOffset) };
}

export interface SeSparseExtentOptions {
  file: BlockNode;
  start: number;
  type: string;
  /** Bytes of grain tables to keep in memory. */
  cacheBytes: number;
}

export class SeSparseExtent implements VmdkExtent {
  readonly kind = 'sesparse';
  readonly file: BlockNode;
  readonly start: number;
  readonly length: number;
  readonly type: string;
  private readonly name: string;
  private readonly tables: TableCache;

  /** The grain directory, paged in as the guest touches it (up to 256 MiB: not read whole at open). */
  private readonly l1: PagedTable;

  private constructor(
    private readonly h: SeSparseHeader,
    o: SeSparseExtentOptions,
  ) {
    this.file = o.file;
    this.name = o.file.name;
    this.start = o.start;
    this.length = h.sectors * SECTOR;
    this.type = o.type;
    // A quarter of the budget for directory pages, the rest for grain tables.
    this.l1 = new PagedTable(o.file, h.gdOffset, h.l1Size, 8, Math.floor(o.cacheBytes / 4));
    this.tables = new TableCache({ name: 'vmdk seSparse grain tables', file: o.file, tableSize: GT_BYTES, maxBytes: o.cacheBytes - Math.floor(o.cacheBytes / 4), barriers: false });
  }

  static async open(o: SeSparseExtentOptions): Promise<SeSparseExtent> {
    return new SeSparseExtent(await readSeSparseHeader(o.file, o.file.name), o);
  }

  /** The grain table of directory entry l1i, or undefined when it has none. */
  private async table(l1i: number): Promise<DataView | undefined> {
    if (l1i >= this.l1.entries) throw new CorruptImageError(`${this.name}: seSparse grain directory index ${l1i} out of range (${this.l1.entries} entries)`);
    const e = await this.l1.u64(l1i);
    if (e === 0n) return undefined;
    // Top 32 bits 0x10000000: a table (QEMU's strict check; 64 TiB needs no more than 32 bits of index).
    if (e >> 32n !== GDE_ALLOCATED) throw new CorruptImageError(`${this.name}: seSparse grain directory entry ${l1i} is invalid (${hex(e)})`);
    const sector = this.h.tablesOffset + (e & 0xffffffffn) * GT_SECTORS;
    if (sector > 0xffffffffn) throw new CorruptImageError(`${this.name}: seSparse grain table ${l1i} lies beyond 2 TiB`);
    const off = Number(sector) * SECTOR;
    if (off + GT_BYTES > this.file.size) throw new CorruptImageError(`${this.name}: seSparse grain table at 0x${off.toString(16)} lies outside the file`);
    return (await this.tables.get(off)).view();
  }

  /** A grain table entry: where the grain is (its first `need` bytes in the file), or what it reads as. */
  private place(t: DataView | undefined, idx: number, offset: number, need: number): 'unallocated' | 'zero' | number {
    const e = t ? t.getBigUint64(idx * 8, true) : 0n;
    switch (e >> 60n) {
      case GTE.unallocated:
        if (e !== 0n) break;
        return 'unallocated';
      case GTE.unmapped:
      case GTE.zero:
        return 'zero';
      case GTE.allocated: {
        const grain = ((e & 0x0fff000000000000n) >> 48n) | ((e & 0x0000ffffffffffffn) << 12n);
        const host = (this.h.grainsOffset + grain * GRAIN_SECTORS) * 512n;
        // The bytes this request reads of the grain must be in the file.
        if (host + BigInt(need) > BigInt(this.file.size)) {
          throw new CorruptImageError(`${this.name}: seSparse grain at 0x${host.toString(16)} (guest 0x${offset.toString(16)}) lies outside the file`);
        }
        return Number(host);
      }
    }
    throw new CorruptImageError(`${this.name}: seSparse grain table entry for guest 0x${offset.toString(16)} is invalid (${hex(e)})`);
  }

  async map(rel: number, length: number): Promise<MappedRun[]> {
    const gb = Number(GRAIN_SECTORS) * SECTOR;
    const out: MappedRun[] = [];
    const end = rel + length;
    for (let pos = rel; pos < end; ) {
      const g = Math.floor(pos / gb);
      const l1i = Math.floor(g / GT_ENTRIES);
      const t = await this.table(l1i);
      const tableEnd = Math.min(end, (l1i + 1) * GT_ENTRIES * gb);
      while (pos < tableEnd) {
        const gi = Math.floor(pos / gb);
        const n = Math.min(tableEnd, (gi + 1) * gb) - pos;
        const offset = this.start + pos;
        const p = this.place(t, gi % GT_ENTRIES, offset, pos - gi * gb + n);
        const run: MappedRun = typeof p === 'number' ? { kind: 'data', offset, length: n, host: p + (pos - gi * gb), file: this.file } : { kind: p, offset, length: n };
        pushRun(out, run);
        pos += n;
      }
    }
    return out;
  }

  /**
   * qemu-img check for a seSparse extent: every grain directory and grain table entry
   * decodes (QEMU's get_cluster_offset fails the check on the first that does not),
   * and no allocated grain starts past the end of the file (QEMU's one message).
   * Every problem is counted, not just the first. One grain table in memory at a time.
   */
  async check(report: CheckReport): Promise<void> {
    const gb = Number(GRAIN_SECTORS) * SECTOR;
    const grains = Math.ceil(this.length / gb);
    const tables = Math.min(this.l1.entries, Math.ceil(grains / GT_ENTRIES));
    const bad = (msg: string): void => addCorruption(report, `ERROR: ${msg}`);
    const size = BigInt(this.file.size);
    const t = Buffer.alloc(GT_BYTES);
    for (let l1i = 0; l1i < tables; l1i++) {
      const first = (this.start + l1i * GT_ENTRIES * gb) / SECTOR;
      const e = await this.l1.u64(l1i);
      if (e === 0n) continue;
      if (e >> 32n !== GDE_ALLOCATED) {
        bad(`seSparse grain directory entry ${l1i} (sector ${first}) is invalid (${hex(e)})`);
        continue;
      }
      const sector = this.h.tablesOffset + (e & 0xffffffffn) * GT_SECTORS;
      if (sector > 0xffffffffn || (sector * 512n) + BigInt(GT_BYTES) > size) {
        bad(`seSparse grain table for sector ${first} at sector ${sector} points after EOF`);
        continue;
      }
      await this.file.read(Number(sector) * SECTOR, t);
      const n = Math.min(GT_ENTRIES, grains - l1i * GT_ENTRIES);
      for (let i = 0; i < n; i++) {
        const g = t.readBigUInt64LE(i * 8);
        const type = g >> 60n;
        const sectorNum = first + (i * gb) / SECTOR;
        if (type === GTE.unmapped || type === GTE.zero || g === 0n) continue;
        if (type !== GTE.allocated) {
          bad(`seSparse grain table entry for sector ${sectorNum} is invalid (${hex(g)})`);
          continue;
        }
        const grain = ((g & 0x0fff000000000000n) >> 48n) | ((g & 0x0000ffffffffffffn) << 12n);
        if ((this.h.grainsOffset + grain * GRAIN_SECTORS) * 512n >= size) bad(`cluster offset for sector ${sectorNum} points after EOF`);
      }
    }
  }

  /** seSparse is read-only (QEMU has no write support either); the open refuses --rw first. */
  write(): Promise<void> {
    return Promise.reject(new UnsupportedError(`${this.name}: VMDK seSparse extents are read-only`));
  }

  zero(): Promise<void> {
    return this.write();
  }
}
