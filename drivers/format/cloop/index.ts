// The cloop driver (compressed loop images, read-only; QEMU's block/cloop.c): a
// 128-byte shell-script preamble, the block size and block count (big-endian), then
// an index of count + 1 big-endian u64 file offsets, block i being the zlib stream
// in [offset i, offset i + 1). Every block inflates to exactly one block size; the
// disk is count blocks long (the tool pads the last one). The node decodes whole
// blocks (chunkSize), so the cluster cache above keeps them and no block is
// inflated twice by a sequential read.
import type { BlockNode, FormatDriver, OpenOptions } from '../../types.js';
import { CorruptImageError, UnsupportedError } from '../../errors.js';
import { MAX_NODE_SIZE } from '../../types.js';
import { PagedTable } from '../table-pages.js';
import { blockPieces, readHead } from '../mapped-node.js';
import type { MappedRun } from '../mapped.js';
import { ReadOnlyMappedNode, refuseWritable } from '../read-only-format.js';
import { decompress } from '../../util/decompress.js';

const PREAMBLE = 128;
const HEADER_BYTES = PREAMBLE + 8;
const SIGNATURE = '#!/bin/sh\n#V';
/** Where the version ("2.0") stands in the preamble. */
const VERSION_AT = 12;
/** QEMU's MAX_BLOCK_SIZE: no real image has larger blocks, and a block is held in memory whole. */
export const MAX_BLOCK_SIZE = 64 * 1024 * 1024;
/** QEMU's bound on one compressed block (a block that compressed badly is a little larger). */
const MAX_COMPRESSED = 2 * MAX_BLOCK_SIZE;

function latin1(h: Uint8Array, from: number, to: number): string {
  return String.fromCharCode(...h.subarray(from, Math.min(to, h.length)));
}

/** Any version is claimed ("#V4.0 Format"...), so that open can name one it does not read. */
function probe(head: Uint8Array): number {
  return latin1(head, 0, SIGNATURE.length) === SIGNATURE && /^\d\.\d+ Format\n/.test(latin1(head, VERSION_AT, VERSION_AT + 16)) ? 100 : 0;
}

function isV2(head: Uint8Array): boolean {
  return latin1(head, VERSION_AT, VERSION_AT + 11) === '2.0 Format\n';
}

export class CloopNode extends ReadOnlyMappedNode {
  readonly chunkSize: number;

  constructor(
    file: BlockNode,
    private readonly blockSize: number,
    blocks: number,
    private readonly index: PagedTable,
  ) {
    super({ file, size: blocks * blockSize, readOnly: true, barriers: false });
    this.chunkSize = blockSize;
  }

  mapRange(offset: number, length: number): Promise<MappedRun[]> {
    const runs: MappedRun[] = [];
    for (const { block, inBlock, pos, n } of blockPieces(offset, length, this.blockSize)) {
      runs.push({ kind: 'custom', offset: pos, length: n, read: (dst) => this.readBlock(block, inBlock, dst) });
    }
    return Promise.resolve(runs);
  }

  private async readBlock(block: number, inBlock: number, dst: Uint8Array): Promise<void> {
    const data = await this.inflate(block);
    dst.set(data.subarray(inBlock, inBlock + dst.length));
  }

  /** Block `block`, inflated; a bad index entry or stream is this read's error (EIO), not the image's. */
  private async inflate(block: number): Promise<Buffer> {
    const start = Number(await this.index.u64be(block));
    const end = Number(await this.index.u64be(block + 1));
    const what = `${this.name}: cloop block ${block} (guest offset 0x${(block * this.blockSize).toString(16)})`;
    if (end < start || end - start > MAX_COMPRESSED) throw new CorruptImageError(`${what}: index gives a bad compressed length (${start}..${end})`);
    if (end > this.file.size) throw new CorruptImageError(`${what}: compressed bytes end at ${end}, past the end of the file (${this.file.size})`);
    const input = Buffer.allocUnsafe(end - start);
    if (input.length > 0) await this.file.read(start, input);
    return decompress('zlib', input, { size: this.blockSize, exact: true, what });
  }
}

async function open(file: BlockNode, opts: OpenOptions): Promise<BlockNode> {
  refuseWritable(file, opts, 'cloop');
  const head = await readHead(file, HEADER_BYTES, 'cloop');
  if (!isV2(head)) {
    const version = latin1(head, VERSION_AT, VERSION_AT + 4).replace(/[^\x20-\x7e]/g, '?');
    throw new UnsupportedError(`${file.name}: cloop version '${version}' is not supported (only V2.0)`);
  }
  const blockSize = head.readUInt32BE(PREAMBLE);
  const blocks = head.readUInt32BE(PREAMBLE + 4);
  if (blockSize === 0 || blockSize % 512 !== 0) throw new CorruptImageError(`${file.name}: cloop block size ${blockSize} is not a positive multiple of 512`);
  if (blockSize > MAX_BLOCK_SIZE) throw new CorruptImageError(`${file.name}: cloop block size ${blockSize} is larger than ${MAX_BLOCK_SIZE}`);
  if (blocks * blockSize >= MAX_NODE_SIZE) throw new CorruptImageError(`${file.name}: cloop disk of ${blocks} blocks of ${blockSize} bytes is too large`);
  // The index is read a page at a time as blocks are needed; it must be in the file.
  const indexEnd = HEADER_BYTES + (blocks + 1) * 8;
  if (indexEnd > file.size) throw new CorruptImageError(`${file.name}: cloop index of ${blocks + 1} offsets runs past the end of the file`);
  const index = new PagedTable(file, HEADER_BYTES, blocks + 1, 8, opts.metadataCacheBytes);
  return new CloopNode(file, blockSize, blocks, index);
}

export const cloopDriver: FormatDriver = { name: 'cloop', probe, open };
