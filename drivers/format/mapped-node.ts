// The one class shape of the table-mapped format nodes (vdi, vhdx, vpc dynamic,
// parallels, qcow, qed, vmdk): reads, block status and in-place writes through the
// runs a driver's mapRange gives (mapped.ts), allocation under one mutex, flush under
// that mutex, and a close that runs once. A driver keeps only its mapping and its
// allocation.
import type { BlockNode, Extent, ImageDescription } from '../types.js';
import { CorruptImageError } from '../errors.js';
import { Mutex } from '../util/mutex.js';
import { closeLayers } from './backing.js';
import { mappedStatus, pushRun, readMapped, writeInPlace, type MappedRun, type Mapper } from './mapped.js';
import type { MetadataRanges } from './metadata-ranges.js';
import type { PagedTable } from './table-pages.js';

export interface MappedNodeInit {
  /** The image file: its name is the node's, and it is closed last. */
  file: BlockNode;
  size: number;
  readOnly: boolean;
  /** Flush the file between data and the table entry that points at it (false for cache=unsafe). */
  barriers: boolean;
  backing?: BlockNode | undefined;
  /** The cluster or block one allocation maps (BlockNode.allocationUnit). */
  allocationUnit?: number | undefined;
}

/** Where one block of a block-mapped table lives: a host offset (of the block's first byte), or a kind, or a run of the driver's own. */
export type BlockPlace = number | 'zero' | 'unallocated' | MappedRun;

export abstract class MappedNode implements BlockNode, Mapper {
  private diskSize: number;
  readonly readOnly: boolean;
  readonly backing: BlockNode | undefined;
  readonly allocationUnit: number | undefined;
  protected readonly file: BlockNode;
  protected readonly barriers: boolean;
  /** Held by writes that allocate and by flush, so a flush sees no half-made allocation. */
  protected readonly mutex = new Mutex();
  private closed = false;
  /** A write was refused because the image is corrupt (metadata overlap): change nothing more at close. */
  protected sawCorruption = false;
  private description: ImageDescription = {};

  /** The image file's metadata, which no data written in place may overlap. */
  abstract readonly metadata: MetadataRanges | undefined;

  constructor(o: MappedNodeInit) {
    this.file = o.file;
    this.diskSize = o.size;
    this.readOnly = o.readOnly;
    this.barriers = o.barriers;
    this.backing = o.backing;
    this.allocationUnit = o.allocationUnit;
  }

  get name(): string {
    return this.file.name;
  }

  get size(): number {
    return this.diskSize;
  }

  /** A driver that resizes (qed) says the new size once it is on disk. */
  protected sizeChanged(size: number): void {
    this.diskSize = size;
  }

  /** What tsimg info shows of this layer: set once by the driver's open (describedAs). */
  describe(): ImageDescription {
    return this.description;
  }

  describedAs(d: ImageDescription): this {
    this.description = d;
    return this;
  }

  abstract mapRange(offset: number, length: number): Promise<MappedRun[]>;

  /**
   * Write what some run of still needs a place: the caller holds the mutex, and
   * `write` has found that [offset, offset + src.length) is not all in place.
   */
  protected abstract writeLocked(offset: number, src: Uint8Array): Promise<void>;

  read(offset: number, dst: Uint8Array): Promise<void> {
    return readMapped(this, this.file, this.backing, offset, dst);
  }

  /** In place without the lock when every byte has a place on disk (allocated blocks never move); else under the mutex. */
  async write(offset: number, src: Uint8Array): Promise<void> {
    try {
      if (await writeInPlace(this, this.file, offset, src)) return;
      await this.mutex.run(() => this.writeLocked(offset, src));
      this.lockedWrites++;
    } catch (err) {
      if (err instanceof CorruptImageError) this.sawCorruption = true;
      throw err;
    }
  }

  async flush(): Promise<void> {
    if (this.readOnly) return;
    await this.mutex.run(() => this.flushLocked());
  }

  /** The flush itself, under the mutex; formats with a dirty flag to clear add it here. */
  protected flushLocked(): Promise<void> {
    return this.file.flush();
  }

  /** mappedStatus gives host offsets only for runs in the image's own file; none for an encrypted image. */
  get hostFd(): number | undefined {
    return (this as BlockNode).encrypted ? undefined : this.file.hostFd;
  }

  blockStatus(offset: number, length: number): Promise<Extent[]> {
    return mappedStatus(this, offset, length, this.file, this.inPlaceWrites, this.hostFd !== undefined);
  }

  /**
   * Whether what writeInPlace writes (data runs in the image's own file, not locked,
   * clear of metadata: block status's inPlace) may instead be written by the FUSE
   * workers with pwrite(2) on hostFd, around this node (fs/read-map.ts): only where the
   * format opts in (writesAroundReady) and the file takes such writes. Allocated blocks
   * never move in these formats; a table allocated or freed (the metadata's generation)
   * is a layout change.
   */
  get inPlaceWrites(): boolean {
    return !this.readOnly && !this.sawCorruption && this.hostFd !== undefined && this.file.inPlaceWrites === true && this.writesAroundReady();
  }

  /**
   * The format lets an overwrite of allocated data go around it: it needs nothing of
   * the format (no flag, no counter, no entry), or the first write's hook already ran.
   * Formats opt in; those whose every write takes the lock do not.
   */
  protected writesAroundReady(): boolean {
    return false;
  }

  /** Tables allocated or freed in the image's file (MetadataRanges.generation); undefined for vmdk, whose grain tables never move after open. */
  get layoutGeneration(): number | undefined {
    return this.metadata?.generation;
  }

  /** Writes that took the lock (they may have allocated): a hint for the read map (BlockNode.allocationGeneration). */
  get allocationGeneration(): number {
    return this.lockedWrites;
  }
  private lockedWrites = 0;

  /** Closes once: a second close (the graph's and an owner's) does nothing. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.closeLayers();
  }

  /** Flush when writable, then close the backing node and the image file. */
  protected closeLayers(): Promise<void> {
    return closeLayers(this, this.backing, this.file);
  }

  /**
   * The entries `table` holds back (PagedTable.later: new blocks' entries), behind one
   * barrier after their data; false when none wait. The caller holds the mutex.
   */
  protected async writeLater(table: PagedTable): Promise<boolean> {
    if (!table.hasLater) return false;
    await this.barrier();
    await table.writeLater();
    return true;
  }

  /** Between data and the table entry that points at it, unless the cache mode is unsafe. */
  protected async barrier(): Promise<void> {
    if (this.barriers) await this.file.flush();
  }

  /**
   * The runs of [offset, offset + length) for a table of fixed-size blocks: `place`
   * says where block b lives (the host offset of its first byte, or a kind, or a
   * run of its own covering [pos, pos + n)).
   */
  protected async mapBlocks(offset: number, length: number, blockSize: number, place: (block: number, pos: number, n: number) => Promise<BlockPlace>): Promise<MappedRun[]> {
    const out: MappedRun[] = [];
    for (const { block, inBlock, pos, n } of blockPieces(offset, length, blockSize)) {
      const w = await place(block, pos, n);
      if (typeof w === 'number') pushRun(out, { kind: 'data', offset: pos, length: n, host: w + inBlock });
      else if (typeof w === 'string') pushRun(out, { kind: w, offset: pos, length: n });
      else pushRun(out, w);
    }
    return out;
  }
}

/** The pieces of [offset, offset + length) that fixed-size blocks cut it into, in order. */
export function* blockPieces(offset: number, length: number, blockSize: number): Generator<{ block: number; inBlock: number; pos: number; n: number }> {
  const end = offset + length;
  for (let pos = offset; pos < end; ) {
    const block = Math.floor(pos / blockSize);
    const inBlock = pos - block * blockSize;
    const n = Math.min(end - pos, blockSize - inBlock);
    yield { block, inBlock, pos, n };
    pos += n;
  }
}

/** The image's first `bytes` (its header); a file shorter than that is corrupt. */
export async function readHead(file: BlockNode, bytes: number, format: string): Promise<Buffer> {
  if (file.size < bytes) throw new CorruptImageError(`${file.name}: file too short for a ${format} header`);
  const head = Buffer.alloc(bytes);
  await file.read(0, head);
  return head;
}
