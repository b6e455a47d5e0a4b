// Creating, deleting and reverting to internal snapshots (QEMU's qcow2-snapshot.c,
// qcow2_update_snapshot_refcount in qcow2-refcount.c), for `tsimg snapshot`. The node
// (qcow2.ts) runs these under its allocation mutex with its caches flushed; every
// reference a snapshot adds or drops goes through the refcounts, and the COPIED flags
// of the active tables are set again where a refcount is one.
import type { BlockNode } from '../../types.js';
import { UnsupportedError, UsageError } from '../../errors.js';
import type { ClusterMap } from './cluster.js';
import type { Refcounts } from './refcount.js';
import { decodeL1, encodeL1, HI } from './entries.js';
import { HDR, type Qcow2Header } from './header.js';
import { OL, type MetadataGuard } from './overlap.js';
import { encodeSnapshotTable, type SnapshotEntry } from './snapshot.js';

/** The header fields the snapshot operations change, kept in step with the file. */
export interface SnapshotState {
  header: Qcow2Header;
  snapshots: SnapshotEntry[];
  tableBytes: number;
}

export interface SnapshotContext {
  file: BlockNode;
  name: string;
  map: ClusterMap;
  refcounts: Refcounts;
  guard: MetadataGuard | undefined;
  state: SnapshotState;
  size: number;
  /** Grow the active L1 table to this many entries (qcow2.ts growL1). */
  growL1(entries: number): Promise<void>;
  /** Write the new virtual size to the header (a snapshot taken at another size). */
  setSize(size: number): Promise<void>;
}

const u64 = (n: number): bigint => BigInt(n);

/**
 * Add `addend` (+1, -1 or 0) to the refcount of every cluster an L1 table reaches
 * (its L2 tables, their data and compressed clusters), and set each COPIED flag to
 * "refcount is one" (qcow2_update_snapshot_refcount). Returns the L1 table with its
 * flags updated; tables whose refcount drops to zero are left as they are.
 */
export async function updateSnapshotRefcount(ctx: SnapshotContext, l1: Buffer, addend: number): Promise<Buffer> {
  const { map, refcounts } = ctx;
  const cs = map.clusterSize;
  const es = map.extended ? 16 : 8;
  const out = Buffer.from(l1);
  const l1View = new DataView(out.buffer, out.byteOffset, out.byteLength);
  for (let i = 0; i < out.length / 8; i++) {
    const { offset: l2 } = decodeL1(l1View, i, cs, Number.MAX_SAFE_INTEGER, ctx.name);
    if (l2 === 0) continue;
    // Entries decoded first: a table is never held across an await (the cache may evict it).
    const table = await map.l2Cache.get(l2);
    const entries = [];
    for (let k = 0; k < map.l2Entries; k++) entries.push(map.entry(table, k, i * map.l2Entries + k));
    if (addend !== 0) {
      for (const e of entries) {
        if (e.kind === 'compressed') {
          for (let c = Math.floor(e.cOffset / cs); c <= Math.floor((e.cOffset + e.cLength - 1) / cs); c++) await refcounts.adjust(c, addend);
        } else if (e.host !== 0) await refcounts.adjust(e.host / cs, addend);
      }
      await refcounts.adjust(l2 / cs, addend);
    }
    const l2Refcount = await refcounts.refcount(l2 / cs);
    encodeL1(l1View, i, l2, l2Refcount === 1);
    if (l2Refcount === 0) continue;
    const copied: (boolean | undefined)[] = [];
    for (const e of entries) copied.push(e.kind !== 'compressed' && e.host !== 0 ? (await refcounts.refcount(e.host / cs)) === 1 : undefined);
    const t = await map.l2Cache.get(l2);
    let changed = false;
    for (let k = 0; k < copied.length; k++) {
      const want = copied[k];
      if (want === undefined) continue;
      const hi = t.data.readUInt32BE(k * es);
      const next = want ? (hi | HI.copied) >>> 0 : (hi & ~HI.copied) >>> 0;
      if (next !== hi) {
        t.data.writeUInt32BE(next, k * es);
        changed = true;
      }
    }
    if (changed) map.l2Cache.markDirty(t);
  }
  return out;
}

/** Write a new snapshot table, point the header at it, free the old one. */
async function writeTable(ctx: SnapshotContext, snapshots: SnapshotEntry[]): Promise<void> {
  const { file, refcounts, state, guard } = ctx;
  const cs = ctx.map.clusterSize;
  const table = encodeSnapshotTable(snapshots);
  let offset = 0;
  if (table.length > 0) {
    const clusters = Math.ceil(table.length / cs);
    offset = (await refcounts.allocateContiguous(clusters)) * cs;
    await guard?.check(offset, table.length);
    guard?.add(offset, table.length, OL.snapshotTable);
    const padded = Buffer.alloc(clusters * cs);
    table.copy(padded);
    await file.write(offset, padded);
    await file.flush();
  }
  const hdr = Buffer.alloc(12);
  hdr.writeUInt32BE(snapshots.length, 0);
  hdr.writeBigUInt64BE(u64(offset), 4);
  await file.write(HDR.nbSnapshots, hdr);
  await file.flush();
  const old = state.header.snapshotsOffset;
  const oldClusters = Math.ceil(state.tableBytes / cs);
  if (state.tableBytes > 0) {
    guard?.remove(old, OL.snapshotTable);
    for (let c = 0; c < oldClusters; c++) await refcounts.adjust(old / cs + c, -1);
  }
  state.header.snapshotsOffset = offset;
  state.header.nbSnapshots = snapshots.length;
  state.snapshots = snapshots;
  state.tableBytes = table.length;
}

/** Write the active L1 table (flags changed in memory) and take it as the map's. */
async function writeActiveL1(ctx: SnapshotContext, l1: Buffer): Promise<void> {
  const offset = ctx.map.l1TableOffset;
  await ctx.file.write(offset, l1);
  ctx.map.replaceL1(l1, offset);
}

/** The snapshot qemu-img means by `idOrName`: by ID first, then by name. */
export function findSnapshot(snapshots: SnapshotEntry[], idOrName: string): SnapshotEntry | undefined {
  return snapshots.find((s) => s.id === idOrName) ?? snapshots.find((s) => s.name === idOrName);
}

function refuseDataFile(ctx: SnapshotContext): void {
  if (ctx.state.header.dataFile !== undefined) throw new UnsupportedError(`${ctx.name}: internal snapshots of a qcow2 image with an external data file are not supported (as in QEMU)`);
}

export async function createSnapshot(ctx: SnapshotContext, name: string): Promise<void> {
  refuseDataFile(ctx);
  const { map, refcounts, file, state } = ctx;
  const cs = map.clusterSize;
  // find_new_snapshot_id: one more than the largest numeric ID.
  let max = 0;
  for (const s of state.snapshots) max = Math.max(max, Number.parseInt(s.id, 10) || 0);
  // The active tables gain a reference each; their COPIED flags go.
  const l1 = await updateSnapshotRefcount(ctx, map.l1Copy(), 1);
  await writeActiveL1(ctx, l1);
  const l1Clusters = Math.max(1, Math.ceil(l1.length / cs));
  const l1Offset = (await refcounts.allocateContiguous(l1Clusters)) * cs;
  await ctx.guard?.check(l1Offset, l1Clusters * cs);
  ctx.guard?.add(l1Offset, l1.length, OL.inactiveL1);
  const copy = Buffer.alloc(l1Clusters * cs);
  l1.copy(copy);
  await file.write(l1Offset, copy);
  const now = Date.now();
  const entry: SnapshotEntry = {
    id: String(max + 1),
    name,
    l1TableOffset: l1Offset,
    l1Size: l1.length / 8,
    diskSize: ctx.size,
    dateSec: Math.floor(now / 1000),
    dateNsec: (now % 1000) * 1e6,
    vmClockNsec: 0,
    vmStateSize: 0,
    // qemu-img snapshot -c records an icount of 0.
    icount: 0,
  };
  await writeTable(ctx, [...state.snapshots, entry]);
}

export async function deleteSnapshot(ctx: SnapshotContext, idOrName: string): Promise<void> {
  const { map, refcounts, file, state } = ctx;
  const cs = map.clusterSize;
  const sn = findSnapshot(state.snapshots, idOrName);
  if (!sn) throw new UsageError(`${ctx.name}: snapshot '${idOrName}' not found`);
  await writeTable(ctx, state.snapshots.filter((s) => s !== sn));
  const l1 = Buffer.alloc(sn.l1Size * 8);
  if (l1.length) await file.read(sn.l1TableOffset, l1);
  await updateSnapshotRefcount(ctx, l1, -1);
  ctx.guard?.remove(sn.l1TableOffset, OL.inactiveL1);
  for (let c = 0; c < Math.ceil(l1.length / cs); c++) await refcounts.adjust(sn.l1TableOffset / cs + c, -1);
  // What only the active tables hold now has refcount one again.
  await writeActiveL1(ctx, await updateSnapshotRefcount(ctx, map.l1Copy(), 0));
}

export async function applySnapshot(ctx: SnapshotContext, idOrName: string): Promise<void> {
  refuseDataFile(ctx);
  const { map, file, state, guard } = ctx;
  const sn = findSnapshot(state.snapshots, idOrName);
  if (!sn) throw new UsageError(`${ctx.name}: snapshot '${idOrName}' not found`);
  if (sn.l1Size > map.l1Size) await ctx.growL1(sn.l1Size);
  const snL1 = Buffer.alloc(map.l1Size * 8);
  if (sn.l1Size) await file.read(sn.l1TableOffset, snL1.subarray(0, sn.l1Size * 8));
  // The snapshot's tables gain the active table's reference, then the old active ones lose it.
  const incremented = await updateSnapshotRefcount(ctx, snL1, 1);
  const old = map.l1Copy();
  const oldOffsets = l2Offsets(ctx, old);
  await writeActiveL1(ctx, incremented);
  await updateSnapshotRefcount(ctx, old, -1);
  for (const o of oldOffsets) guard?.remove(o, OL.activeL2);
  const active = await updateSnapshotRefcount(ctx, map.l1Copy(), 0);
  await writeActiveL1(ctx, active);
  guard?.addTables(Float64Array.from(l2Offsets(ctx, active)), OL.activeL2);
  if (sn.diskSize !== ctx.size) await ctx.setSize(sn.diskSize);
}

function l2Offsets(ctx: SnapshotContext, l1: Buffer): number[] {
  const dv = new DataView(l1.buffer, l1.byteOffset, l1.byteLength);
  const out: number[] = [];
  for (let i = 0; i < l1.length / 8; i++) {
    const { offset } = decodeL1(dv, i, ctx.map.clusterSize, Number.MAX_SAFE_INTEGER, ctx.name);
    if (offset) out.push(offset);
  }
  return out;
}
