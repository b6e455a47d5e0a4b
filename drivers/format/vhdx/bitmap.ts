// The sector bitmaps of a differencing VHDX (specification sections 2.4 and 2.5): one
// bit per logical sector, 1 where the sector is in this file and 0 where the parent
// holds it. Each 1 MiB sector bitmap block covers a chunk of payload blocks; the
// slice of one payload block is cached as one table in the metadata cache.
import { TableCache } from '../../../cache/table-cache.js';
import type { BlockNode } from '../../types.js';

/** A stretch of a payload block, in bytes from the block's start. */
export interface BitmapRun {
  from: number;
  to: number;
  present: boolean;
}

export class SectorBitmaps {
  private readonly cache: TableCache;
  /** Bitmap bytes per payload block. */
  private readonly bytesPerBlock: number;

  constructor(
    file: BlockNode,
    blockSize: number,
    private readonly sectorSize: number,
    maxBytes: number,
  ) {
    this.bytesPerBlock = blockSize / sectorSize / 8;
    this.cache = new TableCache({ name: 'vhdx sector bitmaps', file, tableSize: this.bytesPerBlock, maxBytes, barriers: false });
  }

  /**
   * Runs covering [inBlock, inBlock + n) of the payload block that is number `k` of
   * its chunk, whose sector bitmap block is at `bitmapOffset` in the file.
   */
  async runs(bitmapOffset: number, k: number, inBlock: number, n: number): Promise<BitmapRun[]> {
    const bits = (await this.cache.get(bitmapOffset + k * this.bytesPerBlock)).data;
    const ss = this.sectorSize;
    const end = inBlock + n;
    const out: BitmapRun[] = [];
    for (let s = Math.floor(inBlock / ss); s * ss < end; ) {
      const byte = bits[s >> 3]!;
      // Whole bytes of one value at once: 8 sectors.
      const step = (s & 7) === 0 && (byte === 0 || byte === 0xff) ? 8 : 1;
      const present = ((byte >> (s & 7)) & 1) === 1;
      const from = Math.max(inBlock, s * ss);
      const to = Math.min(end, (s + step) * ss);
      const last = out[out.length - 1];
      if (last && last.present === present && last.to === from) last.to = to;
      else out.push({ from, to, present });
      s += step;
    }
    return out;
  }
}
