// The qcow2 driver: probe and open (docs/interop/qcow2.txt; QEMU's qcow2_do_open).
import type { BlockNode, FormatDriver, OpenOptions } from '../../types.js';
import { CorruptImageError, UnsupportedError } from '../../errors.js';
import { TableCache } from '../../../cache/table-cache.js';
import {
  checkSupported,
  encodeAutoclear,
  HDR,
  HEADER_PROBE_BYTES,
  INCOMPAT,
  parseHeader,
  peekClusterBits,
  QCOW2_MAGIC,
  type Qcow2Header,
} from './header.js';
import { ClusterMap } from './cluster.js';
import { Refcounts } from './refcount.js';
import { Qcow2Node } from './qcow2.js';

function probe(head: Uint8Array): number {
  if (head.length < 8) return 0;
  const dv = new DataView(head.buffer, head.byteOffset, head.byteLength);
  return dv.getUint32(0, false) === QCOW2_MAGIC && dv.getUint32(4, false) >= 2 ? 100 : 0;
}

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
  if (h.incompatibleFeatures & INCOMPAT.dirty) {
    return new UnsupportedError(`${name}: qcow2 image was not closed cleanly (dirty bit, lazy refcounts); run 'qemu-img check -r all' before opening it read-write`);
  }
  if (h.nbSnapshots > 0) {
    return new UnsupportedError(`${name}: qcow2 image has ${h.nbSnapshots} internal snapshot(s); writing to such images is not supported yet (open it read-only)`);
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

  const l1 = await readExactly(file, h.l1TableOffset, h.l1Size * 8);
  const reftable = await readExactly(file, h.refcountTableOffset, h.refcountTableClusters * clusterSize);
  const barriers = opts.cache !== 'unsafe';
  // Three quarters for L2 tables, a quarter for refcount blocks (QEMU's default ratio).
  const l2Cache = new TableCache({ name: 'l2', file, tableSize: clusterSize, maxBytes: Math.floor((opts.metadataCacheBytes * 3) / 4), barriers });
  const refcountCache = new TableCache({ name: 'refcount', file, tableSize: clusterSize, maxBytes: Math.floor(opts.metadataCacheBytes / 4), barriers });
  l2Cache.dependOn(refcountCache);
  const map = new ClusterMap({ file, name, clusterBits, l1, l1Offset: h.l1TableOffset, l2Cache });
  const refcounts = new Refcounts({
    file,
    name,
    clusterBits,
    refcountOrder: h.refcountOrder,
    table: reftable,
    tableOffset: h.refcountTableOffset,
    cache: refcountCache,
    barriers,
  });

  // Autoclear bits name features whose data we would not keep up to date (bitmaps;
  // we support none of them): clear them before the first change, as QEMU does.
  if (!opts.readOnly && h.version === 3 && h.autoclearFeatures !== 0n) {
    await file.write(HDR.autoclearFeatures, encodeAutoclear(0n));
    await file.flush();
  }

  let backing: BlockNode | undefined;
  if (h.backingFile !== undefined && !opts.noBacking) {
    backing = await opts.openBacking(h.backingFile, h.backingFormat);
  }
  return new Qcow2Node({
    file,
    size: h.size,
    readOnly: opts.readOnly,
    version: h.version,
    backing,
    map,
    refcounts,
    refcountCache,
    barriers,
  });
}

export const qcow2Driver: FormatDriver = {
  name: 'qcow2',
  probe,
  open,
};
