// Decoded units of a compressed format (dmg chunks; any format whose compressed unit
// is larger than what one read asks for) kept by key within a byte budget. The
// cluster cache above a format keeps 64 KiB blocks; a compressed unit can be larger
// (hdiutil writes 1 MiB chunks, up to 64 MiB are allowed) and does not start on a
// block boundary, so without this every block of a unit would decompress the whole
// unit again. Loads of one key in flight together are joined; a failed load is not kept.
import { LRUCache } from 'lru-cache';

export class UnitCache {
  private readonly lru: LRUCache<number, Buffer>;
  private readonly loading = new Map<number, Promise<Buffer>>();
  /** Units decoded so far (tests check that a sequential read decodes each unit once). */
  loads = 0;

  /** `maxBytes`, raised to hold at least two of the largest unit (one request may span two). */
  constructor(maxBytes: number, largestUnit: number) {
    this.lru = new LRUCache<number, Buffer>({ maxSize: Math.max(maxBytes, 2 * largestUnit, 1), sizeCalculation: (b) => Math.max(1, b.length) });
  }

  async get(key: number, load: () => Promise<Buffer>): Promise<Buffer> {
    const hit = this.lru.get(key);
    if (hit) return hit;
    const inFlight = this.loading.get(key);
    if (inFlight) return inFlight;
    const p = (async () => {
      this.loads++;
      const data = await load();
      this.lru.set(key, data);
      return data;
    })();
    this.loading.set(key, p);
    try {
      return await p;
    } finally {
      this.loading.delete(key);
    }
  }

  clear(): void {
    this.lru.clear();
  }
}
