// Where an image keeps its own metadata (header, tables, BAT, grain directories),
// so that a data write whose host offset came from a table entry can be refused
// when it would land on them: a corrupt or hostile entry pointing at the header
// must not let a guest write overwrite it (QEMU's "Preventing invalid write on
// metadata" overlap checks). One sorted list of disjoint ranges per image file.
import createDebug from 'debug';
import { CorruptImageError } from '../errors.js';

const debug = createDebug('tsmount:overlap');

export class MetadataRanges {
  /** Sorted by start, disjoint (overlapping ranges are merged; touching ones keep their names). */
  private starts: number[] = [];
  private ends: number[] = [];
  private whats: string[] = [];

  /** `name` is the image, for messages. */
  constructor(private readonly name: string) {}

  /** [offset, offset + length) holds `what`; empty ranges are ignored. */
  add(offset: number, length: number, what: string): this {
    if (length <= 0) return this;
    let start = offset;
    let end = offset + length;
    let i = this.firstEndingAfter(start);
    let label = what;
    // Swallow every range this one overlaps.
    let j = i;
    while (j < this.starts.length && this.starts[j]! < end) {
      start = Math.min(start, this.starts[j]!);
      end = Math.max(end, this.ends[j]!);
      if (this.whats[j] !== what) label = `${this.whats[j]!}, ${label}`;
      j++;
    }
    this.starts.splice(i, j - i, start);
    this.ends.splice(i, j - i, end);
    this.whats.splice(i, j - i, label);
    return this;
  }

  /** The metadata [offset, offset + length) overlaps, if any. */
  overlap(offset: number, length: number): string | undefined {
    if (length <= 0) return undefined;
    const i = this.firstEndingAfter(offset);
    return i < this.starts.length && this.starts[i]! < offset + length ? this.whats[i] : undefined;
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

  /** Index of the first range whose end is past `offset`. */
  private firstEndingAfter(offset: number): number {
    let lo = 0;
    let hi = this.ends.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (this.ends[mid]! <= offset) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  }
}
