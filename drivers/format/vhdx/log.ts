// The VHDX metadata log (specification section 2.3; QEMU's block/vhdx-log.c):
// finding the active sequence of entries, replaying it into the file, applying it
// in memory for a read-only open, and encoding new entries.
import type { BlockNode, Extent } from '../../types.js';
import { CorruptImageError, ReadOnlyError } from '../../errors.js';
import { crc32cUpdate } from '../../util/crc32c.js';
import { ascii, DATA_SECTOR, DESC, descSectors, dv, LOG_SECTOR, LOGE, MiB, sealChecksum } from './layout.js';

export type LogOp =
  | { kind: 'data'; fileOffset: number; data: Uint8Array }
  | { kind: 'zero'; fileOffset: number; length: number };

export interface LogEntry {
  sequenceNumber: bigint;
  flushedFileOffset: bigint;
  lastFileOffset: bigint;
  ops: LogOp[];
}

interface Checked {
  valid: boolean;
  /** Sector index after the entry (valid) or where to look next (invalid). */
  next: number;
  entry?: LogEntry;
}

/**
 * The active log sequence in `log` (the whole log region, `guid` the header's log
 * GUID), or an empty list. A header that passes its checks but carries a broken
 * descriptor makes the image corrupt, as in QEMU.
 */
export function findActiveSequence(log: Uint8Array, guid: Uint8Array, name: string): LogEntry[] {
  const n = log.length / LOG_SECTOR;
  const sector = (i: number): Uint8Array => {
    const k = ((i % n) + n) % n;
    return log.subarray(k * LOG_SECTOR, (k + 1) * LOG_SECTOR);
  };

  const check = (at: number, prev: bigint | undefined): Checked => {
    const invalid: Checked = { valid: false, next: at + 1 };
    const h = sector(at);
    const v = dv(h);
    if (ascii(h, LOGE.signature, 4) !== 'loge') return invalid;
    const entryLength = v.getUint32(LOGE.entryLength, true);
    if (entryLength > log.length || entryLength % LOG_SECTOR !== 0 || entryLength === 0) return invalid;
    const seq = v.getBigUint64(LOGE.sequenceNumber, true);
    if (seq === 0n) return invalid;
    if (!Buffer.from(h.subarray(LOGE.logGuid, LOGE.logGuid + 16)).equals(guid)) return invalid;
    const count = v.getUint32(LOGE.descriptorCount, true);
    if (count * DESC.size > entryLength) return invalid;
    if (prev !== undefined && seq !== prev + 1n) return invalid;
    const total = entryLength / LOG_SECTOR;
    const ds = descSectors(count);
    if (total < ds) return invalid;

    // The descriptors, contiguous across the wrap.
    const descs = Buffer.alloc(ds * LOG_SECTOR);
    for (let i = 0; i < ds; i++) descs.set(sector(at + i), i * LOG_SECTOR);
    const ops: LogOp[] = [];
    let dataIndex = 0;
    for (let i = 0; i < count; i++) {
      const off = LOGE.size + i * DESC.size;
      const d = dv(descs.subarray(off, off + DESC.size));
      const sig = ascii(descs, off, 4);
      const fileOffset = d.getBigUint64(DESC.fileOffset, true);
      const bad = (why: string): never => {
        throw new CorruptImageError(`${name}: VHDX log entry ${seq} descriptor ${i} is invalid (${why})`);
      };
      if (d.getBigUint64(DESC.sequenceNumber, true) !== seq) bad('sequence number');
      if (fileOffset % BigInt(LOG_SECTOR) !== 0n) bad('file offset not 4 KiB aligned');
      if (fileOffset > BigInt(Number.MAX_SAFE_INTEGER)) bad('file offset too large');
      if (sig === 'zero') {
        const length = d.getBigUint64(DESC.leadingBytes, true);
        if (length % BigInt(LOG_SECTOR) !== 0n) bad('zero length not 4 KiB aligned');
        if (length > BigInt(Number.MAX_SAFE_INTEGER)) bad('zero length too large');
        ops.push({ kind: 'zero', fileOffset: Number(fileOffset), length: Number(length) });
      } else if (sig === 'desc') {
        if (ds + dataIndex >= total) bad('more data descriptors than data sectors');
        const s = sector(at + ds + dataIndex);
        const sv = dv(s);
        const dseq = (BigInt(sv.getUint32(DATA_SECTOR.sequenceHigh, true)) << 32n) | BigInt(sv.getUint32(DATA_SECTOR.sequenceLow, true));
        if (dseq !== seq) bad('data sector sequence number');
        const data = Buffer.alloc(LOG_SECTOR);
        data.set(descs.subarray(off + DESC.leadingBytes, off + DESC.leadingBytes + 8), 0);
        data.set(s.subarray(DATA_SECTOR.data, DATA_SECTOR.sequenceLow), 8);
        data.set(descs.subarray(off + DESC.trailingBytes, off + DESC.trailingBytes + 4), LOG_SECTOR - 4);
        ops.push({ kind: 'data', fileOffset: Number(fileOffset), data });
        dataIndex++;
      } else {
        bad(`signature '${sig.replace(/[^ -~]/g, '?')}'`);
      }
    }

    // The checksum covers the whole entry, with the checksum field as zero.
    let crc = 0xffffffff;
    for (let i = 0; i < total; i++) {
      let s = sector(at + i);
      if (i === 0) {
        s = Buffer.from(s);
        dv(s).setUint32(LOGE.checksum, 0, true);
      }
      crc = crc32cUpdate(crc, s);
    }
    if (((crc ^ 0xffffffff) >>> 0) !== v.getUint32(LOGE.checksum, true)) return { valid: false, next: at + total };
    return {
      valid: true,
      next: at + total,
      entry: {
        sequenceNumber: seq,
        flushedFileOffset: v.getBigUint64(LOGE.flushedFileOffset, true),
        lastFileOffset: v.getBigUint64(LOGE.lastFileOffset, true),
        ops,
      },
    };
  };

  // Walk the circular log once, collecting runs of consecutive valid entries.
  let best: LogEntry[] = [];
  let pos = 0;
  while (pos < n) {
    const first = check(pos, undefined);
    if (!first.valid) {
      pos = Math.max(first.next, pos + 1);
      continue;
    }
    const run: LogEntry[] = [first.entry!];
    let at = first.next;
    // A sequence can wrap, but never lap the log.
    while (at - pos < n) {
      const r = check(at, run[run.length - 1]!.sequenceNumber);
      if (!r.valid) break;
      run.push(r.entry!);
      at = r.next;
    }
    const last = run[run.length - 1]!.sequenceNumber;
    if (best.length === 0 || last > best[best.length - 1]!.sequenceNumber) best = run;
    pos = at;
  }
  return best;
}

/** The file size a replayed log asks for: the largest last_file_offset, in whole MiB. */
export function replayedFileSize(entries: LogEntry[], fileSize: number): number {
  let size = fileSize;
  for (const e of entries) {
    const last = Number(e.lastFileOffset > BigInt(Number.MAX_SAFE_INTEGER) ? BigInt(Number.MAX_SAFE_INTEGER) : e.lastFileOffset);
    if (last > size) size = Math.ceil(last / MiB) * MiB;
  }
  return size;
}

/** Check the entries against the file: a log that was written for a longer file means truncation. */
export function checkReplayable(entries: LogEntry[], fileSize: number, name: string): void {
  for (const e of entries) {
    if (e.flushedFileOffset > BigInt(fileSize)) {
      throw new CorruptImageError(`${name}: VHDX log entry ${e.sequenceNumber} expects a file of ${e.flushedFileOffset} bytes, but it has ${fileSize}; the image has been truncated`);
    }
  }
}

/** Write the entries' sectors where they belong (QEMU's vhdx_log_flush), then grow the file if asked. */
export async function replay(file: BlockNode, entries: LogEntry[]): Promise<void> {
  const zeros = Buffer.alloc(MiB);
  for (const e of entries) {
    for (const op of e.ops) {
      if (op.kind === 'data') {
        await file.write(op.fileOffset, op.data);
      } else {
        for (let done = 0; done < op.length; done += zeros.length) {
          const k = Math.min(zeros.length, op.length - done);
          await file.write(op.fileOffset + done, zeros.subarray(0, k));
        }
      }
    }
  }
  const want = replayedFileSize(entries, file.size);
  if (want > file.size && file.truncate) await file.truncate(want);
  await file.flush();
}

/**
 * The file as it reads once the log is replayed, without writing it: the read-only
 * view of an image with a pending log.
 */
export class LogOverlay implements BlockNode {
  readonly readOnly = true;
  readonly size: number;
  private readonly ops: LogOp[];

  constructor(
    private readonly file: BlockNode,
    entries: LogEntry[],
  ) {
    this.ops = entries.flatMap((e) => e.ops);
    this.size = replayedFileSize(entries, file.size);
  }

  get name(): string {
    return this.file.name;
  }

  async read(offset: number, dst: Uint8Array): Promise<void> {
    const inFile = Math.max(0, Math.min(dst.length, this.file.size - offset));
    if (inFile > 0) await this.file.read(offset, dst.subarray(0, inFile));
    dst.fill(0, inFile);
    const end = offset + dst.length;
    // Later entries win: apply in log order.
    for (const op of this.ops) {
      const len = op.kind === 'data' ? op.data.length : op.length;
      const a = Math.max(offset, op.fileOffset);
      const b = Math.min(end, op.fileOffset + len);
      if (a >= b) continue;
      if (op.kind === 'data') dst.set(op.data.subarray(a - op.fileOffset, b - op.fileOffset), a - offset);
      else dst.fill(0, a - offset, b - offset);
    }
  }

  write(): Promise<void> {
    return Promise.reject(new ReadOnlyError(`${this.name}: opened read-only`));
  }
  flush(): Promise<void> {
    return Promise.resolve();
  }
  async blockStatus(offset: number, length: number): Promise<Extent[]> {
    return [{ offset, length, kind: 'data' }];
  }
  close(): Promise<void> {
    return this.file.close();
  }
}

export interface NewLogEntry {
  sequenceNumber: bigint;
  logGuid: Uint8Array;
  /** Offset in the log of the first entry of this sequence. */
  tail: number;
  fileSize: number;
  /** Whole 4 KiB sectors of the file, with their new contents. */
  sectors: { fileOffset: number; data: Uint8Array }[];
}

/** One log entry: header and descriptors, then one data sector per descriptor. */
export function encodeLogEntry(e: NewLogEntry): Buffer {
  const count = e.sectors.length;
  const ds = descSectors(count);
  const total = ds + count;
  const b = Buffer.alloc(total * LOG_SECTOR);
  const v = dv(b);
  b.write('loge', LOGE.signature, 'latin1');
  v.setUint32(LOGE.entryLength, total * LOG_SECTOR, true);
  v.setUint32(LOGE.tail, e.tail, true);
  v.setBigUint64(LOGE.sequenceNumber, e.sequenceNumber, true);
  v.setUint32(LOGE.descriptorCount, count, true);
  b.set(e.logGuid, LOGE.logGuid);
  v.setBigUint64(LOGE.flushedFileOffset, BigInt(e.fileSize), true);
  v.setBigUint64(LOGE.lastFileOffset, BigInt(e.fileSize), true);
  e.sectors.forEach((s, i) => {
    const off = LOGE.size + i * DESC.size;
    b.write('desc', off + DESC.signature, 'latin1');
    b.set(s.data.subarray(LOG_SECTOR - 4, LOG_SECTOR), off + DESC.trailingBytes);
    b.set(s.data.subarray(0, 8), off + DESC.leadingBytes);
    v.setBigUint64(off + DESC.fileOffset, BigInt(s.fileOffset), true);
    v.setBigUint64(off + DESC.sequenceNumber, e.sequenceNumber, true);
    const at = (ds + i) * LOG_SECTOR;
    b.write('data', at + DATA_SECTOR.signature, 'latin1');
    v.setUint32(at + DATA_SECTOR.sequenceHigh, Number(e.sequenceNumber >> 32n), true);
    b.set(s.data.subarray(8, LOG_SECTOR - 4), at + DATA_SECTOR.data);
    v.setUint32(at + DATA_SECTOR.sequenceLow, Number(e.sequenceNumber & 0xffffffffn), true);
  });
  sealChecksum(b, LOGE.checksum);
  return b;
}

/** How many data sectors fit in one entry of a log of `logLength` bytes (one sector kept open). */
export function maxSectorsPerEntry(logLength: number): number {
  const sectors = logLength / LOG_SECTOR - 1;
  let k = sectors - 1;
  while (k > 0 && descSectors(k) + k > sectors) k--;
  return k;
}
