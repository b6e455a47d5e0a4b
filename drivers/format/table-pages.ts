// Flat tables (vdi block map, vhdx and parallels BATs) read in fixed 64 KiB pages
// through one LRU per image, bounded by the metadata budget (OpenOptions.
// metadataCacheBytes). Opening such an image then costs one header read whatever
// size its table claims: a 64 TiB vhdx's 512 MiB BAT is read page by page as the
// guest touches it, never whole (QEMU reads it whole at open).
//
// Pages mirror the file: a driver writes an entry to the file first and then patches
// the cached page, so an evicted page read again is still current.
import { LRUCache } from 'lru-cache';
import type { BlockNode } from '../types.js';

export const TABLE_PAGE_BYTES = 64 * 1024;

/** The page LRU of one image, shared by all its tables. */
export class TablePageCache {
  readonly lru: LRUCache<string, Buffer>;
  private nextId = 0;

  constructor(maxBytes: number) {
    // A few pages whatever the budget says, so one request never thrashes.
    this.lru = new LRUCache<string, Buffer>({ max: Math.max(8, Math.floor(maxBytes / TABLE_PAGE_BYTES)) });
  }

  /** A key prefix unique to one table of this cache. */
  newTableId(): number {
    return this.nextId++;
  }
}

/** The entries of one page: entry i of the table starts at byte (i - first) * entryBytes of view. */
export interface TablePage {
  first: number;
  count: number;
  view: DataView;
  bytes: Buffer;
}

export class PagedTable {
  private readonly id: number;
  private readonly perPage: number;
  private readonly loading = new Map<number, Promise<Buffer>>();
  /** Bumped by every patch, so a load that raced a patch is not cached stale. */
  private epoch = 0;

  constructor(
    private readonly file: BlockNode,
    /** Byte offset of entry 0 in the file. */
    readonly offset: number,
    readonly entries: number,
    readonly entryBytes: 4 | 8,
    private readonly cache: TablePageCache,
  ) {
    this.id = cache.newTableId();
    this.perPage = TABLE_PAGE_BYTES / entryBytes;
  }

  /** The page holding entry `index` (< entries). */
  async page(index: number): Promise<TablePage> {
    const p = Math.floor(index / this.perPage);
    const first = p * this.perPage;
    const count = Math.min(this.perPage, this.entries - first);
    const key = `${this.id}:${p}`;
    let bytes = this.cache.lru.get(key);
    if (!bytes) {
      let load = this.loading.get(p);
      if (!load) {
        const epoch = this.epoch;
        load = (async () => {
          const b = Buffer.alloc(count * this.entryBytes);
          await this.file.read(this.offset + first * this.entryBytes, b);
          return b;
        })();
        this.loading.set(p, load);
        const mine = load;
        load.then(
          (b) => {
            if (this.loading.get(p) === mine) this.loading.delete(p);
            if (this.epoch === epoch) this.cache.lru.set(key, b);
          },
          () => {
            if (this.loading.get(p) === mine) this.loading.delete(p);
          },
        );
      }
      bytes = await load;
    }
    return { first, count, bytes, view: new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength) };
  }

  async u32(index: number): Promise<number> {
    const pg = await this.page(index);
    return pg.view.getUint32((index - pg.first) * 4, true);
  }

  /** For tables stored big-endian (vpc's BAT). */
  async u32be(index: number): Promise<number> {
    const pg = await this.page(index);
    return pg.view.getUint32((index - pg.first) * 4, false);
  }

  /** For tables stored big-endian (qcow's L1). */
  async u64be(index: number): Promise<bigint> {
    const pg = await this.page(index);
    return pg.view.getBigUint64((index - pg.first) * 8, false);
  }

  async u64(index: number): Promise<bigint> {
    const pg = await this.page(index);
    return pg.view.getBigUint64((index - pg.first) * 8, true);
  }

  /**
   * Entries [index, index + count) reached the file with these little-endian
   * bytes: update the cached page, and make any read of it still in flight
   * (which may have read the old bytes) reload instead of being cached.
   */
  patch(index: number, bytes: Uint8Array): void {
    this.epoch++;
    this.loading.clear();
    const count = bytes.length / this.entryBytes;
    for (let k = 0; k < count; ) {
      const i = index + k;
      const p = Math.floor(i / this.perPage);
      const first = p * this.perPage;
      const n = Math.min(count - k, first + this.perPage - i);
      const page = this.cache.lru.peek(`${this.id}:${p}`);
      page?.set(bytes.subarray(k * this.entryBytes, (k + n) * this.entryBytes), (i - first) * this.entryBytes);
      k += n;
    }
  }

  /** Write entries starting at `index` to the file, then to the cached page. */
  async write(index: number, bytes: Uint8Array): Promise<void> {
    await this.file.write(this.offset + index * this.entryBytes, bytes);
    this.patch(index, bytes);
  }

  /**
   * Visit every entry in order, reading the file in pages that are not cached (a
   * full scan must not flush the LRU nor hold the table): memory stays one page.
   */
  async scan(visit: (index: number, view: DataView, at: number) => void): Promise<void> {
    const buf = Buffer.alloc(TABLE_PAGE_BYTES);
    for (let first = 0; first < this.entries; first += this.perPage) {
      const count = Math.min(this.perPage, this.entries - first);
      const cached = this.cache.lru.peek(`${this.id}:${first / this.perPage}`);
      let b: Buffer;
      if (cached) b = cached;
      else {
        b = buf.subarray(0, count * this.entryBytes);
        await this.file.read(this.offset + first * this.entryBytes, b);
      }
      const view = new DataView(b.buffer, b.byteOffset, b.byteLength);
      for (let k = 0; k < count; k++) visit(first + k, view, k * this.entryBytes);
    }
  }
}
