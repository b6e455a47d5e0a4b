// One bit per cluster of an image file, for consistency checks that find clusters
// referenced twice and clusters nothing references (QEMU's qed_check used_clusters
// bitmap). The file's cluster count comes from an untrusted image, so the bitmap is
// capped: a check of a larger file reports that it cannot check rather than
// allocating without bound.

/** Clusters one bitmap may track: 2^30 bits (128 MiB). */
export const MAX_BITMAP_CLUSTERS = 2 ** 30;

export class ClusterBitmap {
  private readonly bits: Uint32Array;

  /** Throws RangeError past MAX_BITMAP_CLUSTERS; callers turn that into a check error. */
  constructor(readonly clusters: number) {
    if (!Number.isSafeInteger(clusters) || clusters < 0 || clusters > MAX_BITMAP_CLUSTERS) {
      throw new RangeError(`${clusters} clusters are too many to check (at most ${MAX_BITMAP_CLUSTERS})`);
    }
    this.bits = new Uint32Array(Math.ceil(clusters / 32));
  }

  has(c: number): boolean {
    return c >= 0 && c < this.clusters && (this.bits[c >>> 5]! & (1 << (c & 31))) !== 0;
  }

  /**
   * Mark clusters [first, first + n) used; returns how many were already marked (a
   * second reference). Clusters outside the bitmap are the caller's to reject first.
   */
  mark(first: number, n: number): number {
    let again = 0;
    for (let c = first; c < first + n; c++) {
      if (c < 0 || c >= this.clusters) continue;
      const m = 1 << (c & 31);
      if (this.bits[c >>> 5]! & m) again++;
      else this.bits[c >>> 5]! |= m;
    }
    return again;
  }

  /** Clusters in [from, to) nothing marked. */
  countClear(from: number, to: number): number {
    let n = 0;
    for (let c = Math.max(0, from); c < Math.min(to, this.clusters); c++) if (!this.has(c)) n++;
    return n;
  }
}
