// The consistency check QEMU runs when a writable open finds the need-check flag
// (block/qed-check.c with fix=true): table entries that point outside the file or
// are misaligned are dropped (set to unallocated), and the flag is cleared only
// when nothing is left to fix. Leaked clusters are harmless in QED and are kept.
import type { BlockNode } from '../../types.js';
import { ENTRY, encodeFeatures, FEATURE, HDR, validTableOffset, type QedHeader } from './header.js';

/** Entries read per request while walking a table. */
const CHUNK_ENTRIES = 1 << 16;

export interface CheckResult {
  corruptions: number;
  fixed: number;
}

/** Walk every table and repair what can be repaired; returns the header features afterwards. */
export async function checkAndRepair(file: BlockNode, h: QedHeader, barriers: boolean): Promise<{ result: CheckResult; features: bigint }> {
  const cs = h.clusterSize;
  const entries = (cs * h.tableSize) / 8;
  const tableBytes = entries * 8;
  const fileEnd = Math.floor(file.size / cs) * cs;
  const headerBytes = h.headerSize * cs;
  const result: CheckResult = { corruptions: 0, fixed: 0 };
  const zero = Buffer.alloc(8);

  /** Visit each entry of a table; a visitor answering false has the entry set to 0. */
  const walk = async (tableOffset: number, visit: (v: bigint) => Promise<boolean> | boolean): Promise<void> => {
    for (let first = 0; first < entries; first += CHUNK_ENTRIES) {
      const n = Math.min(CHUNK_ENTRIES, entries - first);
      const buf = Buffer.alloc(n * 8);
      await file.read(tableOffset + first * 8, buf);
      for (let i = 0; i < n; i++) {
        const v = buf.readBigUInt64LE(i * 8);
        if (v === 0n) continue;
        if (await visit(v)) continue;
        result.corruptions++;
        await file.write(tableOffset + (first + i) * 8, zero);
        result.fixed++;
      }
    }
  };
  const validCluster = (v: bigint): boolean => {
    if (v > BigInt(Number.MAX_SAFE_INTEGER)) return false;
    const off = Number(v);
    return off % cs === 0 && off >= headerBytes && off < fileEnd;
  };

  await walk(h.l1TableOffset, async (v) => {
    if (v > BigInt(Number.MAX_SAFE_INTEGER) || !validTableOffset(Number(v), cs, h.headerSize, tableBytes, file.size)) return false;
    await walk(Number(v), (e) => e === BigInt(ENTRY.zero) || validCluster(e));
    return true;
  });

  let features = h.features;
  if (result.corruptions === result.fixed) {
    // Fixes reach the disk before the flag that asked for them goes.
    if (barriers) await file.flush();
    features &= ~FEATURE.needCheck;
    await file.write(HDR.features, encodeFeatures(features));
    await file.flush();
  }
  return { result, features };
}
