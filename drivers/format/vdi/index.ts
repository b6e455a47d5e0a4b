// The vdi driver: probe, open and create (VirtualBox 1.1 images; QEMU's block/vdi.c).
import crypto from 'node:crypto';
import type { BlockNode, Creatable, CreateRequest, FormatDriver, OpenOptions } from '../../types.js';
import { UsageError } from '../../errors.js';
import { BLOCK_SIZE, BMAP, HDR, HEADER_BYTES, IMAGE_TYPE, MAX_BLOCKS, parseHeader, SECTOR, VDI_SIGNATURE, VDI_TEXT, VDI_VERSION_1_1 } from './header.js';
import { VdiNode } from './vdi.js';
import { PagedTable } from '../table-pages.js';
import { MetadataRanges } from '../metadata-ranges.js';
import { readHead } from '../mapped-node.js';
import { sizeWithBacking } from '../backing.js';
import { probe } from './probe.js';

async function open(file: BlockNode, opts: OpenOptions): Promise<BlockNode> {
  const head = await readHead(file, HEADER_BYTES, 'VDI');
  const h = parseHeader(head, file.size, file.name);
  // Only the entries the disk uses are read, a page at a time as the guest needs them.
  const used = Math.min(h.blocksInImage, Math.ceil(h.diskSize / h.blockSize));
  const bmap = new PagedTable(file, h.offsetBmap, used, 4, opts.metadataCacheBytes);
  const metadata = new MetadataRanges(file.name)
    .add(0, HEADER_BYTES, 'VDI header')
    .add(h.offsetBmap, h.blocksInImage * 4, 'VDI block map');
  return new VdiNode(file, h, bmap, metadata, opts.readOnly, opts.cache !== 'unsafe').describedAs({ clusterSize: h.blockSize, dirty: false });
}

/** A random (version 4) UUID in the byte order QEMU's qemu_uuid_generate leaves on disk. */
function uuid(): Buffer {
  const b = crypto.randomBytes(16);
  b[6] = (b[6]! & 0x0f) | 0x40;
  b[8] = (b[8]! & 0x3f) | 0x80;
  return b;
}

async function create(req: CreateRequest): Promise<void> {
  const isStatic = req.options.bool('static') ?? false;
  req.options.finish('vdi');
  const bytes = Math.ceil((await sizeWithBacking(req, undefined, undefined, 'vdi')) / SECTOR) * SECTOR;
  if (bytes > MAX_BLOCKS * BLOCK_SIZE) throw new UsageError(`Unsupported VDI image size (size is 0x${bytes.toString(16)}, max supported is 0x${(MAX_BLOCKS * BLOCK_SIZE).toString(16)})`);
  const blocks = Math.ceil(bytes / BLOCK_SIZE);
  const bmapSize = Math.ceil((blocks * 4) / SECTOR) * SECTOR;
  const h = Buffer.alloc(HEADER_BYTES);
  h.write(VDI_TEXT, HDR.text, 'latin1');
  h.writeUInt32LE(VDI_SIGNATURE, HDR.signature);
  h.writeUInt32LE(VDI_VERSION_1_1, HDR.version);
  h.writeUInt32LE(0x180, HDR.headerSize);
  h.writeUInt32LE(isStatic ? IMAGE_TYPE.static : IMAGE_TYPE.dynamic, HDR.imageType);
  h.writeUInt32LE(0x200, HDR.offsetBmap);
  h.writeUInt32LE(0x200 + bmapSize, HDR.offsetData);
  h.writeUInt32LE(SECTOR, HDR.sectorSize);
  h.writeBigUInt64LE(BigInt(bytes), HDR.diskSize);
  h.writeUInt32LE(BLOCK_SIZE, HDR.blockSize);
  h.writeUInt32LE(blocks, HDR.blocksInImage);
  h.writeUInt32LE(isStatic ? blocks : 0, HDR.blocksAllocated);
  uuid().copy(h, HDR.uuidImage);
  uuid().copy(h, HDR.uuidLastSnap);
  const file = req.file;
  await file.write(0, h);
  if (bmapSize > 0) {
    const bmap = Buffer.alloc(bmapSize);
    for (let i = 0; i < blocks; i++) bmap.writeUInt32LE(isStatic ? i : BMAP.unallocated, i * 4);
    await file.write(0x200, bmap);
  }
  // static=on: every block exists from the start (metadata preallocation).
  if (isStatic) {
    const end = 0x200 + bmapSize + blocks * BLOCK_SIZE;
    if (!file.truncate) throw new UsageError(`${req.spec}: this protocol cannot be sized`);
    await file.truncate(end);
  }
  await file.flush();
}

export const vdiDriver: FormatDriver & Creatable = {
  name: 'vdi',
  probe,
  open,
  createOptions: ['static'],
  create,
};
