// Flat tables (vdi block map, vhdx, vpc and parallels BATs, qcow's L1) read in fixed
// 64 KiB pages through the metadata table cache (cache/table-cache.ts), bounded by
// the metadata budget (OpenOptions.metadataCacheBytes). Opening such an image then
// costs one header read whatever size its table claims: a 64 TiB vhdx's 512 MiB BAT
// is read page by page as the guest touches it, never whole (QEMU reads it whole at
// open).
//
// Pages are written through: a driver's entry reaches the cached page and the file
// together (write), or the file first and the page after (patch), so an evicted
// page read again is still current. An entry that names newly written data may
// instead wait in memory (later: read before the page, written by writeLater), so a
// format writes the entries of its new blocks at a flush, behind one barrier after
// all their data, instead of a barrier per block (vdi, vpc, parallels). At most
// WAITING_MAX entries wait (laterFull): past that the owner writes them without a flush.
import { TableCache } from '../../cache/table-cache.js';
import type { BlockNode } from '../types.js';
import { indexRuns } from '../util/index-runs.js';

export const TABLE_PAGE_BYTES = 64 * 1024;

/**
 * Table entries of new blocks that may wait in memory for the next flush, in any
 * format that defers them (PagedTable.later; qcow's L2 and vmdk's grain tables keep
 * their own maps under the same bound): memory stays bounded without a flush.
 */
export const WAITING_MAX = 65536;

/** The entries of one page: entry i of the table starts at byte (i - first) * entryBytes of view. */
export interface TablePage {
  first: number;
  count: number;
  view: DataView;
  bytes: Buffer;
}

export class PagedTable {
  private readonly perPage: number;
  private readonly cache: TableCache;
  /** Entries set with later(), not yet in the file nor the page: index -> bytes as stored. */
  private readonly waiting = new Map<number, Buffer>();

  constructor(
    private readonly file: BlockNode,
    /** Byte offset of entry 0 in the file. */
    readonly offset: number,
    readonly entries: number,
    readonly entryBytes: 4 | 8,
    /** The table's share of the metadata budget; a few pages are kept whatever it says. */
    maxBytes: number,
  ) {
    this.perPage = TABLE_PAGE_BYTES / entryBytes;
    this.cache = new TableCache({ name: 'pages', file, tableSize: TABLE_PAGE_BYTES, maxBytes, barriers: false, minTables: 8 });
  }

  /** The page holding entry `index` (< entries). */
  async page(index: number): Promise<TablePage> {
    const p = Math.floor(index / this.perPage);
    const first = p * this.perPage;
    const count = Math.min(this.perPage, this.entries - first);
    const bytes = (await this.cache.get(this.pageOffset(p), count * this.entryBytes)).data;
    return { first, count, bytes, view: new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength) };
  }

  private pageOffset(p: number): number {
    return this.offset + p * TABLE_PAGE_BYTES;
  }

  async u32(index: number): Promise<number> {
    const w = this.waiting.get(index);
    if (w) return viewOf(w).getUint32(0, true);
    const pg = await this.page(index);
    return pg.view.getUint32((index - pg.first) * 4, true);
  }

  /** For tables stored big-endian (vpc's BAT). */
  async u32be(index: number): Promise<number> {
    const w = this.waiting.get(index);
    if (w) return viewOf(w).getUint32(0, false);
    const pg = await this.page(index);
    return pg.view.getUint32((index - pg.first) * 4, false);
  }

  /** For tables stored big-endian (qcow's L1). */
  async u64be(index: number): Promise<bigint> {
    const w = this.waiting.get(index);
    if (w) return viewOf(w).getBigUint64(0, false);
    const pg = await this.page(index);
    return pg.view.getBigUint64((index - pg.first) * 8, false);
  }

  async u64(index: number): Promise<bigint> {
    const w = this.waiting.get(index);
    if (w) return viewOf(w).getBigUint64(0, true);
    const pg = await this.page(index);
    return pg.view.getBigUint64((index - pg.first) * 8, true);
  }

  /** Cut entries [index, index + bytes / entryBytes) at page boundaries: page number, byte in page, bytes. */
  private *pieces(index: number, bytes: Uint8Array): Generator<{ p: number; at: number; part: Uint8Array }> {
    const count = bytes.length / this.entryBytes;
    for (let k = 0; k < count; ) {
      const i = index + k;
      const p = Math.floor(i / this.perPage);
      const n = Math.min(count - k, (p + 1) * this.perPage - i);
      yield { p, at: (i - p * this.perPage) * this.entryBytes, part: bytes.subarray(k * this.entryBytes, (k + n) * this.entryBytes) };
      k += n;
    }
  }

  /**
   * Entries [index, index + count) reached the file with these bytes (as stored):
   * update the cached page, and make any read of it still in flight (which may
   * have read the old bytes) reload instead of being cached.
   */
  patch(index: number, bytes: Uint8Array): void {
    for (const { p, at, part } of this.pieces(index, bytes)) this.cache.patch(this.pageOffset(p), at, part);
  }

  /** Write entries starting at `index` (bytes as stored) to the cached page and the file. */
  async write(index: number, bytes: Uint8Array): Promise<void> {
    for (const { p, at, part } of this.pieces(index, bytes)) await this.cache.writeThrough(this.pageOffset(p), at, part);
  }

  /**
   * Set entry `index` (bytes as stored) in memory only: reads see it at once, the
   * file and the page when writeLater runs. The owner writes the data the entry
   * names first, and a barrier, then calls writeLater.
   */
  later(index: number, bytes: Uint8Array): void {
    if (bytes.length !== this.entryBytes) throw new Error(`later: one entry of ${this.entryBytes} bytes, not ${bytes.length}`);
    this.waiting.set(index, Buffer.from(bytes));
  }

  get hasLater(): boolean {
    return this.waiting.size > 0;
  }

  /** WAITING_MAX entries wait: the owner writes them (barrier, writeLater) before more. */
  get laterFull(): boolean {
    return this.waiting.size >= WAITING_MAX;
  }

  /** Write the entries later() set, neighbours together, through the page to the file. */
  async writeLater(): Promise<void> {
    for (const run of indexRuns([...this.waiting].map(([index, bytes]) => ({ index, bytes })))) {
      await this.write(run[0]!.index, Buffer.concat(run.map((e) => e.bytes)));
      // Set again meanwhile: the next writeLater writes the newer bytes.
      for (const e of run) if (this.waiting.get(e.index) === e.bytes) this.waiting.delete(e.index);
    }
  }

  /**
   * Visit every entry in order, reading the file in pages that are not cached (a
   * full scan must not flush the LRU nor hold the table): memory stays one page.
   */
  async scan(visit: (index: number, view: DataView, at: number) => void): Promise<void> {
    if (this.waiting.size > 0) throw new Error('scan: entries set with later() are not written yet (writeLater first)');
    const buf = Buffer.alloc(TABLE_PAGE_BYTES);
    for (let first = 0, p = 0; first < this.entries; first += this.perPage, p++) {
      const count = Math.min(this.perPage, this.entries - first);
      const cached = this.cache.peek(this.pageOffset(p));
      let b: Buffer;
      if (cached) b = cached.data;
      else {
        b = buf.subarray(0, count * this.entryBytes);
        await this.file.read(this.offset + first * this.entryBytes, b);
      }
      const view = new DataView(b.buffer, b.byteOffset, b.byteLength);
      for (let k = 0; k < count; k++) visit(first + k, view, k * this.entryBytes);
    }
  }
}

function viewOf(b: Buffer): DataView {
  return new DataView(b.buffer, b.byteOffset, b.byteLength);
}
