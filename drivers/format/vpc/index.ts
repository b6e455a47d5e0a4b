// The vpc (VHD) driver: probe, open, create (QEMU 7.2's block/vpc.c).
import type { BlockNode, Creatable, CreateRequest, FormatDriver, OpenOptions } from '../../types.js';
import { MetadataRanges } from '../metadata-ranges.js';
import { PagedTable } from '../table-pages.js';
import { CorruptImageError, UnsupportedError, UsageError } from '../../errors.js';
import {
  ascii,
  DISK_DIFFERENCING,
  DISK_FIXED,
  diskSectors,
  DYN_HEADER_SIZE,
  encodeDynHeader,
  encodeFooter,
  FOOTER_SIZE,
  parseDynHeader,
  parseFooter,
  roundedImageSize,
  SECTOR,
  VHD_MAX_SECTORS,
} from './footer.js';
import { VpcDynamicNode, VpcFixedNode } from './vpc.js';
import { probe } from './probe.js';

/** QEMU's new images use 2 MiB blocks. */
const CREATE_BLOCK_SIZE = 0x200000;
/** The largest block size we accept from an image (a block is read into memory when allocated). */
const MAX_BLOCK_SIZE = 1 << 30;

async function readAt(file: BlockNode, offset: number, length: number): Promise<Buffer> {
  const b = Buffer.alloc(length);
  await file.read(offset, b);
  return b;
}

async function open(file: BlockNode, opts: OpenOptions): Promise<BlockNode> {
  const name = file.name;
  if (file.size < FOOTER_SIZE) throw new CorruptImageError(`${name}: file too small for a VHD footer`);
  let footerBuf = await readAt(file, 0, FOOTER_SIZE);
  let dynamic = true;
  if (ascii(footerBuf, 0, 8) !== 'conectix') {
    // A fixed disk has its footer only at the end.
    footerBuf = await readAt(file, file.size - FOOTER_SIZE, FOOTER_SIZE);
    if (ascii(footerBuf, 0, 8) !== 'conectix') throw new CorruptImageError(`${name}: invalid VPC image (no 'conectix' footer)`);
    dynamic = false;
  }
  const footer = parseFooter(footerBuf);
  if (footer.checksum !== footer.computedChecksum) {
    throw new CorruptImageError(`${name}: incorrect VHD footer checksum (0x${footer.checksum.toString(16)}, expected 0x${footer.computedChecksum.toString(16)})`);
  }
  const sectors = diskSectors(footer);
  if (sectors > VHD_MAX_SECTORS) throw new UnsupportedError(`${name}: VHD disk size is larger than 2040 GiB`);
  const size = sectors * SECTOR;
  const barriers = opts.cache !== 'unsafe';

  if (!dynamic || footer.diskType === DISK_FIXED) {
    if (dynamic) throw new CorruptImageError(`${name}: VHD footer at the start of the file, but the disk type is fixed`);
    return new VpcFixedNode(file, size, opts.readOnly);
  }

  if (footer.dataOffset > BigInt(file.size - DYN_HEADER_SIZE)) {
    throw new CorruptImageError(`${name}: VHD dynamic disk header offset 0x${footer.dataOffset.toString(16)} is outside the file`);
  }
  const dyn = parseDynHeader(await readAt(file, Number(footer.dataOffset), DYN_HEADER_SIZE));
  if (!dyn) throw new CorruptImageError(`${name}: invalid VHD dynamic disk header magic`);
  const bs = dyn.blockSize;
  if (bs < SECTOR || (bs & (bs - 1)) !== 0 || bs > MAX_BLOCK_SIZE) throw new CorruptImageError(`${name}: invalid VHD block size ${bs}`);
  const bitmapSize = (Math.floor(bs / (8 * SECTOR)) + 511) & ~511;
  if (size / bs > 0xffffffff) throw new CorruptImageError(`${name}: too many VHD blocks`);
  const entries = dyn.maxTableEntries;
  if (entries > 0x7fffffff / 4) throw new CorruptImageError(`${name}: VHD max table entries too large (${entries})`);
  if (entries * bs < size) throw new CorruptImageError(`${name}: VHD block allocation table too small for the disk size`);
  const batBytes = entries * 4;
  if (dyn.tableOffset + BigInt(batBytes) > BigInt(file.size)) {
    throw new CorruptImageError(`${name}: VHD block allocation table at 0x${dyn.tableOffset.toString(16)} is outside the file`);
  }
  const batOffset = Number(dyn.tableOffset);
  // The BAT is read a page at a time as the guest needs it; only a writer needs
  // where free space starts, found in one pass a page at a time.
  const bat = new PagedTable(file, batOffset, entries, 4, opts.metadataCacheBytes);
  let freeOffset = Math.ceil((batOffset + batBytes) / 512) * 512;
  if (!opts.readOnly) {
    await bat.scan((_i, view, at) => {
      const e = view.getUint32(at, false);
      if (e !== 0xffffffff) freeOffset = Math.max(freeOffset, e * 512 + bitmapSize + bs);
    });
    if (freeOffset > file.size) {
      throw new CorruptImageError(`${name}: VHD blocks point past the end of the file (0x${freeOffset.toString(16)} > 0x${file.size.toString(16)}); the image has been truncated`);
    }
  }
  if (footer.diskType === DISK_DIFFERENCING && !opts.readOnly) {
    // QEMU reads a differencing VHD as if it had no parent; writing would only deepen that.
    throw new UnsupportedError(`${name}: differencing VHD images (with a parent) can only be opened read-only`);
  }
  const node = new VpcDynamicNode({
    file,
    size,
    readOnly: opts.readOnly,
    footer: footerBuf,
    bat,
    batOffset,
    blockSize: bs,
    bitmapSize,
    freeOffset,
    barriers,
    metadata: new MetadataRanges(name)
      .add(0, FOOTER_SIZE, 'VHD footer copy')
      .add(Number(footer.dataOffset), DYN_HEADER_SIZE, 'VHD dynamic header')
      .add(batOffset, batBytes, 'VHD BAT'),
  }).describedAs({ clusterSize: bs, dirty: false });
  return node;
}

async function create(req: CreateRequest): Promise<void> {
  const o = req.options;
  const subformat = o.choice('subformat', ['dynamic', 'fixed'] as const) ?? 'dynamic';
  const forceSize = o.bool('force_size') ?? false;
  o.finish('vpc');
  if (req.size === undefined) throw new UsageError(`${req.spec}: vpc images need a size`);
  // As vpc_co_create_opts: round up to sectors, then to a CHS geometry unless forced.
  let size = Math.ceil(req.size / SECTOR) * SECTOR;
  if (!forceSize) {
    const r = roundedImageSize(size, false);
    if (!r) throw new UsageError(`${req.spec}: disk size is too large, max size is 2040 GiB`);
    size = r.totalSectors * SECTOR;
  }
  const r = roundedImageSize(size, forceSize);
  if (!r) throw new UsageError(`${req.spec}: disk size is too large, max size is 2040 GiB`);
  if (size !== r.totalSectors * SECTOR) {
    throw new UsageError(`${req.spec}: the requested image size cannot be represented in CHS geometry (try size=${r.totalSectors * SECTOR} or force_size=on)`);
  }
  const fixed = subformat === 'fixed';
  const footer = encodeFooter({ sizeBytes: size, geometry: r.geometry, fixed, forceSize });
  const file = req.file;
  if (fixed) {
    if (!file.truncate) throw new UsageError(`${req.spec}: this protocol cannot be sized`);
    await file.truncate(size + FOOTER_SIZE);
    await file.write(size, footer);
  } else {
    const entries = Math.ceil(r.totalSectors / (CREATE_BLOCK_SIZE / SECTOR));
    const batBytes = Math.ceil((entries * 4) / SECTOR) * SECTOR;
    const batOffset = 3 * SECTOR;
    await file.write(0, footer);
    await file.write(SECTOR, encodeDynHeader({ tableOffset: batOffset, maxTableEntries: entries, blockSize: CREATE_BLOCK_SIZE }));
    if (batBytes > 0) await file.write(batOffset, Buffer.alloc(batBytes, 0xff));
    await file.write(batOffset + batBytes, footer);
  }
  await file.flush();
}

export const vpcDriver: FormatDriver & Creatable = {
  name: 'vpc',
  probe,
  open,
  createOptions: ['size', 'subformat', 'force_size'],
  create,
};
