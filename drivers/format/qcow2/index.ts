// The qcow2 driver: probe and open (docs/interop/qcow2.txt; QEMU's qcow2_do_open),
// and create (create.ts).
import type { BitmapBits, BlockNode, CheckReport, Creatable, FormatDriver, ImageDescription, OpenOptions, SnapshotView } from '../../types.js';
import { CorruptImageError, UnsupportedError } from '../../errors.js';
import { TableCache } from '../../../cache/table-cache.js';
import {
  AUTOCLEAR,
  checkSupported,
  COMPAT,
  encodeAutoclear,
  EXT,
  HDR,
  HEADER_PROBE_BYTES,
  INCOMPAT,
  parseHeader,
  peekClusterBits,
  type Qcow2Header,
} from './header.js';
import { ClusterMap } from './cluster.js';
import { Refcounts } from './refcount.js';
import { Qcow2Node } from './qcow2.js';
import { readSnapshotTable } from './snapshot.js';
import { BitmapTracker, bitmapRanges, readBitmapBits, readBitmapDirectory, type BitmapDirectory } from './bitmap.js';
// Repair, check and the LUKS header reader are imported where they are used: an
// image opened to be read needs none of them.
import type { RepairInput } from './repair.js';
import { luksVersion } from '../../crypto/magic.js';
import { createDefaults, createOptions, createQcow2 } from './create.js';
import { openCrypt, type DataCrypt } from './crypt.js';
import { GuardedTableFile, MetadataGuard, OL } from './overlap.js';
import type { SnapshotEntry } from './snapshot.js';
import { guarded } from '../../filters/read-only.js';
import { probe } from './probe.js';

async function readExactly(file: BlockNode, offset: number, length: number): Promise<Buffer> {
  const buf = Buffer.alloc(length);
  if (length > 0) await file.read(offset, buf);
  return buf;
}

/** Why a writable open must be refused, or undefined. */
function refuseWritable(h: Qcow2Header, name: string): Error | undefined {
  if (h.incompatibleFeatures & INCOMPAT.corrupt) {
    return new CorruptImageError(`${name}: qcow2 image is marked corrupt; it can only be opened read-only (repair with 'qemu-img check -r all')`);
  }
  return undefined;
}

async function open(file: BlockNode, opts: OpenOptions): Promise<BlockNode> {
  const name = file.name;
  const head = await readExactly(file, 0, Math.min(HEADER_PROBE_BYTES, file.size));
  const clusterBits = peekClusterBits(head, name);
  const clusterSize = 2 ** clusterBits;
  const headerCluster = await readExactly(file, 0, Math.min(clusterSize, file.size));
  const h = parseHeader(headerCluster, file.size, name);
  checkSupported(h, name);
  if (!opts.readOnly) {
    const refusal = refuseWritable(h, name);
    if (refusal) throw refusal;
  }
  const extendedL2 = (h.incompatibleFeatures & INCOMPAT.extendedL2) !== 0n;

  let dataFile: BlockNode | undefined;
  if (h.incompatibleFeatures & INCOMPAT.dataFile) {
    if (h.dataFile === undefined) throw new CorruptImageError(`${name}: qcow2 image needs an external data file but names none`);
    if (!opts.openFile) throw new UnsupportedError(`${name}: qcow2 external data file cannot be opened on this protocol`);
    dataFile = await opts.openFile(h.dataFile, 'data file');
  }
  try {
    return await openWith(file, opts, h, headerCluster, dataFile, extendedL2);
  } catch (err) {
    await dataFile?.close().catch(() => undefined);
    throw err;
  }
}

async function openWith(file: BlockNode, opts: OpenOptions, h: Qcow2Header, headerCluster: Buffer, dataFile: BlockNode | undefined, extendedL2: boolean): Promise<BlockNode> {
  const name = file.name;
  const clusterBits = h.clusterBits;
  const clusterSize = h.clusterSize;
  const dataFileRaw = dataFile !== undefined && (h.autoclearFeatures & AUTOCLEAR.dataFileRaw) !== 0n;
  const l1 = await readExactly(file, h.l1TableOffset, h.l1Size * 8);
  const reftable = await readExactly(file, h.refcountTableOffset, h.refcountTableClusters * clusterSize);
  const { entries: snaps, bytes: snapshotTableBytes } = await readSnapshotTable(file, h.snapshotsOffset, h.nbSnapshots, clusterSize, h.size, name);

  // Bitmaps count only while the autoclear bit says they are consistent.
  let bitmaps: BitmapDirectory | undefined;
  const bitmapExt = h.extensions.find((e) => e.type === EXT.bitmaps);
  if (bitmapExt && h.version === 3 && (h.autoclearFeatures & AUTOCLEAR.bitmaps) !== 0n) {
    bitmaps = await readBitmapDirectory(file, headerCluster.subarray(bitmapExt.offset, bitmapExt.offset + bitmapExt.length), name);
  }

  // Not closed cleanly with lazy refcounts: QEMU repairs the refcounts on a writable
  // open, and reads without repair on a read-only one. It runs once the backing file
  // and the passphrase are known good, so a refused open changes nothing.
  // What the refcount walk needs (repair.ts): the lazy-refcount repair and tsimg check.
  const repairInput = async (): Promise<RepairInput> => {
    const extraCorruptions: string[] = [];
    const extraRanges = bitmaps ? await bitmapRanges(file, bitmaps, clusterSize, name, extraCorruptions) : [];
    const crypto = h.extensions.find((e) => e.type === EXT.cryptoHeader);
    if (crypto) {
      const hc = await readExactly(file, crypto.offset, 16);
      extraRanges.push({ offset: Number(hc.readBigUInt64BE(0)), length: Number(hc.readBigUInt64BE(8)) });
    }
    return {
      file,
      name,
      clusterBits,
      refcountOrder: h.refcountOrder,
      extendedL2,
      externalData: dataFile !== undefined,
      l1,
      l1Offset: h.l1TableOffset,
      reftable,
      reftableOffset: h.refcountTableOffset,
      snapshots: snaps,
      snapshotTableOffset: h.snapshotsOffset,
      snapshotTableBytes,
      extraRanges,
      extraCorruptions,
    };
  };
  const repairIfDirty = async (): Promise<void> => {
    if (opts.readOnly || (h.incompatibleFeatures & INCOMPAT.dirty) === 0n) return;
    await (await import('./repair.js')).rebuildRefcounts(await repairInput());
    const bits = Buffer.alloc(8);
    bits.writeBigUInt64BE(h.incompatibleFeatures & ~INCOMPAT.dirty);
    await file.write(HDR.incompatibleFeatures, bits);
    await file.flush();
  };

  let backing: BlockNode | undefined;
  if (h.backingFile !== undefined && !opts.noBacking) {
    backing = await opts.openBacking(h.backingFile, h.backingFormat);
  }
  let crypt: DataCrypt | undefined;
  if (h.cryptMethod !== 0) {
    const ext = h.extensions.find((e) => e.type === EXT.cryptoHeader);
    let cryptoHeader: { offset: number; length: number } | undefined;
    if (ext) {
      if (ext.length < 16) throw new CorruptImageError(`${name}: qcow2 crypto header extension is too short`);
      const dv = new DataView(headerCluster.buffer, headerCluster.byteOffset + ext.offset, 16);
      cryptoHeader = { offset: Number(dv.getBigUint64(0, false)), length: Number(dv.getBigUint64(8, false)) };
    }
    try {
      // Metadata only (tsimg info): without the passphrase nothing is unlocked, and the
      // graph builder refuses every data request (filters/no-io.ts).
      if (!(opts.noIo && opts.secret === undefined)) crypt = await openCrypt(file, h.cryptMethod, cryptoHeader, opts.secret);
    } catch (err) {
      await backing?.close().catch(() => undefined);
      throw err;
    }
  }
  try {
    await repairIfDirty();
  } catch (err) {
    await backing?.close().catch(() => undefined);
    throw err;
  }

  const barriers = opts.cache !== 'unsafe';
  // Three quarters for L2 tables, a quarter for refcount blocks (QEMU's default ratio).
  // A writable node checks every write against the image's metadata (overlap.ts).
  let guard: MetadataGuard | undefined;
  if (!opts.readOnly) {
    guard = new MetadataGuard(file, name, clusterSize, h.version === 3);
    guard.addAll(metadataRanges(h, reftable, snaps, snapshotTableBytes, bitmaps, cryptoHeaderRange(h, headerCluster)));
    guard.addTables(tableOffsets(l1), OL.activeL2);
    guard.addTables(tableOffsets(reftable), OL.refcountBlock);
  }
  const l2File = guard ? new GuardedTableFile(file, guard, OL.activeL2) : file;
  const refcountFile = guard ? new GuardedTableFile(file, guard, OL.refcountBlock) : file;
  const l2Cache = new TableCache({ name: 'l2', file: l2File, tableSize: clusterSize, maxBytes: Math.floor((opts.metadataCacheBytes * 3) / 4), barriers });
  const refcountCache = new TableCache({ name: 'refcount', file: refcountFile, tableSize: clusterSize, maxBytes: Math.floor(opts.metadataCacheBytes / 4), barriers });
  l2Cache.dependOn(refcountCache);
  const dataLimit = dataFile ? () => Number.MAX_SAFE_INTEGER : () => file.size;
  const map = new ClusterMap({ file, name, clusterBits, extendedL2, dataLimit, externalData: dataFile !== undefined, l1, l1Offset: h.l1TableOffset, l2Cache });
  l2Cache.setTail(map.l1Tail());
  const refcounts = new Refcounts({
    file,
    name,
    clusterBits,
    refcountOrder: h.refcountOrder,
    table: reftable,
    tableOffset: h.refcountTableOffset,
    cache: refcountCache,
    barriers,
    guard,
  });

  // Before the first change: clear the autoclear bits of features we do not keep
  // up to date (QEMU knows only bitmaps and data_file_raw), and load the bitmaps,
  // which marks them in use until close() stores them (bitmap.ts).
  const known = AUTOCLEAR.bitmaps | AUTOCLEAR.dataFileRaw;
  let autoclear = h.autoclearFeatures;
  const tracker = !opts.readOnly
    ? new BitmapTracker(bitmaps, {
        file,
        name,
        clusterSize,
        v3: h.version === 3,
        refcounts,
        guard,
        flushRefcounts: async () => {
          await refcountCache.flush();
          if (barriers) await file.flush();
        },
      }, h.size)
    : undefined;
  const beforeFirstChange = async (): Promise<void> => {
    if (h.version === 3 && (autoclear & ~known) !== 0n) {
      await file.write(HDR.autoclearFeatures, encodeAutoclear(autoclear & known));
      await file.flush();
      autoclear &= known;
    }
    await tracker?.load();
  };

  const common = { file, version: h.version, backing, refcounts, refcountCache, barriers, dataFile, dataFileName: h.dataFile, dataFileRaw, compressionType: h.compressionType, crypt };
  // The LUKS header inside the image, as qemu-img info shows it (read without the passphrase).
  let luksInfo: Record<string, unknown> | undefined;
  const cryptoRange = cryptoHeaderRange(h, headerCluster);
  const luks1 = h.cryptMethod === 2 && cryptoRange ? await import('../../crypto/luks1.js') : undefined;
  if (luks1 && cryptoRange && cryptoRange.length >= luks1.HDR.size && cryptoRange.offset + luks1.HDR.size <= file.size) {
    const luksHead = await readExactly(file, cryptoRange.offset, luks1.HDR.size);
    if (luksVersion(luksHead) === 1) luksInfo = luks1.describeLuks1(luks1.parseLuks1Header(luksHead, cryptoRange.length, name));
  }
  const description = describeQcow2(h, snaps, luksInfo, bitmaps);
  const check = async (): Promise<CheckReport> => (await import('./check.js')).checkQcow2(await repairInput(), h.size);
  const readBitmap = (bm: string): Promise<BitmapBits> => readBitmapBits(file, bitmaps, bm, clusterSize, h.size);
  const node = new Qcow2Node({ ...common, size: h.size, readOnly: opts.readOnly, map, beforeFirstChange, bitmaps: tracker, readBitmap, guard, description, check, repair: async (leaksOnly) => (await import('./repair.js')).rebuildRefcounts(await repairInput(), leaksOnly), snapshotState: { header: h, snapshots: snaps, tableBytes: snapshotTableBytes } });
  const views: SnapshotView[] = [];
  // qemu-img convert -l keeps the active layer's size: qcow2_snapshot_load_tmp only swaps the L1 table.
  // A snapshot's L1 table is read when the snapshot is read, a cluster at a time
  // through the L2 cache: opening costs nothing per snapshot.
  for (const s of snaps) {
    const smap = new ClusterMap({ file, name, clusterBits, extendedL2, dataLimit, externalData: dataFile !== undefined, l1Entries: s.l1Size, l1Offset: s.l1TableOffset, l2Cache });
    views.push({ name: s.name, id: s.id, node: guarded(new Qcow2Node({ ...common, size: h.size, readOnly: true, map: smap, view: true, viewName: s.name })) });
  }
  node.setSnapshots(views);
  return node;
}

/** qemu-img info's view of the header (qcow2_get_info, qcow2_get_specific_info). */
function describeQcow2(h: Qcow2Header, snaps: SnapshotEntry[], luks: Record<string, unknown> | undefined, bitmapDir: BitmapDirectory | undefined): ImageDescription {
  const v3 = h.version === 3;
  const data: Record<string, unknown> = { compat: v3 ? '1.1' : '0.10', 'compression-type': h.compressionType === 1 ? 'zstd' : 'zlib' };
  if (v3) data['lazy-refcounts'] = (h.compatibleFeatures & COMPAT.lazyRefcounts) !== 0n;
  // qemu-img info lists the bitmaps only when there are some, after lazy-refcounts.
  const bitmaps = v3 ? (bitmapDir?.bitmaps ?? []) : undefined;
  if (bitmaps?.length) data.bitmaps = bitmaps;
  data['refcount-bits'] = 2 ** h.refcountOrder;
  if (h.dataFile !== undefined) {
    data['data-file'] = h.dataFile;
    data['data-file-raw'] = (h.autoclearFeatures & AUTOCLEAR.dataFileRaw) !== 0n;
  }
  if (h.cryptMethod === 1) data.encrypt = { format: 'aes' };
  else if (h.cryptMethod !== 0) {
    // QEMU's key order: the LUKS fields with "format" after "uuid".
    const { 'ivgen-alg': ivgen, 'hash-alg': hash, 'cipher-alg': cipher, uuid, ...rest } = luks ?? {};
    data.encrypt = luks ? { 'ivgen-alg': ivgen, 'hash-alg': hash, 'cipher-alg': cipher, uuid, format: 'luks', ...rest } : { format: 'luks' };
  }
  if (v3) {
    data.corrupt = (h.incompatibleFeatures & INCOMPAT.corrupt) !== 0n;
    data['extended-l2'] = (h.incompatibleFeatures & INCOMPAT.extendedL2) !== 0n;
  }
  return {
    clusterSize: h.clusterSize,
    dirty: (h.incompatibleFeatures & INCOMPAT.dirty) !== 0n,
    backingFile: h.backingFile,
    backingFormat: h.backingFormat,
    encrypted: h.cryptMethod !== 0,
    snapshots: snaps.map((s) => ({ id: s.id, name: s.name, vmStateSize: s.vmStateSize, dateSec: s.dateSec, dateNsec: s.dateNsec, vmClockNsec: s.vmClockNsec, icount: s.icount })),
    formatSpecific: { type: 'qcow2', data },
    ...(bitmaps ? { bitmaps } : {}),
  };
}

/** The LUKS header's place in the file (crypto header extension), if any. */
function cryptoHeaderRange(h: Qcow2Header, headerCluster: Buffer): { offset: number; length: number } | undefined {
  const ext = h.extensions.find((e) => e.type === EXT.cryptoHeader);
  if (!ext || ext.length < 16) return undefined;
  return { offset: Number(headerCluster.readBigUInt64BE(ext.offset)), length: Number(headerCluster.readBigUInt64BE(ext.offset + 8)) };
}

/** The host offsets a table of 64-bit entries names (bits 9-55, L1E_OFFSET_MASK), zeros left out. */
function tableOffsets(buf: Buffer): Float64Array {
  const out = new Float64Array(buf.length >>> 3);
  let n = 0;
  for (let i = 0; i + 8 <= buf.length; i += 8) {
    const off = (buf.readUInt32BE(i) & 0x00ffffff) * 2 ** 32 + ((buf.readUInt32BE(i + 4) & 0xfffffe00) >>> 0);
    if (off !== 0) out[n++] = off;
  }
  return out.subarray(0, n);
}

/**
 * Every host range the image's metadata holds at open, for the overlap checks
 * (QEMU's "cached" set: header, active L1 and L2 tables, refcount table and blocks,
 * snapshot table, snapshot L1 tables, bitmap directory; and bitmap tables and the
 * LUKS header, which no data cluster may overlap either), except the L2 tables and
 * refcount blocks, which go in as one typed array each (tableOffsets).
 */
function metadataRanges(
  h: Qcow2Header,
  reftable: Buffer,
  snaps: SnapshotEntry[],
  snapshotTableBytes: number,
  bitmaps: BitmapDirectory | undefined,
  crypto: { offset: number; length: number } | undefined,
): { offset: number; bytes: number; what: string }[] {
  const cs = h.clusterSize;
  const out: { offset: number; bytes: number; what: string }[] = [
    { offset: 0, bytes: cs, what: OL.header },
    { offset: h.l1TableOffset, bytes: h.l1Size * 8, what: OL.activeL1 },
    { offset: h.refcountTableOffset, bytes: reftable.length, what: OL.refcountTable },
    { offset: h.snapshotsOffset, bytes: snapshotTableBytes, what: OL.snapshotTable },
  ];
  for (const s of snaps) out.push({ offset: s.l1TableOffset, bytes: s.l1Size * 8, what: OL.inactiveL1 });
  if (bitmaps) {
    out.push({ offset: bitmaps.offset, bytes: bitmaps.data.length, what: OL.bitmapDirectory });
    for (const t of bitmaps.tables) out.push({ offset: t.offset, bytes: t.entries * 8, what: OL.bitmapTable });
  }
  if (crypto) out.push({ offset: crypto.offset, bytes: crypto.length, what: OL.cryptoHeader });
  return out;
}

export const qcow2Driver: FormatDriver & Creatable = {
  name: 'qcow2',
  probe,
  open,
  createOptions,
  createDefaults,
  create: createQcow2,
};
