// The bochs driver (read-only; QEMU's block/bochs.c): bochs' "Redolog" images, the
// growing ones bximage makes and the undoable/volatile redologs of the same layout.
// A 512-byte header (magic, type, subtype, version 1 or 2, then the catalog size,
// bitmap size, extent size and disk size), a catalog of u32 entries at `header`,
// then the extents in the order they were allocated, each a sector bitmap followed
// by its sectors. A sector reads from the image where its extent is in the catalog
// and its bit is set; everything else reads as zeros.
import type { BlockNode, Extent, FormatDriver, OpenOptions } from '../../types.js';
import { CorruptImageError, UnsupportedError } from '../../errors.js';
import { TableCache } from '../../../cache/table-cache.js';
import { PagedTable } from '../table-pages.js';
import { blockPieces, readHead } from '../mapped-node.js';
import { pushRun, type MappedRun } from '../mapped.js';
import { ReadOnlyMappedNode, refuseWritable } from '../read-only-format.js';
import { field, probe } from './probe.js';

const HEADER_BYTES = 512;
const SECTOR = 512;
const VERSION_1 = 0x00010000;
const VERSION_2 = 0x00020000;
/** The subtypes laid out as a growing image; QEMU opens only Growing. */
const SUBTYPES = ['Growing', 'Undoable', 'Volatile'];
const UNALLOCATED = 0xffffffff;
/** QEMU's limits: 1M catalog entries (bximage's largest image), extents of 512 B..8 MiB, a power of two. */
const MAX_CATALOG = 0x100000;
const MAX_EXTENT = 0x800000;

function printable(s: string): string {
  return s.replace(/[^\x20-\x7e]/g, '?');
}

export interface BochsHeader {
  subtype: string;
  version: number;
  /** Where the catalog starts. */
  catalogAt: number;
  catalogEntries: number;
  /** Bytes of each extent's bitmap as the header gives it, and the sectors it takes. */
  bitmapBytes: number;
  extentBytes: number;
  size: number;
  /** Where extent 0 starts, and the bytes each extent takes (bitmap sectors and data sectors). */
  dataAt: number;
  extentStride: number;
  /** Bytes from an extent's start to its first data sector. */
  bitmapSpan: number;
}

export function parseHeader(h: Buffer, fileSize: number, name: string): BochsHeader {
  const type = field(h, 32, 16);
  const subtype = field(h, 48, 16);
  const version = h.readUInt32LE(64);
  if (type !== 'Redolog') throw new UnsupportedError(`${name}: bochs image of type '${printable(type)}' is not supported (only Redolog images: growing, undoable, volatile)`);
  if (!SUBTYPES.includes(subtype)) throw new UnsupportedError(`${name}: bochs redolog subtype '${printable(subtype)}' is not supported (only ${SUBTYPES.join(', ')})`);
  if (version !== VERSION_1 && version !== VERSION_2) throw new UnsupportedError(`${name}: bochs header version 0x${version.toString(16)} is not supported (only 1.0 and 2.0)`);
  const catalogAt = h.readUInt32LE(68);
  const catalogEntries = h.readUInt32LE(72);
  const bitmapBytes = h.readUInt32LE(76);
  const extentBytes = h.readUInt32LE(80);
  // Version 1 has no timestamp before the disk size.
  const disk = h.readBigUInt64LE(version === VERSION_1 ? 84 : 88);
  const bad = (why: string): never => {
    throw new CorruptImageError(`${name}: bochs ${why}`);
  };
  if (catalogEntries > MAX_CATALOG) bad(`catalog of ${catalogEntries} entries is too large (at most ${MAX_CATALOG})`);
  if (extentBytes < SECTOR || extentBytes > MAX_EXTENT || (extentBytes & (extentBytes - 1)) !== 0) bad(`extent size ${extentBytes} is not a power of two from ${SECTOR} to ${MAX_EXTENT}`);
  // One bit per sector of an extent; QEMU reads the bitmap without checking its size.
  const sectorsPerExtent = extentBytes / SECTOR;
  if (bitmapBytes < Math.ceil(sectorsPerExtent / 8) || bitmapBytes > MAX_EXTENT) bad(`bitmap of ${bitmapBytes} bytes does not fit extents of ${extentBytes} bytes`);
  const size = Number((disk / BigInt(SECTOR)) * BigInt(SECTOR));
  if (BigInt(catalogEntries) * BigInt(sectorsPerExtent) < disk / BigInt(SECTOR)) bad(`catalog of ${catalogEntries} entries is too small for a disk of ${disk} bytes`);
  if (catalogAt < 72 || catalogAt + catalogEntries * 4 > fileSize) bad(`catalog of ${catalogEntries} entries at ${catalogAt} is not inside the file`);
  const bitmapSpan = Math.ceil(bitmapBytes / SECTOR) * SECTOR;
  return { subtype, version, catalogAt, catalogEntries, bitmapBytes, extentBytes, size, dataAt: catalogAt + catalogEntries * 4, extentStride: bitmapSpan + extentBytes, bitmapSpan };
}

export class BochsNode extends ReadOnlyMappedNode {
  private readonly bitmaps: TableCache;
  /** Bytes of an extent's bitmap that hold its sectors' bits. */
  private readonly bitmapUsed: number;

  constructor(
    file: BlockNode,
    private readonly h: BochsHeader,
    private readonly catalog: PagedTable,
    cacheBytes: number,
  ) {
    super({ file, size: h.size, readOnly: true, barriers: false });
    this.bitmapUsed = Math.ceil(h.extentBytes / SECTOR / 8);
    this.bitmaps = new TableCache({ name: 'bochs bitmaps', file, tableSize: this.bitmapUsed, maxBytes: cacheBytes, barriers: false, minTables: 16 });
  }

  /**
   * Extent by extent: an allocated extent counts as data (claiming data is always
   * safe), so a status over a window of gigabytes is a run per extent at most, never
   * a run per sector that a hostile bitmap could alternate.
   */
  override async blockStatus(offset: number, length: number): Promise<Extent[]> {
    const out: Extent[] = [];
    for (const { block, pos, n } of blockPieces(offset, length, this.h.extentBytes)) {
      const kind = (await this.catalog.u32(block)) === UNALLOCATED ? 'unallocated' : 'data';
      const last = out[out.length - 1];
      if (last && last.kind === kind) last.length += n;
      else out.push({ offset: pos, length: n, kind });
    }
    return out;
  }

  async mapRange(offset: number, length: number): Promise<MappedRun[]> {
    const out: MappedRun[] = [];
    for (const { block, inBlock, pos, n } of blockPieces(offset, length, this.h.extentBytes)) {
      const entry = await this.catalog.u32(block);
      if (entry === UNALLOCATED) {
        pushRun(out, { kind: 'unallocated', offset: pos, length: n });
        continue;
      }
      const start = this.h.dataAt + entry * this.h.extentStride;
      // bximage ends the file after the last sector it wrote, so only the bitmap and
      // the sectors whose bits are set must be in the file.
      const where = `${this.name}: bochs extent ${block} (guest offset 0x${(block * this.h.extentBytes).toString(16)}) at ${start}`;
      if (start + this.bitmapUsed > this.file.size) throw new CorruptImageError(`${where}: its bitmap is past the end of the file`);
      const bitmap = (await this.bitmaps.get(start)).data;
      for (let at = inBlock; at < inBlock + n; ) {
        const sector = Math.floor(at / SECTOR);
        const next = Math.min(inBlock + n, (sector + 1) * SECTOR);
        const set = (bitmap[sector >> 3]! >> (sector & 7)) & 1;
        const guest = pos + at - inBlock;
        const host = start + this.h.bitmapSpan + at;
        if (set && host + next - at > this.file.size) throw new CorruptImageError(`${where}: sector ${sector} is past the end of the file`);
        if (set) pushRun(out, { kind: 'data', offset: guest, length: next - at, host });
        else pushRun(out, { kind: 'unallocated', offset: guest, length: next - at });
        at = next;
      }
    }
    return out;
  }
}

async function open(file: BlockNode, opts: OpenOptions): Promise<BlockNode> {
  refuseWritable(file, opts, 'bochs');
  const h = parseHeader(await readHead(file, HEADER_BYTES, 'bochs'), file.size, file.name);
  const catalog = new PagedTable(file, h.catalogAt, h.catalogEntries, 4, Math.floor(opts.metadataCacheBytes / 2));
  return new BochsNode(file, h, catalog, Math.floor(opts.metadataCacheBytes / 2));
}

export const bochsDriver: FormatDriver = { name: 'bochs', probe, open };
