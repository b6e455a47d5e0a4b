// The Parallels format node (QEMU's block/parallels.c). Clusters are allocated at
// data_end, the end of the data area; the cluster's bytes go first, its BAT entry
// after. The file is trimmed to data_end and the in-use mark cleared on close.
import type { BlockNode, CheckReport, RepairFixed } from '../../types.js';
import { CorruptImageError } from '../../errors.js';
import type { MappedRun } from '../mapped.js';
import { MappedNode } from '../mapped-node.js';
import { HDR, INUSE_MAGIC, SECTOR, type ParallelsHeader } from './header.js';
import { parallelsCheck } from './check.js';
import type { PagedTable } from '../table-pages.js';
import type { MetadataRanges } from '../metadata-ranges.js';

export class ParallelsNode extends MappedNode {
  /** Parallels works in sectors: unaligned writes become read-modify-write above. */
  readonly requestAlignment = SECTOR;
  private readonly cs: number;
  /** Sectors per BAT unit: a cluster for the "Ext" header, a sector for the old one. */
  private readonly multiplier: number;
  /** End of the data area, in sectors. */
  private dataEnd: number;
  /** A repair of leaks only leaves the in-use mark (a corruption) for a repair of all. */
  private keepInuse = false;

  constructor(
    file: BlockNode,
    private readonly h: ParallelsHeader,
    private readonly bat: PagedTable,
    readonly metadata: MetadataRanges,
    /** End of the data area in sectors (0 when read-only: nothing is allocated). */
    dataEnd: number,
    readOnly: boolean,
    barriers: boolean,
  ) {
    super({ file, size: h.sectors * SECTOR, readOnly, barriers, allocationUnit: h.tracks * SECTOR });
    this.cs = h.tracks * SECTOR;
    this.multiplier = h.ext ? h.tracks : 1;
    this.dataEnd = dataEnd;
  }

  /** Host byte offset of cluster c, or undefined when unallocated; a bad entry throws. */
  private async host(c: number): Promise<number | undefined> {
    if (c >= this.bat.entries) return undefined;
    const e = await this.bat.u32(c);
    if (e === 0) return undefined;
    const host = e * this.multiplier * SECTOR;
    if (host > this.file.size) throw new CorruptImageError(`${this.name}: parallels cluster ${c} at 0x${host.toString(16)} lies outside the file`);
    return host;
  }

  mapRange(offset: number, length: number): Promise<MappedRun[]> {
    return this.mapBlocks(offset, length, this.cs, async (c) => (await this.host(c)) ?? 'unallocated');
  }

  protected async writeLocked(offset: number, src: Uint8Array): Promise<void> {
    const cs = this.cs;
    const end = offset + src.length;
    const first = Math.floor(offset / cs);
    const count = Math.ceil(end / cs) - first;
    let i = 0;
    while (i < count) {
      const allocated = (await this.host(first + i)) !== undefined;
      let j = i + 1;
      while (j < count && ((await this.host(first + j)) !== undefined) === allocated) j++;
      const from = Math.max(offset, (first + i) * cs);
      const to = Math.min(end, (first + j) * cs);
      if (allocated) {
        for (let c = first + i; c < first + j; c++) {
          const a = Math.max(from, c * cs);
          const b = Math.min(to, (c + 1) * cs);
          const host = (await this.host(c))! + (a % cs);
          this.metadata.assertNoOverlap(host, b - a, `parallels cluster ${c}`);
          await this.file.write(host, src.subarray(a - offset, b - offset));
        }
      } else {
        await this.allocate(first + i, j - i, from - (first + i) * cs, src.subarray(from - offset, to - offset));
      }
      i = j;
    }
  }

  /** An overwrite of an allocated cluster needs nothing of the format: the FUSE workers may write it. */
  protected override writesAroundReady(): boolean {
    return true;
  }

  /** Place clusters [c, c + n) at data_end with `data` at byte `at` in them; the rest reads as zeros. */
  private async allocate(c: number, n: number, at: number, data: Uint8Array): Promise<void> {
    if (c + n > this.h.batEntries) throw new CorruptImageError(`${this.name}: parallels BAT has no entry for cluster ${c + n - 1}`);
    const host = this.dataEnd * SECTOR;
    const bytes = n * this.cs;
    this.metadata.assertNoOverlap(host, bytes, `new parallels cluster ${c}`);
    if (this.h.ext && this.dataEnd % this.multiplier !== 0) {
      throw new CorruptImageError(`${this.name}: parallels data end (sector ${this.dataEnd}) is not cluster aligned`);
    }
    // Space past the end of the file reads as zeros; space inside it may hold old bytes.
    const inside = Math.min(bytes, this.file.size - host);
    if (inside > 0) {
      if (this.file.zero) await this.file.zero(host, inside, false);
      else await this.file.write(host, Buffer.alloc(inside));
    }
    await this.file.write(host + at, data);
    // The whole cluster belongs to the file before the BAT points at it.
    if (this.file.size < host + bytes) {
      if (this.file.truncate) await this.file.truncate(host + bytes);
      else await this.file.write(host + bytes - 1, Buffer.alloc(1));
    }
    this.dataEnd += n * this.h.tracks;
    // The BAT entries reach the file at the next flush, behind one barrier after all
    // new clusters (table-pages.ts later), not behind a barrier each.
    for (let k = 0; k < n; k++) {
      const e = Buffer.alloc(4);
      e.writeUInt32LE((host / SECTOR + k * this.h.tracks) / this.multiplier);
      this.bat.later(c + k, e);
    }
    if (this.bat.laterFull) await this.writeLater(this.bat);
  }

  protected override async flushLocked(): Promise<void> {
    await this.writeLater(this.bat);
    await this.file.flush();
  }

  /** qemu-img check: parallels_co_check's report, reading the header and the BAT only. */
  async checkMetadata(): Promise<CheckReport> {
    return this.mutex.run(async () => {
      await this.writeLater(this.bat);
      const r: CheckReport & { imageEnd?: number; outside?: number } = await parallelsCheck(this.file, this.h, this.bat);
      delete r.imageEnd;
      delete r.outside;
      return r;
    });
  }

  /**
   * qemu-img check -r: 'all' drops BAT entries past the end of the file and clears the
   * in-use mark; both modes cut the file after the last cluster in use. The cut and
   * the mark happen at close, which trims the file to data_end.
   */
  get repairMetadata(): ((mode: 'leaks' | 'all') => Promise<RepairFixed>) | undefined {
    if (this.readOnly) return undefined;
    return (mode) =>
      this.mutex.run(async () => {
        await this.writeLater(this.bat);
        const all = mode === 'all';
        const found = await parallelsCheck(this.file, this.h, this.bat, all);
        const fixed: RepairFixed = { leaks: 0, corruptions: 0 };
        if (all) {
          if (found.outside) await this.dropOutside();
          // The in-use mark counts as fixed here; close clears it.
          fixed.corruptions = found.corruptions;
        }
        this.keepInuse = !all && this.h.inuse === INUSE_MAGIC;
        // data_end follows the BAT as repaired; close trims the file to it (or, for a
        // cluster starting right at the end, extends it over that cluster).
        if (all || found.leaks) this.dataEnd = found.imageEnd / SECTOR;
        if (found.leaks && this.file.truncate) fixed.leaks = found.leaks;
        return fixed;
      });
  }

  /** Unmap every BAT entry whose cluster starts past the end of the file, a page at a time. */
  private async dropOutside(): Promise<void> {
    const size = this.file.size;
    for (let i = 0; i < this.bat.entries; ) {
      const pg = await this.bat.page(i);
      const bad: number[] = [];
      for (let k = 0; k < pg.count; k++) if (pg.view.getUint32(k * 4, true) * this.multiplier * SECTOR > size) bad.push(pg.first + k);
      for (const b of bad) await this.bat.write(b, Buffer.alloc(4));
      i = pg.first + pg.count;
    }
    await this.file.flush();
  }

  protected override async closeLayers(): Promise<void> {
    try {
      if (!this.readOnly) {
        await this.flush();
        // parallels_close: clean again, and no space past the data (unless the BAT
        // proved corrupt: then data_end may be short of clusters in use).
        const mark = Buffer.alloc(4);
        if (this.keepInuse) mark.writeUInt32LE(INUSE_MAGIC);
        await this.file.write(HDR.inuse, mark);
        if (this.file.truncate && !this.sawCorruption && this.file.size !== this.dataEnd * SECTOR) await this.file.truncate(this.dataEnd * SECTOR);
        await this.file.flush();
      }
    } finally {
      await this.file.close();
    }
  }
}
