// The VDI format node (QEMU's block/vdi.c): a block map of u32 entries, 1 MiB blocks.
// A write to an unallocated block appends the whole block (written data, zeros
// elsewhere, allocated without writing them where the file can: writeIntoNew); the
// block map entry that points at it and the header's count reach the file at the next
// flush, behind a barrier after the data (QEMU writes both at once with no barrier; a
// barrier per block, as here before, cost a writeback per MiB).
import type { BlockNode, CheckReport } from '../../types.js';
import { CorruptImageError } from '../../errors.js';
import { writeIntoNew, type MappedRun } from '../mapped.js';
import { blockPieces, MappedNode } from '../mapped-node.js';
import { BMAP, HDR, IMAGE_TYPE, type VdiHeader } from './header.js';
import type { PagedTable } from '../table-pages.js';
import { addCorruption, emptyReport } from '../check-report.js';
import type { MetadataRanges } from '../metadata-ranges.js';

export class VdiNode extends MappedNode {
  private readonly bs: number;
  private blocksAllocated: number;

  constructor(
    file: BlockNode,
    private readonly h: VdiHeader,
    private readonly bmap: PagedTable,
    readonly metadata: MetadataRanges,
    readOnly: boolean,
    barriers: boolean,
  ) {
    super({ file, size: h.diskSize, readOnly, barriers, allocationUnit: h.blockSize });
    this.bs = h.blockSize;
    this.blocksAllocated = h.blocksAllocated;
  }

  /** Host offset of block b's data, or a kind when it has none; a bad entry throws. */
  private async where(b: number): Promise<number | 'unallocated' | 'zero'> {
    if (b >= this.bmap.entries) return 'unallocated';
    const e = await this.bmap.u32(b);
    // A VDI has no backing file: its unallocated blocks read as zeros it answers for
    // itself, as QEMU's vdi_co_block_status says (BDRV_BLOCK_ZERO; qemu-img map: present).
    if (e === BMAP.unallocated) return 'zero';
    if (e === BMAP.discarded) return 'zero';
    const host = this.h.offsetData + e * this.bs;
    if (e >= this.h.blocksInImage || host >= this.file.size) {
      throw new CorruptImageError(`${this.name}: VDI block ${b} maps to block ${e}, outside the image`);
    }
    return host;
  }

  mapRange(offset: number, length: number): Promise<MappedRun[]> {
    if (this.h.imageType !== IMAGE_TYPE.static) return this.mapBlocks(offset, length, this.bs, (b) => this.where(b));
    // A static image's blocks are the file's from the start, holes and all: block status
    // asks the file where it has holes (vdi_co_block_status's BDRV_BLOCK_RECURSE).
    return this.mapBlocks(offset, length, this.bs, async (b, pos, n) => {
      const w = await this.where(b);
      return typeof w === 'number' ? { kind: 'data', offset: pos, length: n, host: w + (pos - b * this.bs), recurse: true } : w;
    });
  }

  /** An overwrite of an allocated block needs nothing of the format: the FUSE workers may write it. */
  protected override writesAroundReady(): boolean {
    return true;
  }

  protected async writeLocked(offset: number, src: Uint8Array): Promise<void> {
    for (const { block: b, inBlock, pos, n } of blockPieces(offset, src.length, this.bs)) {
      const part = src.subarray(pos - offset, pos - offset + n);
      const w = await this.where(b);
      if (typeof w === 'number') {
        this.metadata.assertNoOverlap(w + inBlock, n, `VDI block ${b}`);
        await this.file.write(w + inBlock, part);
      } else await this.allocate(b, inBlock, part);
    }
  }

  private async allocate(b: number, at: number, data: Uint8Array): Promise<void> {
    if (this.blocksAllocated >= this.h.blocksInImage) {
      throw new CorruptImageError(`${this.name}: VDI header counts ${this.blocksAllocated} allocated blocks of ${this.h.blocksInImage}; cannot allocate more`);
    }
    const entry = this.blocksAllocated;
    const host = this.h.offsetData + entry * this.bs;
    this.metadata.assertNoOverlap(host, this.bs, `new VDI block ${b}`);
    await writeIntoNew(this.file, host, this.bs, at, data);
    const e = Buffer.alloc(4);
    e.writeUInt32LE(entry);
    this.bmap.later(b, e);
    this.blocksAllocated++;
    if (this.bmap.laterFull) await this.writePending();
  }

  protected override async flushLocked(): Promise<void> {
    await this.writePending();
    await this.file.flush();
  }

  /** The map entries of new blocks and the header's count, after a barrier behind their data. The caller holds the mutex. */
  private async writePending(): Promise<void> {
    if (!(await this.writeLater(this.bmap))) return;
    const n = Buffer.alloc(4);
    n.writeUInt32LE(this.blocksAllocated);
    await this.file.write(HDR.blocksAllocated, n);
  }

  /**
   * The whole block map (blocksInImage entries, which the header check keeps inside
   * the file), a megabyte at a time: visit(block, entry).
   */
  private async eachEntry(visit: (block: number, e: number) => void | Promise<void>): Promise<void> {
    const n = this.h.blocksInImage;
    const chunk = Buffer.alloc(Math.min(n * 4, 1 << 20));
    for (let first = 0; first < n; first += chunk.length / 4) {
      const part = chunk.subarray(0, Math.min(chunk.length, (n - first) * 4));
      await this.file.read(this.h.offsetBmap + first * 4, part);
      for (let k = 0; k < part.length / 4; k++) await visit(first + k, part.readUInt32LE(k * 4));
    }
  }

  /** What QEMU's vdi_co_check says of the block map; one bit per data block. */
  private async scanMap(): Promise<CheckReport> {
    const report = emptyReport();
    const n = this.h.blocksInImage;
    const seen = new Uint8Array(Math.ceil(n / 8));
    let allocated = 0;
    await this.eachEntry((block, e) => {
      if (e >= BMAP.discarded) return;
      if (e >= n) {
        addCorruption(report, `ERROR: block index ${block} too large, is ${e}`);
        return;
      }
      allocated++;
      // QEMU's message names the data block twice (it stores e in its copy of the map).
      if (seen[e >>> 3]! & (1 << (e & 7))) addCorruption(report, `ERROR: block index ${e} also used by ${e}`);
      else seen[e >>> 3]! |= 1 << (e & 7);
    });
    if (allocated !== this.h.blocksAllocated) {
      addCorruption(report, `ERROR: allocated blocks mismatch, is ${allocated}, should be ${this.h.blocksAllocated}`);
    }
    return report;
  }

  /**
   * qemu-img check for VDI (QEMU's vdi_co_check): every allocated block map entry must
   * name a block inside the image that no other entry names, and the header's count of
   * allocated blocks must match. Read from the file, changing nothing.
   */
  checkMetadata(): Promise<CheckReport> {
    if (this.readOnly) return this.scanMap();
    // The check reads the map from the file: the new blocks' entries go there first.
    return this.mutex.run(async () => {
      await this.writePending();
      return this.scanMap();
    });
  }

  /**
   * tsimg check -r all for VDI, which QEMU refuses (vdi_co_check returns ENOTSUP).
   * Entries naming a block past the header's count or past the end of the file are
   * unmapped (they read as zeros either way: QEMU reads zeros past the end), and of
   * two entries naming one block the later one is unmapped (QEMU reports the later).
   * A new block goes to index blocks_allocated, so the blocks still in use must be
   * exactly 0..count-1 before the header may say count: a block above count is
   * copied down into a hole, and only then is its entry pointed at the copy. Each
   * step leaves an image no worse than before if the process dies in between.
   */
  get repairMetadata(): ((mode: 'leaks' | 'all') => Promise<void>) | undefined {
    if (this.readOnly) return undefined;
    return (mode) =>
      this.mutex.run(async () => {
        await this.writePending();
        if (mode === 'all') await this.repairLocked();
      });
  }

  private async setEntry(block: number, value: number): Promise<void> {
    const e = Buffer.alloc(4);
    e.writeUInt32LE(value);
    // The paged table covers the blocks the disk uses; the rest of the map only the file.
    if (block < this.bmap.entries) await this.bmap.write(block, e);
    else await this.file.write(this.h.offsetBmap + block * 4, e);
  }

  private async repairLocked(): Promise<void> {
    const n = this.h.blocksInImage;
    const bs = this.bs;
    // owner[e]: the block map index that keeps data block e. Only blocks inside the
    // file can be kept, so the array is as long as the file has blocks, not the map.
    const inFile = Math.max(0, Math.min(n, Math.ceil((this.file.size - this.h.offsetData) / bs)));
    const owner = new Uint32Array(inFile).fill(BMAP.unallocated);
    await this.eachEntry(async (block, e) => {
      if (e >= BMAP.discarded) return;
      if (e >= inFile || owner[e] !== BMAP.unallocated) {
        await this.setEntry(block, BMAP.unallocated);
        return;
      }
      owner[e] = block;
    });
    let count = 0;
    for (let e = 0; e < inFile; e++) if (owner[e] !== BMAP.unallocated) count++;
    await this.barrier();
    // Fill each hole below count with the highest block in use at or above it.
    let high = inFile - 1;
    for (let hole = 0; hole < count; hole++) {
      if (owner[hole] !== BMAP.unallocated) continue;
      while (owner[high] === BMAP.unallocated) high--;
      const from = this.h.offsetData + high * bs;
      const to = this.h.offsetData + hole * bs;
      this.metadata.assertNoOverlap(to, bs, `VDI block ${hole}`);
      const data = Buffer.alloc(bs);
      // The last block may end past the end of the file: the rest reads as zeros.
      const have = Math.min(bs, this.file.size - from);
      await this.file.read(from, data.subarray(0, have));
      await this.file.write(to, data);
      await this.barrier();
      await this.setEntry(owner[high]!, hole);
      await this.barrier();
      owner[hole] = owner[high]!;
      owner[high] = BMAP.unallocated;
    }
    const c = Buffer.alloc(4);
    c.writeUInt32LE(count);
    await this.file.write(HDR.blocksAllocated, c);
    this.blocksAllocated = count;
    await this.file.flush();
  }
}
