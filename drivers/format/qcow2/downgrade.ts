// qemu-img amend -o compat=0.10 (QEMU's qcow2_downgrade and qcow2_expand_zero_clusters):
// a version 2 image has no zero flag in its L2 entries, so every zero cluster is made
// something v2 reads as zeros first, in the active tables and in every snapshot's:
// unallocated where nothing is below it, else a cluster of written zeros. What v2
// cannot say at all (another refcount width, a data file, subclusters, snapshots of
// another size, zstd-compressed clusters) is refused before anything is written.
import { CorruptImageError, UnsupportedError } from '../../errors.js';
import { decodeL1, encodeL2 } from './entries.js';
import { INCOMPAT, type Qcow2Header } from './header.js';
import type { SnapshotContext } from './snapshot-ops.js';

const UINT32_MAX = 0xffffffff;

/** The refusals of qcow2_downgrade, in its order, from the header as on disk. */
export function checkDowngrade(h: Qcow2Header, ctx: SnapshotContext, hasBitmaps: boolean): void {
  const name = ctx.name;
  if (h.refcountOrder !== 4) throw new UnsupportedError(`${name}: compat=0.10 requires refcount_bits=16`);
  if (h.dataFile !== undefined || (h.incompatibleFeatures & INCOMPAT.dataFile) !== 0n) throw new UnsupportedError(`${name}: Cannot downgrade an image with a data file`);
  for (const s of ctx.state.snapshots) {
    if (s.vmStateSize > UINT32_MAX || s.diskSize !== ctx.size) throw new UnsupportedError(`${name}: Internal snapshots prevent downgrade of image`);
  }
  // The writable open cleared the dirty flag (the lazy-refcount repair), as qcow2_mark_clean would.
  const rest = h.incompatibleFeatures & ~(INCOMPAT.compression | INCOMPAT.dirty);
  if (rest !== 0n) throw new UnsupportedError(`${name}: Cannot downgrade an image with incompatible features 0x${rest.toString(16)} set`);
  // QEMU 7.2 keeps the bitmaps extension in the v2 header, where nothing can say it is
  // valid: the bitmaps become inconsistent and their clusters leak. Refused here instead.
  if (hasBitmaps) throw new UnsupportedError(`${name}: Cannot downgrade an image with persistent bitmaps (remove them first: tsimg bitmap --remove)`);
}

/**
 * Turn every zero cluster reachable from the active L1 and the snapshots' into what
 * v2 reads as zeros. `backed`: the image names a backing file (whether it is open or
 * not), so an unallocated cluster would read the backing file instead. The caller
 * holds the node's mutex and flushes the caches afterwards (refcounts before tables).
 */
export async function expandZeroClusters(ctx: SnapshotContext, backed: boolean): Promise<void> {
  const { map, file } = ctx;
  const tables = [map.l1Copy()];
  for (const s of ctx.state.snapshots) {
    const l1 = Buffer.alloc(s.l1Size * 8);
    if (s.l1Size) await file.read(s.l1TableOffset, l1);
    tables.push(l1);
  }
  for (const l1 of tables) await expandInL1(ctx, l1, backed);
}

async function expandInL1(ctx: SnapshotContext, l1: Buffer, backed: boolean): Promise<void> {
  const { map, refcounts, guard, file } = ctx;
  const cs = map.clusterSize;
  // Subclusters refuse a downgrade before this (incompatible feature extended_l2).
  if (map.extended) throw new UnsupportedError(`${ctx.name}: Cannot downgrade an image with subclusters`);
  const l1View = new DataView(l1.buffer, l1.byteOffset, l1.byteLength);
  const zeros = Buffer.alloc(cs);
  for (let i = 0; i < l1.length / 8; i++) {
    const { offset: l2 } = decodeL1(l1View, i, cs, Number.MAX_SAFE_INTEGER, ctx.name);
    if (l2 === 0) continue;
    if (l2 % cs !== 0) throw new CorruptImageError(`${ctx.name}: qcow2 L2 table offset 0x${l2.toString(16)} unaligned (L1 index 0x${i.toString(16)})`);
    // A table shared with snapshots: a new cluster gets as many references as the table has.
    const l2Refcount = await refcounts.refcount(l2 / cs);
    // Entries decoded first: a table is never held across an await (the cache may evict it).
    const table = await map.l2Cache.get(l2);
    const zeroed: { k: number; host: number }[] = [];
    for (let k = 0; k < map.l2Entries; k++) {
      const e = map.entry(table, k, i * map.l2Entries + k);
      if (e.kind === 'zero') zeroed.push({ k, host: e.host });
    }
    if (zeroed.length === 0) continue;
    const changes: { k: number; host: number; copied: boolean }[] = [];
    for (const z of zeroed) {
      let host = z.host;
      if (host === 0) {
        // Nothing below: unallocated reads as zeros too, and costs nothing.
        if (!backed) {
          changes.push({ k: z.k, host: 0, copied: false });
          continue;
        }
        const { start } = await refcounts.allocate(1);
        if (l2Refcount > 1) await refcounts.adjust(start, l2Refcount - 1);
        host = start * cs;
      }
      if (host % cs !== 0) throw new CorruptImageError(`${ctx.name}: qcow2 cluster 0x${host.toString(16)} unaligned (L2 table 0x${l2.toString(16)})`);
      // Clusters the refcounts call free may still hold metadata (a corrupt image): check first.
      await guard?.check(host, cs);
      await file.write(host, zeros);
      // COPIED where this is the cluster's one reference. QEMU 7.2 sets it by the L2
      // table's refcount instead, which is wrong for a preallocated zero cluster a
      // snapshot shares (qemu-img check then reports OFLAG_COPIED errors).
      changes.push({ k: z.k, host, copied: (await refcounts.refcount(host / cs)) === 1 });
    }
    // The zeros are on disk before any table names them.
    await file.flush();
    const t = await map.l2Cache.get(l2);
    const dv = new DataView(t.data.buffer, t.data.byteOffset, t.data.byteLength);
    for (const c of changes) {
      if (c.host === 0) dv.setBigUint64(c.k * 8, 0n);
      else encodeL2(dv, c.k, c.host, c.copied, false);
    }
    map.l2Cache.markDirty(t);
  }
}

/** Whether the active layer holds compressed clusters (qcow2_has_compressed_clusters). */
export async function hasCompressedClusters(ctx: SnapshotContext): Promise<boolean> {
  const step = ctx.map.l2Span * 64;
  for (let pos = 0; pos < ctx.size; pos += step) {
    const runs = await ctx.map.map(pos, Math.min(step, ctx.size - pos));
    if (runs.some((r) => r.kind === 'compressed')) return true;
  }
  return false;
}
