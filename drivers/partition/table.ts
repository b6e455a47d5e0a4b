// The partition table of a disk, MBR (primary partitions and the logical ones in an
// extended partition's EBR chain) or GPT: where each partition starts and how long it
// is. Pure: it reads through the function it is given and trusts nothing it reads.
// Every count and size from the disk is capped before use; an entry that reaches past
// the end of the disk, or overlaps one already taken, is left out with a warning; the
// EBR chain is followed at most MAX_LOGICAL steps, never back to an EBR already seen
// and never outside its extended partition.
import { crc32 } from 'node:zlib';

export interface Partition {
  /** 1-4 for MBR primaries, 5... for logical partitions; the entry's index + 1 for GPT. */
  number: number;
  /** Bytes from the start of the disk. */
  start: number;
  length: number;
  scheme: 'mbr' | 'gpt';
  /** The MBR type byte as two hex digits, or the GPT type GUID. */
  type: string;
  /** The GPT partition name, when it has one. */
  name?: string;
}

export interface PartitionTable {
  scheme: 'mbr' | 'gpt' | 'none';
  partitions: Partition[];
  /** What was left out, and why; one line each. */
  warnings: string[];
}

/** Reads `length` bytes at `offset` of the disk (inside it). */
export type Reader = (offset: number, length: number) => Promise<Uint8Array>;

const SECTOR = 512;
/** Logical partitions followed in one EBR chain: Linux stops far earlier in practice. */
export const MAX_LOGICAL = 128;
/** GPT entries looked at; the specification's minimum array is 128, sgdisk's default too. */
export const MAX_GPT_ENTRIES = 1024;
const MAX_GPT_ENTRY_SIZE = 4096;
const EXTENDED = new Set([0x05, 0x0f, 0x85]);
const PROTECTIVE = 0xee;

function u32(b: Uint8Array, at: number): number {
  return (b[at]! | (b[at + 1]! << 8) | (b[at + 2]! << 16)) + b[at + 3]! * 0x1000000;
}
function u64(b: Uint8Array, at: number): number {
  // Values above 2^53 cannot be a byte offset of any disk we open: they fail the range check.
  return u32(b, at) + u32(b, at + 4) * 0x100000000;
}

function guid(b: Uint8Array, at: number): string {
  const h = (from: number, to: number, rev: boolean): string => {
    const bytes = Array.from(b.subarray(at + from, at + to));
    return (rev ? bytes.reverse() : bytes).map((x) => x.toString(16).padStart(2, '0')).join('');
  };
  return `${h(0, 4, true)}-${h(4, 6, true)}-${h(6, 8, true)}-${h(8, 10, false)}-${h(10, 16, false)}`.toUpperCase();
}

function utf16z(b: Uint8Array): string {
  let end = 0;
  while (end + 1 < b.length && (b[end] !== 0 || b[end + 1] !== 0)) end += 2;
  return Buffer.from(b.subarray(0, end)).toString('utf16le');
}

/** Collects partitions, refusing ones past the end of the disk or overlapping an earlier one. */
class Taken {
  readonly partitions: Partition[] = [];
  readonly warnings: string[] = [];
  constructor(private readonly diskSize: number) {}

  fits(what: string, start: number, length: number, within?: { start: number; length: number }): boolean {
    if (length <= 0) return false;
    if (!Number.isSafeInteger(start + length) || start + length > this.diskSize) {
      this.warnings.push(`${what} reaches past the end of the disk (${start}+${length} of ${this.diskSize} bytes); left out`);
      return false;
    }
    if (within && (start < within.start || start + length > within.start + within.length)) {
      this.warnings.push(`${what} lies outside its extended partition; left out`);
      return false;
    }
    return true;
  }

  add(what: string, p: Partition): void {
    if (!this.fits(what, p.start, p.length)) return;
    const clash = this.partitions.find((q) => p.start < q.start + q.length && q.start < p.start + p.length);
    if (clash) {
      this.warnings.push(`${what} overlaps partition ${clash.number}; left out`);
      return;
    }
    this.partitions.push(p);
  }
}

/** Read the partition table of a disk of `diskSize` bytes. */
export async function readPartitionTable(read: Reader, diskSize: number): Promise<PartitionTable> {
  if (diskSize < SECTOR) return { scheme: 'none', partitions: [], warnings: [] };
  const mbr = await read(0, SECTOR);
  if (mbr[510] !== 0x55 || mbr[511] !== 0xaa) return { scheme: 'none', partitions: [], warnings: [] };
  const entries = [0, 1, 2, 3].map((i) => {
    const at = 446 + 16 * i;
    return { number: i + 1, type: mbr[at + 4]!, start: u32(mbr, at + 8) * SECTOR, length: u32(mbr, at + 12) * SECTOR };
  });
  if (entries.some((e) => e.type === PROTECTIVE)) {
    const gpt = await readGpt(read, diskSize);
    if (gpt) return gpt;
  }
  const taken = new Taken(diskSize);
  const extended: { start: number; length: number; number: number }[] = [];
  for (const e of entries) {
    if (e.type === 0 || e.length === 0) continue;
    if (e.type === PROTECTIVE) {
      taken.warnings.push(`partition ${e.number} is a GPT's protective entry, but the GPT header is missing; left out`);
      continue;
    }
    if (EXTENDED.has(e.type)) {
      // The container itself is no file system: only its logical partitions are shown.
      const clash = entries.find((o) => o !== e && o.type !== 0 && o.length > 0 && !EXTENDED.has(o.type) && e.start < o.start + o.length && o.start < e.start + e.length);
      if (!taken.fits(`extended partition ${e.number}`, e.start, e.length)) continue;
      if (clash) taken.warnings.push(`extended partition ${e.number} overlaps partition ${clash.number}; its logical partitions left out`);
      else if (extended.length > 0) taken.warnings.push(`a second extended partition (${e.number}); left out`);
      else extended.push({ start: e.start, length: e.length, number: e.number });
      continue;
    }
    taken.add(`partition ${e.number}`, { number: e.number, start: e.start, length: e.length, scheme: 'mbr', type: e.type.toString(16).padStart(2, '0') });
  }
  for (const ext of extended) await readLogical(read, ext, taken);
  taken.partitions.sort((a, b) => a.number - b.number);
  return { scheme: 'mbr', partitions: taken.partitions, warnings: taken.warnings };
}

/** The EBR chain of an extended partition: logical partitions 5, 6, ... */
async function readLogical(read: Reader, ext: { start: number; length: number }, taken: Taken): Promise<void> {
  const seen = new Set<number>();
  let ebr = ext.start;
  let number = 5;
  for (let step = 0; ; step++) {
    if (step >= MAX_LOGICAL) {
      taken.warnings.push(`more than ${MAX_LOGICAL} logical partitions; the rest left out`);
      return;
    }
    if (seen.has(ebr)) {
      taken.warnings.push(`the chain of logical partitions loops back on itself; the rest left out`);
      return;
    }
    seen.add(ebr);
    if (ebr < ext.start || ebr + SECTOR > ext.start + ext.length) {
      taken.warnings.push(`a logical partition's table lies outside the extended partition; the rest left out`);
      return;
    }
    const b = await read(ebr, SECTOR);
    if (b[510] !== 0x55 || b[511] !== 0xaa) {
      if (step > 0) taken.warnings.push(`a logical partition's table has no signature; the rest left out`);
      return;
    }
    const type = b[446 + 4]!;
    const length = u32(b, 446 + 12) * SECTOR;
    if (type !== 0 && length > 0) {
      const start = ebr + u32(b, 446 + 8) * SECTOR;
      const what = `logical partition ${number}`;
      if (taken.fits(what, start, length, ext)) {
        taken.add(what, { number, start, length, scheme: 'mbr', type: type.toString(16).padStart(2, '0') });
      }
      number++;
    }
    const nextType = b[446 + 16 + 4]!;
    const nextRel = u32(b, 446 + 16 + 8);
    if (!EXTENDED.has(nextType) || nextRel === 0) return;
    ebr = ext.start + nextRel * SECTOR;
  }
}

/**
 * The GPT at LBA 1 (512-byte sectors, else 4096); undefined when there is none. A
 * primary header or entry array that is damaged or missing gives way to the backup
 * copy in the disk's last sector, with a warning, as the kernel and gdisk read it.
 */
async function readGpt(read: Reader, diskSize: number): Promise<PartitionTable | undefined> {
  for (const sector of [512, 4096]) {
    if (diskSize < 2 * sector) continue;
    const primary = await gptAt(read, sector, sector, diskSize);
    if (primary && 'table' in primary) return primary.table;
    const lastLba = Math.floor(diskSize / sector) - 1;
    const backup = lastLba > 1 ? await gptAt(read, lastLba * sector, sector, diskSize) : undefined;
    if (backup && 'table' in backup) {
      const why = primary ? primary.error : 'no GPT header at LBA 1';
      backup.table.warnings.unshift(`primary GPT: ${why}; read the backup GPT at the end of the disk`);
      return backup.table;
    }
    if (primary) return { scheme: 'gpt', partitions: [], warnings: [`${primary.error}; no partitions`] };
  }
  return undefined;
}

/** The GPT whose header is at byte `at`: its partitions, what is wrong with it, or undefined when there is no header there. */
async function gptAt(read: Reader, at: number, sector: number, diskSize: number): Promise<{ table: PartitionTable } | { error: string } | undefined> {
  const h = await read(at, sector);
  if (Buffer.from(h.subarray(0, 8)).toString('latin1') !== 'EFI PART') return undefined;
  const warnings: string[] = [];
  const headerSize = u32(h, 12);
  if (headerSize < 92 || headerSize > sector) return { error: `GPT header size ${headerSize} is not possible` };
  const header = Buffer.from(h.subarray(0, headerSize));
  const crc = header.readUInt32LE(16);
  header.writeUInt32LE(0, 16);
  if (crc32(header) !== crc) return { error: 'GPT header checksum is wrong' };
  const entriesLba = u64(h, 72);
  let count = u32(h, 80);
  const entrySize = u32(h, 84);
  if (entrySize < 128 || entrySize > MAX_GPT_ENTRY_SIZE || entrySize % 8 !== 0) return { error: `GPT entry size ${entrySize} is not possible` };
  if (count > MAX_GPT_ENTRIES) {
    warnings.push(`GPT claims ${count} entries; only the first ${MAX_GPT_ENTRIES} read`);
    count = MAX_GPT_ENTRIES;
  }
  const arrayAt = entriesLba * sector;
  const bytes = count * entrySize;
  if (!Number.isSafeInteger(arrayAt + bytes) || arrayAt < 2 * sector || arrayAt + bytes > diskSize) {
    return { error: `GPT entry array at LBA ${entriesLba} lies outside the disk` };
  }
  const array = await read(arrayAt, bytes);
  // The checksum covers the whole array as the header gives it; checked only when we read all of it.
  if (count === u32(h, 80) && crc32(array) !== u32(h, 88)) return { error: 'GPT entry array checksum is wrong' };
  const taken = new Taken(diskSize);
  taken.warnings.push(...warnings);
  for (let i = 0; i < count; i++) {
    const e = array.subarray(i * entrySize, (i + 1) * entrySize);
    if (e.subarray(0, 16).every((x) => x === 0)) continue;
    const first = u64(e, 32);
    const last = u64(e, 40);
    const what = `partition ${i + 1}`;
    if (last < first) {
      taken.warnings.push(`${what} ends before it starts; left out`);
      continue;
    }
    const name = utf16z(e.subarray(56, Math.min(entrySize, 128)));
    taken.add(what, { number: i + 1, start: first * sector, length: (last - first + 1) * sector, scheme: 'gpt', type: guid(e, 0), ...(name ? { name } : {}) });
  }
  return { table: { scheme: 'gpt', partitions: taken.partitions, warnings: taken.warnings } };
}
