// QED tables (L1 and L2) read in 4 KiB pages through the metadata table cache
// (cache/table-cache.ts), so neither a 1 GiB L2 table (64 MiB clusters, table_size
// 16) nor a large L1 is read whole. An entry is a little-endian u64 file offset; 0
// unallocated, 1 zero cluster. Entries are written through.
import { TableCache } from '../../../cache/table-cache.js';
import type { BlockNode } from '../../types.js';
import { CorruptImageError } from '../../errors.js';

export const PAGE_BYTES = 4096;
const PAGE_ENTRIES = PAGE_BYTES / 8;

/** The entries of one page: entry i of the table is view.getBigUint64((i - first) * 8). */
export interface Page {
  first: number;
  count: number;
  view: DataView;
}

export class TablePages {
  private readonly cache: TableCache;

  constructor(
    private readonly file: BlockNode,
    /** Entries per table; pages never run past the table. */
    private readonly tableEntries: number,
    maxBytes: number,
  ) {
    this.cache = new TableCache({ name: 'qed', file, tableSize: PAGE_BYTES, maxBytes, barriers: false, minTables: 16 });
  }

  /** The page of the table at tableOffset that holds entry `index`. */
  async page(tableOffset: number, index: number): Promise<Page> {
    const first = index - (index % PAGE_ENTRIES);
    const count = Math.min(PAGE_ENTRIES, this.tableEntries - first);
    const buf = (await this.cache.get(tableOffset + first * 8, count * 8)).data;
    return { first, count, view: new DataView(buf.buffer, buf.byteOffset, buf.byteLength) };
  }

  /** Entry `index` as an exact number (a corrupt entry of 2^53 or more throws). */
  async get(tableOffset: number, index: number): Promise<number> {
    const p = await this.page(tableOffset, index);
    return entryAt(p, index, this.file.name);
  }

  /** Write one entry to the cached page and the file. */
  set(tableOffset: number, index: number, value: number): Promise<void> {
    const first = index - (index % PAGE_ENTRIES);
    return this.cache.writeThrough(tableOffset + first * 8, (index - first) * 8, encode(value));
  }

  /** Update a cached entry whose bytes reached the file some other way (a whole new table). */
  patch(tableOffset: number, index: number, value: number): void {
    const first = index - (index % PAGE_ENTRIES);
    this.cache.patch(tableOffset + first * 8, (index - first) * 8, encode(value));
  }
}

function encode(value: number): Buffer {
  const b = Buffer.alloc(8);
  b.writeBigUInt64LE(BigInt(value));
  return b;
}

export function entryAt(p: Page, index: number, name: string): number {
  const v = p.view.getBigUint64((index - p.first) * 8, true);
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw new CorruptImageError(`${name}: qed table entry 0x${v.toString(16)} is out of range`);
  return Number(v);
}
