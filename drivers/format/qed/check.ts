// The QED consistency check (QEMU 7.2's block/qed-check.c), one walk for its three
// uses: tsimg check (read-only, fix=false), tsimg check -r (fix=true) and the repair
// QEMU runs when a writable open finds the need-check flag (fix=true).
//
// Table entries that point outside the file or are misaligned are corruptions; with
// fix they are dropped (set to unallocated) and written back. Clusters referenced
// twice are corruptions no fix removes (an L2 table sharing a cluster is skipped, as
// QEMU skips it). Clusters past the header nothing references are leaks: harmless in
// QED, counted and never freed (QEMU has no way to free them either). The need-check
// flag is cleared only when nothing is left to fix.
import type { BlockNode, CheckReport } from '../../types.js';
import { messageOf } from '../../errors.js';
import { addMessage } from '../check-report.js';
import { ClusterBitmap, MAX_BITMAP_CLUSTERS } from '../cluster-bitmap.js';
import { ENTRY, encodeFeatures, FEATURE, HDR, validTableOffset, type QedHeader } from './header.js';

/** Entries read per request while walking a table. */
const CHUNK_ENTRIES = 1 << 16;

export interface QedCheckResult extends CheckReport {
  /** Bad entries dropped (fix only): QEMU's corruptions_fixed. */
  corruptionsFixed: number;
  /** What stopped the walk (counted in checkErrors). */
  error?: unknown;
}

/**
 * Walk the L1 table and every L2 table it names. `wantBitmap` false skips the
 * reference bitmap (no double references or leaks are found): the open-time repair
 * of a file too large to track still drops bad entries.
 */
export async function qedCheck(file: BlockNode, h: QedHeader, fix: boolean, wantBitmap = true): Promise<QedCheckResult> {
  const cs = h.clusterSize;
  const entries = (cs * h.tableSize) / 8;
  const tableBytes = entries * 8;
  // QEMU's s->file_size: the file rounded down to whole clusters.
  const fileEnd = Math.floor(file.size / cs) * cs;
  const nclusters = fileEnd / cs;
  const headerBytes = h.headerSize * cs;
  const r: QedCheckResult = {
    corruptions: 0,
    corruptionsFixed: 0,
    leaks: 0,
    checkErrors: 0,
    messages: [],
    totalClusters: Math.ceil(h.imageSize / cs),
    allocatedClusters: 0,
    fragmentedClusters: 0,
  };
  let used: ClusterBitmap | undefined;
  if (wantBitmap) {
    try {
      used = new ClusterBitmap(nclusters);
    } catch (err) {
      r.checkErrors++;
      addMessage(r, `ERROR ${file.name}: ${messageOf(err)}`);
      return r;
    }
  }
  const zero = Buffer.alloc(8);
  const hex = (v: bigint | number): string => `0x${v.toString(16)}`;
  /** Mark a referenced range; a cluster marked before is a corruption. */
  const markUsed = (offset: number, n: number, what: string): boolean => {
    if (!used) return true;
    const again = used.mark(offset / cs, n);
    if (again === 0) return true;
    r.corruptions += again;
    addMessage(r, `ERROR ${what} at ${hex(offset)} shares ${again} cluster(s) with other metadata or data`);
    return false;
  };
  /** A bad entry: dropped with fix, counted without. */
  const bad = async (at: number, what: string): Promise<void> => {
    if (fix) {
      await file.write(at, zero);
      r.corruptionsFixed++;
      addMessage(r, `Repairing ${what}`);
    } else {
      r.corruptions++;
      addMessage(r, `ERROR ${what}`);
    }
  };
  /** Visit each entry of a table, a chunk at a time (a table may be 1 GiB). */
  const walk = async (tableOffset: number, visit: (v: bigint, index: number) => Promise<void>): Promise<void> => {
    for (let first = 0; first < entries; first += CHUNK_ENTRIES) {
      const n = Math.min(CHUNK_ENTRIES, entries - first);
      const buf = Buffer.alloc(n * 8);
      await file.read(tableOffset + first * 8, buf);
      for (let i = 0; i < n; i++) {
        const v = buf.readBigUInt64LE(i * 8);
        if (v !== 0n) await visit(v, first + i);
      }
    }
  };
  const validCluster = (v: bigint): boolean => {
    if (v > BigInt(Number.MAX_SAFE_INTEGER)) return false;
    const off = Number(v);
    return off % cs === 0 && off >= headerBytes && off < fileEnd;
  };

  const checkL2 = async (l2: number, l1i: number): Promise<void> => {
    // Fragmentation is counted per table, from each table's first data cluster (qed_check_l2_table).
    let last = -1n;
    await walk(l2, async (v, i) => {
      if (v === BigInt(ENTRY.zero)) return;
      r.allocatedClusters!++;
      if (last >= 0n && last + BigInt(cs) !== v) r.fragmentedClusters!++;
      last = v;
      if (!validCluster(v)) return bad(l2 + i * 8, `L2 table ${l1i} entry ${i}: cluster offset ${hex(v)} is misaligned or outside the file`);
      markUsed(Number(v), 1, `data cluster of L2 table ${l1i} entry ${i}`);
    });
  };

  try {
    markUsed(h.l1TableOffset, h.tableSize, 'L1 table');
    await walk(h.l1TableOffset, async (v, i) => {
      if (v > BigInt(Number.MAX_SAFE_INTEGER) || !validTableOffset(Number(v), cs, h.headerSize, tableBytes, file.size)) {
        return bad(h.l1TableOffset + i * 8, `L1 entry ${i}: L2 table offset ${hex(v)} is misaligned or outside the file`);
      }
      // A table sharing clusters with anything before it is not read (it is not a table).
      if (!markUsed(Number(v), h.tableSize, `L2 table ${i}`)) return;
      await checkL2(Number(v), i);
    });
  } catch (err) {
    r.checkErrors++;
    addMessage(r, `ERROR ${messageOf(err)}`);
    r.error = err;
    return r;
  }
  // Leaks only when every table was read (qed_check_for_leaks).
  if (used) {
    r.leaks = used.countClear(h.headerSize, nclusters);
    if (r.leaks) addMessage(r, `Leaked clusters: ${r.leaks} cluster(s) past the header are referenced by nothing`);
  }
  return r;
}

/**
 * The repair a writable open runs on an image left with the need-check flag (and
 * tsimg check -r): drop bad entries, then clear the flag if nothing is left to fix.
 * Returns the report and the header features afterwards; a walk that could not read
 * a table throws, as QEMU's open fails.
 */
export async function checkAndRepair(file: BlockNode, h: QedHeader, barriers: boolean): Promise<{ result: QedCheckResult; features: bigint }> {
  // A file too large for the reference bitmap still has its bad entries dropped.
  const result = await qedCheck(file, h, true, Math.floor(file.size / h.clusterSize) <= MAX_BITMAP_CLUSTERS);
  if (result.error !== undefined) throw result.error;
  let features = h.features;
  // qed_check_mark_clean: not while unfixable corruptions remain.
  if (result.corruptions === 0 && features & FEATURE.needCheck) {
    // Fixes reach the disk before the flag that asked for them goes.
    if (barriers) await file.flush();
    features &= ~FEATURE.needCheck;
    await file.write(HDR.features, encodeFeatures(features));
  }
  await file.flush();
  return { result, features };
}
