// tsimg create -f vmdk: QEMU 7.2's vmdk_co_do_create / vmdk_init_extent, so that the
// files come out as qemu-img makes them (only the random CID differs).
import crypto from 'node:crypto';
import type { BlockNode, CreateRequest } from '../../types.js';
import { UnsupportedError, UsageError } from '../../errors.js';
import { formatDescriptor } from './descriptor.js';
import { COMPRESSION_DEFLATE, FLAG_COMPRESS, FLAG_MARKER, FLAG_NL_DETECT, FLAG_RGD, FLAG_ZERO_GRAIN, H4, VMDK4_MAGIC } from './header.js';

export const SUBFORMATS = ['monolithicSparse', 'monolithicFlat', 'twoGbMaxExtentSparse', 'twoGbMaxExtentFlat', 'streamOptimized'] as const;
const ADAPTER_TYPES = ['ide', 'lsilogic', 'buslogic', 'legacyESX'] as const;

/** qemu-img create -f vmdk -o help (QEMU 7.2), the file protocol's options included. */
export const VMDK_CREATE_OPTIONS = [
  'size',
  'adapter_type',
  'backing_file',
  'backing_fmt',
  'compat6',
  'hwversion',
  'toolsversion',
  'subformat',
  'zeroed_grain',
  'preallocation',
  'extent_size_hint',
  'nocow',
] as const;

/** VMDK has a constant split size. */
const SPLIT_SIZE = 0x80000000;
const DESC_AREA = 20 * 512;

/** A sparse extent of `size` bytes, as vmdk_init_extent lays it out: header, redundant GD + GTs, GD + GTs, grains. */
async function initSparse(file: BlockNode, size: number, compress: boolean, zeroedGrain: boolean): Promise<void> {
  const capacity = Math.floor(size / 512);
  const granularity = 128;
  const gtes = 512;
  const grains = Math.ceil(capacity / granularity);
  const gtSize = Math.ceil((gtes * 4) / 512);
  const gtCount = Math.ceil(grains / gtes);
  const gdSectors = Math.ceil((gtCount * 4) / 512);
  const descOffset = 1;
  const descSize = 20;
  const rgdOffset = descOffset + descSize;
  const gdOffset = rgdOffset + gdSectors + gtSize * gtCount;
  const grainOffset = Math.ceil((gdOffset + gdSectors + gtSize * gtCount) / granularity) * granularity;

  const h = Buffer.alloc(H4.end);
  h.writeUInt32BE(VMDK4_MAGIC, H4.magic);
  h.writeUInt32LE(compress ? 3 : zeroedGrain ? 2 : 1, H4.version);
  const flags = FLAG_RGD | FLAG_NL_DETECT | (compress ? FLAG_COMPRESS | FLAG_MARKER : 0) | (zeroedGrain ? FLAG_ZERO_GRAIN : 0);
  h.writeUInt32LE(flags >>> 0, H4.flags);
  h.writeBigUInt64LE(BigInt(capacity), H4.capacity);
  h.writeBigUInt64LE(BigInt(granularity), H4.granularity);
  h.writeBigUInt64LE(BigInt(descOffset), H4.descOffset);
  h.writeBigUInt64LE(BigInt(descSize), H4.descSize);
  h.writeUInt32LE(gtes, H4.numGtesPerGt);
  h.writeBigUInt64LE(BigInt(rgdOffset), H4.rgdOffset);
  h.writeBigUInt64LE(BigInt(gdOffset), H4.gdOffset);
  h.writeBigUInt64LE(BigInt(grainOffset), H4.grainOffset);
  h.set([0x0a, 0x20, 0x0d, 0x0a], H4.checkBytes);
  h.writeUInt16LE(compress ? COMPRESSION_DEFLATE : 0, H4.compressAlgorithm);
  await file.write(0, h);
  if (!file.truncate) throw new UsageError(`${file.name}: this protocol cannot be sized`);
  await file.truncate(grainOffset * 512);

  const gd = Buffer.alloc(gdSectors * 512);
  // Table sectors are 32-bit in the file format (uint32_t tmp in QEMU).
  for (let i = 0; i < gtCount; i++) gd.writeUInt32LE((rgdOffset + gdSectors + i * gtSize) >>> 0, i * 4);
  await file.write(rgdOffset * 512, gd);
  for (let i = 0; i < gtCount; i++) gd.writeUInt32LE((gdOffset + gdSectors + i * gtSize) >>> 0, i * 4);
  await file.write(gdOffset * 512, gd);
}

/** filename_decompose: "dir/", "name", ".vmdk". */
function decompose(spec: string): { prefix: string; postfix: string; base: string } {
  let cut = spec.lastIndexOf('/');
  if (cut < 0) cut = spec.lastIndexOf('\\');
  if (cut < 0) cut = spec.lastIndexOf(':');
  const base = spec.slice(cut + 1);
  const dot = base.lastIndexOf('.');
  return dot < 0 ? { prefix: base, postfix: '', base } : { prefix: base.slice(0, dot), postfix: base.slice(dot), base };
}

export async function createVmdk(req: CreateRequest): Promise<void> {
  const o = req.options;
  const backingFmt = o.string('backing_fmt');
  const adapterType = o.choice('adapter_type', ADAPTER_TYPES) ?? 'ide';
  const backingFile = o.string('backing_file');
  let hwVersion = o.string('hwversion');
  const toolsVersion = o.string('toolsversion') ?? '2147483647';
  const compat6 = o.bool('compat6') ?? false;
  const subformat = o.choice('subformat', SUBFORMATS) ?? 'monolithicSparse';
  const zeroedGrain = o.bool('zeroed_grain') ?? false;
  // Options of the file protocol underneath: drivers/create.ts sets nocow and the extent size hint on every
  // extent file; QEMU creates each empty, so preallocation changes nothing.
  o.choice('preallocation', ['off', 'falloc', 'full'] as const);
  o.size('extent_size_hint');
  o.bool('nocow');
  o.finish('vmdk');
  if (backingFmt !== undefined && backingFmt !== 'vmdk') throw new UsageError(`${req.spec}: backing_file must be a vmdk image`);
  if (hwVersion === 'undefined') hwVersion = undefined;
  if (compat6) {
    if (hwVersion !== undefined) throw new UsageError(`${req.spec}: compat6 cannot be enabled with hwversion set`);
    hwVersion = '6';
  }
  hwVersion ??= '4';
  const heads = adapterType === 'ide' ? 16 : 255;
  const split = subformat === 'twoGbMaxExtentFlat' || subformat === 'twoGbMaxExtentSparse';
  const flat = subformat === 'monolithicFlat' || subformat === 'twoGbMaxExtentFlat';
  const compress = subformat === 'streamOptimized';
  if (flat && backingFile !== undefined) throw new UnsupportedError(`${req.spec}: flat image can't have backing file`);
  if (flat && zeroedGrain) throw new UnsupportedError(`${req.spec}: flat image can't enable zeroed grain`);

  let parentCid = 0xffffffff;
  let size = req.size;
  if (backingFile !== undefined) {
    const { node, format } = await req.openImage(backingFile);
    if (format !== 'vmdk') throw new UsageError(`${req.spec}: invalid backing file format: ${format}. Must be vmdk`);
    const cid = node.vmdkCid;
    if (cid === undefined) throw new UsageError(`${req.spec}: failed to read parent CID`);
    parentCid = cid;
    size ??= node.size;
  }
  if (size === undefined) throw new UsageError(`${req.spec}: vmdk images need a size`);
  size = Math.ceil(size / 512) * 512;

  const { prefix, postfix, base } = decompose(req.spec);
  const lineFor = (bytes: number, fileName: string): string =>
    flat ? `RW ${Math.ceil(bytes / 512)} FLAT "${fileName}" 0\n` : `RW ${Math.ceil(bytes / 512)} SPARSE "${fileName}"\n`;
  const lines: string[] = [];
  if (!split && !flat) {
    await initSparse(req.file, size, compress, zeroedGrain);
    lines.push(lineFor(size, base));
  } else {
    const extentSize = split ? SPLIT_SIZE : size;
    let created = 0;
    for (let idx = 1; created < size; idx++) {
      const cur = Math.min(size - created, extentSize);
      const name = split ? `${prefix}-${flat ? 'f' : 's'}${String(idx).padStart(3, '0')}${postfix}` : `${prefix}-flat${postfix}`;
      const node = await req.createFile(name);
      if (flat) {
        if (!node.truncate) throw new UsageError(`${node.name}: this protocol cannot be sized`);
        await node.truncate(cur);
      } else {
        await initSparse(node, cur, compress, zeroedGrain);
      }
      await node.flush();
      lines.push(lineFor(cur, name));
      created += cur;
    }
  }

  const desc = formatDescriptor({
    cid: crypto.randomBytes(4).readUInt32LE(0),
    parentCid,
    createType: subformat,
    parentFileNameHint: backingFile,
    extentLines: lines,
    hwVersion,
    cylinders: BigInt(size) / BigInt(63 * heads * 512),
    heads,
    adapterType,
    toolsVersion,
  });
  const bytes = Buffer.from(desc, 'latin1');
  if (!split && !flat) {
    if (bytes.length > DESC_AREA) throw new UsageError(`${req.spec}: the vmdk descriptor is too long (${bytes.length} bytes; at most ${DESC_AREA})`);
    await req.file.write(0x200, bytes);
  } else {
    await req.file.write(0, bytes);
    if (req.file.truncate) await req.file.truncate(bytes.length);
  }
  await req.file.flush();
}
