// The vhdx driver: probe, open (headers, log replay, region table, metadata, BAT)
// and create, after QEMU 7.2's block/vhdx.c and the VHDX specification v1.0.
import type { BlockNode, Creatable, CreateRequest, FormatDriver, OpenOptions } from '../../types.js';
import { CorruptImageError, UnsupportedError, UsageError } from '../../errors.js';
import {
  ascii,
  BLOCK_SIZE_MAX,
  BLOCK_SIZE_MIN,
  checksumValid,
  DEFAULT_LOG_SIZE,
  dv,
  encodeHeader,
  FILE_PARAMS,
  GiB,
  GUIDS,
  guidText,
  HEADER1_OFFSET,
  HEADER2_OFFSET,
  HEADER_BLOCK,
  HEADER_SECTION_END,
  HEADER_SIZE,
  isZero,
  MAX_IMAGE_SIZE,
  MAX_SECTORS_PER_BLOCK,
  META,
  MiB,
  newGuid,
  parseHeader,
  PAYLOAD,
  REGION,
  REGION1_OFFSET,
  REGION2_OFFSET,
  sealChecksum,
  TiB,
  type Header,
} from './layout.js';
import { MAX_LOCATOR_BYTES, openParent, parseParentLocator, type ParentLocator } from './parent.js';
import { checkReplayable, findActiveSequence, LogOverlay, replay } from './log.js';
import { Headers, VhdxNode } from './vhdx.js';
import { PagedTable } from '../table-pages.js';
import { MetadataRanges } from '../metadata-ranges.js';
import { probe } from './probe.js';

/** Logs larger than this are not read into memory. */
const MAX_LOG_READ = 256 * MiB;
/** A BAT larger than this is refused (64 TiB of 1 MiB blocks needs 512 MiB). */
const MAX_BAT_BYTES = 1024 * MiB;

async function readAt(file: BlockNode, offset: number, length: number): Promise<Buffer> {
  const b = Buffer.alloc(length);
  if (length > 0) await file.read(offset, b);
  return b;
}

/** Ranges of the file that hold metadata; they must not overlap, nor payload blocks them. */
class Regions {
  readonly ranges: MetadataRanges;
  constructor(private readonly name: string) {
    this.ranges = new MetadataRanges(name);
  }
  add(start: number, length: number, what: string): void {
    const clash = this.ranges.overlap(start, length);
    if (clash !== undefined) throw new CorruptImageError(`${this.name}: VHDX ${what} (0x${start.toString(16)}+0x${length.toString(16)}) overlaps the ${clash}`);
    this.ranges.add(start, length, what);
  }
}

/** QEMU's vhdx_parse_header: the valid copy with the higher sequence number. */
function chooseHeader(h1: Header | undefined, h2: Header | undefined, name: string): 0 | 1 {
  if (h1 && !h2) return 0;
  if (!h1 && h2) return 1;
  if (!h1 || !h2) throw new CorruptImageError(`${name}: no valid VHDX header found (both copies fail their checksum or signature)`);
  if (h1.sequenceNumber > h2.sequenceNumber) return 0;
  if (h2.sequenceNumber > h1.sequenceNumber) return 1;
  // Disk2VHD writes two identical headers; only differing ones of equal sequence are corrupt.
  if (h1.raw.equals(h2.raw)) return 0;
  throw new CorruptImageError(`${name}: the two VHDX headers have the same sequence number but differ`);
}

function bigToNumber(v: bigint, what: string, name: string): number {
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw new CorruptImageError(`${name}: VHDX ${what} 0x${v.toString(16)} is out of range`);
  return Number(v);
}

interface Metadata {
  blockSize: number;
  dataBits: number;
  virtualSize: number;
  logicalSectorSize: number;
  physicalSectorSize: number;
  /** A differencing image's parent locator. */
  parent?: ParentLocator;
}

async function parseMetadata(view: BlockNode, offset: number, length: number, name: string): Promise<Metadata> {
  const table = await readAt(view, offset, Math.min(HEADER_BLOCK, length));
  if (table.length < META.entries || ascii(table, 0, 8) !== 'metadata') throw new CorruptImageError(`${name}: bad VHDX metadata table signature`);
  const count = dv(table).getUint16(META.entryCount, true);
  if (count > META.maxEntries || META.entries + count * META.entrySize > table.length) throw new CorruptImageError(`${name}: VHDX metadata table has too many entries (${count})`);
  const items = new Map<string, { offset: number; length: number }>();
  const known = Object.entries(GUIDS).filter(([k]) => k !== 'bat' && k !== 'metadata' && k !== 'vhdxParentType');
  for (let i = 0; i < count; i++) {
    const at = META.entries + i * META.entrySize;
    const id = table.subarray(at, at + 16);
    const v = dv(table);
    const itemOffset = v.getUint32(at + 16, true);
    const itemLength = v.getUint32(at + 20, true);
    const bits = v.getUint32(at + 24, true);
    const match = known.find(([, g]) => g.equals(id));
    if (!match) {
      if (bits & META.isRequired) throw new UnsupportedError(`${name}: VHDX metadata item ${id.toString('hex')} is required but unknown`);
      continue;
    }
    if (items.has(match[0])) throw new CorruptImageError(`${name}: VHDX metadata item ${match[0]} appears twice`);
    if (itemOffset + itemLength > length) throw new CorruptImageError(`${name}: VHDX metadata item ${match[0]} lies outside the metadata region`);
    items.set(match[0], { offset: itemOffset, length: itemLength });
  }
  const item = async (key: string, size: number): Promise<DataView> => {
    const it = items.get(key);
    if (!it) throw new UnsupportedError(`${name}: VHDX metadata item ${key} is missing`);
    if (it.length < size) throw new CorruptImageError(`${name}: VHDX metadata item ${key} is too short`);
    return dv(await readAt(view, offset + it.offset, size));
  };
  const fp = await item('fileParameters', 8);
  const vs = await item('virtualDiskSize', 8);
  await item('page83', 16);
  const ls = await item('logicalSectorSize', 4);
  const ps = await item('physicalSectorSize', 4);
  const md: Metadata = {
    blockSize: fp.getUint32(0, true),
    dataBits: fp.getUint32(4, true),
    virtualSize: bigToNumber(vs.getBigUint64(0, true), 'virtual disk size', name),
    logicalSectorSize: ls.getUint32(0, true),
    physicalSectorSize: ps.getUint32(0, true),
  };
  if (md.dataBits & FILE_PARAMS.hasParent) {
    const it = items.get('parentLocator');
    if (!it) throw new CorruptImageError(`${name}: VHDX has a parent but no parent locator`);
    if (it.length > MAX_LOCATOR_BYTES) throw new CorruptImageError(`${name}: VHDX parent locator of ${it.length} bytes is larger than 1 MiB`);
    md.parent = parseParentLocator(await readAt(view, offset + it.offset, it.length), name);
  }
  return md;
}

/** Section 2.5: a differencing image's BAT reaches the sector bitmap entry of its last chunk. */
export function differencingBatEntries(virtualSize: number, blockSize: number, chunkRatio: number): number {
  return Math.ceil(Math.ceil(virtualSize / blockSize) / chunkRatio) * (chunkRatio + 1);
}

/** QEMU's vhdx_calc_bat_entries, with its 32-bit arithmetic (an empty disk still gets a large BAT). */
export function batEntries(virtualSize: number, blockSize: number, chunkRatio: number): number {
  const dataBlocks = Math.ceil(virtualSize / blockSize) >>> 0;
  const bits = Math.log2(chunkRatio);
  return (dataBlocks + (((dataBlocks - 1) >>> 0) >>> bits)) >>> 0;
}

async function open(file: BlockNode, opts: OpenOptions): Promise<BlockNode> {
  const name = file.name;
  if (ascii(await readAt(file, 0, 8), 0, 8) !== 'vhdxfile') throw new CorruptImageError(`${name}: not a VHDX image (no 'vhdxfile' signature)`);
  if (file.size < HEADER_SECTION_END) throw new CorruptImageError(`${name}: VHDX file is shorter than its 1 MiB header section; it has been truncated`);
  const h1 = parseHeader(await readAt(file, HEADER1_OFFSET, HEADER_SIZE));
  const h2 = parseHeader(await readAt(file, HEADER2_OFFSET, HEADER_SIZE));
  const current = chooseHeader(h1, h2, name);
  const hdr = (current === 0 ? h1 : h2)!;
  const barriers = opts.cache !== 'unsafe';
  const sessionGuid = newGuid();
  const headers = new Headers(file, [h1 ?? hdr, h2 ?? hdr], current, sessionGuid, barriers);
  const regions = new Regions(name);

  // The log (section 2.3): validated even when empty, as QEMU's vhdx_parse_log does.
  const logOffset = bigToNumber(hdr.logOffset, 'log offset', name);
  if (logOffset < MiB || logOffset % MiB !== 0) throw new CorruptImageError(`${name}: VHDX log offset 0x${logOffset.toString(16)} is not a multiple of 1 MiB past the header section`);
  if (hdr.logVersion !== 0) throw new UnsupportedError(`${name}: VHDX log version ${hdr.logVersion} is not supported`);
  const logLength = hdr.logLength;
  regions.add(logOffset, logLength, 'log');
  let view: BlockNode = file;
  let replayed = false;
  let toReplay: Parameters<typeof replay>[1] | undefined;
  if (!isZero(hdr.logGuid) && logLength !== 0) {
    if (logLength % MiB !== 0) throw new CorruptImageError(`${name}: VHDX log length ${logLength} is not a multiple of 1 MiB`);
    if (logOffset + logLength > file.size) throw new CorruptImageError(`${name}: VHDX log lies past the end of the file; the image has been truncated`);
    if (logLength > MAX_LOG_READ) throw new UnsupportedError(`${name}: VHDX log of ${logLength} bytes is too large to replay`);
    const entries = findActiveSequence(await readAt(file, logOffset, logLength), hdr.logGuid, name);
    if (entries.length > 0) {
      checkReplayable(entries, file.size, name);
      // Read through the log until the image is known to be writable; replayed below, before the BAT is read.
      view = new LogOverlay(file, entries);
      if (!opts.readOnly) toReplay = entries;
    }
  }

  // The region table (section 2.2.3).
  const rt = await readAt(view, REGION1_OFFSET, HEADER_BLOCK);
  const rv = dv(rt);
  if (ascii(rt, REGION.signature, 4) !== 'regi') throw new CorruptImageError(`${name}: bad VHDX region table signature`);
  if (!checksumValid(rt, REGION.checksum)) {
    throw new CorruptImageError(`${name}: VHDX region table checksum is wrong`);
  }
  const rcount = rv.getUint32(REGION.entryCount, true);
  if (rcount > REGION.maxEntries) throw new CorruptImageError(`${name}: VHDX region table has too many entries (${rcount})`);
  let bat: { offset: number; length: number } | undefined;
  let meta: { offset: number; length: number } | undefined;
  for (let i = 0; i < rcount; i++) {
    const at = REGION.entries + i * REGION.entrySize;
    const id = rt.subarray(at, at + 16);
    const offset = bigToNumber(rv.getBigUint64(at + 16, true), 'region offset', name);
    const length = rv.getUint32(at + 24, true);
    const required = (rv.getUint32(at + 28, true) & REGION.requiredBit) !== 0;
    regions.add(offset, length, `region ${i}`);
    if (GUIDS.bat.equals(id)) {
      if (bat) throw new CorruptImageError(`${name}: VHDX region table lists two BATs`);
      bat = { offset, length };
    } else if (GUIDS.metadata.equals(id)) {
      if (meta) throw new CorruptImageError(`${name}: VHDX region table lists two metadata regions`);
      meta = { offset, length };
    } else if (required) {
      throw new UnsupportedError(`${name}: VHDX region ${id.toString('hex')} is required but unknown`);
    }
  }
  if (!bat || !meta) throw new CorruptImageError(`${name}: VHDX region table lacks the ${bat ? 'metadata region' : 'BAT'}`);
  if (meta.offset + meta.length > view.size) throw new CorruptImageError(`${name}: VHDX metadata region lies past the end of the file; the image has been truncated`);

  const md = await parseMetadata(view, meta.offset, meta.length, name);
  if (md.blockSize < BLOCK_SIZE_MIN || md.blockSize > BLOCK_SIZE_MAX || (md.blockSize & (md.blockSize - 1)) !== 0) {
    throw new CorruptImageError(`${name}: invalid VHDX block size ${md.blockSize}`);
  }
  if (md.logicalSectorSize !== 512 && md.logicalSectorSize !== 4096) throw new CorruptImageError(`${name}: invalid VHDX logical sector size ${md.logicalSectorSize}`);
  if (md.virtualSize > MAX_IMAGE_SIZE) throw new CorruptImageError(`${name}: VHDX virtual disk size ${md.virtualSize} is larger than 64 TiB`);
  const chunkRatio = (MAX_SECTORS_PER_BLOCK * md.logicalSectorSize) / md.blockSize;
  const size = Math.floor(md.virtualSize / md.logicalSectorSize) * md.logicalSectorSize;
  const differencing = md.parent !== undefined;
  // QEMU has no write support for differencing images, and neither have we (refused before a log is replayed).
  if (differencing && !opts.readOnly) throw new UnsupportedError(`${name}: differencing VHDX images (Hyper-V checkpoints) can only be opened read-only`);
  if (toReplay) {
    await replay(file, toReplay);
    await headers.update({ newDataGuid: true, logGuid: Buffer.alloc(16) });
    replayed = true;
    view = file;
  }
  const entries = differencing ? differencingBatEntries(size, md.blockSize, chunkRatio) : batEntries(size, md.blockSize, chunkRatio);
  if (entries * 8 > bat.length) throw new CorruptImageError(`${name}: VHDX BAT region (${bat.length} bytes) is too small for ${entries} entries`);
  if (entries * 8 > MAX_BAT_BYTES) throw new UnsupportedError(`${name}: VHDX BAT of ${entries} entries is too large`);
  if (bat.offset + entries * 8 > view.size) throw new CorruptImageError(`${name}: VHDX BAT lies past the end of the file; the image has been truncated`);
  // The header section too: no payload block may be written there.
  regions.ranges.add(0, HEADER_SECTION_END, 'header section');
  // The BAT is read a page at a time as the guest needs it, and each entry is
  // checked when it is used (VhdxNode.entry), not all at open: a 64 TiB disk's
  // BAT is 512 MiB.
  // A differencing image also caches sector bitmaps: a quarter of the budget.
  const bitmapBytes = differencing ? Math.floor(opts.metadataCacheBytes / 4) : 0;
  const table = new PagedTable(view, bat.offset, entries, 8, opts.metadataCacheBytes - bitmapBytes);
  const backing = md.parent && !opts.noBacking ? await openParent(opts, md.parent, name, md.logicalSectorSize) : undefined;

  const node = new VhdxNode({
    file: view,
    size,
    readOnly: opts.readOnly,
    blockSize: md.blockSize,
    chunkRatio,
    bat: table,
    metadata: regions.ranges,
    headers: opts.readOnly ? undefined : headers,
    logOffset,
    logLength,
    barriers,
    backing,
    differencing: differencing ? { logicalSectorSize: md.logicalSectorSize, bitmapCacheBytes: bitmapBytes } : undefined,
    identity: { dataWriteGuid: guidText(headers.active.dataWriteGuid), logicalSectorSize: md.logicalSectorSize },
    pendingLog: view !== file,
  });
  if (replayed) node.markVisibleWriteDone();
  return node.describedAs({ clusterSize: md.blockSize, dirty: false });
}

/** QEMU's default block size for a disk size (vhdx_co_create). */
function autoBlockSize(size: number): number {
  if (size > 32 * TiB) return 64 * MiB;
  if (size > 100 * GiB) return 32 * MiB;
  if (size > GiB) return 16 * MiB;
  return 8 * MiB;
}

async function create(req: CreateRequest): Promise<void> {
  const o = req.options;
  const subformat = o.choice('subformat', ['dynamic', 'fixed'] as const) ?? 'dynamic';
  const zeroBlocks = o.bool('block_state_zero') ?? true;
  const logSizeOpt = o.size('log_size');
  const blockSizeOpt = o.size('block_size');
  o.finish('vhdx');
  if (req.size === undefined) throw new UsageError(`${req.spec}: vhdx images need a size`);
  // vhdx_co_create_opts: round the size to sectors and the log and block sizes to MiB.
  const size = Math.ceil(req.size / 512) * 512;
  if (size > MAX_IMAGE_SIZE) throw new UsageError(`${req.spec}: image size too large; max of 64TB`);
  const logSize = logSizeOpt === undefined ? DEFAULT_LOG_SIZE : Math.ceil(logSizeOpt / MiB) * MiB;
  if (logSize > 0xffffffff) throw new UsageError(`${req.spec}: log size must be smaller than 4 GB`);
  if (logSize < MiB) throw new UsageError(`${req.spec}: log size must be a multiple of 1 MB`);
  let blockSize = blockSizeOpt === undefined ? 0 : Math.min(Math.ceil(blockSizeOpt / MiB) * MiB, BLOCK_SIZE_MAX);
  if (blockSize === 0) blockSize = autoBlockSize(size);
  if ((blockSize & (blockSize - 1)) !== 0) throw new UsageError(`${req.spec}: block size must be a power of two`);
  const fixed = subformat === 'fixed';
  const file = req.file;
  if (!file.truncate) throw new UsageError(`${req.spec}: this protocol cannot be sized`);

  // (A) file identifier with a creator string (UTF-16).
  const ident = Buffer.alloc(8 + 2 * 16);
  ident.write('vhdxfile', 0, 'latin1');
  ident.write('tsmount', 8, 'utf16le');
  await file.write(0, ident);

  // (B), (C): two headers, the second one newer.
  const seq = BigInt(Math.floor(Math.random() * 0x100000000));
  const header = {
    sequenceNumber: seq,
    fileWriteGuid: newGuid(),
    dataWriteGuid: newGuid(),
    logGuid: Buffer.alloc(16),
    logVersion: 0,
    version: 1,
    logLength: logSize,
    logOffset: BigInt(HEADER_SECTION_END),
  };
  await file.write(HEADER1_OFFSET, encodeHeader(header));
  await file.write(HEADER2_OFFSET, encodeHeader({ ...header, sequenceNumber: seq + 1n }));

  // (D), (E): region tables; (G) the BAT; (H) the metadata, as QEMU lays them out.
  const sectorSize = 512;
  const chunkRatio = (MAX_SECTORS_PER_BLOCK * sectorSize) / blockSize;
  const entries = batEntries(size, blockSize, chunkRatio);
  const batOffset = Math.ceil((HEADER_SECTION_END + logSize) / MiB) * MiB;
  const batLength = Math.ceil((entries * 8) / MiB) * MiB;
  const metaOffset = Math.ceil((batOffset + batLength) / MiB) * MiB;
  const rt = Buffer.alloc(HEADER_BLOCK);
  const rv = dv(rt);
  rt.write('regi', REGION.signature, 'latin1');
  rv.setUint32(REGION.entryCount, 2, true);
  GUIDS.bat.copy(rt, REGION.entries);
  rv.setBigUint64(REGION.entries + 16, BigInt(batOffset), true);
  rv.setUint32(REGION.entries + 24, batLength, true);
  GUIDS.metadata.copy(rt, REGION.entries + 32);
  rv.setBigUint64(REGION.entries + 48, BigInt(metaOffset), true);
  rv.setUint32(REGION.entries + 56, MiB, true);
  sealChecksum(rt, REGION.checksum);

  const dataOffset = batOffset + batLength + 5 * MiB;
  await file.truncate(fixed ? dataOffset + size : dataOffset);
  if (fixed || zeroBlocks) {
    const batBuf = Buffer.alloc(batLength);
    const state = zeroBlocks ? PAYLOAD.zero : fixed ? PAYLOAD.fullyPresent : PAYLOAD.notPresent;
    for (let block = 0; block * blockSize < size; block++) {
      const idx = block + Math.floor(block / chunkRatio);
      const at = Math.ceil((dataOffset + block * blockSize) / MiB) * MiB;
      const e = state === PAYLOAD.fullyPresent ? BigInt(at) | BigInt(state) : BigInt(state);
      batBuf.writeBigUInt64LE(e, idx * 8);
    }
    await file.write(batOffset, batBuf);
  }
  await file.write(REGION1_OFFSET, rt);
  await file.write(REGION2_OFFSET, rt);

  const table = Buffer.alloc(HEADER_BLOCK);
  const tv = dv(table);
  table.write('metadata', 0, 'latin1');
  tv.setUint16(META.entryCount, 5, true);
  const items: [Buffer, number, number][] = [
    [GUIDS.fileParameters, 8, META.isRequired],
    [GUIDS.virtualDiskSize, 8, META.isRequired | META.isVirtualDisk],
    [GUIDS.page83, 16, META.isRequired | META.isVirtualDisk],
    [GUIDS.logicalSectorSize, 4, META.isRequired | META.isVirtualDisk],
    [GUIDS.physicalSectorSize, 4, META.isRequired | META.isVirtualDisk],
  ];
  let itemOffset = 64 * 1024;
  items.forEach(([id, len, bits], i) => {
    const at = META.entries + i * META.entrySize;
    id.copy(table, at);
    tv.setUint32(at + 16, itemOffset, true);
    tv.setUint32(at + 20, len, true);
    tv.setUint32(at + 24, bits, true);
    itemOffset += len;
  });
  const data = Buffer.alloc(40);
  const dd = dv(data);
  dd.setUint32(0, blockSize, true);
  dd.setUint32(4, fixed ? FILE_PARAMS.leaveBlocksAllocated : 0, true);
  dd.setBigUint64(8, BigInt(size), true);
  newGuid().copy(data, 16);
  dd.setUint32(32, sectorSize, true);
  dd.setUint32(36, sectorSize, true);
  await file.write(metaOffset, table);
  await file.write(metaOffset + 64 * 1024, data);
  await file.flush();
}

export const vhdxDriver: FormatDriver & Creatable = {
  name: 'vhdx',
  probe,
  open,
  createOptions: ['size', 'subformat', 'block_state_zero', 'block_size', 'log_size'],
  create,
};
