// The qcow2 format node: read, write, zero, flush, block status (QEMU's qcow2.c).
// Mapping lives in cluster.ts, allocation in refcount.ts; this file does the I/O
// and decides the order in which data and metadata reach the disk.
import type { BlockNode, Extent, ExtentKind, HasBacking } from '../../types.js';
import { ReadOnlyError, UnsupportedError } from '../../errors.js';
import type { TableCache } from '../../../cache/table-cache.js';
import { readFromBacking } from '../backing.js';
import type { ClusterMap, Run } from './cluster.js';
import type { Refcounts } from './refcount.js';
import { encodeL2, type L2Entry } from './entries.js';
import { Mutex } from './mutex.js';

export interface Qcow2NodeOptions {
  file: BlockNode;
  size: number;
  readOnly: boolean;
  version: 2 | 3;
  backing: BlockNode | undefined;
  map: ClusterMap;
  refcounts: Refcounts;
  refcountCache: TableCache;
  /** Flush the file between dependent metadata writes (false for cache=unsafe). */
  barriers: boolean;
}

/** Zeros written per request when zeroing has to write data (v2 with a backing file). */
const ZERO_CHUNK = 1 << 20;

export class Qcow2Node implements BlockNode, HasBacking {
  readonly size: number;
  readonly readOnly: boolean;
  readonly backing: BlockNode | undefined;
  private readonly file: BlockNode;
  private readonly cs: number;
  private readonly v3: boolean;
  private readonly map: ClusterMap;
  private readonly refcounts: Refcounts;
  private readonly refcountCache: TableCache;
  private readonly barriers: boolean;
  private readonly mutex = new Mutex();
  /** In-place writes in flight; freed clusters are not handed out again until they end. */
  private readonly inflight = new Set<Promise<boolean>>();
  private closed = false;

  constructor(o: Qcow2NodeOptions) {
    this.file = o.file;
    this.size = o.size;
    this.readOnly = o.readOnly;
    this.v3 = o.version === 3;
    this.backing = o.backing;
    this.map = o.map;
    this.cs = o.map.clusterSize;
    this.refcounts = o.refcounts;
    this.refcountCache = o.refcountCache;
    this.barriers = o.barriers;
  }

  get name(): string {
    return this.file.name;
  }

  async read(offset: number, dst: Uint8Array): Promise<void> {
    const runs = await this.map.map(offset, dst.length);
    if (runs.length === 1) return this.readRun(runs[0]!, offset, dst);
    await Promise.all(runs.map((r) => this.readRun(r, offset, dst)));
  }

  private readRun(run: Run, base: number, dst: Uint8Array): Promise<void> {
    const sub = dst.subarray(run.guest - base, run.guest - base + run.length);
    switch (run.kind) {
      case 'data':
        return this.file.read(run.host, sub);
      case 'zero':
        sub.fill(0);
        return Promise.resolve();
      case 'unallocated':
        return readFromBacking(this.backing, run.guest, sub);
      case 'compressed':
        return Promise.reject(this.compressedError(run.guest));
    }
  }

  private compressedError(guest: number): UnsupportedError {
    return new UnsupportedError(`${this.name}: qcow2 feature compressed clusters is not supported yet (guest offset 0x${guest.toString(16)})`);
  }

  async write(offset: number, src: Uint8Array): Promise<void> {
    if (this.readOnly) throw new ReadOnlyError(`${this.name}: opened read-only`);
    const inPlace = this.writeInPlace(offset, src);
    this.inflight.add(inPlace);
    let done: boolean;
    try {
      done = await inPlace;
    } finally {
      this.inflight.delete(inPlace);
    }
    if (!done) await this.mutex.run(() => this.writeLocked(offset, src));
  }

  /** The common case, without the mutex: every cluster is allocated and ours alone. */
  private async writeInPlace(offset: number, src: Uint8Array): Promise<boolean> {
    const runs = await this.map.map(offset, src.length);
    if (!runs.every((r) => r.kind === 'data' && r.copied)) return false;
    const sub = (r: Run): Uint8Array => src.subarray(r.guest - offset, r.guest - offset + r.length);
    if (runs.length === 1) await this.file.write(runs[0]!.host, src);
    else await Promise.all(runs.map((r) => this.file.write(r.host, sub(r))));
    return true;
  }

  /** Write with allocation; the caller holds the mutex. */
  private async writeLocked(offset: number, src: Uint8Array): Promise<void> {
    const end = offset + src.length;
    let pos = offset;
    while (pos < end) {
      const l1i = Math.floor(pos / this.map.l2Span);
      const chunkEnd = Math.min(end, (l1i + 1) * this.map.l2Span);
      const l2Offset = await this.l2ForWrite(l1i);
      await this.writeInTable(l2Offset, l1i, pos, src.subarray(pos - offset, chunkEnd - offset));
      pos = chunkEnd;
    }
  }

  /**
   * The L2 table for L1 index l1i, made writable: allocated if missing (written
   * before the L1 entry points at it), its COPIED flag set if its refcount is one.
   */
  private async l2ForWrite(l1i: number): Promise<number> {
    const e = this.map.l1Entry(l1i);
    if (e.offset !== 0) {
      if (!e.copied) {
        const rc = await this.refcounts.refcount(e.offset / this.cs);
        if (rc !== 1) {
          throw new UnsupportedError(`${this.name}: qcow2 L2 table at 0x${e.offset.toString(16)} is shared (refcount ${rc}); writing to shared tables is not supported yet`);
        }
        await this.map.setL1Entry(l1i, e.offset, true);
      }
      return e.offset;
    }
    const { start } = await this.refcounts.allocate(1);
    const offset = start * this.cs;
    this.map.l2Cache.getNew(offset);
    // The table's refcount, then the (empty) table, then the L1 entry.
    await this.map.l2Cache.flush();
    await this.barrier();
    await this.map.setL1Entry(l1i, offset, true);
    return offset;
  }

  /** Write data that lies inside one L2 table's range. */
  private async writeInTable(l2Offset: number, l1i: number, pos: number, data: Uint8Array): Promise<void> {
    const cs = this.cs;
    const end = pos + data.length;
    const first = Math.floor(pos / cs);
    const count = Math.ceil(end / cs) - first;
    const baseIndex = l1i * this.map.l2Entries;
    // Tables are never held across an await: a clean table may be evicted and
    // read back as another object. Snapshot the entries, re-get to modify.
    let table = await this.map.l2Cache.get(l2Offset);
    const entries: L2Entry[] = [];
    for (let k = 0; k < count; k++) entries.push(this.map.entry(table, first + k - baseIndex, first + k));

    let i = 0;
    while (i < count) {
      const e = entries[i]!;
      if (e.kind === 'compressed') throw this.compressedError((first + i) * cs);
      if (e.kind === 'data' && e.copied) {
        let j = i + 1;
        while (j < count && isInPlace(entries[j]!) && entries[j]!.host === e.host + (j - i) * cs) j++;
        const from = Math.max(pos, (first + i) * cs);
        const to = Math.min(end, (first + j) * cs);
        await this.file.write(e.host + (from - (first + i) * cs), data.subarray(from - pos, to - pos));
        i = j;
        continue;
      }
      let j = i + 1;
      while (j < count && !isInPlace(entries[j]!) && entries[j]!.kind !== 'compressed') j++;
      const got = await this.refcounts.allocate(j - i);
      j = i + got.count;
      const host = got.start * cs;
      // New data first; the L2 entries that point at it after.
      await this.writeNewClusters(first + i, first + j, host, entries.slice(i, j), pos, data);
      table = await this.map.l2Cache.get(l2Offset);
      const dv = table.view();
      for (let k = i; k < j; k++) {
        encodeL2(dv, first + k - baseIndex, host + (k - i) * cs, true, false);
        const old = entries[k]!;
        if (old.host !== 0) this.refcounts.queueFree(old.host);
      }
      this.map.l2Cache.markDirty(table);
      i = j;
    }
  }

  /**
   * Fill freshly allocated clusters [c0, c1) at `host` with the written bytes, and
   * the parts of the first and last cluster the write does not cover with what
   * they read as before (backing file, zeros, or the old shared cluster).
   */
  private async writeNewClusters(c0: number, c1: number, host: number, olds: L2Entry[], pos: number, data: Uint8Array): Promise<void> {
    const cs = this.cs;
    const from = Math.max(pos, c0 * cs);
    const to = Math.min(pos + data.length, c1 * cs);
    const head = from - c0 * cs;
    const tail = c1 * cs - to;
    const body = (a: number, b: number): Uint8Array => data.subarray(a - pos, b - pos);
    if (head === 0 && tail === 0) return this.file.write(host, body(from, to));
    if (c1 - c0 === 1) {
      const buf = Buffer.alloc(cs);
      await Promise.all([this.cowFill(c0, olds[0]!, buf, 0, head), this.cowFill(c0, olds[0]!, buf, cs - tail, cs)]);
      buf.set(body(from, to), head);
      return this.file.write(host, buf);
    }
    const writes: Promise<void>[] = [];
    let midFrom = from;
    let midTo = to;
    if (head > 0) {
      const buf = Buffer.alloc(cs);
      midFrom = (c0 + 1) * cs;
      await this.cowFill(c0, olds[0]!, buf, 0, head);
      buf.set(body(from, midFrom), head);
      writes.push(this.file.write(host, buf));
    }
    if (tail > 0) {
      const buf = Buffer.alloc(cs);
      midTo = (c1 - 1) * cs;
      await this.cowFill(c1 - 1, olds[olds.length - 1]!, buf, cs - tail, cs);
      buf.set(body(midTo, to), 0);
      writes.push(this.file.write(host + (c1 - 1 - c0) * cs, buf));
    }
    if (midTo > midFrom) writes.push(this.file.write(host + (midFrom - c0 * cs), body(midFrom, midTo)));
    await Promise.all(writes);
  }

  /** Bytes [a, b) of guest cluster gc as they read before the write. */
  private async cowFill(gc: number, old: L2Entry, buf: Buffer, a: number, b: number): Promise<void> {
    if (b <= a) return;
    const guest = gc * this.cs;
    // Past the end of the disk stays zero.
    const limit = Math.min(b, Math.max(a, this.size - guest));
    if (limit <= a) return;
    const dst = buf.subarray(a, limit);
    if (old.kind === 'unallocated') await readFromBacking(this.backing, guest + a, dst);
    else if (old.kind === 'data') await this.file.read(old.host + a, dst);
    // zero clusters: the buffer already is.
  }

  async zero(offset: number, length: number, unmap: boolean): Promise<void> {
    if (this.readOnly) throw new ReadOnlyError(`${this.name}: opened read-only`);
    await this.mutex.run(() => this.zeroLocked(offset, length, unmap));
  }

  private async zeroLocked(offset: number, length: number, unmap: boolean): Promise<void> {
    const cs = this.cs;
    const end = offset + length;
    const alignedStart = Math.ceil(offset / cs) * cs;
    // The last, partial cluster of the disk counts as whole.
    const alignedEnd = end === this.size ? Math.ceil(end / cs) * cs : Math.floor(end / cs) * cs;
    if (alignedStart >= alignedEnd) return this.zeroPartial(offset, end);
    if (offset < alignedStart) await this.zeroPartial(offset, alignedStart);
    await this.zeroClusters(alignedStart, alignedEnd, unmap);
    if (alignedEnd < end) await this.zeroPartial(alignedEnd, end);
  }

  private async zeroPartial(a: number, b: number): Promise<void> {
    const runs = await this.map.map(a, b - a);
    const readsZero = runs.every((r) => r.kind === 'zero' || (r.kind === 'unallocated' && !this.backingCovers(r.guest)));
    if (!readsZero) await this.writeLocked(a, Buffer.alloc(b - a));
  }

  private backingCovers(guest: number): boolean {
    return this.backing !== undefined && this.backing.size > guest;
  }

  /** Zero whole clusters [a, b) (b may pass the disk end by less than a cluster). */
  private async zeroClusters(a: number, b: number, unmap: boolean): Promise<void> {
    const cs = this.cs;
    if (!this.v3 && this.backing) {
      // v2 has no zero flag, and unallocated would show the backing file.
      const limit = Math.min(b, this.size);
      for (let pos = a; pos < limit; pos += ZERO_CHUNK) {
        const n = Math.min(ZERO_CHUNK, limit - pos);
        await this.writeLocked(pos, Buffer.alloc(n));
      }
      return;
    }
    let pos = a;
    while (pos < b) {
      const l1i = Math.floor(pos / this.map.l2Span);
      const chunkEnd = Math.min(b, (l1i + 1) * this.map.l2Span);
      const here = pos;
      pos = chunkEnd;
      if (this.map.l1Entry(l1i).offset === 0 && !this.backingCovers(here)) continue;
      const l2Offset = await this.l2ForWrite(l1i);
      const table = await this.map.l2Cache.get(l2Offset);
      const dv = table.view();
      const baseIndex = l1i * this.map.l2Entries;
      const first = here / cs;
      const last = chunkEnd / cs;
      for (let gc = first; gc < last; gc++) {
        if (this.map.entry(table, gc - baseIndex, gc).kind === 'compressed') throw this.compressedError(gc * cs);
      }
      let changed = false;
      for (let gc = first; gc < last; gc++) {
        const idx = gc - baseIndex;
        const e = this.map.entry(table, idx, gc);
        if (this.v3) {
          if (e.kind === 'zero' && (e.host === 0 || !unmap)) continue;
          if (e.kind === 'unallocated' && !this.backingCovers(gc * cs)) continue;
          if (!unmap && e.kind === 'data' && e.copied) {
            // Keep the allocation, as QEMU does without unmap.
            encodeL2(dv, idx, e.host, true, true);
          } else {
            encodeL2(dv, idx, 0, false, true);
            if (e.host !== 0) this.refcounts.queueFree(e.host);
          }
        } else {
          if (e.kind === 'unallocated') continue;
          encodeL2(dv, idx, 0, false, false);
          if (e.host !== 0) this.refcounts.queueFree(e.host);
        }
        changed = true;
      }
      if (changed) this.map.l2Cache.markDirty(table);
    }
  }

  /**
   * Refcount blocks, barrier, L2 tables, then the file. Clusters freed since the
   * last flush are given back only now that no L2 table on disk points at them.
   */
  async flush(): Promise<void> {
    if (this.readOnly) return;
    await this.mutex.run(async () => {
      const frees = this.refcounts.takeFrees();
      await Promise.allSettled([...this.inflight]);
      if (this.refcountCache.hasDirty()) {
        await this.refcountCache.flush();
        await this.barrier();
      }
      await this.map.l2Cache.flush();
      await this.file.flush();
      if (frees.length > 0) {
        await this.refcounts.applyFrees(frees);
        await this.refcountCache.flush();
        await this.file.flush();
      }
    });
  }

  private async barrier(): Promise<void> {
    if (this.barriers) await this.file.flush();
  }

  async blockStatus(offset: number, length: number): Promise<Extent[]> {
    const runs = await this.map.map(offset, length);
    const out: Extent[] = [];
    for (const r of runs) {
      const kind: ExtentKind = r.kind === 'compressed' ? 'data' : r.kind;
      const last = out[out.length - 1];
      if (last && last.kind === kind) last.length += r.length;
      else out.push({ offset: r.guest, length: r.length, kind });
    }
    return out;
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    try {
      if (!this.readOnly) await this.flush();
    } finally {
      try {
        await this.backing?.close();
      } finally {
        await this.file.close();
      }
    }
  }
}

function isInPlace(e: L2Entry): boolean {
  return e.kind === 'data' && e.copied;
}
