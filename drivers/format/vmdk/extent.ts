// vmdk extents: flat (the guest bytes lie in a file at an offset) and sparse (a
// grain directory of grain tables maps grains into the file; VMDK spec 1.1 and
// QEMU 7.2's get_cluster_offset / vmdk_L2update / get_whole_cluster). Each extent
// maps, reads and writes its own byte range; the node strings them together.
import { MetadataRanges } from '../metadata-ranges.js';
import { WAITING_MAX } from '../table-pages.js';
import { TableCache } from '../../../cache/table-cache.js';
import { constants } from 'node:os';
import type { BlockNode, CheckReport } from '../../types.js';
import { CorruptImageError, IoError, UnsupportedError } from '../../errors.js';
import { pushRun, writeIntoNew, type MappedRun } from '../mapped.js';
import { FLAG_MARKER, FLAG_ZERO_GRAIN, type SparseHeader } from './header.js';
import { encodeCompressedGrain, MARKER_HEADER, readCompressedGrain } from './stream.js';
import { addCorruption } from '../check-report.js';

/** Grain table entry 1 with the zeroed-grain flag: the grain reads as zeros (VMDK_GTE_ZEROED). */
const GTE_ZEROED = 1;
/** Grain offsets are 32-bit sector numbers (VMDK_EXTENT_MAX_SECTORS). */
const MAX_EXTENT_SECTORS = 2 ** 32;
/** Decompressed grains kept per extent, so sequential small reads inflate each grain once. */
const GRAIN_CACHE = 8;
/** What an extent needs from the node above when it writes. */
export interface WriteContext {
  /** Guest bytes as they read below this layer (backing file, or zeros). */
  readBacking(guestOffset: number, dst: Uint8Array): Promise<void>;
  hasBacking: boolean;
  /** Guest bytes past this read as zeros below this layer (the backing file's size; 0 without one). */
  backingEnd: number;
  /** Make everything written so far durable before metadata points at it. */
  barrier(file: BlockNode): Promise<void>;
}

export interface VmdkExtent {
  readonly kind: 'flat' | 'sparse' | 'sesparse';
  readonly file: BlockNode;
  /** Guest byte offset of the extent's first byte, and its length in bytes. */
  readonly start: number;
  readonly length: number;
  /** The descriptor's extent type ('' for a monolithic sparse file), as qemu-img info shows it. */
  readonly type: string;
  /** Runs covering [rel, rel + length) of this extent, in guest offsets. */
  map(rel: number, length: number): Promise<MappedRun[]>;
  write(rel: number, src: Uint8Array, ctx: WriteContext): Promise<void>;
  /** Zero [rel, rel+length); returns ranges (extent-relative) that still need zeros written. */
  zero(rel: number, length: number, unmap: boolean, ctx: WriteContext): Promise<void>;
  /** Table entries still in memory to the file, behind a barrier after their data (sparse extents). */
  writeWaiting?(ctx: WriteContext): Promise<void>;
}

export class FlatExtent implements VmdkExtent {
  readonly kind = 'flat';
  constructor(
    readonly file: BlockNode,
    readonly start: number,
    readonly length: number,
    readonly flatOffset: number,
    readonly type: string,
  ) {}

  async map(rel: number, length: number): Promise<MappedRun[]> {
    const host = this.flatOffset + rel;
    if (host + length > this.file.size) {
      throw new CorruptImageError(`${this.file.name}: flat extent ends at 0x${(this.flatOffset + this.length).toString(16)}, past the end of its file (0x${this.file.size.toString(16)} bytes)`);
    }
    // Holes of the flat file read as zeros: block status asks it (vmdk_co_block_status's BDRV_BLOCK_RECURSE).
    return [{ kind: 'data', offset: this.start + rel, length, host, file: this.file, recurse: true }];
  }

  write(rel: number, src: Uint8Array): Promise<void> {
    return this.file.write(this.flatOffset + rel, src);
  }

  async zero(rel: number, length: number, unmap: boolean): Promise<void> {
    if (this.file.zero) return this.file.zero(this.flatOffset + rel, length, unmap);
    const chunk = new Uint8Array(Math.min(length, 1 << 20));
    for (let done = 0; done < length; done += chunk.length) {
      const n = Math.min(chunk.length, length - done);
      await this.file.write(this.flatOffset + rel + done, chunk.subarray(0, n));
    }
  }
}

type Entry = { kind: 'unallocated' } | { kind: 'zero' } | { kind: 'data'; host: number } | { kind: 'compressed'; host: number };

export interface SparseExtentOptions {
  file: BlockNode;
  name: string;
  start: number;
  header: SparseHeader;
  type: string;
  /** Bytes of grain tables to keep in memory. */
  cacheBytes: number;
}

export class SparseExtent implements VmdkExtent {
  readonly kind = 'sparse';
  readonly file: BlockNode;
  readonly start: number;
  readonly length: number;
  readonly type: string;
  readonly grainBytes: number;
  readonly compressed: boolean;
  readonly hasMarker: boolean;
  readonly zeroGrain: boolean;
  readonly version: number;
  readonly gdAtEnd: boolean;
  private readonly name: string;
  private readonly gtEntries: number;
  private readonly gtBytes: number;
  private l1: Uint32Array = new Uint32Array(0);
  private l1Backup: Uint32Array | undefined;
  /** Grain tables, keyed by file offset; written through (a table being written is pinned). */
  private readonly tables: TableCache;
  private readonly grains = new Map<number, Buffer>();
  /**
   * Table entries of new grains not yet in the file (grain index -> sector): written
   * at the next flush behind one barrier after all their data, as vdi's and
   * parallels' are, instead of a barrier per allocation; lookups see them first.
   */
  private readonly waiting = new Map<number, number>();
  /** Next free sector for a new grain (QEMU's next_cluster_sector). */
  private nextSector: number;
  /** Header, descriptor, grain directories and the tables QEMU preallocates before the first grain. */
  private readonly metadata: MetadataRanges;

  private constructor(private readonly h: SparseHeader, o: SparseExtentOptions) {
    this.file = o.file;
    this.name = o.name;
    this.start = o.start;
    this.length = h.sectors * 512;
    this.type = o.type;
    this.grainBytes = h.grainSectors * 512;
    this.gtEntries = h.gtEntries;
    this.gtBytes = h.gtEntries * 4;
    this.compressed = h.compressed;
    this.hasMarker = (h.flags & FLAG_MARKER) !== 0 && h.magic === 'KDMV';
    this.zeroGrain = (h.flags & FLAG_ZERO_GRAIN) !== 0 && h.magic === 'KDMV';
    this.version = h.version;
    this.gdAtEnd = h.gdAtEnd;
    this.tables = new TableCache({ name: 'vmdk grain tables', file: o.file, tableSize: Math.max(1, this.gtBytes), maxBytes: o.cacheBytes, barriers: false, minTables: 16 });
    this.nextSector = Math.ceil(Math.ceil(o.file.size / 512) / h.grainSectors) * h.grainSectors;
    this.metadata = new MetadataRanges(o.name)
      .add(0, Math.max(512, h.grainOffset * 512), 'VMDK header and grain tables')
      .add(h.gdOffset, h.l1Size * 4, 'VMDK grain directory')
      .add(h.rgdOffset, h.rgdOffset === 0 ? 0 : h.l1Size * 4, 'VMDK redundant grain directory');
  }

  /** Refuse a grain write onto metadata: the header, the directories, any grain table. */
  private checkTarget(host: number, length: number, what: string): void {
    this.metadata.assertNoOverlap(host, length, what);
  }

  static async open(o: SparseExtentOptions): Promise<SparseExtent> {
    const e = new SparseExtent(o.header, o);
    e.l1 = await e.readDirectory(o.header.gdOffset, 'grain directory');
    if (o.header.rgdOffset !== 0) e.l1Backup = await e.readDirectory(o.header.rgdOffset, 'redundant grain directory');
    // Every grain table the directories name: no grain may be written over one.
    e.metadata.addTables(Array.from(e.l1, (s) => s * 512), e.gtBytes, 'VMDK grain table');
    if (e.l1Backup) e.metadata.addTables(Array.from(e.l1Backup, (s) => s * 512), e.gtBytes, 'VMDK redundant grain table');
    return e;
  }

  private async readDirectory(offset: number, what: string): Promise<Uint32Array> {
    const bytes = this.h.l1Size * 4;
    if (offset + bytes > this.file.size) throw new CorruptImageError(`${this.name}: VMDK ${what} at 0x${offset.toString(16)} lies outside the file`);
    const buf = new Uint8Array(bytes);
    if (bytes > 0) await this.file.read(offset, buf);
    return decodeLE32(buf);
  }

  /** The grain table for L1 index l1i, or undefined when the directory has none. */
  private async table(l1i: number): Promise<Buffer | undefined> {
    if (l1i >= this.l1.length) throw new CorruptImageError(`${this.name}: VMDK grain directory index ${l1i} out of range`);
    const sector = this.l1[l1i]!;
    if (sector === 0) return undefined;
    const off = sector * 512;
    if (off + this.gtBytes > this.file.size) throw new CorruptImageError(`${this.name}: VMDK grain table at 0x${off.toString(16)} lies outside the file`);
    return (await this.tables.get(off, this.gtBytes)).data;
  }

  /** Entry idx of grain table l1i (t, its bytes): a new grain's entry waiting for the next flush first. */
  private entry(t: Buffer | undefined, l1i: number, idx: number): Entry {
    const waiting = this.waiting.size > 0 ? this.waiting.get(l1i * this.gtEntries + idx) : undefined;
    const v = waiting ?? (t ? t.readUInt32LE(idx * 4) : 0);
    if (v === 0) return { kind: 'unallocated' };
    if (this.zeroGrain && v === GTE_ZEROED) return { kind: 'zero' };
    return this.compressed ? { kind: 'compressed', host: v * 512 } : { kind: 'data', host: v * 512 };
  }

  async map(rel: number, length: number): Promise<MappedRun[]> {
    const gb = this.grainBytes;
    const out: MappedRun[] = [];
    const end = rel + length;
    let pos = rel;
    while (pos < end) {
      const grain = Math.floor(pos / gb);
      const l1i = Math.floor(grain / this.gtEntries);
      const t = await this.table(l1i);
      const tableEnd = Math.min(end, (l1i + 1) * this.gtEntries * gb);
      // No table: the whole span is unallocated, one run (a 1 TiB sparse disk has 16
      // million grains; walking each took half a minute for one SEEK_DATA).
      if (!t) {
        pushRun(out, { kind: 'unallocated', offset: this.start + pos, length: tableEnd - pos });
        pos = tableEnd;
        continue;
      }
      while (pos < tableEnd) {
        const g = Math.floor(pos / gb);
        const n = Math.min(tableEnd, (g + 1) * gb) - pos;
        const inGrain = pos - g * gb;
        const e = this.entry(t, l1i, g % this.gtEntries);
        const offset = this.start + pos;
        if (e.kind === 'data') {
          if (e.host + inGrain + n > this.file.size) {
            throw new CorruptImageError(`${this.name}: VMDK grain at 0x${e.host.toString(16)} (guest 0x${offset.toString(16)}) lies outside the file`);
          }
          pushRun(out, { kind: 'data', offset, length: n, host: e.host + inGrain, file: this.file, metadata: this.metadata });
        } else if (e.kind === 'compressed') {
          const host = e.host;
          const run: MappedRun = { kind: 'custom', offset, length: n, read: (dst) => this.readCompressed(host, inGrain, dst) };
          // A whole grain behind its marker: where its stream lies, for the read map's threads (at most what QEMU reads: twice a grain).
          if (this.hasMarker && inGrain === 0 && n === gb && host < this.file.size) {
            run.compressed = { host, length: Math.min(MARKER_HEADER + 2 * gb, this.file.size - host), stream: 'vmdk-grain' };
            run.file = this.file;
          }
          out.push(run);
        } else {
          pushRun(out, { kind: e.kind, offset, length: n });
        }
        pos += n;
      }
    }
    return out;
  }

  private async grain(host: number): Promise<Buffer> {
    const hit = this.grains.get(host);
    if (hit) return hit;
    const g = await readCompressedGrain(this.file, host, this.grainBytes, this.hasMarker, this.name);
    this.grains.set(host, g);
    if (this.grains.size > GRAIN_CACHE) this.grains.delete(this.grains.keys().next().value!);
    return g;
  }

  private async readCompressed(host: number, inGrain: number, dst: Uint8Array): Promise<void> {
    const g = await this.grain(host);
    if (inGrain + dst.length > g.length) throw new CorruptImageError(`${this.name}: compressed grain at 0x${host.toString(16)} is too short`);
    dst.set(g.subarray(inGrain, inGrain + dst.length));
  }

  /** Guest bytes [a, b) of the extent as they read now (for read-modify-write of a grain). */
  private async current(a: number, dst: Uint8Array, ctx: WriteContext): Promise<void> {
    const runs = await this.map(a, dst.length);
    await Promise.all(
      runs.map((r) => {
        const part = dst.subarray(r.offset - this.start - a, r.offset - this.start - a + r.length);
        switch (r.kind) {
          case 'data':
            return this.file.read(r.host, part);
          case 'custom':
            return r.read(part);
          case 'zero':
            part.fill(0);
            return Promise.resolve();
          case 'unallocated':
            return ctx.readBacking(r.offset, part);
        }
      }),
    );
  }

  private checkWritable(t: Buffer | undefined, l1i: number): Buffer {
    if (!t) throw new UnsupportedError(`${this.name}: VMDK grain directory entry ${l1i} has no grain table; writing there is not supported`);
    return t;
  }

  async write(rel: number, src: Uint8Array, ctx: WriteContext): Promise<void> {
    if (this.compressed) return this.writeCompressed(rel, src, ctx);
    const gb = this.grainBytes;
    const end = rel + src.length;
    let pos = rel;
    while (pos < end) {
      const l1i = Math.floor(Math.floor(pos / gb) / this.gtEntries);
      const tableEnd = Math.min(end, (l1i + 1) * this.gtEntries * gb);
      const t = this.checkWritable(await this.table(l1i), l1i);
      const g0 = Math.floor(pos / gb);
      const g1 = Math.ceil(tableEnd / gb);
      let g = g0;
      while (g < g1) {
        const e = this.entry(t, l1i, g % this.gtEntries);
        if (e.kind === 'data') {
          // In place; neighbours contiguous on disk go in one write.
          let h = g + 1;
          while (h < g1) {
            const n = this.entry(t, l1i, h % this.gtEntries);
            if (n.kind !== 'data' || n.host !== e.host + (h - g) * gb) break;
            h++;
          }
          const from = Math.max(pos, g * gb);
          const to = Math.min(tableEnd, h * gb);
          if (e.host + (to - g * gb) > this.file.size) throw new CorruptImageError(`${this.name}: VMDK grain at 0x${e.host.toString(16)} lies outside the file`);
          this.checkTarget(e.host + (from - g * gb), to - from, `VMDK grain ${g}`);
          await this.file.write(e.host + (from - g * gb), src.subarray(from - rel, to - rel));
          g = h;
          continue;
        }
        let h = g + 1;
        while (h < g1 && this.entry(t, l1i, h % this.gtEntries).kind !== 'data') h++;
        await this.allocate(g, h, l1i, Math.max(pos, g * gb), Math.min(tableEnd, h * gb), src.subarray(Math.max(pos, g * gb) - rel, Math.min(tableEnd, h * gb) - rel), ctx);
        g = h;
      }
      pos = tableEnd;
    }
  }

  /** Sectors for `sectors` more, at the end of the file; QEMU's next_cluster_sector. */
  private claim(sectors: number): number {
    const at = this.nextSector;
    if (at + sectors > MAX_EXTENT_SECTORS) throw new IoError(`${this.name}: VMDK extent is full (grain offsets are 32-bit sectors)`, constants.errno.ENOSPC);
    this.nextSector = at + sectors;
    return at;
  }

  /**
   * New grains [g, h) (all in table l1i) holding the guest bytes [from, to): the grains
   * are written whole (the rest from the backing file unless zeroed, else zeros, which
   * writeIntoNew allocates without writing where the file can); their table entries
   * wait in memory for the next flush (writeWaiting).
   */
  private async allocate(g: number, h: number, l1i: number, from: number, to: number, data: Uint8Array, ctx: WriteContext): Promise<void> {
    const gb = this.grainBytes;
    const t = this.checkWritable(await this.table(l1i), l1i);
    const first = this.entry(t, l1i, g % this.gtEntries);
    const last = this.entry(t, l1i, (h - 1) % this.gtEntries);
    const bytes = (h - g) * gb;
    const head = from - g * gb;
    const tailStart = to - g * gb;
    // Of grain bytes [a, b) the write leaves, how many read from the backing file (none past the extent or the backing file's end).
    const backed = (e: Entry, a: number, b: number): number => (e.kind === 'unallocated' ? Math.max(0, Math.min(b, this.length - g * gb, ctx.backingEnd - this.start - g * gb) - a) : 0);
    let buf: Buffer | undefined;
    if (backed(first, 0, head) > 0 || backed(last, tailStart, bytes) > 0) {
      const whole = Buffer.alloc(bytes);
      const fill = async (e: Entry, a: number, b: number): Promise<void> => {
        const n = backed(e, a, b);
        if (n > 0) await ctx.readBacking(this.start + g * gb + a, whole.subarray(a, a + n));
      };
      await Promise.all([fill(first, 0, head), fill(last, tailStart, bytes)]);
      whole.set(data, head);
      buf = whole;
    }
    const sector = this.claim(bytes / 512);
    this.checkTarget(sector * 512, bytes, `new VMDK grain ${g}`);
    if (buf) await this.file.write(sector * 512, buf);
    else await writeIntoNew(this.file, sector * 512, bytes, head, data);
    for (let k = g; k < h; k++) this.waiting.set(k, sector + (k - g) * (gb / 512));
    // Bounded memory between flushes: 64 Ki entries (4 GiB of 64 KiB grains) at most.
    if (this.waiting.size >= WAITING_MAX) await this.writeWaiting(ctx);
  }

  /**
   * The table entries of new grains (both copies), behind a barrier after their data:
   * at a flush, before a check reads the tables, and when many wait. The caller holds
   * the node's mutex.
   */
  async writeWaiting(ctx: WriteContext): Promise<void> {
    if (this.waiting.size === 0) return;
    await ctx.barrier(this.file);
    const grains = [...this.waiting.keys()].sort((a, b) => a - b);
    for (let i = 0; i < grains.length; ) {
      // Neighbours in one table go together.
      const l1i = Math.floor(grains[i]! / this.gtEntries);
      let j = i + 1;
      while (j < grains.length && grains[j] === grains[j - 1]! + 1 && Math.floor(grains[j]! / this.gtEntries) === l1i) j++;
      await this.setEntries(l1i, grains[i]! % this.gtEntries, grains.slice(i, j).map((g) => this.waiting.get(g)!));
      i = j;
    }
  }

  /** Table entries [idx, idx + values.length) of table l1i, in memory and on disk (both copies). */
  private async setEntries(l1i: number, idx: number, values: number[]): Promise<void> {
    this.checkWritable(await this.table(l1i), l1i);
    const sector = this.l1[l1i]!;
    const bytes = Buffer.alloc(values.length * 4);
    values.forEach((x, k) => bytes.writeUInt32LE(x, k * 4));
    await this.tables.writeThrough(sector * 512, idx * 4, bytes);
    // On disk now: an older entry waiting for these grains must not follow it there.
    if (this.waiting.size > 0) for (let k = 0; k < values.length; k++) this.waiting.delete(l1i * this.gtEntries + idx + k);
    const backup = this.l1Backup?.[l1i] ?? 0;
    // A redundant directory entry of 0 has no table to update (QEMU would write into the header).
    if (backup !== 0 && backup * 512 + this.gtBytes <= this.file.size) await this.file.write(backup * 512 + idx * 4, bytes);
  }

  /**
   * streamOptimized: every grain touched is written anew, deflated behind a marker at
   * the end of the file, and its table entry moved there (QEMU's order: data, then
   * entry). Partial grains are merged with what they read as now.
   */
  private async writeCompressed(rel: number, src: Uint8Array, ctx: WriteContext): Promise<void> {
    const gb = this.grainBytes;
    const end = rel + src.length;
    const parts: Buffer[] = [];
    const updates: { l1i: number; idx: number; offset: number }[] = [];
    let bytes = 0;
    for (let g = Math.floor(rel / gb); g * gb < end; g++) {
      const gStart = g * gb;
      const len = Math.min(gb, this.length - gStart);
      const grain = Buffer.alloc(len);
      const from = Math.max(rel, gStart);
      const to = Math.min(end, gStart + len);
      if (from > gStart) await this.current(gStart, grain.subarray(0, from - gStart), ctx);
      if (to < gStart + len) await this.current(to, grain.subarray(to - gStart), ctx);
      grain.set(src.subarray(from - rel, to - rel), from - gStart);
      const l1i = Math.floor(g / this.gtEntries);
      this.checkWritable(await this.table(l1i), l1i);
      const enc = encodeCompressedGrain(this.start + gStart, grain);
      parts.push(enc);
      updates.push({ l1i, idx: g % this.gtEntries, offset: bytes });
      bytes += enc.length;
    }
    const sector = this.claim(bytes / 512);
    await this.file.write(sector * 512, Buffer.concat(parts, bytes));
    await ctx.barrier(this.file);
    for (const u of updates) await this.setEntries(u.l1i, u.idx, [sector + u.offset / 512]);
  }

  async zero(rel: number, length: number, _unmap: boolean, ctx: WriteContext): Promise<void> {
    const gb = this.grainBytes;
    const end = rel + length;
    let pos = rel;
    while (pos < end) {
      const g = Math.floor(pos / gb);
      const l1i = Math.floor(g / this.gtEntries);
      const gEnd = Math.min(end, (g + 1) * gb);
      const t = await this.table(l1i);
      const e = this.entry(t, l1i, g % this.gtEntries);
      const whole = pos === g * gb && gEnd === (g + 1) * gb;
      if (e.kind === 'zero' || (e.kind === 'unallocated' && !ctx.hasBacking)) {
        // Already reads as zeros.
      } else if (whole && this.zeroGrain && t) {
        // Batch the run of whole grains in this table (QEMU's zeroed-grain write).
        let h = g + 1;
        const tableEndGrain = (l1i + 1) * this.gtEntries;
        while (h < tableEndGrain && (h + 1) * gb <= end) h++;
        await this.setEntries(l1i, g % this.gtEntries, new Array<number>(h - g).fill(GTE_ZEROED));
        pos = h * gb;
        continue;
      } else {
        await this.write(pos, new Uint8Array(gEnd - pos), ctx);
      }
      pos = gEnd;
    }
  }

  /**
   * qemu-img check for this extent (QEMU 7.2's vmdk_co_check walks every grain and
   * stops at the first that points past the end of its file). Here every grain is
   * walked and each bad one counted: a grain table or grain past the end of the file,
   * a grain table on the header or a grain directory, a grain on any metadata (a later
   * write there would overwrite a table). One grain table in memory at a time.
   */
  async check(report: CheckReport): Promise<void> {
    const gb = this.grainBytes;
    const grains = Math.ceil(this.length / gb);
    const tables = Math.min(this.l1.length, Math.ceil(grains / this.gtEntries));
    const meta = new MetadataRanges(this.name)
      .add(0, 512, 'VMDK header')
      .add(this.h.gdOffset, this.h.l1Size * 4, 'VMDK grain directory')
      .add(this.h.rgdOffset, this.h.rgdOffset === 0 ? 0 : this.h.l1Size * 4, 'VMDK redundant grain directory');
    const t = Buffer.alloc(this.gtBytes);
    const bad = (msg: string): void => addCorruption(report, `ERROR: ${msg}`);
    for (let l1i = 0; l1i < tables; l1i++) {
      const sector = this.l1[l1i]!;
      if (sector === 0) continue;
      const first = (this.start + l1i * this.gtEntries * gb) / 512;
      const off = sector * 512;
      if (off + this.gtBytes > this.file.size) {
        bad(`grain table for sector ${first} at 0x${off.toString(16)} points after EOF`);
        continue;
      }
      const hit = meta.overlap(off, this.gtBytes);
      if (hit !== undefined) {
        bad(`grain table for sector ${first} at 0x${off.toString(16)} overlaps the ${hit}`);
        continue;
      }
      await this.file.read(off, t);
      const n = Math.min(this.gtEntries, grains - l1i * this.gtEntries);
      for (let i = 0; i < n; i++) {
        const e = this.entry(t, l1i, i);
        if (e.kind !== 'data' && e.kind !== 'compressed') continue;
        const sectorNum = first + (i * gb) / 512;
        // QEMU's own message for the one problem it finds.
        if (e.host >= this.file.size) {
          bad(`cluster offset for sector ${sectorNum} points after EOF`);
          continue;
        }
        // A compressed grain's length is in its marker; its first sector must be free of metadata.
        const clash = this.metadata.overlap(e.host, e.kind === 'data' ? gb : 512);
        if (clash !== undefined) bad(`cluster offset for sector ${sectorNum} (0x${e.host.toString(16)}) overlaps the ${clash}`);
      }
    }
  }

  /** For qemu-img-info-like reporting and tests. */
  get clusterSize(): number {
    return this.grainBytes;
  }
}

function decodeLE32(buf: Uint8Array): Uint32Array {
  const out = new Uint32Array(buf.length / 4);
  const v = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  for (let i = 0; i < out.length; i++) out[i] = v.getUint32(i * 4, true);
  return out;
}
