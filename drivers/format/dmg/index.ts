// Apple's UDIF disk images (.dmg), read-only as in QEMU: the koly trailer, the block
// tables of every partition (udif.ts), and chunks stored as zeros, raw bytes, or
// compressed with zlib (UDZO), bzip2 (UDBZ), ADC (UDCO) or LZFSE (ULFO). QEMU 7.2 as
// Debian builds it reads bzip2 and LZFSE chunks as zeros; here every known type is
// decoded, and a chunk of a type nobody knows fails its reads with EIO and says why.
// Decoded chunks are kept in a UnitCache within the metadata budget, so a sequential
// reader decompresses each chunk once.
import createDebug from '../../util/debug.js';
import type { BlockNode, FormatDriver, OpenOptions } from '../../types.js';
import { CorruptImageError, ReadOnlyError, UnsupportedError } from '../../errors.js';
import { decompress, type Codec } from '../../util/decompress.js';
import { UnitCache } from '../../../cache/unit-cache.js';
import { MappedNode } from '../mapped-node.js';
import { pushRun, type MappedRun } from '../mapped.js';
import { ChunkType, readChunks, readKoly, SECTOR, type ChunkTable } from './udif.js';
import { probe, TAIL_BYTES } from './probe.js';

const codecs: ReadonlyMap<number, { codec: Codec; name: string }> = new Map([
  [ChunkType.zlib, { codec: 'zlib', name: 'zlib (UDZO)' }],
  [ChunkType.bzip2, { codec: 'bzip2', name: 'bzip2 (UDBZ)' }],
  [ChunkType.adc, { codec: 'adc', name: 'ADC (UDCO)' }],
  [ChunkType.lzfse, { codec: 'lzfse', name: 'LZFSE (ULFO)' }],
]);

const debug = createDebug('tsmount:dmg');

/** hdiutil's ULMO (macOS 10.15 and later): known, not decoded here. */
const LZMA = 0x80000008;

export class DmgNode extends MappedNode {
  readonly metadata = undefined;
  private readonly chunks: ChunkTable;
  /** Decoded chunks; `decoded.loads` counts decompressions. */
  readonly decoded: UnitCache;

  constructor(file: BlockNode, size: number, chunks: ChunkTable, cacheBytes: number) {
    super({ file, size, readOnly: true, barriers: false });
    this.chunks = chunks;
    let largest = 0;
    for (let i = 0; i < chunks.count; i++) if (codecs.has(chunks.type[i]!)) largest = Math.max(largest, chunks.length[i]!);
    this.decoded = new UnitCache(cacheBytes, largest);
  }

  protected writeLocked(): Promise<void> {
    return Promise.reject(new ReadOnlyError(`${this.name}: dmg images are read-only`));
  }

  /** The first chunk that ends after `pos` (chunks are sorted and do not overlap). */
  private chunkAfter(pos: number): number {
    const t = this.chunks;
    let lo = 0;
    let hi = t.count;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (t.start[mid]! + t.length[mid]! <= pos) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  }

  async mapRange(offset: number, length: number): Promise<MappedRun[]> {
    const t = this.chunks;
    const out: MappedRun[] = [];
    const end = offset + length;
    let i = this.chunkAfter(offset);
    for (let pos = offset; pos < end; ) {
      if (i >= t.count || t.start[i]! > pos) {
        // No table maps these sectors: QEMU fails such reads too, rather than inventing zeros.
        const next = i < t.count ? Math.min(end, t.start[i]!) : end;
        const sector = Math.floor(pos / SECTOR);
        out.push({ kind: 'custom', offset: pos, length: next - pos, read: () => Promise.reject(new CorruptImageError(`${this.name}: no dmg block table maps sector ${sector}`)) });
        pos = next;
        continue;
      }
      const start = t.start[i]!;
      const n = Math.min(end, start + t.length[i]!) - pos;
      pushRun(out, this.place(i, pos, pos - start, n));
      pos += n;
      i++;
    }
    return out;
  }

  /** Where [pos, pos + n) of chunk i, `inChunk` bytes into it, comes from. */
  private place(i: number, pos: number, inChunk: number, n: number): MappedRun {
    const t = this.chunks;
    const type = t.type[i]!;
    if (type === ChunkType.zero || type === ChunkType.ignore) return { kind: 'zero', offset: pos, length: n };
    if (type === ChunkType.raw) {
      // A raw chunk shorter than its sectors reads as zeros after its bytes.
      const stored = Math.max(0, Math.min(n, t.hostLength[i]! - inChunk));
      if (stored === n) return { kind: 'data', offset: pos, length: n, host: t.host[i]! + inChunk };
      return {
        kind: 'custom',
        offset: pos,
        length: n,
        read: async (dst) => {
          dst.fill(0, stored);
          if (stored > 0) await this.file.read(t.host[i]! + inChunk, dst.subarray(0, stored));
        },
      };
    }
    const codec = codecs.get(type);
    if (!codec) {
      const known = type === LZMA ? ' (LZMA, ULMO)' : '';
      const why = `${this.name}: dmg chunk at sector ${t.start[i]! / SECTOR} has type 0x${type.toString(16).padStart(8, '0')}${known}, which tsmount cannot decode`;
      return { kind: 'custom', offset: pos, length: n, read: () => Promise.reject(new UnsupportedError(why, CorruptImageError.defaultErrno)) };
    }
    return {
      kind: 'custom',
      offset: pos,
      length: n,
      read: async (dst) => {
        const data = await this.decoded.get(i, () => this.decode(i, codec));
        dst.set(data.subarray(inChunk, inChunk + n));
      },
    };
  }

  private async decode(i: number, c: { codec: Codec; name: string }): Promise<Buffer> {
    const t = this.chunks;
    const input = Buffer.alloc(t.hostLength[i]!);
    await this.file.read(t.host[i]!, input);
    const what = `${this.name}: ${c.name} chunk at sector ${t.start[i]! / SECTOR} (file offset 0x${t.host[i]!.toString(16)})`;
    debug('decode chunk %d: %s', i, what);
    return decompress(c.codec, input, { size: t.length[i]!, exact: true, what });
  }

  protected override async closeLayers(): Promise<void> {
    this.decoded.clear();
    await super.closeLayers();
  }
}

async function open(file: BlockNode, opts: OpenOptions): Promise<BlockNode> {
  const name = file.name;
  if (!opts.readOnly) throw new UnsupportedError(`${name}: dmg images can only be opened read-only`);
  const koly = await readKoly(file);
  const chunks = await readChunks(file, koly);
  return new DmgNode(file, koly.sectorCount * SECTOR, chunks, opts.metadataCacheBytes);
}

/** The trailer and the 511 bytes before it that QEMU also searches. */
export const dmgDriver: FormatDriver = { name: 'dmg', probe, open, tailBytes: TAIL_BYTES };
