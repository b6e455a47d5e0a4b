// QEMU's preallocate filter (qemu-block-drivers(7), "Filter drivers"; block/preallocate.c):
// between a format and its file, a write past the end of the data first allocates
// zeros well beyond it (prealloc-size, default 128 MiB, the new file end aligned to
// prealloc-align, default 1 MiB), so a file system with slow allocation allocates once
// per that much growth rather than per cluster. Above the filter the file is as long
// as its data (`size`); at close the file is cut back to that. A kill leaves the
// zeros past the data, which every format reads past (QEMU's filter leaves the same).
//
// The graph builder (drivers/open.ts) puts it over the top image's own file only, and
// only when that is opened writable (QEMU's filter does nothing without the write and
// resize permissions; backing files, extents and data files are opened without it, as
// QEMU opens them by name without the filter).
import createDebug from '../util/debug.js';
import type { BlockNode, TruncateOptions, ZeroOptions } from '../types.js';
import { UsageError, messageOf } from '../errors.js';
import { parseSize } from '../options.js';
import { SameBytesFilter } from './filter.js';

const debug = createDebug('tsmount:preallocate');

export interface PreallocateOptions {
  /** How far past a write's end the file is allocated (prealloc-size). */
  size: number;
  /** The new file end is a multiple of this (prealloc-align). */
  align: number;
}

export const PREALLOCATE_DEFAULTS: Readonly<PreallocateOptions> = { size: 128 << 20, align: 1 << 20 };

/** The largest prealloc-size taken: QEMU's is any int64; past 1 TiB at a time is a typo. */
const MAX_PREALLOC_SIZE = 2 ** 40;

/**
 * The filter's options from QEMU's names (`prealloc-size`, `prealloc-align`, sizes with
 * k/M/G/T suffixes), checked as preallocate_absorb_opts checks them.
 */
export function preallocateOptions(given: { size?: string; align?: string }, what = 'preallocate filter'): PreallocateOptions {
  const size = given.size === undefined ? PREALLOCATE_DEFAULTS.size : parseSize(given.size, `${what}: prealloc-size`);
  const align = given.align === undefined ? PREALLOCATE_DEFAULTS.align : parseSize(given.align, `${what}: prealloc-align`);
  if (size > MAX_PREALLOC_SIZE) throw new UsageError(`${what}: prealloc-size ${size} is more than 1 TiB`);
  if (align === 0 || align % 512 !== 0) throw new UsageError('prealloc-align parameter of preallocate filter is not aligned to 512');
  if (align > MAX_PREALLOC_SIZE) throw new UsageError(`${what}: prealloc-align ${align} is more than 1 TiB`);
  return { size, align };
}

/** The filter over `file`; refused where prealloc-align is no multiple of the file's request alignment (QEMU's check). */
export function preallocated(file: BlockNode, o: PreallocateOptions): BlockNode {
  const unit = file.requestAlignment ?? 1;
  if (o.align % unit !== 0) throw new UsageError(`prealloc-align parameter of preallocate filter is not aligned to underlying node request alignment (${unit})`);
  return new PreallocateFilter(file, o);
}

const alignUp = (n: number, a: number): number => Math.ceil(n / a) * a;

/**
 * Bytes are neither changed nor moved here, and every write around the filter (the FUSE
 * workers' in-place writes, the kernel's passthrough) lands inside the data: only a
 * change through the graph allocates past its end (SameBytesFilter).
 */
export class PreallocateFilter extends SameBytesFilter {
  /** The end of the data: the file's length when opened, or the end of a write past it. */
  private dataEnd: number;
  /** Where the zeros past the data begin (a write of zeros past the end moves dataEnd, not this). */
  private zeroStart: number;
  /** Allocation past the end is given up after it failed (a file system without ZERO_RANGE). */
  private unsupported = false;
  private closed = false;

  constructor(next: BlockNode, readonly opts: PreallocateOptions) {
    super(next);
    this.dataEnd = this.zeroStart = next.size;
  }

  /** The file as long as its data: the format above never sees the zeros ahead of it. */
  override get size(): number {
    return this.dataEnd;
  }

  /**
   * Before each write (QEMU's handle_write): one past the end of the data moves the
   * end, and one past the end of the file first allocates zeros to `opts.size` beyond
   * it. True when `mergeZero` (the request is itself zeros) and its range already reads
   * as zeros, so it need not reach the file.
   */
  private async handleWrite(offset: number, length: number, mergeZero: boolean): Promise<boolean> {
    const end = offset + length;
    if (end <= this.dataEnd) {
      // Data inside the data's end but past zeroStart: from there on the zeros are no
      // longer known. (QEMU does not move zero_start here, so a later merged write of
      // zeros over such data would be skipped; tsmount never skips it.)
      if (!mergeZero && end > this.zeroStart) this.zeroStart = end;
      return false;
    }
    this.dataEnd = end;
    if (!mergeZero) this.zeroStart = end;
    const fileEnd = this.next.size;
    if (end <= fileEnd) return mergeZero && offset >= this.zeroStart;
    if (this.unsupported || !this.next.allocateZeros) return false;
    const unit = this.next.requestAlignment ?? 1;
    const start = alignUp(mergeZero ? Math.min(offset, fileEnd) : fileEnd, unit);
    const stop = alignUp(Math.max(start, end) + this.opts.size, Math.max(this.opts.align, unit));
    let done: boolean;
    try {
      done = await this.next.allocateZeros(start, stop - start);
    } catch (err) {
      // As QEMU: a failed preallocation is not the write's failure.
      debug('%s: preallocating %d..%d failed: %s', this.name, start, stop, messageOf(err));
      return false;
    }
    if (!done) {
      this.unsupported = true;
      debug('%s: the file cannot allocate zeros; preallocation off', this.name);
      return false;
    }
    return mergeZero && start <= offset;
  }

  override async write(offset: number, src: Uint8Array): Promise<void> {
    await this.handleWrite(offset, src.length, false);
    return this.next.write(offset, src);
  }

  get writev(): ((offset: number, parts: Uint8Array[]) => Promise<void>) | undefined {
    const next = this.next;
    if (!next.writev) return undefined;
    return async (offset, parts) => {
      let length = 0;
      for (const p of parts) length += p.length;
      await this.handleWrite(offset, length, false);
      return next.writev!(offset, parts);
    };
  }

  get allocateZeros(): ((offset: number, length: number) => Promise<boolean>) | undefined {
    const next = this.next;
    if (!next.allocateZeros) return undefined;
    return async (offset, length) => ((await this.handleWrite(offset, length, true)) ? true : next.allocateZeros!(offset, length));
  }

  /** A discard changes no length (QEMU's filter passes it on as it is). */
  get discard(): ((offset: number, length: number) => Promise<boolean>) | undefined {
    const next = this.next;
    return next.discard && ((offset, length) => next.discard!(offset, length));
  }

  override get zero(): ((offset: number, length: number, unmap: boolean, o?: ZeroOptions) => Promise<void>) | undefined {
    const next = this.next;
    if (!next.zero) return undefined;
    // Unmapping zeros are not merged into the preallocation (QEMU's BDRV_REQ_MAY_UNMAP).
    return async (offset, length, unmap, o) => ((await this.handleWrite(offset, length, !unmap)) ? undefined : next.zero!(offset, length, unmap, o));
  }

  /**
   * QEMU's preallocate_co_truncate: growing with falloc inside the preallocation only
   * moves the end of the data; any other growth first gives the preallocation back.
   */
  override get truncate(): ((size: number, o?: TruncateOptions) => Promise<void>) | undefined {
    const next = this.next;
    if (!next.truncate) return undefined;
    return async (size, o) => {
      if (size > this.dataEnd) {
        if (o?.prealloc === 'falloc' && size <= next.size) {
          this.dataEnd = size;
          return;
        }
        if (o?.prealloc !== 'falloc' && next.size > this.dataEnd) await next.truncate!(this.dataEnd);
      }
      await next.truncate!(size, o);
      this.dataEnd = this.zeroStart = size;
    };
  }

  /** The file cut back to its data, then closed (a failed cut is logged, as QEMU ignores it). */
  override async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    if (this.next.size > this.dataEnd && this.next.truncate) {
      try {
        await this.next.truncate(this.dataEnd);
      } catch (err) {
        process.stderr.write(`tsmount: ${this.name}: could not drop the preallocation past ${this.dataEnd}: ${messageOf(err)}\n`);
      }
    }
    return this.next.close();
  }
}
