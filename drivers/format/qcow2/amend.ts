// Changing the header in place: the backing file (tsimg rebase, amend) and the options
// qemu-img amend changes without moving data (QEMU's qcow2_update_header and
// qcow2_amend_options): compat 0.10 <-> 1.1 (the downgrade's zero clusters in
// downgrade.ts), lazy_refcounts, backing_file, backing_fmt.
// The header is read back from the file each time, so fields other code changed since
// the open (snapshot table, L1 table) are kept.
import type { BlockNode } from '../../types.js';
import { UnsupportedError, UsageError } from '../../errors.js';
import type { CreateOptions } from '../../options.js';
import { AUTOCLEAR, COMPAT, EXT, HDR, LIMITS, parseHeader, V2_HEADER_LENGTH, type Qcow2Header } from './header.js';
import { extension, featureTable } from './create.js';

/** The v3 header QEMU writes (with compression_type), as create.ts does. */
const V3_HEADER_LENGTH = 112;

export interface HeaderChange {
  backingFile?: string | undefined;
  backingFormat?: string | undefined;
  /** Replace the backing fields (both, even with undefined). */
  setBacking?: boolean;
  upgrade?: boolean;
  /** To version 2: the v2 header, feature bits and the feature table dropped (zero clusters already expanded). */
  downgrade?: boolean;
  lazyRefcounts?: boolean;
  /**
   * The bitmaps extension (bitmap.ts): its fields, written with the autoclear bit that
   * says it is valid; null drops both (the last bitmap removed).
   */
  bitmaps?: { count: number; directorySize: number; directoryOffset: number } | null;
}

async function readHeader(file: BlockNode, clusterSize: number): Promise<{ buf: Buffer; h: Qcow2Header }> {
  const buf = Buffer.alloc(clusterSize);
  await file.read(0, buf);
  return { buf, h: parseHeader(buf, file.size, file.name) };
}

/** Rewrite the header cluster with `c` applied; returns the header as now on disk. */
export async function rewriteHeader(file: BlockNode, clusterSize: number, c: HeaderChange): Promise<Qcow2Header> {
  const { buf, h } = await readHeader(file, clusterSize);
  const out = Buffer.alloc(clusterSize);
  const v3 = (h.version === 3 || c.upgrade === true) && c.downgrade !== true;
  const fixed = h.version === 3 && v3 ? h.headerLength : V2_HEADER_LENGTH;
  buf.copy(out, 0, 0, fixed);
  let pos = fixed;
  // A v2 header ends at the snapshot table offset: no feature bits, no refcount order, no compression type.
  if (h.version === 3 && c.downgrade) out.writeUInt32BE(2, HDR.version);
  if (h.version === 2 && c.upgrade) {
    out.writeUInt32BE(3, HDR.version);
    out.writeBigUInt64BE(0n, HDR.incompatibleFeatures);
    out.writeBigUInt64BE(0n, HDR.compatibleFeatures);
    out.writeBigUInt64BE(0n, HDR.autoclearFeatures);
    out.writeUInt32BE(4, HDR.refcountOrder);
    out.writeUInt32BE(V3_HEADER_LENGTH, HDR.headerLength);
    pos = V3_HEADER_LENGTH;
  }
  if (c.lazyRefcounts !== undefined) {
    if (!v3) throw new UsageError(`${file.name}: Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)`);
    const compat = out.readBigUInt64BE(HDR.compatibleFeatures);
    out.writeBigUInt64BE(c.lazyRefcounts ? compat | COMPAT.lazyRefcounts : compat & ~COMPAT.lazyRefcounts, HDR.compatibleFeatures);
  }
  const backingFile = c.setBacking ? c.backingFile : h.backingFile;
  const backingFormat = c.setBacking ? c.backingFormat : h.backingFormat;
  // QEMU's order: backing format first, then the others as they were, feature table included.
  const exts: Buffer[] = [];
  if (backingFormat !== undefined && backingFile !== undefined) exts.push(extension(EXT.backingFormat, Buffer.from(backingFormat, 'latin1')));
  let hasFeatureTable = false;
  let bitmapsExt: Buffer | undefined;
  if (c.bitmaps) {
    bitmapsExt = Buffer.alloc(24);
    bitmapsExt.writeUInt32BE(c.bitmaps.count, 0);
    bitmapsExt.writeBigUInt64BE(BigInt(c.bitmaps.directorySize), 8);
    bitmapsExt.writeBigUInt64BE(BigInt(c.bitmaps.directoryOffset), 16);
    const autoclear = out.readBigUInt64BE(HDR.autoclearFeatures);
    out.writeBigUInt64BE(autoclear | AUTOCLEAR.bitmaps, HDR.autoclearFeatures);
  } else if (c.bitmaps === null) {
    const autoclear = out.readBigUInt64BE(HDR.autoclearFeatures);
    out.writeBigUInt64BE(autoclear & ~AUTOCLEAR.bitmaps, HDR.autoclearFeatures);
  }
  for (const e of h.extensions) {
    if (e.type === EXT.backingFormat || e.type === EXT.end) continue;
    // QEMU writes the feature table only into v3 headers of clusters over 4 KiB (qcow2_update_header).
    if (e.type === EXT.featureTable && (!v3 || clusterSize <= 4096)) continue;
    if (e.type === EXT.featureTable) hasFeatureTable = true;
    if (e.type === EXT.bitmaps && c.bitmaps !== undefined) {
      // Replaced where it was, or dropped.
      if (bitmapsExt) exts.push(extension(EXT.bitmaps, bitmapsExt));
      bitmapsExt = undefined;
      continue;
    }
    exts.push(extension(e.type, buf.subarray(e.offset, e.offset + e.length)));
  }
  if (bitmapsExt) exts.push(extension(EXT.bitmaps, bitmapsExt));
  if (v3 && clusterSize > 4096 && !hasFeatureTable) exts.push(extension(EXT.featureTable, featureTable()));
  exts.push(Buffer.alloc(8));
  for (const e of exts) {
    if (pos + e.length > clusterSize) throw new UsageError(`${file.name}: the header does not fit in one cluster`);
    e.copy(out, pos);
    pos += e.length;
  }
  if (backingFile !== undefined) {
    const name = Buffer.from(backingFile, 'utf8');
    if (name.length > LIMITS.maxBackingNameLength) throw new UsageError(`${file.name}: backing file name too long`);
    if (pos + name.length > clusterSize) throw new UsageError(`${file.name}: the header does not fit in one cluster (backing file name too long?)`);
    out.writeBigUInt64BE(BigInt(pos), HDR.backingFileOffset);
    out.writeUInt32BE(name.length, HDR.backingFileSize);
    name.copy(out, pos);
  } else {
    out.writeBigUInt64BE(0n, HDR.backingFileOffset);
    out.writeUInt32BE(0, HDR.backingFileSize);
  }
  await file.write(0, out);
  await file.flush();
  return parseHeader(out, file.size, file.name);
}

/**
 * What a downgrade needs of the node (qcow2.ts): its refusals checked against the
 * header as on disk, then every zero cluster expanded (downgrade.ts).
 */
export interface Downgrader {
  check(h: Qcow2Header): Promise<void>;
  expand(h: Qcow2Header): Promise<void>;
}

/** qemu-img amend -o for qcow2: what can change in place (a downgrade writes out zero clusters). */
export async function amendQcow2(file: BlockNode, clusterSize: number, o: CreateOptions, downgrader?: Downgrader): Promise<void> {
  const { h } = await readHeader(file, clusterSize);
  const c: HeaderChange = {};
  const compat = o.choice('compat', ['0.10', '1.1', 'v2', 'v3'] as const);
  let downgrade = false;
  if (compat !== undefined) {
    const version = compat === '0.10' || compat === 'v2' ? 2 : 3;
    if (version === 2 && h.version === 3) downgrade = true;
    if (version === 3 && h.version === 2) c.upgrade = true;
  }
  if (downgrade && !downgrader) throw new UnsupportedError(`${file.name}: downgrading to compat=0.10 needs the image opened writable`);
  const lazy = o.bool('lazy_refcounts');
  if (lazy !== undefined) c.lazyRefcounts = lazy;
  // QEMU sets lazy refcounts before the downgrade and refuses them for a v2 target.
  if (downgrade && lazy === true) throw new UsageError(`${file.name}: Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)`);
  const backingFile = o.string('backing_file');
  const backingFormat = o.string('backing_fmt');
  // QEMU 7.2's qcow2_amend_options: the backing fields may only be given as they are
  // (changing them is a rebase, which checks what the new chain reads).
  if ((backingFile !== undefined || backingFormat !== undefined) && (backingFile !== h.backingFile || backingFormat !== h.backingFormat)) {
    throw new UsageError(`${file.name}: Cannot amend the backing file (use tsimg rebase instead)`);
  }
  for (const k of o.unused()) {
    if (['size', 'cluster_size', 'refcount_bits', 'extended_l2', 'encryption', 'encrypt.format', 'data_file', 'data_file_raw', 'preallocation', 'compression_type'].includes(k)) {
      throw new UnsupportedError(`${file.name}: changing option '${k}' is not supported by tsimg amend`);
    }
  }
  o.finish('qcow2');
  if (c.upgrade && c.lazyRefcounts === undefined) c.lazyRefcounts = false;
  // Everything refused before anything is written.
  if (downgrade) await downgrader!.check(h);
  const now = await rewriteHeader(file, clusterSize, c);
  // Downgrade last, as QEMU does: the other changes are in the header first.
  if (downgrade) {
    await downgrader!.expand(now);
    await rewriteHeader(file, clusterSize, { downgrade: true, lazyRefcounts: undefined });
  }
}
