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
import createDebug from '../util/debug.js';
import { CorruptImageError } from '../errors.js';
import type { BlockNode } from '../types.js';

const debug = createDebug('tsmount:overlap');

export interface MetadataRange {
  offset: number;
  length: number;
  /** What the range holds, as a message names it ("active L1 table"). */
  what: string;
}

/**
 * The host offsets a table of `entries` big-endian or little-endian words at `offset`
 * names (`decode` turns a word into a byte offset, 0 for none), read a page at a time:
 * what a writer registers with addTables() at open.
 */
export async function tableOffsets(file: BlockNode, offset: number, entries: number, entryBytes: 4 | 8, le: boolean, decode: (v: bigint) => number): Promise<number[]> {
  const out: number[] = [];
  const PAGE = 64 * 1024;
  const total = Math.max(0, Math.min(entries * entryBytes, file.size - offset));
  const buf = Buffer.alloc(Math.min(PAGE, total));
  for (let done = 0; done < total; done += buf.length) {
    const n = Math.min(buf.length, total - done);
    await file.read(offset + done, buf.subarray(0, n));
    for (let i = 0; i + entryBytes <= n; i += entryBytes) {
      const v = entryBytes === 8 ? (le ? buf.readBigUInt64LE(i) : buf.readBigUInt64BE(i)) : BigInt(le ? buf.readUInt32LE(i) : buf.readUInt32BE(i));
      const o = decode(v);
      if (o !== 0) out.push(o);
    }
  }
  return out;
}

export class MetadataRanges {
  // Parallel typed arrays sorted by offset, not one object per range: a qcow2 image
  // may have 4 million L2 tables (a 32 MiB L1), and an object each cost about 60 bytes
  // more than these 26.
  private n = 0;
  private offsets = new Float64Array(16);
  private lengths = new Float64Array(16);
  /** Index into `names`. */
  private kinds = new Uint16Array(16);
  /** maxEnd[i]: the largest end among ranges[0..i], so a search can stop early. */
  private maxEnd = new Float64Array(16);
  private readonly names: string[] = [];
  private readonly kindIds = new Map<string, number>();

  /** `name` is the image, for messages. */
  constructor(private readonly name = '') {}

  get count(): number {
    return this.n;
  }

  /**
   * Bumped by every add and remove: a table allocated or freed moved host space, so a
   * range found writable in place may since be metadata (MappedNode.layoutGeneration).
   */
  get generation(): number {
    return this.changes;
  }
  private changes = 0;

  /** Add many ranges at once (one sort, one merge). */
  addAll(list: readonly MetadataRange[]): void {
    const sorted = list.filter((r) => r.length > 0).sort((a, b) => a.offset - b.offset);
    this.merge(sorted.length, (i) => sorted[i]!.offset, (i) => sorted[i]!.length, (i) => this.kind(sorted[i]!.what));
  }

  /**
   * Add one range of `length` bytes at each of `offsets` (a table of tables: every
   * L2 table an L1 names); repeated offsets count once. `offsets` is sorted in place.
   */
  addUniform(offsets: Float64Array, length: number, what: string): void {
    if (length <= 0 || offsets.length === 0) return;
    offsets.sort();
    let m = 0;
    for (let i = 0; i < offsets.length; i++) if (i === 0 || offsets[i] !== offsets[i - 1]) offsets[m++] = offsets[i]!;
    const k = this.kind(what);
    this.merge(m, (i) => offsets[i]!, () => length, () => k);
  }

  /**
   * Every table a table of tables names (qed and qcow L2 tables from their L1, vmdk
   * grain tables from the grain directory): `length` bytes at each nonzero offset.
   */
  addTables(offsets: Iterable<number>, length: number, what: string): void {
    const list: number[] = [];
    for (const o of offsets) if (o !== 0) list.push(o);
    this.addUniform(Float64Array.from(list), length, what);
  }

  /** [offset, offset + length) holds `what`; empty ranges are ignored. */
  add(offset: number, length: number, what: string): this {
    if (length <= 0) return this;
    this.changes++;
    const k = this.kind(what);
    const i = this.upperBound(offset);
    this.reserve(this.n + 1);
    this.offsets.copyWithin(i + 1, i, this.n);
    this.lengths.copyWithin(i + 1, i, this.n);
    this.kinds.copyWithin(i + 1, i, this.n);
    this.offsets[i] = offset;
    this.lengths[i] = length;
    this.kinds[i] = k;
    this.n++;
    this.recompute(i);
    return this;
  }

  /** Remove one range that starts at `offset` and holds `what`; false if there is none. */
  remove(offset: number, what: string): boolean {
    const k = this.kindIds.get(what);
    if (k === undefined) return false;
    for (let i = this.upperBound(offset) - 1; i >= 0 && this.offsets[i] === offset; i--) {
      if (this.kinds[i] !== k) continue;
      this.changes++;
      this.offsets.copyWithin(i, i + 1, this.n);
      this.lengths.copyWithin(i, i + 1, this.n);
      this.kinds.copyWithin(i, i + 1, this.n);
      this.n--;
      this.recompute(i);
      return true;
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
      if (this.offsets[i]! + this.lengths[i]! > offset && this.offsets[i]! < end) {
        const what = this.names[this.kinds[i]!]!;
        if (!(ignore && ignore.includes(what))) return { offset: this.offsets[i]!, length: this.lengths[i]!, what };
      }
    }
    return undefined;
  }

  /** What [offset, offset + length) overlaps, every kind once in file order ("L2 table, header"), or undefined. */
  overlap(offset: number, length: number): string | undefined {
    if (length <= 0) return undefined;
    const end = offset + length;
    const hits: string[] = [];
    for (let i = this.upperBound(end - 1) - 1; i >= 0 && this.maxEnd[i]! > offset; i--) {
      if (this.offsets[i]! + this.lengths[i]! > offset && this.offsets[i]! < end) hits.push(this.names[this.kinds[i]!]!);
    }
    if (hits.length === 0) return undefined;
    return [...new Set(hits.reverse())].join(', ');
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

  private kind(what: string): number {
    let k = this.kindIds.get(what);
    if (k === undefined) {
      k = this.names.length;
      if (k > 0xffff) throw new CorruptImageError(`${this.name}: too many kinds of metadata`);
      this.names.push(what);
      this.kindIds.set(what, k);
    }
    return k;
  }

  private reserve(want: number): void {
    if (want <= this.offsets.length) return;
    let cap = this.offsets.length;
    while (cap < want) cap *= 2;
    const grow = <T extends Float64Array | Uint16Array>(a: T, make: (n: number) => T): T => {
      const b = make(cap);
      b.set(a.subarray(0, this.n));
      return b;
    };
    this.offsets = grow(this.offsets, (c) => new Float64Array(c));
    this.lengths = grow(this.lengths, (c) => new Float64Array(c));
    this.kinds = grow(this.kinds, (c) => new Uint16Array(c));
    this.maxEnd = grow(this.maxEnd, (c) => new Float64Array(c));
  }

  /** Merge `m` ranges sorted by offset into the sorted arrays, from the back, in place. */
  private merge(m: number, off: (i: number) => number, len: (i: number) => number, kind: (i: number) => number): void {
    this.changes++;
    if (m === 0) return;
    this.reserve(this.n + m);
    let i = this.n - 1;
    let j = m - 1;
    for (let w = this.n + m - 1; j >= 0; w--) {
      // Equal offsets: the new range goes after the old ones (as add() does).
      if (i >= 0 && this.offsets[i]! > off(j)) {
        this.offsets[w] = this.offsets[i]!;
        this.lengths[w] = this.lengths[i]!;
        this.kinds[w] = this.kinds[i]!;
        i--;
      } else {
        this.offsets[w] = off(j);
        this.lengths[w] = len(j);
        this.kinds[w] = kind(j);
        j--;
      }
    }
    this.n += m;
    this.recompute(0);
  }

  /** Index of the first range with offset > x. */
  private upperBound(x: number): number {
    let lo = 0;
    let hi = this.n;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (this.offsets[mid]! <= x) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  }

  private recompute(from: number): void {
    let m = from > 0 ? this.maxEnd[from - 1]! : 0;
    for (let i = from; i < this.n; i++) {
      m = Math.max(m, this.offsets[i]! + this.lengths[i]!);
      this.maxEnd[i] = m;
    }
  }
}
