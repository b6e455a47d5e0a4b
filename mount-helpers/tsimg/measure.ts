// tsimg measure: how large a new image would be, as qemu-img measure computes it
// (QEMU's qcow2_measure and raw_measure): "required" for the data the source holds,
// "fully-allocated" for every cluster. The source is read through its chain
// (drivers/open.ts), the same walk map and convert use.
import { UsageError } from '../../drivers/errors.js';
import { CreateOptions, parseOptionString, parseSize } from '../../drivers/options.js';
import { mapRuns } from './map.js';
import type { BlockNode } from '../../drivers/types.js';
import { openForRead, print, type OpenCli } from './common.js';

export interface MeasureCli extends OpenCli {
  outputFormat: string;
  options: string[];
  size?: string;
  output: string;
}

export interface Measure {
  required: number;
  'fully-allocated': number;
  bitmaps?: number;
}

const roundUp = (n: number, m: number): number => Math.ceil(n / m) * m;

/** qcow2_refcount_metadata_size: the fixed point of refcount blocks and table clusters that count everything, themselves included. */
export function refcountMetadataSize(clusters: number, clusterSize: number, refcountOrder: number): number {
  const perTableCluster = clusterSize / 8;
  const perBlock = (clusterSize * 8) / 2 ** refcountOrder;
  let table = 0;
  let blocks = 0;
  let n = 0;
  let last;
  do {
    last = n;
    blocks = Math.ceil((clusters + table + blocks) / perBlock);
    table = Math.ceil(blocks / perTableCluster);
    n = clusters + blocks + table;
  } while (n !== last);
  return (blocks + table) * clusterSize;
}

/** qcow2_calc_prealloc_size: header, L2 and L1 tables, refcounts, and every data cluster. */
export function qcow2PreallocSize(totalSize: number, clusterSize: number, refcountOrder: number, extendedL2: boolean): number {
  const aligned = roundUp(totalSize, clusterSize);
  const l2e = extendedL2 ? 16 : 8;
  let meta = clusterSize;
  const nl2e = roundUp(aligned / clusterSize, clusterSize / l2e);
  meta += nl2e * l2e;
  const nl1e = roundUp((nl2e * l2e) / clusterSize, clusterSize / 8);
  meta += nl1e * 8;
  meta += refcountMetadataSize((meta + aligned) / clusterSize, clusterSize, refcountOrder);
  return meta + aligned;
}

/** Bytes of the source that hold data, counted in whole clusters as qcow2_measure counts them. */
async function dataBytes(src: BlockNode, clusterSize: number): Promise<number> {
  let required = 0;
  // Data that reads as zeros (a hole beneath a flat vmdk extent, a preallocated cluster) is skipped, as BDRV_BLOCK_ZERO is.
  const runs = (await mapRuns(src)).map((r) => ({ offset: r.offset, length: r.length, data: r.kind === 'data' && r.zeroData !== true }));
  let offset = 0;
  for (const r of runs) {
    const end = r.offset + r.length;
    if (end <= offset) continue;
    if (!r.data) {
      offset = end;
      continue;
    }
    const pnum = roundUp(end, clusterSize) - offset;
    required += (offset % clusterSize) + pnum;
    offset += pnum;
  }
  return required;
}

/**
 * qcow2_get_persistent_dirty_bitmap_size: the source's bitmaps copied into a new image
 * of this cluster size, every bitmap cluster counted as allocated, with its table,
 * and the directory (24-byte entries with the name, each padded to 8 bytes).
 */
export function bitmapsSize(bitmaps: readonly { name: string; granularity: number }[], virtualSize: number, clusterSize: number): number {
  let size = 0;
  let directory = 0;
  for (const b of bitmaps) {
    const bytes = Math.ceil(Math.ceil(virtualSize / b.granularity) / 8);
    const clusters = Math.ceil(bytes / clusterSize);
    size += clusters * clusterSize + roundUp(clusters * 8, clusterSize);
    directory += roundUp(24 + Buffer.byteLength(b.name, 'utf8'), 8);
  }
  return size + roundUp(directory, clusterSize);
}

export async function measureImage(src: BlockNode | undefined, sizeOpt: number | undefined, format: string, o: CreateOptions): Promise<Measure> {
  if (format === 'raw') {
    o.finish('raw');
    const size = src ? src.size : roundUp(sizeOpt ?? 0, 512);
    return { required: size, 'fully-allocated': size };
  }
  if (format !== 'qcow2') throw new UsageError(`Format driver '${format}' does not support size measurement`);
  const compat = o.choice('compat', ['0.10', '1.1', 'v2', 'v3'] as const) ?? '1.1';
  const version = compat === '0.10' || compat === 'v2' ? 2 : 3;
  const clusterSize = o.size('cluster_size') ?? 65536;
  const refcountBits = o.int('refcount_bits', 1, 64) ?? 16;
  const extendedL2 = o.bool('extended_l2') ?? false;
  const prealloc = o.choice('preallocation', ['off', 'metadata', 'falloc', 'full'] as const) ?? 'off';
  const backing = o.string('backing_file') !== undefined;
  o.string('backing_fmt');
  o.choice('compression_type', ['zlib', 'zstd'] as const);
  o.bool('lazy_refcounts');
  o.finish('qcow2');
  if (!Number.isInteger(Math.log2(clusterSize)) || clusterSize < 512 || clusterSize > 2 << 20) throw new UsageError(`Cluster size must be a power of two between 512 and 2048k (cluster_size=${clusterSize})`);
  if (!Number.isInteger(Math.log2(refcountBits))) throw new UsageError('Refcount width must be a power of two and may not exceed 64 bits');
  const virtual = roundUp(src ? src.size : (sizeOpt ?? 0), clusterSize);
  let required = 0;
  if (src) required = backing ? virtual : await dataBytes(src, clusterSize);
  if (prealloc === 'full' || prealloc === 'falloc') required = virtual;
  const full = qcow2PreallocSize(virtual, clusterSize, Math.log2(refcountBits), extendedL2);
  // Bitmaps are shown when source and target could both hold them: a v3 target, and a
  // source layer that can (a qcow2 v3 describes its list, maybe empty).
  const srcBitmaps = src?.describe?.().bitmaps;
  const bitmaps = version >= 3 && srcBitmaps ? { bitmaps: bitmapsSize(srcBitmaps, src!.size, clusterSize) } : {};
  // qemu-img's key order.
  return { ...bitmaps, required: full - virtual + required, 'fully-allocated': full };
}

export async function measure(spec: string | undefined, o: MeasureCli): Promise<void> {
  if (o.output !== 'json' && o.output !== 'human') throw new UsageError(`--output must be human or json, not '${o.output}'`);
  if ((spec === undefined) === (o.size === undefined)) throw new UsageError('Either --size N or one filename must be specified.');
  const options = new CreateOptions(o.options.flatMap((t) => parseOptionString(t)));
  const src = spec === undefined ? undefined : await openForRead(spec, o);
  try {
    const m = await measureImage(src, o.size === undefined ? undefined : parseSize(o.size, 'size'), o.outputFormat, options);
    if (o.output === 'json') print(`${JSON.stringify(m, null, 4)}\n`);
    else print(`required size: ${m.required}\nfully allocated size: ${m['fully-allocated']}\n${m.bitmaps !== undefined ? `bitmaps size: ${m.bitmaps}\n` : ''}`);
  } finally {
    await src?.close();
  }
}
