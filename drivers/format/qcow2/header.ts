// The qcow2 header and its extensions (docs/interop/qcow2.txt, "Header" and
// "Header extensions"). Every size and count is capped here, before anything is
// allocated from it; a header that fails a check is a CorruptImageError.
import { CorruptImageError, UnsupportedError } from '../../errors.js';
import { MAX_NODE_SIZE } from '../../types.js';

export const QCOW2_MAGIC = 0x514649fb; // "QFI\xfb"

/** Byte offsets of the header fields (qcow2.txt, "Header"). */
export const HDR = {
  magic: 0, // u32
  version: 4, // u32
  backingFileOffset: 8, // u64
  backingFileSize: 16, // u32
  clusterBits: 20, // u32
  size: 24, // u64
  cryptMethod: 32, // u32
  l1Size: 36, // u32
  l1TableOffset: 40, // u64
  refcountTableOffset: 48, // u64
  refcountTableClusters: 56, // u32
  nbSnapshots: 60, // u32
  snapshotsOffset: 64, // u64
  // Version 3 and later:
  incompatibleFeatures: 72, // u64
  compatibleFeatures: 80, // u64
  autoclearFeatures: 88, // u64
  refcountOrder: 96, // u32
  headerLength: 100, // u32
  // "Additional fields (version 3 and higher)"
  compressionType: 104, // u8
} as const;

export const V2_HEADER_LENGTH = 72;
export const V3_MIN_HEADER_LENGTH = 104;

/** incompatible_features bits (qcow2.txt, header bytes 72-79). */
export const INCOMPAT = {
  dirty: 1n << 0n,
  corrupt: 1n << 1n,
  dataFile: 1n << 2n,
  compression: 1n << 3n,
  extendedL2: 1n << 4n,
} as const;
const KNOWN_INCOMPAT = INCOMPAT.dirty | INCOMPAT.corrupt | INCOMPAT.dataFile | INCOMPAT.compression | INCOMPAT.extendedL2;

/** compatible_features bits (header bytes 80-87). */
export const COMPAT = { lazyRefcounts: 1n << 0n } as const;

/** autoclear_features bits (header bytes 88-95). */
export const AUTOCLEAR = { bitmaps: 1n << 0n, dataFileRaw: 1n << 1n } as const;

/** Header extension types (qcow2.txt, "Header extensions"). */
export const EXT = {
  end: 0x00000000,
  backingFormat: 0xe2792aca,
  featureTable: 0x6803f857,
  bitmaps: 0x23852875,
  cryptoHeader: 0x0537be77,
  dataFile: 0x44415441,
} as const;

/** Feature name table entry layout (qcow2.txt, "Feature name table"). */
const FEATURE_ENTRY = { type: 0, bit: 1, name: 2, nameLength: 46, size: 48 } as const;

/** QEMU's implementation limits (block/qcow2.h). */
export const LIMITS = {
  minClusterBits: 9,
  maxClusterBits: 21,
  /** QCOW_MAX_L1_SIZE: 32 MiB of L1 table. */
  maxL1Bytes: 32 * 1024 * 1024,
  /** QCOW_MAX_REFTABLE_SIZE: 8 MiB of refcount table. */
  maxRefcountTableBytes: 8 * 1024 * 1024,
  /** QCOW_MAX_SNAPSHOTS. */
  maxSnapshots: 65536,
  maxBackingNameLength: 1023,
  maxRefcountOrder: 6,
  /** Host offsets are bits 9-55 of a table entry. */
  maxHostOffset: 2 ** 56,
} as const;

export interface FeatureName {
  type: number; // 0 incompatible, 1 compatible, 2 autoclear
  bit: number;
  name: string;
}

export interface HeaderExtension {
  type: number;
  /** Byte offset of the extension data within the header cluster. */
  offset: number;
  length: number;
}

export interface Qcow2Header {
  version: 2 | 3;
  clusterBits: number;
  clusterSize: number;
  size: number;
  cryptMethod: number;
  l1Size: number;
  l1TableOffset: number;
  refcountTableOffset: number;
  refcountTableClusters: number;
  nbSnapshots: number;
  snapshotsOffset: number;
  incompatibleFeatures: bigint;
  compatibleFeatures: bigint;
  autoclearFeatures: bigint;
  refcountOrder: number;
  headerLength: number;
  compressionType: number;
  backingFile: string | undefined;
  backingFormat: string | undefined;
  /** External data file name (header extension 0x44415441). */
  dataFile: string | undefined;
  featureNames: FeatureName[];
  extensions: HeaderExtension[];
}

function view(buf: Uint8Array): DataView {
  return new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
}

/** A u64 as an exact number, or a CorruptImageError when it is 2^53 or more. */
function u64(dv: DataView, off: number, what: string, name: string): number {
  const v = dv.getBigUint64(off, false);
  if (v >= BigInt(MAX_NODE_SIZE)) throw new CorruptImageError(`${name}: qcow2 ${what} ${v} is out of range`);
  return Number(v);
}

function latin1(buf: Uint8Array, off: number, len: number): string {
  return Buffer.from(buf.buffer, buf.byteOffset + off, len).toString('latin1');
}

/** Bytes to read before the cluster size is known: the longest v3 header we know. */
export const HEADER_PROBE_BYTES = 512;

/** cluster_bits from the first bytes, validated, so the whole header cluster can be read. */
export function peekClusterBits(head: Uint8Array, name: string): number {
  if (head.length < V2_HEADER_LENGTH) throw new CorruptImageError(`${name}: file too short for a qcow2 header (${head.length} bytes)`);
  const dv = view(head);
  if (dv.getUint32(HDR.magic, false) !== QCOW2_MAGIC) throw new CorruptImageError(`${name}: not a qcow2 image (bad magic)`);
  const version = dv.getUint32(HDR.version, false);
  if (version !== 2 && version !== 3) throw new UnsupportedError(`${name}: qcow2 version ${version} is not supported`);
  const bits = dv.getUint32(HDR.clusterBits, false);
  if (bits < LIMITS.minClusterBits || bits > LIMITS.maxClusterBits) {
    throw new CorruptImageError(`${name}: qcow2 cluster_bits ${bits} is outside ${LIMITS.minClusterBits}..${LIMITS.maxClusterBits}`);
  }
  return bits;
}

/**
 * Parse and validate the header cluster. `buf` holds the first cluster of the
 * image (or the whole file when it is shorter); `fileSize` bounds table offsets.
 */
export function parseHeader(buf: Uint8Array, fileSize: number, name: string): Qcow2Header {
  const clusterBits = peekClusterBits(buf, name);
  const clusterSize = 2 ** clusterBits;
  const dv = view(buf);
  const version = dv.getUint32(HDR.version, false) as 2 | 3;
  const bad = (msg: string): never => {
    throw new CorruptImageError(`${name}: ${msg}`);
  };

  let headerLength = V2_HEADER_LENGTH;
  let incompatibleFeatures = 0n;
  let compatibleFeatures = 0n;
  let autoclearFeatures = 0n;
  let refcountOrder = 4;
  let compressionType = 0;
  if (version === 3) {
    if (buf.length < V3_MIN_HEADER_LENGTH) bad(`file too short for a qcow2 v3 header (${buf.length} bytes)`);
    headerLength = dv.getUint32(HDR.headerLength, false);
    if (headerLength < V3_MIN_HEADER_LENGTH || headerLength > clusterSize || headerLength % 8 !== 0) {
      bad(`qcow2 header_length ${headerLength} is invalid`);
    }
    if (headerLength > buf.length) bad(`file too short for its qcow2 header (${headerLength} bytes)`);
    incompatibleFeatures = dv.getBigUint64(HDR.incompatibleFeatures, false);
    compatibleFeatures = dv.getBigUint64(HDR.compatibleFeatures, false);
    autoclearFeatures = dv.getBigUint64(HDR.autoclearFeatures, false);
    refcountOrder = dv.getUint32(HDR.refcountOrder, false);
    if (refcountOrder > LIMITS.maxRefcountOrder) bad(`qcow2 refcount_order ${refcountOrder} is larger than ${LIMITS.maxRefcountOrder}`);
    if (headerLength > HDR.compressionType) compressionType = buf[HDR.compressionType]!;
  }

  const size = u64(dv, HDR.size, 'virtual size', name);
  const cryptMethod = dv.getUint32(HDR.cryptMethod, false);
  const l1Size = dv.getUint32(HDR.l1Size, false);
  const l1TableOffset = u64(dv, HDR.l1TableOffset, 'L1 table offset', name);
  const refcountTableOffset = u64(dv, HDR.refcountTableOffset, 'refcount table offset', name);
  const refcountTableClusters = dv.getUint32(HDR.refcountTableClusters, false);
  const nbSnapshots = dv.getUint32(HDR.nbSnapshots, false);
  const snapshotsOffset = u64(dv, HDR.snapshotsOffset, 'snapshot table offset', name);

  // Tables: cluster aligned, inside QEMU's limits, inside the file.
  const checkTable = (what: string, offset: number, bytes: number): void => {
    if (offset % clusterSize !== 0) bad(`qcow2 ${what} offset 0x${offset.toString(16)} is not cluster aligned`);
    if (bytes > 0 && (offset === 0 || offset + bytes > fileSize)) {
      bad(`qcow2 ${what} (0x${offset.toString(16)}, ${bytes} bytes) lies outside the file`);
    }
  };
  if (l1Size * 8 > LIMITS.maxL1Bytes) bad(`qcow2 L1 table of ${l1Size} entries exceeds the 32 MiB limit`);
  const l2Entries = clusterSize / 8;
  const neededL1 = Math.ceil(size / (clusterSize * l2Entries));
  if (l1Size < neededL1) bad(`qcow2 L1 table (${l1Size} entries) is too small for a ${size}-byte disk`);
  checkTable('L1 table', l1TableOffset, l1Size * 8);
  if (refcountTableClusters === 0) bad('qcow2 image has no refcount table');
  if (refcountTableClusters * clusterSize > LIMITS.maxRefcountTableBytes) {
    bad(`qcow2 refcount table of ${refcountTableClusters} clusters exceeds the 8 MiB limit`);
  }
  checkTable('refcount table', refcountTableOffset, refcountTableClusters * clusterSize);
  if (nbSnapshots > LIMITS.maxSnapshots) bad(`qcow2 image claims ${nbSnapshots} snapshots (limit ${LIMITS.maxSnapshots})`);
  if (nbSnapshots > 0) checkTable('snapshot table', snapshotsOffset, 40 * nbSnapshots);

  // The backing file name lives in the first cluster (qcow2.txt, "Header extensions").
  const backingFileOffset = u64(dv, HDR.backingFileOffset, 'backing file offset', name);
  const backingFileSize = dv.getUint32(HDR.backingFileSize, false);
  let backingFile: string | undefined;
  if (backingFileOffset !== 0) {
    if (backingFileSize > LIMITS.maxBackingNameLength) bad(`qcow2 backing file name is ${backingFileSize} bytes (limit ${LIMITS.maxBackingNameLength})`);
    if (backingFileOffset < headerLength || backingFileOffset + backingFileSize > Math.min(clusterSize, buf.length)) {
      bad('qcow2 backing file name lies outside the header cluster');
    }
    if (backingFileSize > 0) backingFile = Buffer.from(buf.buffer, buf.byteOffset + backingFileOffset, backingFileSize).toString('utf8');
  }

  // Header extensions run from header_length to the backing name (or the cluster end).
  const extEnd = Math.min(backingFileOffset !== 0 ? backingFileOffset : clusterSize, buf.length);
  const extensions: HeaderExtension[] = [];
  const featureNames: FeatureName[] = [];
  let backingFormat: string | undefined;
  let dataFile: string | undefined;
  let pos = headerLength;
  while (pos + 8 <= extEnd) {
    const type = dv.getUint32(pos, false);
    const length = dv.getUint32(pos + 4, false);
    if (type === EXT.end) break;
    const data = pos + 8;
    if (length > extEnd - data) bad(`qcow2 header extension 0x${type.toString(16)} runs past the header (${length} bytes)`);
    extensions.push({ type, offset: data, length });
    if (type === EXT.backingFormat) {
      if (length > 1023) bad(`qcow2 backing format name is ${length} bytes long`);
      backingFormat = latin1(buf, data, length);
    } else if (type === EXT.dataFile) {
      if (length > 4096) bad(`qcow2 data file name is ${length} bytes long`);
      dataFile = Buffer.from(buf.buffer, buf.byteOffset + data, length).toString('utf8');
    } else if (type === EXT.featureTable) {
      for (let e = data; e + FEATURE_ENTRY.size <= data + length; e += FEATURE_ENTRY.size) {
        const raw = latin1(buf, e + FEATURE_ENTRY.name, FEATURE_ENTRY.nameLength);
        const nul = raw.indexOf('\0');
        featureNames.push({ type: buf[e + FEATURE_ENTRY.type]!, bit: buf[e + FEATURE_ENTRY.bit]!, name: nul < 0 ? raw : raw.slice(0, nul) });
      }
    }
    // Bitmaps, crypto header and data file name are recognised; their features are
    // refused (or their autoclear bit cleared) by the caller. Others are ignored.
    pos = data + Math.ceil(length / 8) * 8;
  }

  const unknownIncompat = incompatibleFeatures & ~KNOWN_INCOMPAT;
  if (unknownIncompat !== 0n) {
    const names: string[] = [];
    for (let bit = 0; bit < 64; bit++) {
      if (!(unknownIncompat & (1n << BigInt(bit)))) continue;
      const named = featureNames.find((f) => f.type === 0 && f.bit === bit);
      names.push(named ? `'${named.name}'` : `bit ${bit}`);
    }
    throw new UnsupportedError(`${name}: qcow2 image uses unknown incompatible features: ${names.join(', ')}`);
  }
  if ((incompatibleFeatures & INCOMPAT.compression) !== 0n) {
    if (compressionType === 0) bad('qcow2 compression type bit is set but compression_type is zlib');
  } else if (compressionType !== 0) {
    bad(`qcow2 compression_type ${compressionType} without the compression type feature bit`);
  }

  return {
    version,
    clusterBits,
    clusterSize,
    size,
    cryptMethod,
    l1Size,
    l1TableOffset,
    refcountTableOffset,
    refcountTableClusters,
    nbSnapshots,
    snapshotsOffset,
    incompatibleFeatures,
    compatibleFeatures,
    autoclearFeatures,
    refcountOrder,
    headerLength,
    compressionType,
    backingFile,
    backingFormat,
    dataFile,
    featureNames,
    extensions,
  };
}

/** Refuse features that belong to later work, naming them as the user knows them. */
export function checkSupported(h: Qcow2Header, name: string): void {
  const unsupported = (feature: string): never => {
    throw new UnsupportedError(`${name}: qcow2 feature ${feature} is not supported yet`);
  };
  if (h.cryptMethod > 2) unsupported(`encryption (method ${h.cryptMethod})`);
  if (h.incompatibleFeatures & INCOMPAT.extendedL2 && h.clusterBits < 14) {
    throw new CorruptImageError(`${name}: qcow2 extended_l2 needs clusters of at least 16 KiB`);
  }
  if (h.cryptMethod !== 2 && h.extensions.some((e) => e.type === EXT.cryptoHeader)) throw new CorruptImageError(`${name}: qcow2 crypto header extension without LUKS encryption`);
  if (h.cryptMethod !== 0 && h.incompatibleFeatures & INCOMPAT.dataFile) unsupported('encryption with an external data file');
}

/** The bytes of the refcount table location fields (header bytes 48-59), for growth. */
export function encodeRefcountTableFields(offset: number, clusters: number): Buffer {
  const b = Buffer.alloc(12);
  b.writeBigUInt64BE(BigInt(offset), 0);
  b.writeUInt32BE(clusters, 8);
  return b;
}

/** The autoclear_features field (header bytes 88-95). */
export function encodeAutoclear(bits: bigint): Buffer {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(bits, 0);
  return b;
}
