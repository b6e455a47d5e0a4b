// Metadata overlap checks before writes (QEMU's qcow2_pre_write_overlap_check and
// qcow2_check_metadata_overlap in qcow2-refcount.c, in its default "cached" mode).
// A data cluster or a table that an L1/L2/refcount entry of a corrupt (or hostile)
// image points at the header, an L1 table, the refcount table... must not be
// written: the write fails with EIO and the image is marked corrupt (incompatible
// feature bit 1, QEMU's qcow2_signal_corruption), after which the node writes
// nothing more and later writable opens are refused until `qemu-img check -r all`.
//
// The metadata's host ranges are kept in a sorted set, updated as tables are
// allocated and freed, so one check is a binary search.
import type { BlockNode } from '../../types.js';
import { CorruptImageError } from '../../errors.js';
import { MetadataRanges } from '../metadata-ranges.js';
import { Filter } from '../../filters/filter.js';
import { HDR, INCOMPAT } from './header.js';

/** What a range holds, in QEMU's words (metadata_ol_names). */
export const OL = {
  header: 'qcow2_header',
  activeL1: 'active L1 table',
  activeL2: 'active L2 table',
  refcountTable: 'refcount table',
  refcountBlock: 'refcount block',
  snapshotTable: 'snapshot table',
  inactiveL1: 'inactive L1 table',
  bitmapDirectory: 'bitmap directory',
  // Not among QEMU's cached checks, but never a valid target of a data write either.
  bitmapTable: 'bitmap table',
  cryptoHeader: 'encryption header',
} as const;

export class MetadataGuard {
  private readonly ranges = new MetadataRanges();
  /** Set once a write was refused: the node then writes nothing more. */
  private corruptReason: string | undefined;
  private marking: Promise<void> | undefined;

  constructor(
    private readonly file: BlockNode,
    private readonly name: string,
    private readonly clusterSize: number,
    private readonly v3: boolean,
  ) {}

  get corrupt(): boolean {
    return this.corruptReason !== undefined;
  }

  /** Record a table at [offset, offset + bytes), widened to whole clusters. */
  add(offset: number, bytes: number, what: string): void {
    if (bytes <= 0) return;
    const a = this.floor(offset);
    this.ranges.add(a, this.ceil(offset + bytes) - a, what);
  }

  addAll(list: { offset: number; bytes: number; what: string }[]): void {
    const sized = list.filter((r) => r.bytes > 0);
    this.ranges.addAll(sized.map((r) => ({ offset: this.floor(r.offset), length: this.ceil(r.offset + r.bytes) - this.floor(r.offset), what: r.what })));
  }

  /** One cluster-sized table at each of `offsets` (every L2 table an L1 names). */
  addTables(offsets: Float64Array, what: string): void {
    for (let i = 0; i < offsets.length; i++) offsets[i] = this.floor(offsets[i]!);
    this.ranges.addUniform(offsets, this.clusterSize, what);
  }

  /** Forget a table added at `offset` (freed, or no longer in use). */
  remove(offset: number, what: string): void {
    this.ranges.remove(this.floor(offset), what);
  }

  /**
   * Throw (after marking the image corrupt) if [offset, offset + length) touches a
   * cluster holding metadata other than `ignore`; refuse everything once corrupt.
   * Synchronous when the write is fine, which is the cost every write pays.
   */
  check(offset: number, length: number, ignore?: readonly string[]): Promise<void> | undefined {
    if (this.corruptReason !== undefined) return Promise.reject(this.refusal());
    const a = this.floor(offset);
    const hit = this.ranges.find(a, this.ceil(offset + length) - a, ignore);
    if (!hit) return undefined;
    return this.signal(`Preventing invalid write on metadata (overlaps with ${hit.what})`, offset, length);
  }

  /** Whether a data write at [offset, offset + length) would be refused (check), without refusing it. */
  touches(offset: number, length: number): boolean {
    if (this.corruptReason !== undefined) return true;
    const a = this.floor(offset);
    return this.ranges.find(a, this.ceil(offset + length) - a) !== undefined;
  }

  /** The error for any write after the image was marked corrupt. */
  refusal(): CorruptImageError {
    return new CorruptImageError(`${this.name}: qcow2 image is marked corrupt (${this.corruptReason ?? 'unknown reason'}); writes are refused until 'qemu-img check -r all' repairs it`);
  }

  /**
   * QEMU's qcow2_signal_corruption (fatal): set the corrupt bit in the header (v3;
   * a v2 header has no feature bits, so only this node stops writing), then fail.
   */
  private async signal(reason: string, offset: number, length: number): Promise<never> {
    const first = this.corruptReason === undefined;
    this.corruptReason ??= reason;
    const where = `host offset 0x${offset.toString(16)}, ${length} bytes`;
    if (first && this.v3) this.marking = this.markCorrupt();
    // QEMU: "qcow2: Marking image as corrupt: Preventing invalid write on metadata (...)".
    let what = this.v3 ? 'Marking qcow2 image as corrupt' : 'qcow2 image is corrupt';
    try {
      await this.marking;
    } catch (err) {
      what = `qcow2 image is corrupt (setting its corrupt bit failed: ${err instanceof Error ? err.message : String(err)})`;
    }
    throw new CorruptImageError(`${this.name}: ${what}: ${reason} at ${where}; repair with 'qemu-img check -r all'`);
  }

  private async markCorrupt(): Promise<void> {
    const field = Buffer.alloc(8);
    await this.file.read(HDR.incompatibleFeatures, field);
    field.writeBigUInt64BE(field.readBigUInt64BE(0) | INCOMPAT.corrupt);
    await this.file.write(HDR.incompatibleFeatures, field);
    await this.file.flush();
  }

  private floor(x: number): number {
    return Math.floor(x / this.clusterSize) * this.clusterSize;
  }

  private ceil(x: number): number {
    return Math.ceil(x / this.clusterSize) * this.clusterSize;
  }
}

/**
 * The image file as a table cache sees it: every table write is checked against
 * the metadata of other kinds first (QEMU checks qcow2-cache.c's write-back the same
 * way, ignoring the cache's own kind).
 */
export class GuardedTableFile extends Filter {
  constructor(
    file: BlockNode,
    private readonly guard: MetadataGuard,
    private readonly own: string,
  ) {
    super(file);
  }

  override async write(offset: number, src: Uint8Array): Promise<void> {
    await this.guard.check(offset, src.length, [this.own]);
    return this.next.write(offset, src);
  }

  /** The image file stays open: the qcow2 node closes it. */
  override async close(): Promise<void> {}
}
