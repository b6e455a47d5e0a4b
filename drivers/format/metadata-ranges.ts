// Where an image keeps its own metadata (header, tables, BAT, grain directories),
// each range with what it is, so that a data write whose host offset came from a
// table entry can be refused when it would land on them: a corrupt or hostile entry
// pointing at the header must not let a guest write overwrite it (QEMU's
// qcow2_check_metadata_overlap, "Preventing invalid write on metadata", done with a
// binary search instead of QEMU's walk over every table). One instance per image
// file, for every format with tables; formats keep it up to date as tables are
// allocated and freed.
//
// Ranges may overlap each other (a corrupt image) and may repeat (two table entries
// naming one cluster): it is a multiset, remove() takes away one copy.
import createDebug from 'debug';
import { CorruptImageError } from '../errors.js';

const debug = createDebug('tsmount:overlap');

export interface MetadataRange {
  offset: number;
  length: number;
  /** What the range holds, as a message names it ("active L1 table"). */
  what: string;
}

export class MetadataRanges {
  /** Sorted by offset. */
  private ranges: MetadataRange[] = [];
  /** maxEnd[i]: the largest end among ranges[0..i], so a search can stop early. */
  private maxEnd: number[] = [];

  /** `name` is the image, for messages. */
  constructor(private readonly name = '') {}

  get count(): number {
    return this.ranges.length;
  }

  /** Add many ranges at once (one sort). */
  addAll(list: MetadataRange[]): void {
    for (const r of list) if (r.length > 0) this.ranges.push({ ...r });
    this.ranges.sort((a, b) => a.offset - b.offset);
    this.recompute(0);
  }

  /** [offset, offset + length) holds `what`; empty ranges are ignored. */
  add(offset: number, length: number, what: string): this {
    if (length <= 0) return this;
    const i = this.upperBound(offset);
    this.ranges.splice(i, 0, { offset, length, what });
    this.maxEnd.splice(i, 0, 0);
    this.recompute(i);
    return this;
  }

  /** Remove one range that starts at `offset` and holds `what`; false if there is none. */
  remove(offset: number, what: string): boolean {
    let i = this.upperBound(offset) - 1;
    while (i >= 0 && this.ranges[i]!.offset === offset) {
      if (this.ranges[i]!.what === what) {
        this.ranges.splice(i, 1);
        this.maxEnd.splice(i, 1);
        this.recompute(i);
        return true;
      }
      i--;
    }
    return false;
  }

  /**
   * A range that [offset, offset + length) overlaps, or undefined. Ranges whose
   * `what` is in `ignore` do not count (a table being written overlaps itself).
   */
  find(offset: number, length: number, ignore?: readonly string[]): MetadataRange | undefined {
    const end = offset + length;
    // The last range starting before `end`; none before it can overlap once the
    // largest end up to it is at or before `offset`.
    for (let i = this.upperBound(end - 1) - 1; i >= 0 && this.maxEnd[i]! > offset; i--) {
      const r = this.ranges[i]!;
      if (r.offset + r.length > offset && r.offset < end && !(ignore && ignore.includes(r.what))) return r;
    }
    return undefined;
  }

  /** What [offset, offset + length) overlaps, every kind once in file order ("L2 table, header"), or undefined. */
  overlap(offset: number, length: number): string | undefined {
    if (length <= 0) return undefined;
    const end = offset + length;
    const hits: MetadataRange[] = [];
    for (let i = this.upperBound(end - 1) - 1; i >= 0 && this.maxEnd[i]! > offset; i--) {
      const r = this.ranges[i]!;
      if (r.offset + r.length > offset && r.offset < end) hits.push(r);
    }
    if (hits.length === 0) return undefined;
    return [...new Set(hits.reverse().map((r) => r.what))].join(', ');
  }

  /**
   * Refuse (EIO) a data write of `length` bytes at host `offset` that would land on
   * metadata; `what` says which guest data it is, for the message and the log.
   */
  assertNoOverlap(offset: number, length: number, what: string): void {
    const hit = this.overlap(offset, length);
    if (hit === undefined) return;
    const msg = `${this.name}: preventing invalid write on metadata: ${what} maps to 0x${offset.toString(16)}+0x${length.toString(16)}, which overlaps the ${hit}; the image is corrupt`;
    debug(msg);
    throw new CorruptImageError(msg);
  }

  /** Index of the first range with offset > x. */
  private upperBound(x: number): number {
    let lo = 0;
    let hi = this.ranges.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (this.ranges[mid]!.offset <= x) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  }

  private recompute(from: number): void {
    this.maxEnd.length = this.ranges.length;
    let m = from > 0 ? this.maxEnd[from - 1]! : 0;
    for (let i = from; i < this.ranges.length; i++) {
      const r = this.ranges[i]!;
      m = Math.max(m, r.offset + r.length);
      this.maxEnd[i] = m;
    }
  }
}
