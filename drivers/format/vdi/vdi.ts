// The VDI format node (QEMU's block/vdi.c): a block map of u32 entries, 1 MiB blocks.
// A write to an unallocated block appends the whole block (written data, zeros
// elsewhere), then points the block map at it, then counts it in the header.
import type { BlockNode, Extent } from '../../types.js';
import { CorruptImageError } from '../../errors.js';
import { closeLayers } from '../backing.js';
import { mappedStatus, pushRun, readMapped, writeInPlace, type MappedRun, type Mapper } from '../mapped.js';
import { Mutex } from '../../util/mutex.js';
import { BMAP, HDR, type VdiHeader } from './header.js';
import type { PagedTable } from '../table-pages.js';
import type { MetadataRanges } from '../metadata-ranges.js';

export class VdiNode implements BlockNode, Mapper {
  readonly size: number;
  readonly readOnly: boolean;
  private readonly bs: number;
  private readonly mutex = new Mutex();
  private blocksAllocated: number;
  private closed = false;

  constructor(
    private readonly file: BlockNode,
    private readonly h: VdiHeader,
    private readonly bmap: PagedTable,
    readonly metadata: MetadataRanges,
    readOnly: boolean,
    private readonly barriers: boolean,
  ) {
    this.size = h.diskSize;
    this.readOnly = readOnly;
    this.bs = h.blockSize;
    this.blocksAllocated = h.blocksAllocated;
  }

  get name(): string {
    return this.file.name;
  }

  /** Host offset of block b's data, or a kind when it has none; a bad entry throws. */
  private async where(b: number): Promise<number | 'unallocated' | 'zero'> {
    if (b >= this.bmap.entries) return 'unallocated';
    const e = await this.bmap.u32(b);
    if (e === BMAP.unallocated) return 'unallocated';
    if (e === BMAP.discarded) return 'zero';
    const host = this.h.offsetData + e * this.bs;
    if (e >= this.h.blocksInImage || host >= this.file.size) {
      throw new CorruptImageError(`${this.name}: VDI block ${b} maps to block ${e}, outside the image`);
    }
    return host;
  }

  async mapRange(offset: number, length: number): Promise<MappedRun[]> {
    const out: MappedRun[] = [];
    const end = offset + length;
    for (let pos = offset; pos < end; ) {
      const b = Math.floor(pos / this.bs);
      const next = Math.min(end, (b + 1) * this.bs);
      const w = await this.where(b);
      if (typeof w === 'number') pushRun(out, { kind: 'data', offset: pos, length: next - pos, host: w + (pos % this.bs) });
      else pushRun(out, { kind: w, offset: pos, length: next - pos });
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
    const end = offset + src.length;
    for (let pos = offset; pos < end; ) {
      const b = Math.floor(pos / this.bs);
      const next = Math.min(end, (b + 1) * this.bs);
      const part = src.subarray(pos - offset, next - offset);
      const w = await this.where(b);
      if (typeof w === 'number') {
        this.metadata.assertNoOverlap(w + (pos % this.bs), part.length, `VDI block ${b}`);
        await this.file.write(w + (pos % this.bs), part);
      }
      else await this.allocate(b, pos % this.bs, part);
      pos = next;
    }
  }

  private async allocate(b: number, at: number, data: Uint8Array): Promise<void> {
    if (this.blocksAllocated >= this.h.blocksInImage) {
      throw new CorruptImageError(`${this.name}: VDI header counts ${this.blocksAllocated} allocated blocks of ${this.h.blocksInImage}; cannot allocate more`);
    }
    const entry = this.blocksAllocated;
    const host = this.h.offsetData + entry * this.bs;
    this.metadata.assertNoOverlap(host, this.bs, `new VDI block ${b}`);
    const block = Buffer.alloc(this.bs);
    block.set(data, at);
    await this.file.write(host, block);
    if (this.barriers) await this.file.flush();
    const e = Buffer.alloc(4);
    e.writeUInt32LE(entry);
    await this.bmap.write(b, e);
    this.blocksAllocated++;
    const n = Buffer.alloc(4);
    n.writeUInt32LE(this.blocksAllocated);
    await this.file.write(HDR.blocksAllocated, n);
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
    await closeLayers(this, this.file);
  }
}
