// The cloop driver (compressed loop images, read-only). V2.0 as QEMU's block/cloop.c
// reads it: a 128-byte shell-script preamble, the block size and block count
// (big-endian), then an index of count + 1 big-endian u64 file offsets, block i being
// the zlib stream in [offset i, offset i + 1), inflating to exactly one block size;
// the disk is count blocks long (the tool pads the last one). V4.0 as the cloop
// module reads it (its cloop.h): the same header and index either first or last in
// the file, and the top 4 bits of each index entry naming the block's compressor.
// The node decodes whole blocks (chunkSize), so the cluster cache above keeps them
// and no block is inflated twice by a sequential read.
import { constants } from 'node:os';
import type { BlockNode, Extent, FormatDriver, OpenOptions } from '../../types.js';
import { CorruptImageError, UnsupportedError } from '../../errors.js';
import { MAX_NODE_SIZE } from '../../types.js';
import { PagedTable } from '../table-pages.js';
import { blockPieces } from '../mapped-node.js';
import type { MappedRun } from '../mapped.js';
import { ReadOnlyMappedNode, refuseWritable } from '../read-only-format.js';
import { decompress, type Codec } from '../../util/decompress.js';
import { HEADER_BYTES, PREAMBLE, probe, versionOf } from './probe.js';

/** QEMU's MAX_BLOCK_SIZE: no real image has larger blocks, and a block is held in memory whole. */
export const MAX_BLOCK_SIZE = 64 * 1024 * 1024;
/** QEMU's bound on one compressed block (a block that compressed badly is a little larger). */
const MAX_COMPRESSED = 2 * MAX_BLOCK_SIZE;
/** V4 index entries: compressor in the top 4 bits, offset in the other 60. */
const OFFSET_MASK = (1n << 60n) - 1n;
/** V4 compressors (cloop.h CLOOP_COMPRESSOR_*): a codec, 'none', or a name tsmount cannot decode. */
const COMPRESSORS: readonly (Codec | 'none')[] = ['zlib', 'none', 'xz', 'lz4-block', 'lzo1x'];

export class CloopNode extends ReadOnlyMappedNode {
  readonly chunkSize: number;

  constructor(
    file: BlockNode,
    private readonly blockSize: number,
    private readonly blocks: number,
    private readonly v4: boolean,
    private readonly index: PagedTable,
  ) {
    super({ file, size: blocks * blockSize, readOnly: true, barriers: false });
    this.chunkSize = blockSize;
  }

  /** Every block holds data; one extent, not a run per block (a window may span millions). */
  override blockStatus(offset: number, length: number): Promise<Extent[]> {
    return Promise.resolve([{ offset, length, kind: 'data' }]);
  }

  mapRange(offset: number, length: number): Promise<MappedRun[]> {
    const runs: MappedRun[] = [];
    for (const { block, inBlock, pos, n } of blockPieces(offset, length, this.blockSize)) {
      runs.push({ kind: 'custom', offset: pos, length: n, read: (dst) => this.readBlock(block, inBlock, dst) });
    }
    return Promise.resolve(runs);
  }

  private async readBlock(block: number, inBlock: number, dst: Uint8Array): Promise<void> {
    const data = await this.decode(block);
    dst.set(data.subarray(inBlock, inBlock + dst.length));
  }

  /** Where block `block`'s bytes are and how they are stored (V2: zlib, the whole entry an offset). */
  private async entry(block: number): Promise<{ offset: number; compressor: (typeof COMPRESSORS)[number] | undefined }> {
    const e = await this.index.u64be(block);
    if (!this.v4) return { offset: Number(e), compressor: 'zlib' };
    return { offset: Number(e & OFFSET_MASK), compressor: COMPRESSORS[Number(e >> 60n)] };
  }

  /** Block `block`, decoded; a bad index entry or stream is this read's error (EIO), not the image's. */
  private async decode(block: number): Promise<Buffer> {
    const { offset: start, compressor } = await this.entry(block);
    const { offset: end } = await this.entry(block + 1);
    const what = `${this.name}: cloop block ${block} (guest offset 0x${(block * this.blockSize).toString(16)})`;
    if (end < start || end - start > MAX_COMPRESSED) throw new CorruptImageError(`${what}: index gives a bad compressed length (${start}..${end})`);
    if (end > this.file.size) throw new CorruptImageError(`${what}: compressed bytes end at ${end}, past the end of the file (${this.file.size})`);
    if (compressor === undefined) {
      // EIO, as any block that cannot be read: the rest of the disk still reads.
      throw new UnsupportedError(`${what}: compressed with an unknown compressor (${Number((await this.index.u64be(block)) >> 60n)}), which tsmount does not decode`, constants.errno.EIO);
    }
    const input = Buffer.allocUnsafe(end - start);
    if (input.length > 0) await this.file.read(start, input);
    // V4's module takes a short last block (the rest reads as zeros); every other block is whole.
    const last = this.v4 && block === this.blocks - 1;
    let out: Buffer;
    if (compressor === 'none') {
      if (input.length > this.blockSize) throw new CorruptImageError(`${what}: stored block of ${input.length} bytes is larger than a block`);
      out = input;
    } else out = await decompress(compressor, input, { size: this.blockSize, exact: !last, what });
    if (out.length === this.blockSize) return out;
    if (!last) throw new CorruptImageError(`${what}: holds ${out.length} bytes, not ${this.blockSize}`);
    const whole = Buffer.alloc(this.blockSize);
    out.copy(whole);
    return whole;
  }
}

async function open(file: BlockNode, opts: OpenOptions): Promise<BlockNode> {
  refuseWritable(file, opts, 'cloop');
  if (file.size < HEADER_BYTES) throw new CorruptImageError(`${file.name}: file too short for a cloop header`);
  // V4 may keep its header (and index) at the end instead, as the module looks for it.
  let headerAt = 0;
  let head = Buffer.alloc(HEADER_BYTES);
  await file.read(0, head);
  if (versionOf(head) === undefined) {
    headerAt = file.size - HEADER_BYTES;
    head = Buffer.alloc(HEADER_BYTES);
    await file.read(headerAt, head);
    if (versionOf(head) !== '4.0') throw new CorruptImageError(`${file.name}: no cloop header at the start or the end of the file`);
  }
  const version = versionOf(head)!;
  if (version !== '2.0' && version !== '4.0') throw new UnsupportedError(`${file.name}: cloop version ${version} is not supported (only 2.0 and 4.0)`);
  const blockSize = head.readUInt32BE(PREAMBLE);
  const blocks = head.readUInt32BE(PREAMBLE + 4);
  if (blockSize === 0 || blockSize % 512 !== 0) throw new CorruptImageError(`${file.name}: cloop block size ${blockSize} is not a positive multiple of 512`);
  if (blockSize > MAX_BLOCK_SIZE) throw new CorruptImageError(`${file.name}: cloop block size ${blockSize} is larger than ${MAX_BLOCK_SIZE}`);
  if (blocks * blockSize >= MAX_NODE_SIZE) throw new CorruptImageError(`${file.name}: cloop disk of ${blocks} blocks of ${blockSize} bytes is too large`);
  // The index is read a page at a time as blocks are needed; it must be in the file.
  const indexBytes = (blocks + 1) * 8;
  if (HEADER_BYTES + indexBytes > file.size) throw new CorruptImageError(`${file.name}: cloop index of ${blocks + 1} offsets runs past the end of the file`);
  const indexAt = headerAt === 0 ? HEADER_BYTES : headerAt - indexBytes;
  const index = new PagedTable(file, indexAt, blocks + 1, 8, opts.metadataCacheBytes);
  return new CloopNode(file, blockSize, blocks, version === '4.0', index);
}

export const cloopDriver: FormatDriver = { name: 'cloop', probe, open, tailBytes: HEADER_BYTES };
