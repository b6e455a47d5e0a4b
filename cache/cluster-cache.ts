// The data cluster cache: a filter node between fs/ and the format node. It keeps
// recently read blocks of guest data in an LRU bounded in bytes, and implements
// QEMU's cache modes at this one place for every driver.
//
// Writes pass straight down to the format node (which allocates and orders its own
// metadata) and update the cached copies, so a killed process never loses a write
// that was acknowledged; what "writeback" defers is the format's metadata, kept in
// its TableCaches until flush. A read that raced a write never inserts stale data.
import { LRUCache } from 'lru-cache';
import type { BlockNode, CacheMode, HostCipher, TruncateOptions, WriteLog, ZeroOptions } from '../drivers/types.js';
import { Filter } from '../drivers/filters/filter.js';
import createDebug from '../drivers/util/debug.js';

const debug = createDebug('tsmount:cache');

export interface ClusterCacheOptions {
  mode: CacheMode;
  /** Bytes of guest data to keep; 0 disables the data cache. */
  maxBytes: number;
  /** The unit of caching: a power of two, or the node's chunk size when `chunked`. */
  blockSize: number;
  /**
   * The node below decodes whole chunks of blockSize bytes (BlockNode.chunkSize):
   * reads fill the LRU a whole block at a time, small reads included (a scan only
   * the blocks at its edges), and a block being read is shared by every request
   * that needs it, so a sequential read decodes each chunk once.
   */
  chunked?: boolean;
}

export const DEFAULT_BLOCK_SIZE = 64 * 1024;

/** Reads of at least this many bytes bypass the LRU (see read). */
export const SCAN_READ_MIN = 256 * 1024;

export class ClusterCache extends Filter {
  private readonly lru: LRUCache<number, Buffer> | undefined;
  /** Chunked mode: blocks being read, shared by every request that needs them. */
  private readonly loading = new Map<number, Promise<Buffer>>();
  private writesInFlight = 0;
  /** Bumped when a write or zero finishes; fills that saw it change are dropped. */
  private writeSeq = 0;
  /** Block lookups answered from the LRU, and reads that went to the node below (tsmount --list). */
  readonly stats = { hits: 0, misses: 0 };

  constructor(next: BlockNode, private readonly opts: ClusterCacheOptions) {
    super(next);
    if (opts.chunked ? !(Number.isSafeInteger(opts.blockSize) && opts.blockSize > 0) : !Number.isInteger(Math.log2(opts.blockSize))) {
      throw new Error(opts.chunked ? 'cache chunk size must be a positive integer' : 'cache block size must be a power of two');
    }
    // cache=none and directsync bypass host caches in QEMU; we bypass ours.
    const bypass = opts.mode === 'none' || opts.mode === 'directsync';
    // A chunk larger than the budget is still kept, one at a time: decoding it needs
    // that much memory anyway, and without it every small read would decode it again.
    const room = opts.chunked && opts.maxBytes > 0 ? Math.max(opts.maxBytes, opts.blockSize) : opts.maxBytes;
    if (!bypass && room >= opts.blockSize) {
      this.lru = new LRUCache<number, Buffer>({ maxSize: room, sizeCalculation: (b) => b.length });
    }
  }

  /**
   * With passthrough no request reaches this cache, so it holds nothing stale. Not in
   * writethrough and directsync, where every write must be flushed here.
   */
  override get passthroughFd(): number | undefined {
    return this.opts.mode === 'writethrough' || this.opts.mode === 'directsync' ? undefined : this.next.passthroughFd;
  }

  /**
   * Writes pass straight down, so the image file always has the newest bytes once a
   * write is answered (fs/read-map.ts reads it around this cache).
   */
  override get hostFd(): number | undefined {
    return this.next.hostFd;
  }
  override get hostCipher(): HostCipher | undefined {
    return this.next.hostCipher;
  }

  /**
   * Writes around this cache only where it flushes nothing per write; what it holds
   * of them goes stale, so the FUSE layer calls dropCachedData before its next read.
   */
  override get inPlaceWrites(): boolean | undefined {
    return this.opts.mode === 'writethrough' || this.opts.mode === 'directsync' ? undefined : this.next.inPlaceWrites;
  }
  override get writeLog(): WriteLog | undefined {
    return this.opts.mode === 'writethrough' || this.opts.mode === 'directsync' ? undefined : this.next.writeLog;
  }

  /** Forget every cached block; a read in flight inserts nothing it read before (writeSeq). */
  override get dropCachedData(): () => void {
    return () => {
      this.lru?.clear();
      this.writeSeq++;
      this.next.dropCachedData?.();
    };
  }

  override async read(offset: number, dst: Uint8Array): Promise<void> {
    const lru = this.lru;
    // A large read is a scan (readahead of a sequential reader): it reads straight into
    // dst and is not cached, so a scan neither evicts what the LRU holds nor pays a copy
    // and a fresh buffer per block for data the kernel's page cache keeps anyway. This
    // doubled sequential reads. The node below always has the newest bytes (writes
    // pass straight down), so skipping cached blocks here is never stale.
    if (lru && this.opts.chunked) return this.readChunks(lru, offset, dst);
    if (!lru || dst.length >= SCAN_READ_MIN) {
      this.stats.misses++;
      return this.next.read(offset, dst);
    }
    const bs = this.opts.blockSize;
    const end = offset + dst.length;
    let block = Math.floor(offset / bs);
    const lastBlock = Math.floor((end - 1) / bs);
    while (block <= lastBlock) {
      const cached = lru.get(block);
      if (cached) {
        this.stats.hits++;
        copyOut(cached, block * bs, offset, dst);
        block++;
        continue;
      }
      // A run of missing blocks is read with one request.
      this.stats.misses++;
      let runEnd = block + 1;
      while (runEnd <= lastBlock && !lru.has(runEnd)) runEnd++;
      if (dst.length < bs && block === Math.floor(offset / bs) && block === lastBlock) {
        // A small read inside one block (random 4 KiB reads: readahead is off) reads
        // just its bytes, straight into dst: filling the whole block would read and
        // copy 16 times as much, for a block the kernel's page cache already keeps
        // the part of that was asked for. Nothing is inserted, so no staleness.
        return this.next.read(offset, dst);
      }
      await this.fill(block, runEnd, offset, dst);
      block = runEnd;
    }
  }

  /**
   * Chunked mode: every block the request touches, whole, from the LRU or read once.
   * A scan reads the blocks it covers whole straight into dst, uncached, as the block
   * mode does (a sequential reader does not come back to them, and filling fresh cache
   * memory cost a third of the CPU); the blocks at its edges, which the next request
   * also needs, go through the LRU.
   */
  private async readChunks(lru: LRUCache<number, Buffer>, offset: number, dst: Uint8Array): Promise<void> {
    const bs = this.opts.blockSize;
    const end = offset + dst.length;
    const first = Math.floor(offset / bs);
    const last = Math.floor((end - 1) / bs);
    const scan = dst.length >= SCAN_READ_MIN;
    const pending: Promise<void>[] = [];
    for (let b = first; b <= last; b++) {
      const cached = lru.get(b);
      if (cached) {
        this.stats.hits++;
        copyOut(cached, b * bs, offset, dst);
        continue;
      }
      this.stats.misses++;
      const whole = b * bs >= offset && Math.min((b + 1) * bs, this.next.size) <= end;
      if (scan && whole && !this.loading.has(b)) {
        // A run of such blocks is one request.
        let runEnd = b + 1;
        while (runEnd <= last && Math.min((runEnd + 1) * bs, this.next.size) <= end && !lru.has(runEnd) && !this.loading.has(runEnd)) runEnd++;
        const to = Math.min(runEnd * bs, this.next.size);
        pending.push(this.next.read(b * bs, dst.subarray(b * bs - offset, to - offset)));
        b = runEnd - 1;
        continue;
      }
      pending.push(this.chunk(lru, b).then((buf) => copyOut(buf, b * bs, offset, dst)));
    }
    await Promise.all(pending);
  }

  private chunk(lru: LRUCache<number, Buffer>, b: number): Promise<Buffer> {
    const inFlight = this.loading.get(b);
    if (inFlight) return inFlight;
    const bs = this.opts.blockSize;
    const seq = this.writeSeq;
    const load = (async () => {
      const buf = Buffer.allocUnsafe(Math.min(bs, this.next.size - b * bs));
      await this.next.read(b * bs, buf);
      if (this.writesInFlight === 0 && this.writeSeq === seq) lru.set(b, buf);
      return buf;
    })().finally(() => this.loading.delete(b));
    this.loading.set(b, load);
    return load;
  }

  private async fill(first: number, endBlock: number, offset: number, dst: Uint8Array): Promise<void> {
    const bs = this.opts.blockSize;
    const start = first * bs;
    const stop = Math.min(endBlock * bs, this.next.size);
    const seq = this.writeSeq;
    const reqStart = Math.max(start, offset);
    const reqEnd = Math.min(stop, offset + dst.length);
    // Whole blocks are read, so that they can be cached; the request is copied out.
    const buf = Buffer.allocUnsafe(stop - start);
    try {
      await this.next.read(start, buf);
    } catch (err) {
      // The error may lie in the blocks but outside the request (a damaged cluster
      // next to it): QEMU reads only what was asked, so read just that, uncached, and
      // give its own error if it has one.
      if (reqStart === start && reqEnd === stop) throw err;
      await this.next.read(reqStart, dst.subarray(reqStart - offset, reqEnd - offset));
      return;
    }
    dst.set(buf.subarray(reqStart - start, reqEnd - start), reqStart - offset);
    if (this.writesInFlight > 0 || this.writeSeq !== seq) return;
    for (let b = first; b < endBlock; b++) {
      const from = b * bs - start;
      if (from >= buf.length) break;
      this.lru!.set(b, buf.subarray(from, Math.min(from + bs, buf.length)));
    }
  }

  override async write(offset: number, src: Uint8Array): Promise<void> {
    this.writesInFlight++;
    try {
      await this.next.write(offset, src);
      this.patch(offset, src);
    } catch (err) {
      this.invalidate(offset, src.length);
      throw err;
    } finally {
      this.writesInFlight--;
      this.writeSeq++;
    }
    if (this.opts.mode === 'writethrough' || this.opts.mode === 'directsync') await this.next.flush();
  }

  /** The cached blocks the cluster covers are dropped: the node below may store it in any form. */
  override get writeCompressed(): ((offset: number, data: Uint8Array) => Promise<void>) | undefined {
    const next = this.next;
    if (!next.writeCompressed) return undefined;
    return async (offset, data) => {
      this.writesInFlight++;
      try {
        this.invalidate(offset, data.length);
        await next.writeCompressed!(offset, data);
      } finally {
        this.invalidate(offset, data.length);
        this.writesInFlight--;
        this.writeSeq++;
      }
      if (this.opts.mode === 'writethrough' || this.opts.mode === 'directsync') await next.flush();
    };
  }

  /** Always offered: where the node below cannot zero, zeros are written. */
  override get zero(): (offset: number, length: number, unmap: boolean, o?: ZeroOptions) => Promise<void> {
    return (offset, length, unmap, o) => this.cachedZero(offset, length, unmap, o);
  }

  private async cachedZero(offset: number, length: number, unmap: boolean, o?: ZeroOptions): Promise<void> {
    this.writesInFlight++;
    try {
      this.invalidate(offset, length);
      if (this.next.zero) await this.next.zero(offset, length, unmap, o);
      else await this.writeZeros(offset, length);
    } finally {
      this.invalidate(offset, length);
      this.writesInFlight--;
      this.writeSeq++;
    }
    if (this.opts.mode === 'writethrough' || this.opts.mode === 'directsync') await this.next.flush();
  }

  private async writeZeros(offset: number, length: number): Promise<void> {
    const chunk = new Uint8Array(Math.min(length, 1 << 20));
    for (let done = 0; done < length; done += chunk.length) {
      const n = Math.min(chunk.length, length - done);
      await this.next.write(offset + done, chunk.subarray(0, n));
    }
  }

  /** Copy freshly written bytes into blocks that are cached. */
  private patch(offset: number, src: Uint8Array): void {
    const lru = this.lru;
    if (!lru) return;
    const bs = this.opts.blockSize;
    const end = offset + src.length;
    for (let b = Math.floor(offset / bs); b * bs < end; b++) {
      const cached = lru.peek(b);
      if (!cached) continue;
      const blockStart = b * bs;
      const from = Math.max(offset, blockStart);
      const to = Math.min(end, blockStart + cached.length);
      if (to > from) cached.set(src.subarray(from - offset, to - offset), from - blockStart);
    }
  }

  private invalidate(offset: number, length: number): void {
    const lru = this.lru;
    if (!lru) return;
    const bs = this.opts.blockSize;
    for (let b = Math.floor(offset / bs); b * bs < offset + length; b++) lru.delete(b);
  }

  /** cache=unsafe ignores flushes, as QEMU does; close() still writes everything. */
  override async flush(): Promise<void> {
    debug('%s: flush%s', this.next.name, this.opts.mode === 'unsafe' ? ' ignored (cache=unsafe)' : '');
    if (this.opts.mode === 'unsafe') return;
    await this.next.flush();
  }

  /** Offered where the node below can grow; cached blocks go with the old size. */
  override get truncate(): ((size: number, o?: TruncateOptions) => Promise<void>) | undefined {
    const next = this.next;
    if (!next.truncate) return undefined;
    return async (size, o) => {
      this.lru?.clear();
      await next.truncate!(size, o);
    };
  }

  override async close(): Promise<void> {
    this.lru?.clear();
    await this.next.close();
  }
}

function copyOut(block: Buffer, blockStart: number, offset: number, dst: Uint8Array): void {
  const from = Math.max(blockStart, offset);
  const to = Math.min(blockStart + block.length, offset + dst.length);
  if (to > from) dst.set(block.subarray(from - blockStart, to - blockStart), from - offset);
}
