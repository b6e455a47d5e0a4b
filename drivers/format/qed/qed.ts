// The QED format node (QEMU's block/qed.c): mapping through L1/L2 tables, reads via
// the shared mapped read path, allocating writes in QEMU's order: the need-check
// flag, then the data (and a flush when a backing file shows through), then a new
// L2 table, then the L1 or L2 entry that points at it. The flag is cleared on flush.
import type { BlockNode, CheckReport, RepairFixed, TruncateOptions } from '../../types.js';
import { CorruptImageError, UnsupportedError, UsageError } from '../../errors.js';
import { refusePreallocation } from '../../resize.js';
import { readFromBacking } from '../backing.js';
import { MetadataRanges, tableOffsets } from '../metadata-ranges.js';
import { pushRun, writeIntoNew, type MappedRun } from '../mapped.js';
import { MappedNode } from '../mapped-node.js';
import { encodeFeatures, encodeHeader, ENTRY, FEATURE, HDR, HEADER_BYTES, LIMITS, maxImageSize, type QedHeader } from './header.js';
import { entryAt, type TablePages } from './tables.js';
import { checkAndRepair, qedCheck } from './check.js';

export interface QedNodeOptions {
  file: BlockNode;
  header: QedHeader;
  readOnly: boolean;
  backing: BlockNode | undefined;
  pages: TablePages;
  barriers: boolean;
}

/** Bytes written per request when zeroing has to write data. */
const ZERO_CHUNK = 1 << 20;

export class QedNode extends MappedNode {
  private h: QedHeader;
  private readonly cs: number;
  private readonly tableEntries: number;
  /** Guest bytes one L2 table maps. */
  private readonly l2Span: number;
  private readonly headerBytes: number;
  private readonly pages: TablePages;
  /** Where the next cluster goes: the file size rounded down to a cluster, then grown (QEMU's s->file_size). */
  private fileEnd: number;
  private features: bigint;
  /** Header, L1 table and (for a writer) every L2 table: no guest data may be written there. */
  readonly metadata: MetadataRanges;

  constructor(o: QedNodeOptions) {
    super({ file: o.file, size: o.header.imageSize, readOnly: o.readOnly, barriers: o.barriers, backing: o.backing, allocationUnit: o.header.clusterSize });
    this.h = o.header;
    this.cs = o.header.clusterSize;
    this.tableEntries = (o.header.clusterSize * o.header.tableSize) / 8;
    this.l2Span = this.tableEntries * this.cs;
    this.headerBytes = o.header.headerSize * this.cs;
    this.pages = o.pages;
    this.fileEnd = Math.floor(o.file.size / this.cs) * this.cs;
    this.features = o.header.features;
    this.metadata = new MetadataRanges(o.file.name)
      .add(0, this.headerBytes, 'qed header')
      .add(o.header.l1TableOffset, this.tableEntries * 8, 'qed L1 table');
  }

  /** A writer knows every L2 table, so no data write lands on one (as qcow2's overlap checks). */
  async trackTables(): Promise<void> {
    this.metadata.addTables(await tableOffsets(this.file, this.h.l1TableOffset, this.tableEntries, 8, true, Number), this.tableEntries * 8, 'qed L2 table');
  }

  private corrupt(what: string, value: number): CorruptImageError {
    return new CorruptImageError(`${this.name}: qed ${what} 0x${value.toString(16)} is invalid or outside the file`);
  }

  /** The L2 table offset for L1 index l1i, 0 when unallocated; a bad one throws. */
  private async l2Offset(l1i: number): Promise<number> {
    const off = await this.pages.get(this.h.l1TableOffset, l1i);
    if (off === 0) return 0;
    const tableBytes = this.tableEntries * 8;
    if (off % this.cs !== 0 || off < this.headerBytes || off + tableBytes > this.fileEnd) throw this.corrupt('L2 table offset', off);
    return off;
  }

  private validCluster(off: number): boolean {
    return off % this.cs === 0 && off >= this.headerBytes && off < this.fileEnd;
  }

  /** Runs covering [offset, offset + length): data, zero (zero clusters) or unallocated. */
  async mapRange(offset: number, length: number): Promise<MappedRun[]> {
    const out: MappedRun[] = [];
    const end = offset + length;
    let pos = offset;
    while (pos < end) {
      const l1i = Math.floor(pos / this.l2Span);
      const spanEnd = Math.min(end, (l1i + 1) * this.l2Span);
      const l2 = await this.l2Offset(l1i);
      if (l2 === 0) {
        pushRun(out, { kind: 'unallocated', offset: pos, length: spanEnd - pos });
        pos = spanEnd;
        continue;
      }
      while (pos < spanEnd) {
        const l2i = Math.floor(pos / this.cs) % this.tableEntries;
        const page = await this.pages.page(l2, l2i);
        const pageEnd = Math.min(spanEnd, l1i * this.l2Span + (page.first + page.count) * this.cs);
        while (pos < pageEnd) {
          const i = Math.floor(pos / this.cs) % this.tableEntries;
          const e = entryAt(page, i, this.name);
          const clusterEnd = Math.min(pageEnd, (Math.floor(pos / this.cs) + 1) * this.cs);
          const len = clusterEnd - pos;
          if (e === ENTRY.unallocated) pushRun(out, { kind: 'unallocated', offset: pos, length: len });
          else if (e === ENTRY.zero) pushRun(out, { kind: 'zero', offset: pos, length: len });
          else if (!this.validCluster(e)) throw this.corrupt('cluster offset', e);
          else pushRun(out, { kind: 'data', offset: pos, length: len, host: e + (pos % this.cs) });
          pos = clusterEnd;
        }
      }
    }
    return out;
  }

  protected writeLocked(offset: number, src: Uint8Array): Promise<void> {
    return this.writeRange(offset, src.length, src);
  }

  /**
   * Write src at [offset, offset + length), or without src make whole clusters read
   * as zeros; the caller holds the mutex.
   */
  private async writeRange(offset: number, length: number, src: Uint8Array | undefined): Promise<void> {
    const end = offset + length;
    let pos = offset;
    while (pos < end) {
      const l1i = Math.floor(pos / this.l2Span);
      const chunkEnd = Math.min(end, (l1i + 1) * this.l2Span);
      await this.writeInTable(l1i, pos, chunkEnd, src?.subarray(pos - offset, chunkEnd - offset));
      pos = chunkEnd;
    }
  }

  private async writeInTable(l1i: number, pos: number, end: number, data: Uint8Array | undefined): Promise<void> {
    const cs = this.cs;
    const zero = data === undefined;
    const first = Math.floor(pos / cs);
    const count = Math.ceil(end / cs) - first;
    const base = l1i * this.tableEntries;
    let l2 = await this.l2Offset(l1i);
    if (zero && l2 === 0 && !(this.backing && this.backing.size > pos)) return;
    const entries: number[] = [];
    for (let k = 0; k < count; ) {
      if (l2 === 0) {
        entries.push(ENTRY.unallocated);
        k++;
        continue;
      }
      const page = await this.pages.page(l2, first + k - base);
      for (; k < count && first + k - base < page.first + page.count; k++) {
        const e = entryAt(page, first + k - base, this.name);
        if (e > ENTRY.zero && !this.validCluster(e)) throw this.corrupt('cluster offset', e);
        entries.push(e);
      }
    }
    const part = (a: number, b: number): Uint8Array => data!.subarray(a - pos, b - pos);
    const updates: { index: number; values: number[] }[] = [];
    let i = 0;
    while (i < count) {
      const e = entries[i]!;
      let j = i + 1;
      const allocated = e > ENTRY.zero;
      while (j < count && entries[j]! > ENTRY.zero === allocated) j++;
      const from = Math.max(pos, (first + i) * cs);
      const to = Math.min(end, (first + j) * cs);
      if (allocated) {
        for (let k = i; k < j; k++) {
          const a = Math.max(from, (first + k) * cs);
          const b = Math.min(to, (first + k + 1) * cs);
          const at = entries[k]! + (a % cs);
          this.metadata.assertNoOverlap(at, b - a, `qed cluster ${first + k}`);
          if (zero) await this.zeroFile(at, b - a);
          else await this.file.write(at, part(a, b));
        }
      } else if (zero) {
        // Whole clusters only reach here when zeroing: mark them as zero clusters.
        const values: number[] = [];
        for (let k = i; k < j; k++) values.push(ENTRY.zero);
        if (entries.slice(i, j).some((v) => v !== ENTRY.zero)) updates.push({ index: first + i - base, values });
      } else {
        await this.markNeedCheck();
        const host = this.fileEnd;
        const g0 = (first + i) * cs;
        this.fileEnd += (j - i) * cs;
        if (this.backedBytes(entries[i]!, g0, from) === 0 && this.backedBytes(entries[j - 1]!, to, (first + j) * cs) === 0) {
          // Zeros around the data: allocated without writing them where the file can.
          await writeIntoNew(this.file, host, (j - i) * cs, from - g0, part(from, to));
        } else {
          await this.fillNew(first + i, host, entries[i]!, g0, from);
          await this.file.write(host + (from - g0), part(from, to));
          await this.fillNew(first + j - 1, host + (j - 1 - i) * cs, entries[j - 1]!, to, (first + j) * cs);
        }
        const values: number[] = [];
        for (let k = i; k < j; k++) values.push(host + (k - i) * cs);
        updates.push({ index: first + i - base, values });
      }
      i = j;
    }
    if (updates.length === 0) return;
    await this.markNeedCheck();
    // The data must be on disk before a table points at it, when the old bytes came from a backing file.
    if (this.backing) await this.barrier();
    if (l2 === 0) {
      l2 = this.fileEnd;
      const tableBytes = this.tableEntries * 8;
      this.fileEnd += tableBytes;
      this.metadata.add(l2, tableBytes, 'qed L2 table');
      await this.zeroFile(l2, tableBytes);
      for (const u of updates) await this.file.write(l2 + u.index * 8, encodeEntries(u.values));
      await this.barrier();
      await this.pages.set(this.h.l1TableOffset, l1i, l2);
      return;
    }
    for (const u of updates) {
      await this.file.write(l2 + u.index * 8, encodeEntries(u.values));
      u.values.forEach((v, k) => this.pages.patch(l2, u.index + k, v));
    }
  }

  /**
   * An overwrite of an allocated cluster needs nothing of the format (the need-check
   * flag is for table changes): the FUSE workers may write it. New L2 tables are added
   * to the metadata, which ends what the workers may write (layoutGeneration).
   */
  protected override writesAroundReady(): boolean {
    return true;
  }

  /**
   * Guest bytes [a, b) of guest cluster gc (newly placed at host) as they read before:
   * from the backing file, or zeros (for a zero cluster, or past the backing file).
   */
  private async fillNew(gc: number, host: number, old: number, a: number, b: number): Promise<void> {
    if (b <= a) return;
    const at = host + (a - gc * this.cs);
    const backed = this.backedBytes(old, a, b);
    if (backed > 0) {
      const buf = Buffer.alloc(backed);
      await readFromBacking(this.backing, a, buf);
      await this.file.write(at, buf);
    }
    if (a + backed < b) await this.zeroFile(at + backed, b - a - backed);
  }

  /** Of guest bytes [a, b) of a cluster whose entry is `old`, how many read from the backing file (the rest read as zeros). */
  private backedBytes(old: number, a: number, b: number): number {
    return old === ENTRY.unallocated && this.backing ? Math.max(0, Math.min(b, this.backing.size) - a) : 0;
  }

  private async zeroFile(at: number, length: number): Promise<void> {
    if (this.file.zero) return this.file.zero(at, length, false);
    const chunk = Buffer.alloc(Math.min(length, ZERO_CHUNK));
    for (let done = 0; done < length; done += chunk.length) await this.file.write(at + done, chunk.subarray(0, Math.min(chunk.length, length - done)));
  }

  /** Set the need-check flag on disk before the first metadata change (qed_should_set_need_check). */
  private async markNeedCheck(): Promise<void> {
    if (this.features & FEATURE.needCheck) return;
    this.features |= FEATURE.needCheck;
    await this.file.write(HDR.features, encodeFeatures(this.features));
    await this.barrier();
  }

  async zero(offset: number, length: number, unmap: boolean): Promise<void> {
    void unmap;
    const cs = this.cs;
    const end = offset + length;
    const a = Math.ceil(offset / cs) * cs;
    // The last, partial cluster of the disk counts as whole.
    const b = end === this.size ? Math.ceil(end / cs) * cs : Math.floor(end / cs) * cs;
    await this.mutex.run(async () => {
      if (a >= b) return this.zeroPartial(offset, end);
      if (offset < a) await this.zeroPartial(offset, a);
      // Unallocated clusters no backing file shows through stay as they are.
      await this.writeRange(a, b - a, undefined);
      if (b < end) await this.zeroPartial(b, end);
    });
  }

  private async zeroPartial(a: number, b: number): Promise<void> {
    for (let pos = a; pos < b; pos += ZERO_CHUNK) {
      const n = Math.min(ZERO_CHUNK, b - pos);
      await this.writeRange(pos, n, Buffer.alloc(n));
    }
  }

  /** qemu-img check: the walk of block/qed-check.c without fixing anything. */
  async checkMetadata(): Promise<CheckReport> {
    return this.mutex.run(async () => {
      const r: CheckReport & { error?: unknown; corruptionsFixed?: number } = await qedCheck(this.file, this.h, false);
      delete r.error;
      delete r.corruptionsFixed;
      return { ...r, repairAlways: true };
    });
  }

  /**
   * qemu-img check -r: QEMU's qed check fixes whatever it can under either mode
   * (bdrv_qed_co_check passes !!fix), so 'leaks' drops bad entries too. Leaks
   * themselves stay: QED has no way to free a cluster.
   */
  get repairMetadata(): ((mode: 'leaks' | 'all') => Promise<RepairFixed>) | undefined {
    if (this.readOnly) return undefined;
    return () =>
      this.mutex.run(async () => {
        const { result, features } = await checkAndRepair(this.file, { ...this.h, features: this.features }, this.barriers);
        this.features = features;
        return { leaks: 0, corruptions: result.corruptionsFixed };
      });
  }

  /**
   * Grow the disk (QEMU's bdrv_qed_co_truncate): the header's size is all there is to
   * change, the L1 table spans the largest size the header allows already. QEMU's
   * refusals, in its order: zeroing a new area a longer backing file would show (no
   * zero flag in QED), preallocation, a size the tables cannot map, shrinking.
   */
  async truncate(size: number, o: TruncateOptions = {}): Promise<void> {
    if (o.zeroNew) throw new UnsupportedError(`${this.name}: Block driver does not support requested flags`);
    refusePreallocation(o);
    if (size % 512 !== 0 || size > maxImageSize(this.cs, this.h.tableSize)) throw new UsageError(`${this.name}: Invalid image size specified`);
    if (size < this.size) throw new UnsupportedError(`${this.name}: Shrinking images is currently not supported`);
    if (size === this.size) return;
    await this.mutex.run(async () => {
      const field = Buffer.alloc(8);
      field.writeBigUInt64LE(BigInt(size));
      await this.file.write(HDR.imageSize, field);
      // qed_write_header_sync
      await this.file.flush();
      this.h = { ...this.h, imageSize: size };
      this.sizeChanged(size);
    });
  }

  /**
   * Name another backing file, or none (tsimg rebase; QEMU's
   * bdrv_qed_change_backing_file): the header and the name right after it, in one
   * write and a flush. The features say whether there is one and whether it is raw
   * (read without probing, the only format QED records). The name must fit in the
   * header clusters; an image with compat features this code does not know may lay
   * out more after the header, so it takes no name, as in QEMU.
   */
  async setBacking(file: string | undefined, format: string | undefined): Promise<void> {
    if (file !== undefined && this.h.compatFeatures !== 0n) throw new UnsupportedError(`${this.name}: Could not change the backing file to '${file}': Operation not supported`);
    const name = Buffer.from(file ?? '', 'utf8');
    if (name.length > LIMITS.maxBackingNameLength || HEADER_BYTES + name.length > this.headerBytes) throw new UsageError(`${this.name}: Could not change the backing file to '${file}': No space left on device`);
    await this.mutex.run(async () => {
      let features = this.features & ~(FEATURE.backingFile | FEATURE.backingFormatNoProbe);
      if (file !== undefined) features |= format === 'raw' ? FEATURE.backingFile | FEATURE.backingFormatNoProbe : FEATURE.backingFile;
      const h: QedHeader = { ...this.h, features, backingFilenameOffset: HEADER_BYTES, backingFilenameSize: name.length };
      await this.file.write(0, Buffer.concat([encodeHeader(h), name]));
      await this.file.flush();
      this.h = h;
      this.features = features;
    });
  }

  protected override async flushLocked(): Promise<void> {
    await this.file.flush();
    // Clean again: the next open needs no check (bdrv_qed_close, qed_need_check_timer).
    if (this.features & FEATURE.needCheck) {
      this.features &= ~FEATURE.needCheck;
      await this.file.write(HDR.features, encodeFeatures(this.features));
      await this.file.flush();
    }
  }
}

function encodeEntries(values: number[]): Buffer {
  const b = Buffer.alloc(values.length * 8);
  values.forEach((v, k) => b.writeBigUInt64LE(BigInt(v), k * 8));
  return b;
}
