// The vhdx format node: payload blocks mapped through the BAT (specification
// section 2.5), with every BAT change made durable through the metadata log first,
// as QEMU's vhdx_co_writev does with vhdx_log_write_and_flush.
import type { BlockNode, CheckReport } from '../../types.js';
import { CorruptImageError } from '../../errors.js';
import { pushRun, type MappedRun } from '../mapped.js';
import { blockPieces, MappedNode, type BlockPlace } from '../mapped-node.js';
import type { VhdxIdentity } from './parent.js';
import { SectorBitmaps } from './bitmap.js';
import { BAT_OFFSET_MASK, SB_BLOCK_PRESENT, SECTOR_BITMAP_BLOCK, encodeHeader, HEADER1_OFFSET, HEADER2_OFFSET, HEADER_SIZE, LOG_SECTOR, MiB, newGuid, PAYLOAD, type Header } from './layout.js';
import { encodeLogEntry, maxSectorsPerEntry } from './log.js';
import type { PagedTable } from '../table-pages.js';
import type { MetadataRanges } from '../metadata-ranges.js';
import { addCorruption, addMessage, emptyReport, MAX_CHECK_MESSAGES } from '../check-report.js';

/** The two header copies; updates always go to the older one (section 2.2.2.1). */
export class Headers {
  constructor(
    private readonly file: BlockNode,
    private readonly copies: [Header, Header],
    private current: 0 | 1,
    private readonly sessionGuid: Buffer,
    private readonly barriers: boolean,
  ) {}

  get active(): Header {
    return this.copies[this.current];
  }

  /** Write the non-current copy with the next sequence number; it becomes current. */
  private async updateOne(newDataGuid: Buffer | undefined, logGuid: Buffer | undefined): Promise<void> {
    const next: 0 | 1 = this.current === 0 ? 1 : 0;
    const a = this.active;
    const h: Header = {
      ...a,
      sequenceNumber: a.sequenceNumber + 1n,
      fileWriteGuid: this.sessionGuid,
      dataWriteGuid: newDataGuid ?? a.dataWriteGuid,
      logGuid: logGuid ?? a.logGuid,
    };
    const at = next === 0 ? HEADER1_OFFSET : HEADER2_OFFSET;
    // Keep whatever the reserved rest of the 4 KiB holds, as QEMU does.
    const old = Buffer.alloc(HEADER_SIZE);
    await this.file.read(at, old);
    const block = encodeHeader(h, old);
    await this.file.write(at, block);
    if (this.barriers) await this.file.flush();
    this.copies[next] = { ...h, raw: block.subarray(0, 80) };
    this.current = next;
  }

  /** Both copies, so that either one read alone is up to date (QEMU's vhdx_update_headers). */
  async update(o: { newDataGuid?: boolean; logGuid?: Buffer }): Promise<void> {
    const data = o.newDataGuid ? newGuid() : undefined;
    await this.updateOne(data, o.logGuid);
    await this.updateOne(data, o.logGuid);
  }
}

export interface VhdxNodeOptions {
  file: BlockNode;
  size: number;
  readOnly: boolean;
  blockSize: number;
  chunkRatio: number;
  bat: PagedTable;
  /** Header section, log, BAT and metadata regions: payload blocks must stay clear of them. */
  metadata: MetadataRanges;
  headers: Headers | undefined;
  logOffset: number;
  logLength: number;
  barriers: boolean;
  /** A differencing image's parent (undefined when opened without backing files). */
  backing?: BlockNode | undefined;
  /** Set for a differencing image: blocks not present read from the parent, partial ones through sector bitmaps. */
  differencing?: { logicalSectorSize: number; bitmapCacheBytes: number } | undefined;
  identity: VhdxIdentity;
  /** Opened read-only with a log that needs replaying (read through it, not replayed). */
  pendingLog?: boolean;
}

/** One problem vhdx check finds in the BAT, and the entry a repair unmaps (if any). */
interface BatProblem {
  message: string;
  unmap?: number;
}

export class VhdxNode extends MappedNode {
  /** Sectors are the unit of the sector bitmaps and the log. */
  readonly requestAlignment = 512;
  private readonly bs: number;
  private readonly chunkRatio: number;
  private readonly bat: PagedTable;
  readonly metadata: MetadataRanges;
  /**
   * BAT entries of new blocks, not yet committed through the log: the next flush
   * commits them all in one log transaction (QEMU commits one per new block, three
   * flushes each, a writeback of everything written so far every block).
   */
  private readonly pending = new Map<number, bigint>();
  private readonly headers: Headers | undefined;
  private readonly logOffset: number;
  private readonly logLength: number;
  private visibleWrite: Promise<void> | undefined;
  private guidChanged = false;
  private logSequence = 1n;
  readonly vhdxIdentity: VhdxIdentity;
  private readonly bitmaps: SectorBitmaps | undefined;
  private readonly pendingLog: boolean;

  constructor(o: VhdxNodeOptions) {
    super({ ...o, allocationUnit: o.blockSize });
    this.pendingLog = o.pendingLog ?? false;
    ({ blockSize: this.bs, chunkRatio: this.chunkRatio, bat: this.bat, metadata: this.metadata, headers: this.headers, logOffset: this.logOffset, logLength: this.logLength } = o);
    this.vhdxIdentity = o.identity;
    if (o.differencing) this.bitmaps = new SectorBitmaps(o.file, o.blockSize, o.differencing.logicalSectorSize, o.differencing.bitmapCacheBytes);
  }

  /** BAT index of payload block `block`: a sector bitmap entry follows every chunk. */
  private batIndex(block: number): number {
    return block + Math.floor(block / this.chunkRatio);
  }

  private async rawEntry(idx: number): Promise<bigint> {
    const p = this.pending.get(idx);
    if (p !== undefined) return p;
    return idx < this.bat.entries ? this.bat.u64(idx) : 0n;
  }

  /**
   * The BAT entry of payload block `block`. A present block must lie inside the
   * file and clear of metadata (QEMU's vhdx_check_bat_entries, done here entry by
   * entry as the BAT is paged in rather than all at open).
   */
  private async entry(block: number): Promise<{ state: number; offset: number }> {
    const idx = this.batIndex(block);
    const e = await this.rawEntry(idx);
    const state = Number(e & 7n);
    const off = e & BAT_OFFSET_MASK;
    if (state === PAYLOAD.fullyPresent || (this.bitmaps && state === PAYLOAD.partiallyPresent)) {
      this.checkPlace(idx, off, Math.min(this.bs, this.size - block * this.bs));
    }
    return { state, offset: Number(off) };
  }

  /** A present block (or sector bitmap block) lies inside the file and clear of metadata. */
  private checkPlace(idx: number, off: bigint, length: number): void {
    if (off + BigInt(length) > BigInt(this.file.size)) {
      throw new CorruptImageError(`${this.name}: VHDX BAT entry ${idx} points past the end of the file (0x${off.toString(16)}); the image has probably been truncated`);
    }
    const clash = this.metadata.overlap(Number(off), length);
    if (clash !== undefined) throw new CorruptImageError(`${this.name}: VHDX BAT entry ${idx} (0x${off.toString(16)}) overlaps the image metadata (${clash})`);
  }

  /** The sector bitmap block of the chunk holding payload block `block` (section 2.5): its file offset. */
  private async bitmapBlock(block: number): Promise<number> {
    const idx = (Math.floor(block / this.chunkRatio) + 1) * (this.chunkRatio + 1) - 1;
    const e = await this.rawEntry(idx);
    if (Number(e & 7n) !== SB_BLOCK_PRESENT) {
      throw new CorruptImageError(`${this.name}: VHDX payload block ${block} is partially present, but its sector bitmap block (BAT entry ${idx}) is not present`);
    }
    const off = e & BAT_OFFSET_MASK;
    this.checkPlace(idx, off, SECTOR_BITMAP_BLOCK);
    return Number(off);
  }

  async mapRange(offset: number, length: number): Promise<MappedRun[]> {
    const bitmaps = this.bitmaps;
    if (!bitmaps) return this.mapBlocks(offset, length, this.bs, (block, pos, n) => this.place(block, pos, n));
    // Differencing: a partially present block maps to several runs, by its sector bitmap.
    const out: MappedRun[] = [];
    for (const { block, inBlock, pos, n } of blockPieces(offset, length, this.bs)) {
      const { state, offset: host } = await this.entry(block);
      if (state !== PAYLOAD.partiallyPresent) {
        const w = this.placeOf(state, host, pos, n);
        pushRun(out, typeof w === 'number' ? { kind: 'data', offset: pos, length: n, host: w + inBlock } : typeof w === 'string' ? { kind: w, offset: pos, length: n } : w);
        continue;
      }
      const sb = await this.bitmapBlock(block);
      for (const r of await bitmaps.runs(sb, block % this.chunkRatio, inBlock, n)) {
        const at = pos + (r.from - inBlock);
        pushRun(out, r.present ? { kind: 'data', offset: at, length: r.to - r.from, host: host + r.from } : { kind: 'unallocated', offset: at, length: r.to - r.from });
      }
    }
    return out;
  }

  private async place(block: number, pos: number, n: number): Promise<BlockPlace> {
    const { state, offset: host } = await this.entry(block);
    return this.placeOf(state, host, pos, n);
  }

  /** Where a block in `state` at `host` reads from; [pos, pos + n) is the piece asked for. */
  private placeOf(state: number, host: number, pos: number, n: number): BlockPlace {
    switch (state) {
      case PAYLOAD.fullyPresent:
        return host;
      case PAYLOAD.notPresent:
      case PAYLOAD.undefined:
        // Not in a differencing file: the parent answers (section 2.5.1.1).
        if (this.bitmaps) return 'unallocated';
        return 'zero';
      case PAYLOAD.zero:
      case PAYLOAD.unmapped:
      case PAYLOAD.unmappedV095:
        return 'zero';
      default: {
        const why = state === PAYLOAD.partiallyPresent ? 'partially present, which only a differencing image may be' : `in unknown state ${state}`;
        return {
          kind: 'custom',
          offset: pos,
          length: n,
          read: () => Promise.reject(new CorruptImageError(`${this.name}: VHDX payload block at guest offset 0x${pos.toString(16)} is ${why}`)),
        };
      }
    }
  }

  /**
   * QEMU 7.2's vhdx_check_bat_entries: every fully present BAT entry (payload or
   * sector bitmap block) must start and end inside the file, and a payload block must
   * not overlap the log, the BAT or the metadata region; its messages word for word.
   * Beyond QEMU: a payload block on the header section, or on another payload block
   * (a write to one would show in the other). The BAT is scanned a page at a time.
   */
  private async scanBat(): Promise<{ problems: BatProblem[]; count: number }> {
    const problems: BatProblem[] = [];
    let count = 0;
    const found = (p: BatProblem): void => {
      count++;
      // Counted all; kept (for the lines and the repair) up to the report's limit.
      if (problems.length < MAX_CHECK_MESSAGES) problems.push(p);
    };
    const size = BigInt(this.file.size);
    const bs = BigInt(this.bs);
    const period = this.chunkRatio + 1;
    // Blocks start on a MiB and lie inside the file: owner[m] + 1 is the BAT entry
    // whose block covers MiB m of the file (4 bytes per MiB of file, whatever the BAT says).
    const owner = new Uint32Array(Math.ceil(this.file.size / MiB));
    const perBlock = this.bs / MiB;
    await this.bat.scan((idx, view, at) => {
      const e = view.getBigUint64(at, true);
      if (Number(e & 7n) !== PAYLOAD.fullyPresent) return;
      const off = e & BAT_OFFSET_MASK;
      // QEMU measures against the virtual size with the BAT index, bitmap entries included.
      const left = BigInt(this.size) - BigInt(idx) * bs;
      const length = left > 0n && left < bs ? left : bs;
      if (off >= size) {
        found({ message: `VHDX BAT entry ${idx} start offset ${off} points after end of file (${size}). Image has probably been truncated.`, unmap: idx });
        return;
      }
      if (off + length > size) {
        found({ message: `VHDX BAT entry ${idx} end offset ${off + length - 1n} points after end of file (${size}). Image has probably been truncated.`, unmap: idx });
        return;
      }
      if (idx % period === this.chunkRatio) return;
      const clash = this.metadata.find(Number(off), this.bs);
      if (clash) {
        found({ message: `VHDX region ${off}-${off + bs} overlaps with region ${clash.offset}-${clash.offset + clash.length}`, unmap: idx });
        return;
      }
      // Blocks are all one length, so one that overlaps a block already seen covers its first or its last MiB.
      const m = Number(off) / MiB;
      const last = Math.min(owner.length - 1, m + perBlock - 1);
      const other = owner[m] || owner[last];
      if (other) {
        found({ message: `VHDX BAT entry ${idx} (block at ${off}) overlaps the block of BAT entry ${other - 1}`, unmap: idx });
        return;
      }
      owner.fill(idx + 1, m, last + 1);
    });
    return { problems, count };
  }

  /**
   * qemu-img check for vhdx. A log that needs replaying counts as one corruption:
   * QEMU refuses the read-only open outright, and replays it on the open for -r, of
   * either kind (repairAlways: -r leaks too opens the image writable, which replays it).
   */
  async checkMetadata(): Promise<CheckReport> {
    // The scan reads the BAT pages: new blocks' entries go through the log first.
    if (!this.readOnly) await this.mutex.run(() => this.commitAllPending());
    const report = emptyReport();
    if (this.pendingLog) {
      addCorruption(report, `VHDX image file '${this.name}' opened read-only, but contains a log that needs to be replayed`);
      addMessage(report, `To replay the log, run: tsimg check -r all '${this.name}'`);
      report.repairAlways = true;
    }
    const { problems, count } = await this.scanBat();
    for (const p of problems) addMessage(report, p.message);
    report.corruptions += count;
    return report;
  }

  /**
   * tsimg check -r all: the log was replayed by the writable open already. Beyond
   * QEMU (which leaves them): each bad BAT entry becomes "not present", so the block
   * reads as zeros, as a block past the end of the file read under QEMU anyway;
   * the change goes through the log like any BAT update.
   */
  get repairMetadata(): ((mode: 'leaks' | 'all') => Promise<void>) | undefined {
    if (this.readOnly || !this.headers) return undefined;
    return async (mode) => {
      if (mode !== 'all') return;
      await this.mutex.run(() => this.commitAllPending());
      const changes = new Map<number, bigint>();
      for (const p of (await this.scanBat()).problems) if (p.unmap !== undefined) changes.set(p.unmap, BigInt(PAYLOAD.notPresent));
      if (changes.size === 0) return;
      await this.firstWrite();
      await this.mutex.run(async () => {
        for (const [idx, e] of changes) this.pending.set(idx, e);
        await this.commitPending(changes);
      });
    };
  }

  /** The open already changed the data write GUID (replaying a log). */
  markVisibleWriteDone(): void {
    this.visibleWrite = Promise.resolve();
    this.guidChanged = true;
  }

  /** The data write GUID changed (firstWrite ran): overwrites of present blocks may go around the node (the FUSE workers). */
  protected override writesAroundReady(): boolean {
    return this.guidChanged;
  }

  /** Per the spec, the data write GUID changes before the first guest-visible write. */
  private firstWrite(): Promise<void> {
    if (!this.visibleWrite) {
      this.visibleWrite = this.mutex.run(() => this.headers!.update({ newDataGuid: true }));
      this.visibleWrite.then(
        () => (this.guidChanged = true),
        () => (this.visibleWrite = undefined),
      );
    }
    return this.visibleWrite;
  }

  override async write(offset: number, src: Uint8Array): Promise<void> {
    // A BAT entry that is corrupt (or points at metadata) fails here, before the headers change.
    await this.mapRange(offset, src.length);
    await this.firstWrite();
    await super.write(offset, src);
  }

  protected async writeLocked(offset: number, src: Uint8Array): Promise<void> {
    for (const { block, inBlock, pos, n } of blockPieces(offset, src.length, this.bs)) {
      const data = src.subarray(pos - offset, pos - offset + n);
      const { state, offset: host } = await this.entry(block);
      if (state === PAYLOAD.fullyPresent) {
        await this.file.write(host + inBlock, data);
      } else if (state === PAYLOAD.partiallyPresent || state === 4 || state > 7) {
        throw new CorruptImageError(`${this.name}: cannot write VHDX payload block ${block}: its state (${state}) is not supported`);
      } else {
        // A new block at the next MiB past the end; the rest of it reads as zeros.
        const start = Math.ceil(this.file.size / MiB) * MiB;
        this.metadata.assertNoOverlap(start, this.bs, `new VHDX payload block ${block}`);
        if (this.file.truncate) await this.file.truncate(start + this.bs);
        else await this.file.write(start, Buffer.alloc(this.bs));
        await this.file.write(start + inBlock, data);
        // Mapped in memory now (rawEntry reads it first), through the log at the next flush.
        this.pending.set(this.batIndex(block), BigInt(start) | BigInt(PAYLOAD.fullyPresent));
      }
    }
  }

  protected override async flushLocked(): Promise<void> {
    await this.commitAllPending();
    await this.file.flush();
  }

  /** Every BAT entry still in memory only, through the log. The caller holds the mutex. */
  private async commitAllPending(): Promise<void> {
    if (this.pending.size > 0) await this.commitPending(new Map(this.pending));
  }

  /** BAT entries through the log, then the cached BAT pages; `pending` is emptied either way. */
  private async commitPending(changes: Map<number, bigint>): Promise<void> {
    try {
      await this.commitBat(changes);
      // On disk now: the cached BAT pages follow.
      for (const [idx, e] of changes) {
        const b = Buffer.alloc(8);
        b.writeBigUInt64LE(e);
        this.bat.patch(idx, b);
      }
    } finally {
      // Committed, or not mapped on disk and so forgotten here too.
      this.pending.clear();
    }
  }

  /**
   * Make BAT changes durable through the log: data already written is flushed,
   * the log entry holding the new BAT sectors is written and flushed, then the
   * sectors are written in place and the log is emptied (QEMU's
   * vhdx_log_write_and_flush). A crash at any point leaves either the old BAT or
   * a log whose replay gives the new one.
   */
  private async commitBat(changes: Map<number, bigint>): Promise<void> {
    const sectors = new Map<number, Buffer>();
    for (const idx of changes.keys()) {
      const at = this.bat.offset + idx * 8;
      const sectorAt = at - (at % LOG_SECTOR);
      if (!sectors.has(sectorAt)) {
        const b = Buffer.alloc(LOG_SECTOR);
        await this.file.read(sectorAt, b);
        sectors.set(sectorAt, b);
      }
    }
    for (const [sectorAt, b] of sectors) {
      // Every entry the sector holds, from memory: the on-disk copy may predate earlier commits of this session.
      const firstIdx = (sectorAt - this.bat.offset) / 8;
      for (let k = 0; k < LOG_SECTOR / 8; k++) {
        const idx = firstIdx + k;
        if (idx >= 0 && idx < this.bat.entries && Number.isInteger(idx)) b.writeBigUInt64LE(await this.rawEntry(idx), k * 8);
      }
    }
    const all = [...sectors.entries()].sort((a, b) => a[0] - b[0]).map(([fileOffset, data]) => ({ fileOffset, data }));
    const per = maxSectorsPerEntry(this.logLength);
    await this.barrier();
    for (let i = 0; i < all.length; i += per) await this.logTransaction(all.slice(i, i + per));
  }

  private async logTransaction(sectors: { fileOffset: number; data: Buffer }[]): Promise<void> {
    const headers = this.headers!;
    const guid = newGuid();
    await headers.update({ logGuid: guid });
    const entry = encodeLogEntry({ sequenceNumber: this.logSequence++, logGuid: guid, tail: 0, fileSize: this.file.size, sectors });
    await this.file.write(this.logOffset, entry);
    await this.barrier();
    for (const s of sectors) await this.file.write(s.fileOffset, s.data);
    await this.barrier();
    await headers.update({ logGuid: Buffer.alloc(16) });
  }
}
