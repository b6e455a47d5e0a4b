// The Parallels format node (QEMU's block/parallels.c). Clusters are allocated at
// data_end, the end of the data area; the cluster's bytes go first, its BAT entry
// after. The file is trimmed to data_end and the in-use mark cleared on close.
import type { BlockNode, Extent } from '../../types.js';
import { CorruptImageError } from '../../errors.js';
import { mappedStatus, pushRun, readMapped, writeInPlace, type MappedRun, type Mapper } from '../mapped.js';
import { Mutex } from '../../util/mutex.js';
import { HDR, SECTOR, type ParallelsHeader } from './header.js';
import type { PagedTable } from '../table-pages.js';
import type { MetadataRanges } from '../metadata-ranges.js';

export class ParallelsNode implements BlockNode, Mapper {
  /** Parallels works in sectors: unaligned writes become read-modify-write above. */
  readonly requestAlignment = SECTOR;
  readonly size: number;
  readonly readOnly: boolean;
  private readonly cs: number;
  /** Sectors per BAT unit: a cluster for the "Ext" header, a sector for the old one. */
  private readonly multiplier: number;
  private readonly mutex = new Mutex();
  /** End of the data area, in sectors. */
  private dataEnd: number;
  private closed = false;

  constructor(
    private readonly file: BlockNode,
    private readonly h: ParallelsHeader,
    private readonly bat: PagedTable,
    readonly metadata: MetadataRanges,
    /** End of the data area in sectors (0 when read-only: nothing is allocated). */
    dataEnd: number,
    readOnly: boolean,
    private readonly barriers: boolean,
  ) {
    this.size = h.sectors * SECTOR;
    this.readOnly = readOnly;
    this.cs = h.tracks * SECTOR;
    this.multiplier = h.ext ? h.tracks : 1;
    this.dataEnd = dataEnd;
  }

  get name(): string {
    return this.file.name;
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

  async mapRange(offset: number, length: number): Promise<MappedRun[]> {
    const out: MappedRun[] = [];
    const end = offset + length;
    for (let pos = offset; pos < end; ) {
      const c = Math.floor(pos / this.cs);
      const next = Math.min(end, (c + 1) * this.cs);
      const h = await this.host(c);
      if (h === undefined) pushRun(out, { kind: 'unallocated', offset: pos, length: next - pos });
      else pushRun(out, { kind: 'data', offset: pos, length: next - pos, host: h + (pos % this.cs) });
      pos = next;
    }
    return out;
  }

  read(offset: number, dst: Uint8Array): Promise<void> {
    return readMapped(this, this.file, undefined, offset, dst);
  }

  async write(offset: number, src: Uint8Array): Promise<void> {
    if (await writeInPlace(this, this.file, offset, src)) return;
    await this.mutex.run(() => this.writeLocked(offset, src));
  }

  private async writeLocked(offset: number, src: Uint8Array): Promise<void> {
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
    if (this.barriers) await this.file.flush();
    const entries = Buffer.alloc(n * 4);
    for (let k = 0; k < n; k++) {
      const v = (host / SECTOR + k * this.h.tracks) / this.multiplier;
      entries.writeUInt32LE(v, k * 4);
    }
    await this.bat.write(c, entries);
  }

  async flush(): Promise<void> {
    if (this.readOnly) return;
    await this.mutex.run(() => this.file.flush());
  }

  blockStatus(offset: number, length: number): Promise<Extent[]> {
    return mappedStatus(this, offset, length);
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    try {
      if (!this.readOnly) {
        await this.flush();
        // parallels_close: clean again, and no space past the data.
        await this.file.write(HDR.inuse, Buffer.alloc(4));
        if (this.file.truncate && this.file.size !== this.dataEnd * SECTOR) await this.file.truncate(this.dataEnd * SECTOR);
        await this.file.flush();
      }
    } finally {
      await this.file.close();
    }
  }
}
