// The qed driver: probe, open and create (docs/interop/qed_spec.txt; QEMU's block/qed.c).
import type { BlockNode, Creatable, CreateRequest, FormatDriver, OpenOptions } from '../../types.js';
import { UsageError } from '../../errors.js';
import {
  encodeHeader,
  FEATURE,
  HDR,
  HEADER_BYTES,
  LIMITS,
  maxImageSize,
  parseHeader,
  validClusterSize,
  validTableSize,
  type QedHeader,
} from './header.js';
import { TablePages } from './tables.js';
import { checkAndRepair } from './check.js';
import { QedNode } from './qed.js';
import { readHead } from '../mapped-node.js';
import { sizeWithBacking } from '../backing.js';
import { probe } from './probe.js';

async function open(file: BlockNode, opts: OpenOptions): Promise<BlockNode> {
  const name = file.name;
  const head = await readHead(file, HEADER_BYTES, 'qed');
  let h: QedHeader = parseHeader(head, file.size, name);
  const barriers = opts.cache !== 'unsafe';

  let backingName: string | undefined;
  if (h.features & FEATURE.backingFile) {
    const b = Buffer.alloc(h.backingFilenameSize);
    await file.read(h.backingFilenameOffset, b);
    backingName = b.toString('utf8');
  }

  if (!opts.readOnly) {
    // Unknown autoclear bits are knocked out before anything changes (none are known).
    if (h.autoclearFeatures !== 0n) {
      h = { ...h, autoclearFeatures: 0n };
      await file.write(0, encodeHeader(h));
      await file.flush();
    }
    // Left dirty by a writer that did not close it: check and repair, as QEMU does
    // (not when opened for tsimg check -r, which runs the same walk itself).
    if (h.features & FEATURE.needCheck && !opts.check) {
      const { features } = await checkAndRepair(file, h, barriers);
      h = { ...h, features };
    }
  }

  let backing: BlockNode | undefined;
  if (backingName !== undefined && backingName !== '' && !opts.noBacking) {
    backing = await opts.openBacking(backingName, h.features & FEATURE.backingFormatNoProbe ? 'raw' : undefined);
  }
  const pages = new TablePages(file, (h.clusterSize * h.tableSize) / 8, opts.metadataCacheBytes);
  // qed_get_info: the need-check bit is the dirty flag; a raw backing format is recorded as 'raw'.
  const node = new QedNode({ file, header: h, readOnly: opts.readOnly, backing, pages, barriers }).describedAs({
    clusterSize: h.clusterSize,
    dirty: (h.features & FEATURE.needCheck) !== 0n,
    backingFile: backingName || undefined,
    backingFormat: backingName && h.features & FEATURE.backingFormatNoProbe ? 'raw' : undefined,
  });
  if (!opts.readOnly) {
    await node.trackTables().catch(async (err: unknown) => {
      await backing?.close();
      throw err;
    });
  }
  return node;
}

async function create(req: CreateRequest): Promise<void> {
  const o = req.options;
  const clusterSize = o.size('cluster_size') ?? LIMITS.defaultClusterSize;
  const tableSize = o.size('table_size') ?? LIMITS.defaultTableSize;
  const backingFile = o.string('backing_file');
  const backingFmt = o.string('backing_fmt');
  o.finish('qed');
  if (!validClusterSize(clusterSize)) {
    throw new UsageError(`QED cluster size must be within range [${LIMITS.minClusterSize}, ${LIMITS.maxClusterSize}] and power of 2`);
  }
  if (!validTableSize(tableSize)) throw new UsageError(`QED table size must be within range [${LIMITS.minTableSize}, ${LIMITS.maxTableSize}] and power of 2`);
  if (backingFmt !== undefined && backingFile === undefined) throw new UsageError('backing_fmt needs a backing_file');
  if (backingFile !== undefined && Buffer.byteLength(backingFile) > LIMITS.maxBackingNameLength) throw new UsageError('backing file name too long');

  const size = Math.ceil((await sizeWithBacking(req, backingFile, backingFmt, 'qed')) / 512) * 512;
  const max = maxImageSize(clusterSize, tableSize);
  if (size > max) throw new UsageError(`QED image size must be a non-zero multiple of cluster size and less than ${max} bytes`);

  let features = 0n;
  if (backingFile !== undefined) {
    features |= FEATURE.backingFile;
    if (backingFmt === 'raw') features |= FEATURE.backingFormatNoProbe;
  }
  const nameBytes = Buffer.from(backingFile ?? '', 'utf8');
  const h: QedHeader = {
    clusterSize,
    tableSize,
    headerSize: 1,
    features,
    compatFeatures: 0n,
    autoclearFeatures: 0n,
    l1TableOffset: clusterSize,
    imageSize: size,
    backingFilenameOffset: backingFile !== undefined ? HEADER_BYTES : 0,
    backingFilenameSize: backingFile !== undefined ? nameBytes.length : 0,
  };
  const file = req.file;
  await file.write(HDR.magic, encodeHeader(h));
  if (nameBytes.length) await file.write(HEADER_BYTES, nameBytes);
  // An empty L1 table fills the file up to its end, written as zeros as qed_co_create
  // writes it (the same blocks allocated as qemu-img's), a MiB at a time.
  const l1Bytes = clusterSize * tableSize;
  const zeros = Buffer.alloc(Math.min(l1Bytes, 1 << 20));
  for (let off = 0; off < l1Bytes; off += zeros.length) await file.write(clusterSize + off, zeros.subarray(0, Math.min(zeros.length, l1Bytes - off)));
  await file.flush();
}

export const qedDriver: FormatDriver & Creatable = {
  name: 'qed',
  probe,
  open,
  createOptions: ['backing_file', 'backing_fmt', 'cluster_size', 'table_size'],
  create,
};
