// The vpc (VHD) format node: fixed disks are the file's bytes; dynamic disks map
// 2 MiB-ish blocks through the BAT, each block preceded by its sector bitmap
// (QEMU's block/vpc.c). Reads go through the shared mapped-read path.
import type { BlockNode, Extent, ImageDescription } from '../../types.js';
import { CorruptImageError } from '../../errors.js';
import type { MetadataRanges } from '../metadata-ranges.js';
import type { PagedTable } from '../table-pages.js';
import { splitByHoles, writeIntoNew, type MappedRun } from '../mapped.js';
import { blockPieces, MappedNode } from '../mapped-node.js';
import { FOOTER_SIZE, SECTOR } from './footer.js';

export const BAT_UNUSED = 0xffffffff;

/** Zeros written per request when zeroing allocated blocks. */
const ZERO_CHUNK = 1 << 20;

export class VpcFixedNode implements BlockNode {
  readonly requestAlignment = SECTOR;
  constructor(
    private readonly file: BlockNode,
    readonly size: number,
    readonly readOnly: boolean,
  ) {}
  get name(): string {
    return this.file.name;
  }
  read(offset: number, dst: Uint8Array): Promise<void> {
    return this.file.read(offset, dst);
  }
  async write(offset: number, src: Uint8Array): Promise<void> {
    // A geometry larger than the file would put guest data over the footer.
    if (offset + src.length > this.file.size - FOOTER_SIZE) {
      throw new CorruptImageError(`${this.name}: fixed VHD is shorter than its disk size; write at 0x${offset.toString(16)} would overwrite the footer`);
    }
    await this.file.write(offset, src);
  }
  flush(): Promise<void> {
    return this.readOnly ? Promise.resolve() : this.file.flush();
  }
  /** Block status gives the file's own offsets: the disk is the file's first bytes. */
  get hostFd(): number | undefined {
    return this.file.hostFd;
  }
  /**
   * Nothing of the format changes on a write: where the file allows it, the FUSE
   * workers may write around the node (fs/read-map.ts), up to the footer (blockStatus).
   */
  get inPlaceWrites(): boolean {
    return !this.readOnly && this.file.inPlaceWrites === true;
  }
  async blockStatus(offset: number, length: number): Promise<Extent[]> {
    // In place only before the footer, as write() allows (a disk size over the file's is corrupt).
    const inPlaceEnd = this.inPlaceWrites ? Math.max(offset, Math.min(offset + length, this.file.size - FOOTER_SIZE)) : offset;
    const out: Extent[] = [];
    if (inPlaceEnd > offset) out.push({ offset, length: inPlaceEnd - offset, kind: 'data', host: offset, inPlace: true });
    if (inPlaceEnd < offset + length) out.push({ offset: inPlaceEnd, length: offset + length - inPlaceEnd, kind: 'data', host: inPlaceEnd });
    // Holes of the file read as zeros: asked of it (vpc_co_block_status's BDRV_BLOCK_RECURSE).
    return (await Promise.all(out.map((e) => splitByHoles(this.file, e.host!, e)))).flat();
  }
  /** vpc_get_info gives a fixed disk no cluster size. */
  describe(): ImageDescription {
    return { dirty: false };
  }
  close(): Promise<void> {
    return this.file.close();
  }
}

export interface VpcDynamicOptions {
  file: BlockNode;
  size: number;
  readOnly: boolean;
  /** The footer as on disk (rewritten at the end of the file as it grows). */
  footer: Uint8Array;
  bat: PagedTable;
  batOffset: number;
  blockSize: number;
  bitmapSize: number;
  /** Where the next block goes: past the BAT and every allocated block. */
  freeOffset: number;
  barriers: boolean;
  /** Footer copy, dynamic header and BAT: no guest data may be written there. */
  metadata: MetadataRanges;
}

export class VpcDynamicNode extends MappedNode {
  /** Sector bitmaps: the unit of allocation inside a block. */
  readonly requestAlignment = SECTOR;
  private readonly footer: Uint8Array;
  private readonly bat: PagedTable;
  private readonly batOffset: number;
  private readonly blockSize: number;
  private readonly bitmapSize: number;
  private freeOffset: number;
  /**
   * Blocks whose bitmap is all ones: found so, or set so by this session. Other tools
   * may leave bits clear; QEMU sets them all before its first write to a block, so
   * that Virtual PC never takes written sectors for unused ones.
   */
  private readonly bitmapSet = new Set<number>();
  /** Blocks whose bitmap was found with a bit clear (not set yet): mapRange need not read it again. */
  private readonly bitmapPartial = new Set<number>();
  readonly metadata: MetadataRanges;

  constructor(o: VpcDynamicOptions) {
    super({ ...o, allocationUnit: o.blockSize });
    this.metadata = o.metadata;
    this.footer = o.footer;
    this.bat = o.bat;
    this.batOffset = o.batOffset;
    this.blockSize = o.blockSize;
    this.bitmapSize = o.bitmapSize;
    this.freeOffset = o.freeOffset;
  }

  /** Host offset of block idx's data, undefined when unallocated; checked as it is used. */
  private async blockHost(idx: number): Promise<number | undefined> {
    const e = idx < this.bat.entries ? await this.bat.u32be(idx) : BAT_UNUSED;
    if (e === BAT_UNUSED) return undefined;
    const host = e * 512 + this.bitmapSize;
    if (host + this.blockSize > this.file.size) {
      throw new CorruptImageError(`${this.name}: VHD block ${idx} at 0x${(e * 512).toString(16)} points past the end of the file; the image has been truncated`);
    }
    return host;
  }

  /**
   * Unallocated blocks read as zeros: a VHD has no backing file here. A block whose
   * sector bitmap has a bit clear is `locked`: its first write sets the bitmap, under
   * the lock (then in place, by the FUSE workers too). A writer reads a block's bitmap
   * the first time it maps the block, so one QEMU left all set (it sets every bit when
   * it allocates) is in place from the start.
   */
  mapRange(offset: number, length: number): Promise<MappedRun[]> {
    return this.mapBlocks(offset, length, this.blockSize, async (idx, pos, n) => {
      const host = await this.blockHost(idx);
      if (host === undefined) return 'zero';
      if (this.bitmapSet.has(idx) || (!this.readOnly && !this.bitmapPartial.has(idx) && (await this.bitmapFull(idx, host)))) return host;
      return { kind: 'data', offset: pos, length: n, host: host + (pos - idx * this.blockSize), locked: true };
    });
  }

  /** Whether block idx's sector bitmap (before its data at host) has every bit set; remembered either way. */
  private async bitmapFull(idx: number, host: number): Promise<boolean> {
    const bitmap = Buffer.alloc(this.bitmapSize);
    await this.file.read(host - this.bitmapSize, bitmap);
    // Set meanwhile by a write (under the lock): set it stays.
    if (this.bitmapSet.has(idx)) return true;
    if (!bitmap.every((b) => b === 0xff)) {
      this.bitmapPartial.add(idx);
      return false;
    }
    this.bitmapSet.add(idx);
    return true;
  }

  /** An overwrite in a block whose bitmap is set needs nothing of the format: the FUSE workers may write it. */
  protected override writesAroundReady(): boolean {
    return true;
  }

  protected async writeLocked(offset: number, src: Uint8Array): Promise<void> {
    for (const { block: idx, inBlock, pos, n } of blockPieces(offset, src.length, this.blockSize)) {
      const data = src.subarray(pos - offset, pos - offset + n);
      const host = await this.blockHost(idx);
      if (host === undefined) {
        await this.allocate(idx, inBlock, data);
      } else {
        // The block's bitmap and its data, as the BAT entry places them.
        this.metadata.assertNoOverlap(host - this.bitmapSize, this.bitmapSize + this.blockSize, `VHD block ${idx}`);
        // Set already (QEMU sets every bit when it allocates a block): no write, no barrier.
        if (!this.bitmapSet.has(idx) && (this.bitmapPartial.has(idx) || !(await this.bitmapFull(idx, host)))) {
          await this.file.write(host - this.bitmapSize, Buffer.alloc(this.bitmapSize, 0xff));
          await this.barrier();
          this.bitmapSet.add(idx);
          this.bitmapPartial.delete(idx);
        }
        await this.file.write(host + inBlock, data);
      }
    }
  }

  /**
   * A new block at the end of the file, where the footer was: bitmap, data and the
   * footer after the block written together (the footer's bytes do not change, only
   * its place; QEMU reads a dynamic disk's copy at offset 0). The BAT entry that makes
   * the block live waits for the next flush, behind one barrier after the data of
   * every new block (PagedTable.later, as vdi's and parallels' do; QEMU syncs three
   * times per block, this did twice). A crash before the flush leaves the new blocks
   * unreferenced, the old mapping whole.
   */
  private async allocate(idx: number, inBlock: number, data: Uint8Array): Promise<void> {
    const start = this.freeOffset;
    const next = start + this.bitmapSize + this.blockSize;
    if (next / 512 > BAT_UNUSED) throw new CorruptImageError(`${this.name}: VHD is full (block offsets are 32-bit sector numbers)`);
    this.metadata.assertNoOverlap(start, this.bitmapSize + this.blockSize, `new VHD block ${idx}`);
    const bitmap = Buffer.alloc(this.bitmapSize, 0xff);
    const pastFooter = this.file.size > start + FOOTER_SIZE;
    const writes = [this.file.write(start, bitmap), this.file.write(next, this.footer)];
    // Past the end of the file the block reads as zeros; something lying past the
    // footer is overwritten with them (writeIntoNew).
    if (pastFooter) writes.push(writeIntoNew(this.file, start + this.bitmapSize, this.blockSize, inBlock, data));
    else writes.push(this.file.write(start + this.bitmapSize + inBlock, data));
    await Promise.all(writes);
    const entry = Buffer.alloc(4);
    entry.writeUInt32BE(start / 512, 0);
    this.bat.later(idx, entry);
    this.freeOffset = next;
    this.bitmapSet.add(idx);
    if (this.bat.laterFull) await this.writeLater(this.bat);
  }

  protected override async flushLocked(): Promise<void> {
    await this.writeLater(this.bat);
    await this.file.flush();
  }

  async zero(offset: number, length: number): Promise<void> {
    // Unallocated blocks read as zeros already; only allocated ones are written.
    await this.mutex.run(async () => {
      for (const r of await this.mapRange(offset, length)) {
        if (r.kind !== 'data') continue;
        for (let done = 0; done < r.length; done += ZERO_CHUNK) {
          const n = Math.min(ZERO_CHUNK, r.length - done);
          await this.writeLocked(r.offset + done, Buffer.alloc(n));
        }
      }
    });
  }
}
