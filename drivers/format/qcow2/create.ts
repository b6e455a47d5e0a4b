// `tsimg create -f qcow2`: a new image laid out as QEMU's qcow2_co_create lays it out
// (header, refcount table, refcount blocks, the L1 table's bytes; with preallocation
// each L2 table followed by the data clusters it maps; then a LUKS header), with every
// option qemu-img 7.2 takes. test/tsimg-create-layout.test.ts holds it to qemu-img's file.
import type { BlockNode, CreateRequest } from '../../types.js';
import { UnsupportedError, UsageError } from '../../errors.js';
import { AUTOCLEAR, COMPAT, EXT, HDR, INCOMPAT, LIMITS, QCOW2_MAGIC } from './header.js';
import { encodeL1, encodeL2, encodeL2Ext, encodeRefcount, encodeReftable } from './entries.js';
import { createLuksHeader, LUKS_CREATE_OPTIONS } from './crypt.js';

export const createOptions: readonly string[] = [
  'size',
  'compat',
  'backing_file',
  'backing_fmt',
  'data_file',
  'data_file_raw',
  'encryption',
  'encrypt.format',
  ...LUKS_CREATE_OPTIONS,
  'cluster_size',
  'extended_l2',
  'preallocation',
  'lazy_refcounts',
  'refcount_bits',
  'compression_type',
  'nocow',
];

/** What readSettings takes when an option is not given (tsimg create -o help). */
export const createDefaults: Readonly<Record<string, string>> = {
  compat: '1.1',
  cluster_size: '65536',
  extended_l2: 'off',
  preallocation: 'off',
  lazy_refcounts: 'off',
  refcount_bits: '16',
  compression_type: 'zlib',
  data_file_raw: 'off',
  encryption: 'off',
  nocow: 'off',
};

/** The v3 header QEMU 7.2 writes: 104 bytes plus compression_type, padded to 8. */
const V3_HEADER_LENGTH = 112;
/** Bytes written per request when preallocating. */
const CHUNK = 1 << 20;

/** Feature name table entries QEMU writes (qcow2.txt, "Feature name table"). */
const FEATURE_NAMES: [number, number, string][] = [
  [0, 0, 'dirty bit'],
  [0, 1, 'corrupt bit'],
  [0, 2, 'external data file'],
  [0, 3, 'compression type'],
  [0, 4, 'extended L2 entries'],
  [1, 0, 'lazy refcounts'],
  [2, 0, 'bitmaps'],
  [2, 1, 'raw external data'],
];

interface Settings {
  version: 2 | 3;
  size: number;
  clusterBits: number;
  refcountOrder: number;
  extendedL2: boolean;
  lazyRefcounts: boolean;
  zstd: boolean;
  prealloc: 'off' | 'metadata' | 'falloc' | 'full';
  backingFile: string | undefined;
  backingFormat: string | undefined;
  dataFile: string | undefined;
  dataFileRaw: boolean;
  encrypt: 'aes' | 'luks' | undefined;
}

function powerOfTwoBits(n: number): number | undefined {
  const bits = Math.log2(n);
  return Number.isInteger(bits) ? bits : undefined;
}

async function readSettings(req: CreateRequest): Promise<Settings & { luks: Map<string, string> }> {
  const o = req.options;
  const fail = (msg: string): never => {
    throw new UsageError(`${req.spec}: ${msg}`);
  };
  const compat = o.choice('compat', ['0.10', '1.1', 'v2', 'v3'] as const) ?? '1.1';
  const version: 2 | 3 = compat === '0.10' || compat === 'v2' ? 2 : 3;
  const clusterSize = o.size('cluster_size') ?? 65536;
  const clusterBits = powerOfTwoBits(clusterSize);
  if (clusterBits === undefined || clusterBits < LIMITS.minClusterBits || clusterBits > LIMITS.maxClusterBits) {
    fail(`Cluster size must be a power of two between 512 and 2048k (cluster_size=${clusterSize})`);
  }
  const refcountBits = o.int('refcount_bits', 1, 64) ?? 16;
  const refcountOrder = powerOfTwoBits(refcountBits);
  if (refcountOrder === undefined) fail(`Refcount width must be a power of two and may not exceed 64 bits (refcount_bits=${refcountBits})`);
  if (version === 2 && refcountBits !== 16) fail('Different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)');
  const lazyRefcounts = o.bool('lazy_refcounts') ?? false;
  if (lazyRefcounts && version === 2) fail('Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)');
  const extendedL2 = o.bool('extended_l2') ?? false;
  if (extendedL2) {
    if (version === 2) fail('Extended L2 entries are only supported with compatibility level 1.1 and above (use compat=1.1 or greater)');
    if (clusterBits! < 14) fail('Extended L2 entries are only supported with cluster sizes of at least 16384 bytes');
  }
  const compression = o.choice('compression_type', ['zlib', 'zstd'] as const) ?? 'zlib';
  if (compression !== 'zlib' && version === 2) fail('Compression type selection is only supported with compatibility level 1.1 and above (use compat=1.1 or greater)');
  let prealloc = o.choice('preallocation', ['off', 'metadata', 'falloc', 'full'] as const) ?? 'off';
  o.bool('nocow'); // btrfs NOCOW attribute: set on the new file by drivers/create.ts, as for any format
  const dataFile = o.string('data_file');
  const dataFileRaw = o.bool('data_file_raw') ?? false;
  if (dataFile !== undefined && version === 2) fail('Data file requires compatibility level 1.1 or above (use compat=1.1 or greater)');
  if (dataFileRaw && dataFile === undefined) fail("'data-file-raw' requires 'data-file'");
  // QEMU preallocates metadata so that a raw data file keeps data at guest offsets.
  if (dataFileRaw && prealloc === 'off') prealloc = 'metadata';
  const backingFile = o.string('backing_file');
  let backingFormat = o.string('backing_fmt');
  if (backingFormat !== undefined && backingFile === undefined) fail('backing_fmt needs backing_file');
  if (backingFile !== undefined && dataFileRaw) fail('Backing file and data-file-raw cannot be used together');
  if (backingFile !== undefined && prealloc !== 'off' && !extendedL2) fail('Backing file and preallocation can only be used at the same time if extended_l2 is on');

  const encryption = o.bool('encryption') ?? false;
  let encrypt = o.choice('encrypt.format', ['aes', 'luks'] as const);
  if (encryption && encrypt === undefined) encrypt = 'aes';
  if (encryption && encrypt === 'luks') fail("encryption=on and encrypt.format=luks conflict (encryption=on is encrypt.format=aes)");
  const luks = new Map<string, string>();
  for (const k of LUKS_CREATE_OPTIONS) {
    const v = o.string(k);
    if (v === undefined || k === 'encrypt.key-secret') continue;
    if (encrypt !== 'luks') fail(`${k} is only valid with encrypt.format=luks`);
    luks.set(k, v);
  }
  if (encrypt !== undefined && req.secret === undefined) fail('encryption needs a passphrase: encrypt.key-secret, --secret or --secret-file');
  if (encrypt !== undefined && dataFile !== undefined) fail('external data files and encryption cannot be used together');

  let size = req.size ?? o.size('size');
  o.finish('qcow2');
  if (backingFile !== undefined) {
    const b = await req.openImage(backingFile, backingFormat);
    try {
      if (backingFormat === undefined) fail(`Backing file specified without backing format (detected format of ${b.format}; use -F ${b.format})`);
      size ??= b.node.size;
      backingFormat ??= b.format;
    } finally {
      await b.node.close();
    }
  }
  if (size === undefined) fail('Image creation needs a size parameter');
  if (size! % 512 !== 0) size = Math.ceil(size! / 512) * 512;
  return {
    version,
    size: size!,
    clusterBits: clusterBits!,
    refcountOrder: refcountOrder!,
    extendedL2,
    lazyRefcounts,
    zstd: compression === 'zstd',
    prealloc,
    backingFile,
    backingFormat,
    dataFile,
    dataFileRaw,
    encrypt,
    luks,
  };
}

/** Header extension: type, length, data padded to 8 bytes. */
export function extension(type: number, data: Uint8Array): Buffer {
  const b = Buffer.alloc(8 + Math.ceil(data.length / 8) * 8);
  b.writeUInt32BE(type, 0);
  b.writeUInt32BE(data.length, 4);
  b.set(data, 8);
  return b;
}

export function featureTable(): Buffer {
  const b = Buffer.alloc(FEATURE_NAMES.length * 48);
  FEATURE_NAMES.forEach(([type, bit, name], i) => {
    b[i * 48] = type;
    b[i * 48 + 1] = bit;
    b.write(name, i * 48 + 2, 'latin1');
  });
  return b;
}

export async function createQcow2(req: CreateRequest): Promise<void> {
  const s = await readSettings(req);
  const file = req.file;
  const cs = 2 ** s.clusterBits;
  const l2Entries = cs / (s.extendedL2 ? 16 : 8);
  const l1Size = Math.ceil(s.size / (cs * l2Entries));
  if (l1Size * 8 > LIMITS.maxL1Bytes) throw new UsageError(`${req.spec}: image size is too large for this cluster size`);
  // QEMU's qcow2_co_create: no L1 table for an empty disk (offset 0), else its own clusters.
  const l1Clusters = Math.ceil((l1Size * 8) / cs);
  const prealloc = s.prealloc !== 'off';
  const l2Count = prealloc ? l1Size : 0;
  const guestClusters = Math.ceil(s.size / cs);
  const dataInFile = prealloc && s.dataFile === undefined ? guestClusters : 0;

  let data: BlockNode | undefined;
  if (s.dataFile !== undefined) {
    data = await req.createFile(s.dataFile);
    if (!data.truncate) throw new UnsupportedError(`${req.spec}: the data file cannot be sized on this protocol`);
    await data.truncate(s.size);
  }

  // LUKS: the header lives in clusters of the image, right after the header cluster.
  let luks: { header: Uint8Array } | undefined;
  if (s.encrypt === 'luks') luks = await createLuksHeader(s.luks, req.secret!, req.spec);
  const luksClusters = luks ? Math.ceil(luks.header.length / cs) : 0;

  // Refcount table and blocks sized to count everything, themselves included.
  const perBlock = (cs * 8) / 2 ** s.refcountOrder;
  const fixed = 1 + luksClusters + l1Clusters + l2Count + dataInFile;
  let rb = 1;
  let rt = 1;
  for (;;) {
    const total = fixed + rb + rt;
    const nrb = Math.ceil(total / perBlock);
    const nrt = Math.ceil((nrb * 8) / cs);
    if (nrb === rb && nrt === rt) break;
    rb = Math.max(rb, nrb);
    rt = Math.max(rt, nrt);
  }
  if (rt * cs > LIMITS.maxRefcountTableBytes) throw new UsageError(`${req.spec}: image would need a refcount table over 8 MiB; use larger clusters`);
  // QEMU's order: header, refcount table and blocks, then what growing the disk
  // allocates (L1, L2 tables, data), then the LUKS header (qcow2_co_create truncates
  // before it sets up encryption).
  const rtAt = 1;
  const rbAt = rtAt + rt;
  const l1At = rbAt + rb;
  // Preallocation allocates as QEMU's preallocate_co does, one L2 table at a time: the
  // table, then the data clusters it maps (when they are in this file), then the next.
  const l2At = l1At + l1Clusters;
  const perTable = dataInFile ? l2Entries : 0;
  const tableAt = (t: number): number => l2At + t * (1 + perTable);
  const dataOf = (gc: number): number => tableAt(Math.floor(gc / l2Entries)) + 1 + (gc % l2Entries);
  const luksAt = l2At + l2Count + dataInFile;
  const total = luksAt + luksClusters;

  // Header cluster.
  const hdr = Buffer.alloc(cs);
  hdr.writeUInt32BE(QCOW2_MAGIC, HDR.magic);
  hdr.writeUInt32BE(s.version, HDR.version);
  hdr.writeUInt32BE(s.clusterBits, HDR.clusterBits);
  hdr.writeBigUInt64BE(BigInt(s.size), HDR.size);
  hdr.writeUInt32BE(s.encrypt === 'aes' ? 1 : s.encrypt === 'luks' ? 2 : 0, HDR.cryptMethod);
  hdr.writeUInt32BE(l1Size, HDR.l1Size);
  hdr.writeBigUInt64BE(BigInt(l1Size === 0 ? 0 : l1At * cs), HDR.l1TableOffset);
  hdr.writeBigUInt64BE(BigInt(rtAt * cs), HDR.refcountTableOffset);
  hdr.writeUInt32BE(rt, HDR.refcountTableClusters);
  let pos = 72;
  if (s.version === 3) {
    let incompat = 0n;
    if (s.dataFile !== undefined) incompat |= INCOMPAT.dataFile;
    if (s.zstd) incompat |= INCOMPAT.compression;
    if (s.extendedL2) incompat |= INCOMPAT.extendedL2;
    hdr.writeBigUInt64BE(incompat, HDR.incompatibleFeatures);
    hdr.writeBigUInt64BE(s.lazyRefcounts ? COMPAT.lazyRefcounts : 0n, HDR.compatibleFeatures);
    hdr.writeBigUInt64BE(s.dataFileRaw ? AUTOCLEAR.dataFileRaw : 0n, HDR.autoclearFeatures);
    hdr.writeUInt32BE(s.refcountOrder, HDR.refcountOrder);
    hdr.writeUInt32BE(V3_HEADER_LENGTH, HDR.headerLength);
    hdr[HDR.compressionType] = s.zstd ? 1 : 0;
    pos = V3_HEADER_LENGTH;
  }
  const exts: Buffer[] = [];
  if (s.backingFormat !== undefined) exts.push(extension(EXT.backingFormat, Buffer.from(s.backingFormat, 'latin1')));
  if (s.dataFile !== undefined) exts.push(extension(EXT.dataFile, Buffer.from(s.dataFile, 'utf8')));
  if (luks) {
    const c = Buffer.alloc(16);
    c.writeBigUInt64BE(BigInt(luksAt * cs), 0);
    c.writeBigUInt64BE(BigInt(luks.header.length), 8);
    exts.push(extension(EXT.cryptoHeader, c));
  }
  // QEMU leaves the feature table out of clusters of 4 KiB and less (qcow2_update_header).
  if (s.version === 3 && cs > 4096) exts.push(extension(EXT.featureTable, featureTable()));
  exts.push(Buffer.alloc(8)); // end of extensions
  const backingName = s.backingFile !== undefined ? Buffer.from(s.backingFile, 'utf8') : undefined;
  const need = pos + exts.reduce((a, e) => a + e.length, 0) + (backingName?.length ?? 0);
  if (need > cs) throw new UsageError(`${req.spec}: the header does not fit in one ${cs}-byte cluster (backing file name too long?)`);
  if (backingName && backingName.length > LIMITS.maxBackingNameLength) throw new UsageError(`${req.spec}: backing file name too long`);
  for (const e of exts) {
    e.copy(hdr, pos);
    pos += e.length;
  }
  if (backingName) {
    hdr.writeBigUInt64BE(BigInt(pos), HDR.backingFileOffset);
    hdr.writeUInt32BE(backingName.length, HDR.backingFileSize);
    backingName.copy(hdr, pos);
  }

  // Refcount table and blocks: every cluster in [0, total) has refcount one.
  const reftable = Buffer.alloc(rt * cs);
  const rtView = new DataView(reftable.buffer, reftable.byteOffset, reftable.byteLength);
  for (let i = 0; i < rb; i++) encodeReftable(rtView, i, (rbAt + i) * cs);
  const blocks = Buffer.alloc(rb * cs);
  for (let c = 0; c < total; c++) encodeRefcount(blocks, s.refcountOrder, c, 1);

  // L1 (and with preallocation, L2) tables. As QEMU's qcow2_grow_l1_table writes it, the
  // L1 table is its entries' bytes only: without preallocation the file ends there.
  const l1 = Buffer.alloc(l1Size * 8);
  const l1View = new DataView(l1.buffer, l1.byteOffset, l1.byteLength);
  for (let i = 0; i < l2Count; i++) encodeL1(l1View, i, tableAt(i) * cs, true);

  if (!file.truncate) throw new UnsupportedError(`${req.spec}: this protocol cannot be sized`);
  await file.truncate(prealloc || luks ? total * cs : l1At * cs + l1.length);
  await file.write(0, hdr);
  if (luks) {
    // qcow2_crypto_hdr_init_func: the clusters zeroed (allocated, not unmapped), then the header.
    await file.zero?.(luksAt * cs, luksClusters * cs, false);
    await writeNonZero(file, luksAt * cs, luks.header);
  }
  await file.write(rtAt * cs, reftable);
  await file.write(rbAt * cs, blocks);
  if (l1.length) await file.write(l1At * cs, l1);
  if (prealloc) {
    const table = Buffer.alloc(cs);
    const dv = new DataView(table.buffer, table.byteOffset, table.byteLength);
    for (let t = 0; t < l2Count; t++) {
      table.fill(0);
      for (let k = 0; k < l2Entries; k++) {
        const gc = t * l2Entries + k;
        if (gc >= guestClusters) break;
        const host = s.dataFile !== undefined ? gc * cs : dataOf(gc) * cs;
        // QEMU leaves preallocated subclusters unallocated (the backing file shows through).
        if (s.extendedL2) encodeL2Ext(dv, k, host, true, 0, 0);
        else encodeL2(dv, k, host, true, false);
      }
      await file.write(tableAt(t) * cs, table);
    }
    // falloc and full: the data clusters, each table's run of them (or the data file), allocated or written.
    const target = data ?? file;
    const runs: [number, number][] = data
      ? [[0, s.size]]
      : Array.from({ length: l2Count }, (_, t) => [dataOf(t * l2Entries) * cs, Math.min(l2Entries, guestClusters - t * l2Entries) * cs]);
    for (const [start, length] of s.prealloc === 'falloc' || s.prealloc === 'full' ? runs : []) {
      if (s.prealloc === 'falloc' && target.zero) await target.zero(start, length, false);
      else {
        const zeros = new Uint8Array(Math.min(CHUNK, length));
        for (let off = 0; off < length; off += zeros.length) await target.write(start + off, zeros.subarray(0, Math.min(zeros.length, length - off)));
      }
    }
  }
  await data?.flush();
  await file.flush();
}

/**
 * `data` at `offset` of a file that reads zeros there already, leaving out its 4 KiB
 * blocks of zeros: QEMU zeroes the LUKS header's clusters (allocated, no data written)
 * and then writes the header, whose unused key slots are zeros it need not write again.
 */
async function writeNonZero(file: BlockNode, offset: number, data: Uint8Array): Promise<void> {
  const block = 4096;
  const zero = (a: number, b: number): boolean => data.subarray(a, b).every((x) => x === 0);
  let start = -1;
  for (let i = 0; i <= data.length; i += block) {
    const isData = i < data.length && !zero(i, Math.min(data.length, i + block));
    if (isData && start < 0) start = i;
    if (!isData && start >= 0) {
      await file.write(offset + start, data.subarray(start, i));
      start = -1;
    }
  }
}
