// Internal snapshots (qcow2.txt, "Snapshots"; QEMU's qcow2-snapshot.c): the table is
// parsed at open, and each snapshot becomes a read-only view that maps guest offsets
// through the snapshot's own L1 table.
import type { BlockNode } from '../../types.js';
import { CorruptImageError } from '../../errors.js';
import { LIMITS } from './header.js';

/** Snapshot table entry layout (qcow2.txt, "Snapshot table entry"). */
const SN = {
  l1TableOffset: 0, // u64
  l1Size: 8, // u32
  idSize: 12, // u16
  nameSize: 14, // u16
  dateSec: 16, // u32
  dateNsec: 20, // u32
  vmClockNsec: 24, // u64
  vmStateSize: 32, // u32
  extraDataSize: 36, // u32
  fixed: 40,
  /** Extra data: disk size of the snapshot (bytes 8-15 of the extra data). */
  extraDiskSize: 8,
  /** Extra data: the large VM state size (bytes 0-7) and icount (bytes 16-23). */
  extraVmStateSize: 0,
  extraIcount: 16,
} as const;

/** QEMU's QCOW_MAX_SNAPSHOT_EXTRA_DATA and QCOW_MAX_SNAPSHOTS_SIZE. */
const MAX_EXTRA = 1024;
const MAX_TABLE_BYTES = 64 * 1024 * 1024;

export interface SnapshotEntry {
  id: string;
  name: string;
  l1TableOffset: number;
  l1Size: number;
  /** Virtual size when the snapshot was taken (the header's size if not recorded). */
  diskSize: number;
  /** What qemu-img info lists (the snapshot's time, VM clock and state). */
  dateSec: number;
  dateNsec: number;
  vmClockNsec: number;
  vmStateSize: number;
  icount: number | undefined;
}

export async function readSnapshotTable(
  file: BlockNode,
  offset: number,
  count: number,
  clusterSize: number,
  imageSize: number,
  name: string,
): Promise<{ entries: SnapshotEntry[]; bytes: number }> {
  const bad = (msg: string): never => {
    throw new CorruptImageError(`${name}: qcow2 snapshot table: ${msg}`);
  };
  if (count === 0) return { entries: [], bytes: 0 };
  // Entries vary in size: read a guess, and twice as much whenever an entry runs
  // past it, up to QEMU's limit on the table (and the end of the file).
  const limit = Math.min(MAX_TABLE_BYTES, file.size - offset);
  if (limit <= 0) bad('lies outside the file');
  let buf = Buffer.alloc(Math.min(limit, count * 128));
  await file.read(offset, buf);
  const ensure = async (end: number): Promise<void> => {
    if (end <= buf.length) return;
    if (end > MAX_TABLE_BYTES) bad('is larger than the 64 MiB limit (QEMU\'s QCOW_MAX_SNAPSHOTS_SIZE)');
    if (end > limit) bad('runs past the end of the file');
    const next = Buffer.alloc(Math.min(limit, Math.max(end, buf.length * 2)));
    // Keep what was read; read only the rest.
    buf.copy(next);
    await file.read(offset + buf.length, next.subarray(buf.length));
    buf = next;
  };
  const out: SnapshotEntry[] = [];
  let pos = 0;
  for (let i = 0; i < count; i++) {
    await ensure(pos + SN.fixed);
    const l1Big = buf.readBigUInt64BE(pos + SN.l1TableOffset);
    if (l1Big >= BigInt(LIMITS.maxHostOffset)) bad(`entry ${i} has an L1 table offset out of range`);
    const l1TableOffset = Number(l1Big);
    const l1Size = buf.readUInt32BE(pos + SN.l1Size);
    const idSize = buf.readUInt16BE(pos + SN.idSize);
    const nameSize = buf.readUInt16BE(pos + SN.nameSize);
    const extra = buf.readUInt32BE(pos + SN.extraDataSize);
    if (extra > MAX_EXTRA) bad(`entry ${i} has ${extra} bytes of extra data`);
    const extraAt = pos + SN.fixed;
    const end = extraAt + extra + idSize + nameSize;
    await ensure(end);
    let diskSize = imageSize;
    if (extra >= SN.extraDiskSize + 8) {
      const d = buf.readBigUInt64BE(extraAt + SN.extraDiskSize);
      if (d >= 2n ** 53n) bad(`entry ${i} has a disk size out of range`);
      diskSize = Number(d);
    }
    if (l1Size * 8 > LIMITS.maxL1Bytes) bad(`entry ${i} has an L1 table of ${l1Size} entries, over the 32 MiB limit (QEMU's QCOW_MAX_L1_SIZE)`);
    if (l1Size > 0 && (l1TableOffset % clusterSize !== 0 || l1TableOffset + l1Size * 8 > file.size)) bad(`entry ${i} has its L1 table outside the file`);
    const id = buf.toString('utf8', extraAt + extra, extraAt + extra + idSize);
    const snapName = buf.toString('utf8', extraAt + extra + idSize, end);
    let vmStateSize = buf.readUInt32BE(pos + SN.vmStateSize);
    if (extra >= SN.extraVmStateSize + 8) vmStateSize = Number(buf.readBigUInt64BE(extraAt + SN.extraVmStateSize) & 0x1fffffffffffffn);
    const icountRaw = extra >= SN.extraIcount + 8 ? buf.readBigUInt64BE(extraAt + SN.extraIcount) : undefined;
    out.push({
      id,
      name: snapName,
      l1TableOffset,
      l1Size,
      diskSize,
      dateSec: buf.readUInt32BE(pos + SN.dateSec),
      dateNsec: buf.readUInt32BE(pos + SN.dateNsec),
      vmClockNsec: Number(buf.readBigUInt64BE(pos + SN.vmClockNsec) & 0x1fffffffffffffn),
      vmStateSize,
      // QEMU writes all ones for "not recorded".
      icount: icountRaw === undefined || icountRaw === 0xffffffffffffffffn ? undefined : Number(icountRaw & 0x1fffffffffffffn),
    });
    pos = Math.ceil(end / 8) * 8;
  }
  return { entries: out, bytes: pos };
}

/** Extra data QEMU writes: vm_state_size_large, disk_size, icount (QCowSnapshotExtraData). */
const EXTRA_WRITTEN = 24;

/** The snapshot table as qcow2_write_snapshots lays it out: entries padded to 8 bytes. */
export function encodeSnapshotTable(entries: SnapshotEntry[]): Buffer {
  const parts: Buffer[] = [];
  for (const s of entries) {
    const id = Buffer.from(s.id, 'utf8');
    const name = Buffer.from(s.name, 'utf8');
    const len = SN.fixed + EXTRA_WRITTEN + id.length + name.length;
    const b = Buffer.alloc(Math.ceil(len / 8) * 8);
    b.writeBigUInt64BE(BigInt(s.l1TableOffset), SN.l1TableOffset);
    b.writeUInt32BE(s.l1Size, SN.l1Size);
    b.writeUInt16BE(id.length, SN.idSize);
    b.writeUInt16BE(name.length, SN.nameSize);
    b.writeUInt32BE(s.dateSec >>> 0, SN.dateSec);
    b.writeUInt32BE(s.dateNsec >>> 0, SN.dateNsec);
    b.writeBigUInt64BE(BigInt(s.vmClockNsec), SN.vmClockNsec);
    b.writeUInt32BE(Math.min(s.vmStateSize, 0xffffffff), SN.vmStateSize);
    b.writeUInt32BE(EXTRA_WRITTEN, SN.extraDataSize);
    b.writeBigUInt64BE(BigInt(s.vmStateSize), SN.fixed + SN.extraVmStateSize);
    b.writeBigUInt64BE(BigInt(s.diskSize), SN.fixed + SN.extraDiskSize);
    b.writeBigUInt64BE(s.icount === undefined ? 0xffffffffffffffffn : BigInt(s.icount), SN.fixed + SN.extraIcount);
    id.copy(b, SN.fixed + EXTRA_WRITTEN);
    name.copy(b, SN.fixed + EXTRA_WRITTEN + id.length);
    parts.push(b);
  }
  return Buffer.concat(parts);
}
