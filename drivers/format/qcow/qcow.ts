// The qcow (version 1) format node (QEMU's block/qcow.c): one L1 table in memory, L2
// tables in an LRU, clusters plain, deflate-compressed or AES-encrypted. New clusters
// and L2 tables go at the end of the file, cluster aligned; each is written whole
// (copied from what the guest saw before, zeros allocated without writing them)
// before the L2 or L1 entry points at it: new clusters' entries at the next flush.
import { decompress } from '../../util/decompress.js';
import { MetadataRanges, tableOffsets } from '../metadata-ranges.js';
import { WAITING_MAX, type PagedTable } from '../table-pages.js';
import { TableCache } from '../../../cache/table-cache.js';
import type { BlockNode } from '../../types.js';
import { CorruptImageError, UsageError } from '../../errors.js';
import { compressBlock } from '../../util/compress.js';
import { readFromBacking } from '../backing.js';
import { indexRuns } from '../../util/index-runs.js';
import { pushRun, writeIntoNew, type MappedRun } from '../mapped.js';
import { MappedNode } from '../mapped-node.js';
import { COMPRESSED, HEADER_BYTES, type QcowHeader } from './header.js';
import type { QcowCipher } from './crypto.js';

export interface QcowNodeOptions {
  file: BlockNode;
  header: QcowHeader;
  /** The L1 table, read a page at a time as needed. */
  l1: PagedTable;
  readOnly: boolean;
  backing: BlockNode | undefined;
  cipher: QcowCipher | undefined;
  metadataCacheBytes: number;
  barriers: boolean;
}

/** Where one guest cluster lives (never changed once made: UNALLOCATED is shared). */
type Where =
  | { kind: 'unallocated' }
  | { kind: 'data'; host: number }
  | { kind: 'compressed'; host: number; length: number };
const UNALLOCATED: Where = Object.freeze({ kind: 'unallocated' });

export class QcowNode extends MappedNode {
  private readonly cs: number;
  private readonly clusterBits: number;
  private readonly l2Entries: number;
  private readonly l2Span: number;
  private readonly l1: PagedTable;
  private readonly l1Offset: number;
  private readonly cipher: QcowCipher | undefined;
  readonly encrypted: boolean;
  readonly requestAlignment: number | undefined;
  private readonly l2Cache: TableCache;
  /** The last cluster decompressed (QEMU's cluster_cache). */
  private inflated: { host: number; data: Buffer } | undefined;
  /** Header, L1 table and (for a writer) every L2 table: no guest data may be written there. */
  readonly metadata: MetadataRanges;
  /**
   * L2 entries of new clusters not yet in the file (guest cluster -> entry): written at
   * the next flush behind one barrier after all their data (writeWaiting), as vdi's
   * and vmdk's are, instead of a barrier per allocating write; lookups see them first.
   */
  private readonly waiting = new Map<number, bigint>();

  constructor(o: QcowNodeOptions) {
    super({ file: o.file, size: Math.floor(o.header.size / 512) * 512, readOnly: o.readOnly, barriers: o.barriers, backing: o.backing, allocationUnit: 2 ** o.header.clusterBits });
    this.clusterBits = o.header.clusterBits;
    this.cs = 2 ** o.header.clusterBits;
    this.l2Entries = 2 ** o.header.l2Bits;
    this.l2Span = this.l2Entries * this.cs;
    this.l1 = o.l1;
    this.l1Offset = o.header.l1TableOffset;
    this.cipher = o.cipher;
    this.encrypted = o.cipher !== undefined;
    // Encryption works on whole sectors: unaligned writes become read-modify-write above.
    this.requestAlignment = o.cipher ? 512 : undefined;
    // Three quarters of the metadata budget; the L1 pages have the rest (index.ts).
    this.l2Cache = new TableCache({ name: 'qcow l2', file: o.file, tableSize: this.l2Entries * 8, maxBytes: Math.floor((o.metadataCacheBytes * 3) / 4), barriers: o.barriers });
    this.metadata = new MetadataRanges(o.file.name)
      .add(0, HEADER_BYTES, 'qcow header')
      .add(this.l1Offset, this.l1.entries * 8, 'qcow L1 table');
  }

  /** A writer knows every L2 table, so no data write lands on one (as qcow2's overlap checks). */
  async trackTables(): Promise<void> {
    this.metadata.addTables(await tableOffsets(this.file, this.l1Offset, this.l1.entries, 8, false, Number), this.l2Entries * 8, 'qcow L2 table');
  }

  private corrupt(msg: string): CorruptImageError {
    return new CorruptImageError(`${this.name}: ${msg}`);
  }

  private async l2Table(l2Offset: number): Promise<Buffer> {
    if (l2Offset + this.l2Entries * 8 > this.file.size) throw this.corrupt(`qcow L2 table at 0x${l2Offset.toString(16)} lies outside the file`);
    return (await this.l2Cache.get(l2Offset)).data;
  }

  /**
   * Entry i of an L2 table (guest cluster gc): a plain cluster offset below 2^53 read as
   * two 32-bit halves (a 64 MiB window of 4 KiB clusters is 16384 entries), anything
   * else through decode, which names the fault.
   */
  private entry(table: Buffer, i: number, gc: number): Where {
    const hi = table.readUInt32BE(i * 8);
    const lo = table.readUInt32BE(i * 8 + 4);
    if (hi === 0 && lo === 0) return UNALLOCATED;
    if (hi >= 2 ** 21) return this.decode(table.readBigUInt64BE(i * 8), gc);
    const host = hi * 2 ** 32 + lo;
    if (host % 512 !== 0 || host >= this.file.size) return this.decode(BigInt(host), gc);
    return { kind: 'data', host };
  }

  /** The L2 entry of guest cluster gc, decoded and checked. */
  private decode(raw: bigint, gc: number): Where {
    if (raw === 0n) return UNALLOCATED;
    if (raw & COMPRESSED) {
      const shift = BigInt(63 - this.clusterBits);
      const length = Number((raw >> shift) & BigInt(this.cs - 1));
      const host = Number(raw & ((1n << shift) - 1n));
      if (host + length > this.file.size || length === 0) throw this.corrupt(`qcow compressed cluster ${gc} (0x${host.toString(16)}, ${length} bytes) lies outside the file`);
      return { kind: 'compressed', host, length };
    }
    if (raw > BigInt(Number.MAX_SAFE_INTEGER)) throw this.corrupt(`qcow cluster offset 0x${raw.toString(16)} is out of range`);
    const host = Number(raw);
    if (host % 512 !== 0 || host >= this.file.size) throw this.corrupt(`qcow cluster ${gc} at 0x${host.toString(16)} is misaligned or outside the file`);
    return { kind: 'data', host };
  }

  /** L1 entry l1i: an L2 table offset, 0 when none. */
  private async l1Entry(l1i: number): Promise<number> {
    if (l1i >= this.l1.entries) return 0;
    const v = await this.l1.u64be(l1i);
    if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw this.corrupt(`qcow L1 entry ${l1i} (0x${v.toString(16)}) is out of range`);
    return Number(v);
  }

  /** Where guest clusters [first, first + count) live; count stays inside one L2 table. */
  private async lookup(first: number, count: number): Promise<Where[]> {
    const l1i = Math.floor(first / this.l2Entries);
    const l2Offset = await this.l1Entry(l1i);
    const table = l2Offset === 0 ? undefined : await this.l2Table(l2Offset);
    const out: Where[] = new Array<Where>(count);
    for (let k = 0; k < count; k++) out[k] = table ? this.entry(table, (first + k) % this.l2Entries, first + k) : UNALLOCATED;
    if (this.waiting.size > 0) {
      for (let k = 0; k < count; k++) {
        const e = this.waiting.get(first + k);
        if (e !== undefined) out[k] = this.decode(e, first + k);
      }
    }
    return out;
  }

  async mapRange(offset: number, length: number): Promise<MappedRun[]> {
    const out: MappedRun[] = [];
    const end = offset + length;
    let pos = offset;
    while (pos < end) {
      const spanEnd = Math.min(end, (Math.floor(pos / this.l2Span) + 1) * this.l2Span);
      const first = Math.floor(pos / this.cs);
      const wheres = await this.lookup(first, Math.ceil(spanEnd / this.cs) - first);
      wheres.forEach((w, k) => {
        const a = Math.max(pos, (first + k) * this.cs);
        const b = Math.min(spanEnd, (first + k + 1) * this.cs);
        if (w.kind === 'unallocated') pushRun(out, { kind: 'unallocated', offset: a, length: b - a });
        else if (w.kind === 'compressed') {
          const run: MappedRun = { kind: 'custom', offset: a, length: b - a, read: (dst) => this.readCompressed(w.host, w.length, a % this.cs, dst) };
          // A whole cluster: where its stream lies (raw deflate of exactly `length` bytes, as qcow2's), for the read map's threads.
          if (a % this.cs === 0 && b - a === this.cs) {
            run.compressed = { host: w.host, length: w.length, stream: 'deflate-raw' };
            run.file = this.file;
          }
          out.push(run);
        }
        else pushRun(out, { kind: 'data', offset: a, length: b - a, host: w.host + (a % this.cs) });
      });
      pos = spanEnd;
    }
    if (!this.cipher) return out;
    return out.map((r) => (r.kind === 'data' ? { kind: 'custom', offset: r.offset, length: r.length, read: (dst) => this.readEncrypted(r.host, r.offset, dst) } : r));
  }

  private async readEncrypted(host: number, guest: number, dst: Uint8Array): Promise<void> {
    // Whole sectors are read and decrypted; the request may start or end inside one.
    const start = guest - (guest % 512);
    const endG = Math.ceil((guest + dst.length) / 512) * 512;
    if (start === guest && endG === guest + dst.length) {
      await this.file.read(host, dst);
      this.cipher!.decrypt(dst, guest);
      return;
    }
    const buf = Buffer.alloc(endG - start);
    await this.file.read(host - (guest - start), buf);
    this.cipher!.decrypt(buf, start);
    dst.set(buf.subarray(guest - start, guest - start + dst.length));
  }

  private async inflate(host: number, length: number): Promise<Buffer> {
    if (this.inflated?.host === host) return this.inflated.data;
    const comp = Buffer.alloc(length);
    await this.file.read(host, comp);
    const data = await decompress('deflate-raw', comp, { size: this.cs, exact: true, what: `${this.name}: qcow compressed cluster at 0x${host.toString(16)}` });
    this.inflated = { host, data };
    return data;
  }

  private async readCompressed(host: number, length: number, at: number, dst: Uint8Array): Promise<void> {
    const data = await this.inflate(host, length);
    dst.set(data.subarray(at, at + dst.length));
  }

  /**
   * An overwrite of a plain allocated cluster needs nothing of the format (clusters
   * never move; new L2 tables join the metadata, which ends what the workers may
   * write): MappedNode.write writes it in place without the lock, and the FUSE workers
   * may too. An encrypted image's clusters map as `custom` runs (sealed under the lock)
   * and compressed ones are placed anew, so neither is ever in place.
   */
  protected override writesAroundReady(): boolean {
    return this.cipher === undefined;
  }

  protected async writeLocked(offset: number, src: Uint8Array): Promise<void> {
    const end = offset + src.length;
    let pos = offset;
    while (pos < end) {
      const spanEnd = Math.min(end, (Math.floor(pos / this.l2Span) + 1) * this.l2Span);
      await this.writeInTable(pos, src.subarray(pos - offset, spanEnd - offset));
      pos = spanEnd;
    }
  }

  /** Compressed writes: whole clusters, deflated, on images that are not encrypted (QEMU's qcow writes none encrypted). */
  get compressedClusterSize(): number | undefined {
    return this.readOnly || this.cipher ? undefined : this.cs;
  }

  get writeCompressed(): ((offset: number, data: Uint8Array) => Promise<void>) | undefined {
    return this.compressedClusterSize === undefined ? undefined : (offset, data) => this.compressedWrite(offset, data);
  }

  /**
   * One whole cluster deflated (QEMU's qcow_co_pwritev_compressed): the stream goes at
   * the end of the file, unaligned, and the L2 entry holds its offset and length. A
   * cluster that does not shrink, or one already allocated, is written normally.
   */
  private async compressedWrite(offset: number, data: Uint8Array): Promise<void> {
    const cs = this.cs;
    if (offset % cs !== 0 || data.length === 0 || data.length > cs || (data.length < cs && offset + data.length !== this.size)) {
      throw new UsageError(`${this.name}: a compressed write must be one whole cluster (${data.length} bytes at ${offset})`);
    }
    let whole = data;
    if (data.length < cs) {
      whole = new Uint8Array(cs);
      whole.set(data);
    }
    const packed = await compressBlock('deflate-raw', whole, cs - 1);
    if (!packed) return this.write(offset, data);
    await this.mutex.run(async () => {
      const gc = offset / cs;
      const [old] = await this.lookup(gc, 1);
      if (old!.kind !== 'unallocated') return this.writeLocked(offset, data);
      const host = this.file.size;
      this.metadata.assertNoOverlap(host, packed.length, `new qcow compressed cluster ${gc}`);
      await this.file.write(host, packed);
      await this.barrier();
      await this.setEntries([{ gc, entry: COMPRESSED | (BigInt(packed.length) << BigInt(63 - this.clusterBits)) | BigInt(host) }]);
    });
  }

  /** Bytes to put on disk for guest bytes at `guest`: encrypted when the image is. */
  private sealed(data: Uint8Array, guest: number): Uint8Array {
    return this.cipher ? this.cipher.encrypt(data, guest) : data;
  }

  private async writeInTable(pos: number, data: Uint8Array): Promise<void> {
    const cs = this.cs;
    const end = pos + data.length;
    const first = Math.floor(pos / cs);
    const count = Math.ceil(end / cs) - first;
    const wheres = await this.lookup(first, count);
    const updates: { gc: number; entry: bigint }[] = [];
    let i = 0;
    while (i < count) {
      const w = wheres[i]!;
      if (w.kind === 'data') {
        // Clusters that follow each other on disk too go in one write.
        let j = i + 1;
        while (j < count) {
          const n = wheres[j]!;
          if (n.kind !== 'data' || n.host !== w.host + (j - i) * cs) break;
          j++;
        }
        const a = Math.max(pos, (first + i) * cs);
        const b = Math.min(end, (first + j) * cs);
        const at = w.host + (a - (first + i) * cs);
        this.metadata.assertNoOverlap(at, b - a, `qcow cluster ${first + i}`);
        await this.file.write(w.host + (a - (first + i) * cs), this.sealed(data.subarray(a - pos, b - pos), a));
        i = j;
        continue;
      }
      // A run of clusters to place anew: unallocated ones, or compressed ones being overwritten.
      let j = i + 1;
      while (j < count && wheres[j]!.kind !== 'data') j++;
      const g0 = (first + i) * cs;
      const bytes = (j - i) * cs;
      const from = Math.max(pos, g0);
      const to = Math.min(end, (first + j) * cs);
      // Only the first and last cluster can keep old bytes; where those read as zeros
      // (and nothing is encrypted) writeIntoNew need not write them.
      const keepsOld = (gc: number, keeps: boolean): boolean => keeps && !this.readsAsZeros(gc, wheres[gc - first]!);
      let whole: Buffer | undefined;
      if (this.cipher || keepsOld(first + i, from > g0) || keepsOld(first + j - 1, to < g0 + bytes)) {
        whole = Buffer.alloc(bytes);
        for (let k = i; k < j; k++) await this.oldContent(first + k, wheres[k]!, whole.subarray((k - i) * cs, (k - i + 1) * cs));
        whole.set(data.subarray(from - pos, to - pos), from - g0);
      }
      const host = this.allocate();
      this.metadata.assertNoOverlap(host, bytes, `new qcow cluster ${first + i}`);
      if (whole) await this.file.write(host, this.sealed(whole, g0));
      else await writeIntoNew(this.file, host, bytes, from - g0, data.subarray(from - pos, to - pos));
      for (let k = i; k < j; k++) updates.push({ gc: first + k, entry: BigInt(host + (k - i) * cs) });
      i = j;
    }
    for (const u of updates) this.waiting.set(u.gc, u.entry);
    // Bounded memory between flushes: 64 Ki entries at most.
    if (this.waiting.size >= WAITING_MAX) await this.writeWaiting();
  }

  /**
   * The L2 entries of new clusters, behind a barrier after their data; new L2 tables
   * are written whole with their entries, and their L1 entries follow behind a second
   * barrier (two per flush, not one per table). The caller holds the mutex.
   */
  private async writeWaiting(): Promise<void> {
    if (this.waiting.size === 0) return;
    await this.barrier();
    const byTable = new Map<number, { gc: number; entry: bigint }[]>();
    for (const [gc, entry] of [...this.waiting].sort((a, b) => a[0] - b[0])) {
      const l1i = Math.floor(gc / this.l2Entries);
      let list = byTable.get(l1i);
      if (!list) byTable.set(l1i, (list = []));
      list.push({ gc, entry });
    }
    const newTables: { l1i: number; l2Offset: number; table: Buffer }[] = [];
    for (const [l1i, updates] of byTable) {
      if ((await this.l1Entry(l1i)) === 0) newTables.push(await this.newTable(l1i, updates));
      else await this.setEntries(updates);
    }
    if (newTables.length > 0) {
      await this.barrier();
      for (const t of newTables) await this.pointAt(t);
    }
    this.waiting.clear();
  }

  protected override async flushLocked(): Promise<void> {
    await this.writeWaiting();
    await this.file.flush();
  }

  /**
   * Every cluster unallocated (tsimg commit), as qcow_make_empty: the L1 table zeroed
   * on disk, then the file cut right after it (every L2 table and cluster lay past it:
   * this format allocates only at the end), the tables in memory forgotten.
   */
  get makeEmpty(): (() => Promise<void>) | undefined {
    if (this.readOnly) return undefined;
    return () =>
      this.mutex.run(async () => {
        await this.flushLocked();
        const tables: number[] = [];
        for (let i = 0; i < this.l1.entries; i++) {
          const t = await this.l1Entry(i);
          if (t !== 0) tables.push(t);
        }
        await this.l1.write(0, Buffer.alloc(this.l1.entries * 8));
        await this.file.flush();
        if (this.file.truncate) await this.file.truncate(this.l1Offset + this.l1.entries * 8);
        for (const t of tables) {
          this.l2Cache.drop(t);
          this.metadata.remove(t, 'qcow L2 table');
        }
        this.inflated = undefined;
      });
  }

  /** Guest cluster gc, not placed on disk, reads as zeros without a read: unallocated over no backing data. */
  private readsAsZeros(gc: number, w: Where): boolean {
    return w.kind === 'unallocated' && (this.backing === undefined || this.backing.size <= gc * this.cs);
  }

  /** What guest cluster gc reads as now, into dst (a whole cluster). */
  private async oldContent(gc: number, w: Where, dst: Buffer): Promise<void> {
    if (w.kind === 'compressed') {
      dst.set(await this.inflate(w.host, w.length));
      return;
    }
    const guest = gc * this.cs;
    const n = Math.max(0, Math.min(this.cs, this.size - guest));
    if (n > 0) await readFromBacking(this.backing, guest, dst.subarray(0, n));
  }

  /**
   * The end of the file, cluster aligned (QEMU's get_cluster_offset). Writers hold
   * the mutex and write what they allocate before allocating again.
   */
  private allocate(): number {
    return Math.ceil(this.file.size / this.cs) * this.cs;
  }

  /** Set L2 entries (new clusters, compressed ones); a missing L2 table is written whole before the L1 entry. */
  private async setEntries(updates: { gc: number; entry: bigint }[]): Promise<void> {
    const l1i = Math.floor(updates[0]!.gc / this.l2Entries);
    const l2Offset = await this.l1Entry(l1i);
    // On disk from here: an older entry waiting for these clusters must not follow.
    for (const u of updates) this.waiting.delete(u.gc);
    if (l2Offset === 0) {
      const t = await this.newTable(l1i, updates);
      await this.barrier();
      await this.pointAt(t);
      return;
    }
    await this.l2Table(l2Offset);
    // Neighbouring entries in one write.
    for (const run of indexRuns(updates.map((u) => ({ index: u.gc, entry: u.entry })))) {
      const bytes = Buffer.alloc(run.length * 8);
      run.forEach((u, k) => bytes.writeBigUInt64BE(u.entry, k * 8));
      await this.l2Cache.writeThrough(l2Offset, (run[0]!.index % this.l2Entries) * 8, bytes);
    }
  }

  /** A new L2 table for L1 index l1i holding `updates`, written whole at the end of the file; nothing points at it yet. */
  private async newTable(l1i: number, updates: { gc: number; entry: bigint }[]): Promise<{ l1i: number; l2Offset: number; table: Buffer }> {
    const table = Buffer.alloc(this.l2Entries * 8);
    for (const u of updates) table.writeBigUInt64BE(u.entry, (u.gc % this.l2Entries) * 8);
    const l2Offset = this.allocate();
    this.metadata.add(l2Offset, table.length, 'qcow L2 table');
    await this.file.write(l2Offset, table);
    return { l1i, l2Offset, table };
  }

  /** The L1 entry of a table newTable wrote, after a barrier behind it. */
  private async pointAt(t: { l1i: number; l2Offset: number; table: Buffer }): Promise<void> {
    const e = Buffer.alloc(8);
    e.writeBigUInt64BE(BigInt(t.l2Offset));
    await this.l1.write(t.l1i, e);
    this.l2Cache.put(t.l2Offset, t.table);
  }
}
