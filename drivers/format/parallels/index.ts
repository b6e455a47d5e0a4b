// The parallels driver: probe, open and create (QEMU's block/parallels.c).
import type { BlockNode, Creatable, CreateRequest, FormatDriver, OpenOptions } from '../../types.js';
import { CorruptImageError, UsageError } from '../../errors.js';
import { DEFAULT_CLUSTER_SIZE, HDR, HEADER_BYTES, HEADER_VERSION, INUSE_MAGIC, MAGIC_V2, MAX_IMAGE_FACTOR, parseHeader, SECTOR, type ParallelsHeader } from './header.js';
import { ParallelsNode } from './parallels.js';
import { PagedTable } from '../table-pages.js';
import { MetadataRanges } from '../metadata-ranges.js';
import { readHead } from '../mapped-node.js';
import { sizeWithBacking } from '../backing.js';
import { probe } from './probe.js';

async function open(file: BlockNode, opts: OpenOptions): Promise<BlockNode> {
  const name = file.name;
  const head = await readHead(file, HEADER_BYTES, 'parallels');
  const h = parseHeader(head, file.size, name);
  if (!opts.readOnly && h.inuse === INUSE_MAGIC && !opts.check) {
    throw new CorruptImageError(`${name}: parallels image was not closed correctly; it cannot be opened read/write (repair with 'qemu-img check -r all')`);
  }
  // The BAT lies inside the file (parseHeader checks), read a page at a time as needed.
  const bat = new PagedTable(file, HEADER_BYTES, h.batEntries, 4, opts.metadataCacheBytes);
  const metadata = new MetadataRanges(name).add(0, HEADER_BYTES + h.batEntries * 4, 'parallels header and BAT');
  // Only a writer needs the end of the data area: one pass over the BAT, a page at a time.
  const dataEnd = opts.readOnly ? 0 : await findDataEnd(h, bat);
  if (!opts.readOnly) {
    // In use until closed: a crash leaves the mark for qemu-img check to see.
    const mark = Buffer.alloc(4);
    mark.writeUInt32LE(INUSE_MAGIC);
    await file.write(HDR.inuse, mark);
    await file.flush();
  }
  return new ParallelsNode(file, h, bat, metadata, dataEnd, opts.readOnly, opts.cache !== 'unsafe');
}

/** parallels_open's data_end, in sectors: data_off, or the end of the BAT; then past every cluster in use. */
async function findDataEnd(h: ParallelsHeader, bat: PagedTable): Promise<number> {
  const multiplier = h.ext ? h.tracks : 1;
  let end = h.dataOff !== 0 ? h.dataOff : Math.ceil((HEADER_BYTES + h.batEntries * 4) / SECTOR);
  await bat.scan((_i, view, at) => {
    const e = view.getUint32(at, true);
    if (e !== 0 && e * multiplier >= end) end = e * multiplier + h.tracks;
  });
  return end;
}

async function create(req: CreateRequest): Promise<void> {
  const requested = req.options.size('cluster_size') ?? DEFAULT_CLUSTER_SIZE;
  req.options.finish('parallels');
  // parallels_co_create_opts rounds both up to a sector silently.
  const size = Math.ceil((await sizeWithBacking(req, undefined, undefined, 'parallels')) / SECTOR) * SECTOR;
  const cs = Math.ceil(requested / SECTOR) * SECTOR;
  if (cs === 0 || cs / SECTOR > Math.floor(0x7fffffff / 513)) throw new UsageError('Cluster size is too large');
  if (size >= MAX_IMAGE_FACTOR * cs) throw new UsageError('Image size is too large for this cluster size');
  const batEntries = Math.ceil(size / cs);
  const batSectors = (Math.ceil((HEADER_BYTES + batEntries * 4) / cs) * cs) / SECTOR;
  const h = Buffer.alloc(SECTOR);
  h.write(MAGIC_V2, HDR.magic, 'latin1');
  h.writeUInt32LE(HEADER_VERSION, HDR.version);
  h.writeUInt32LE(16, HDR.heads);
  h.writeUInt32LE(Math.floor(size / SECTOR / 16 / 32), HDR.cylinders);
  h.writeUInt32LE(cs / SECTOR, HDR.tracks);
  h.writeUInt32LE(batEntries, HDR.batEntries);
  h.writeBigUInt64LE(BigInt(size / SECTOR), HDR.nbSectors);
  h.writeUInt32LE(batSectors, HDR.dataOff);
  const file = req.file;
  await file.write(0, h);
  // The BAT zeroed as parallels_co_create zeroes it: allocated (write_zeroes without unmap), not written.
  if (file.truncate) await file.truncate(batSectors * SECTOR);
  if (file.zero && file.truncate) await file.zero(SECTOR, (batSectors - 1) * SECTOR, false);
  else if (!file.truncate) await file.write(SECTOR, Buffer.alloc((batSectors - 1) * SECTOR));
  await file.flush();
}

export const parallelsDriver: FormatDriver & Creatable = {
  name: 'parallels',
  probe,
  open,
  createOptions: ['cluster_size'],
  create,
};
