// The on-disk structures of Apple's UDIF (.dmg), as QEMU's block/dmg.c reads them and
// as Apple's and others' public descriptions lay them out; every number big-endian.
//   - the "koly" trailer: the last 512 bytes (QEMU also looks up to 511 bytes earlier,
//     for files padded after it): where the data fork, the resource fork and the XML
//     property list are, and the disk's size in sectors.
//   - the block tables ("mish", one per partition: a `blkx` resource), each a header
//     and 40-byte chunk entries: the chunk's type, its first sector and sector count
//     (relative to the table's first sector), and where its bytes are (relative to the
//     data fork plus the table's data offset). The tables are in the XML property list
//     (base64 in <data> elements under resource-fork/blkx) or, in old images, in a
//     binary resource fork.
import { CorruptImageError, UnsupportedError } from '../../errors.js';
import type { BlockNode } from '../../types.js';

export const KOLY_SIZE = 512;
const KOLY_MAGIC = 0x6b6f6c79; // "koly"
const MISH_MAGIC = 0x6d697368; // "mish"
/** The block table header before its chunk entries; a table holds at least one entry. */
const MISH_HEADER = 204;
const CHUNK_ENTRY = 40;
export const SECTOR = 512;

export const ChunkType = {
  zero: 0x00000000,
  raw: 0x00000001,
  ignore: 0x00000002,
  adc: 0x80000004,
  zlib: 0x80000005,
  bzip2: 0x80000006,
  lzfse: 0x80000007,
  comment: 0x7ffffffe,
  end: 0xffffffff,
} as const;

/**
 * QEMU's limits (DMG_LENGTHS_MAX): a chunk that has to be read or decompressed holds at
 * most 64 MiB either way, so one chunk never costs more memory than that.
 */
export const MAX_CHUNK_BYTES = 64 * 1024 * 1024;
/** The XML property list or the resource fork, read whole: far above any real one (QEMU allows 16 MiB). */
export const MAX_TABLES_BYTES = 32 * 1024 * 1024;

export interface Koly {
  /** Where the trailer is in the file. */
  offset: number;
  dataForkOffset: number;
  rsrcForkOffset: number;
  rsrcForkLength: number;
  xmlOffset: number;
  xmlLength: number;
  sectorCount: number;
}

/** The chunks of every table, sorted by first sector; bytes, not sectors. */
export interface ChunkTable {
  count: number;
  type: Uint32Array;
  /** First guest byte. */
  start: Float64Array;
  /** Guest bytes. */
  length: Float64Array;
  /** Where its stored bytes are in the file, and how many (zero and ignore chunks have none). */
  host: Float64Array;
  hostLength: Float64Array;
}

function u64(dv: DataView, at: number, what: string, name: string): number {
  const v = dv.getBigUint64(at, false);
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw new CorruptImageError(`${name}: dmg ${what} is out of range (0x${v.toString(16)})`);
  return Number(v);
}

/**
 * Where the koly trailer starts in `tail` (the file's last bytes), or -1: at 512 bytes
 * from the end, else anywhere QEMU's dmg_find_koly_offset looks (the 515 bytes from
 * 1023 before the end).
 */
export function findKoly(tail: Uint8Array): number {
  const dv = new DataView(tail.buffer, tail.byteOffset, tail.byteLength);
  const at512 = tail.length - KOLY_SIZE;
  if (at512 >= 0 && dv.getUint32(at512, false) === KOLY_MAGIC) return at512;
  const from = Math.max(0, tail.length - 1023);
  const to = Math.min(tail.length - 4, from + 515 - 4);
  for (let i = from; i <= to; i++) if (dv.getUint32(i, false) === KOLY_MAGIC) return i;
  return -1;
}

/** Whether the file's last bytes end with a UDIF trailer (for probing: magic and a 512-byte header). */
export function hasKoly(tail: Uint8Array): boolean {
  const at = findKoly(tail);
  return at >= 0 && at + 12 <= tail.length && new DataView(tail.buffer, tail.byteOffset + at, 12).getUint32(8, false) === KOLY_SIZE;
}

export async function readKoly(file: BlockNode): Promise<Koly> {
  const name = file.name;
  if (file.size < KOLY_SIZE) throw new CorruptImageError(`${name}: file too short for a dmg trailer`);
  const tailLength = Math.min(file.size, 1023 + 512);
  const tail = Buffer.alloc(tailLength);
  await file.read(file.size - tailLength, tail);
  const at = findKoly(tail);
  if (at < 0) throw new CorruptImageError(`${name}: no dmg (UDIF) trailer at the end of the file`);
  const k = Buffer.alloc(KOLY_SIZE);
  tail.copy(k, 0, at);
  const offset = file.size - tailLength + at;
  const dv = new DataView(k.buffer, k.byteOffset, KOLY_SIZE);
  const koly: Koly = {
    offset,
    dataForkOffset: u64(dv, 0x18, 'data fork offset', name),
    rsrcForkOffset: u64(dv, 0x28, 'resource fork offset', name),
    rsrcForkLength: u64(dv, 0x30, 'resource fork length', name),
    xmlOffset: u64(dv, 0xd8, 'property list offset', name),
    xmlLength: u64(dv, 0xe0, 'property list length', name),
    sectorCount: u64(dv, 0x1ec, 'sector count', name),
  };
  // A segmented image (.dmg, .002.dmgpart, ...) has its data fork spread over files this one does not name.
  const segments = dv.getUint32(60, false);
  if (segments > 1) throw new UnsupportedError(`${name}: segmented dmg images (${segments} segments) are not supported`);
  // As dmg_open: every fork lies before the trailer.
  if (koly.dataForkOffset > offset) throw new CorruptImageError(`${name}: dmg data fork starts after the trailer`);
  if (koly.rsrcForkLength > 0 && (koly.rsrcForkOffset >= offset || koly.rsrcForkLength > offset - koly.rsrcForkOffset)) {
    throw new CorruptImageError(`${name}: dmg resource fork (0x${koly.rsrcForkOffset.toString(16)}+0x${koly.rsrcForkLength.toString(16)}) is outside the file`);
  }
  if (koly.xmlLength > 0 && (koly.xmlOffset >= offset || koly.xmlLength > offset - koly.xmlOffset)) {
    throw new CorruptImageError(`${name}: dmg property list (0x${koly.xmlOffset.toString(16)}+0x${koly.xmlLength.toString(16)}) is outside the file`);
  }
  if (koly.sectorCount > Math.floor(Number.MAX_SAFE_INTEGER / SECTOR)) throw new CorruptImageError(`${name}: dmg sector count ${koly.sectorCount} is too large`);
  return koly;
}

/** One chunk entry, before sorting. */
interface Entry {
  type: number;
  start: number;
  length: number;
  host: number;
  hostLength: number;
}

/** The chunk entries of one block table (dmg_read_mish_block); a buffer that is not one is skipped, as QEMU does. */
function readMish(buf: Uint8Array, koly: Koly, name: string, out: Entry[]): void {
  if (buf.length < MISH_HEADER + CHUNK_ENTRY) return;
  const dv = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  if (dv.getUint32(0, false) !== MISH_MAGIC) return;
  const firstSector = u64(dv, 8, 'block table sector', name);
  const dataOffset = u64(dv, 0x18, 'block table data offset', name);
  const declared = dv.getUint32(200, false);
  const n = Math.min(declared, Math.floor((buf.length - MISH_HEADER) / CHUNK_ENTRY));
  for (let i = 0; i < n; i++) {
    const at = MISH_HEADER + i * CHUNK_ENTRY;
    const type = dv.getUint32(at, false);
    if (type === ChunkType.comment || type === ChunkType.end) continue;
    const what = `dmg chunk ${out.length}`;
    const sectors = u64(dv, at + 16, `${what} sector count`, name);
    const start = (firstSector + u64(dv, at + 8, `${what} sector`, name)) * SECTOR;
    const length = sectors * SECTOR;
    if (!Number.isSafeInteger(start + length)) throw new CorruptImageError(`${name}: ${what} lies beyond any disk size`);
    const stored = type !== ChunkType.zero && type !== ChunkType.ignore;
    if (stored && length > MAX_CHUNK_BYTES) throw new CorruptImageError(`${name}: ${what} holds ${sectors} sectors, more than ${MAX_CHUNK_BYTES / SECTOR}`);
    let host = 0;
    let hostLength = 0;
    if (stored) {
      host = koly.dataForkOffset + dataOffset + u64(dv, at + 24, `${what} offset`, name);
      hostLength = u64(dv, at + 32, `${what} length`, name);
      if (hostLength > MAX_CHUNK_BYTES) throw new CorruptImageError(`${name}: ${what} is ${hostLength} bytes long, more than ${MAX_CHUNK_BYTES}`);
      // Its bytes must be in the file, before the trailer: a cut-off image fails here, not on some later read.
      if (host + hostLength > koly.offset) {
        throw new CorruptImageError(`${name}: ${what} (0x${host.toString(16)}+0x${hostLength.toString(16)}) lies past the end of the data; the image is truncated or damaged`);
      }
    }
    if (length > 0) out.push({ type, start, length, host, hostLength });
  }
}

/** The blkx tables from the XML property list: the base64 <data> of each entry of resource-fork/blkx. */
function readPlist(xml: string, koly: Koly, name: string, out: Entry[]): void {
  // Only the blkx array holds block tables; other resources (plst, cSum, nsiz) are skipped.
  // Without a blkx key, every <data> is tried, as QEMU does (non-tables are skipped).
  let from = 0;
  let to = xml.length;
  const key = xml.search(/<key>\s*blkx\s*<\/key>/);
  if (key >= 0) {
    const open = xml.indexOf('<array>', key);
    const close = open < 0 ? -1 : xml.indexOf('</array>', open);
    if (open < 0 || close < 0) throw new CorruptImageError(`${name}: dmg property list has a blkx key without its array`);
    from = open;
    to = close;
  }
  for (let at = xml.indexOf('<data>', from); at >= 0 && at < to; at = xml.indexOf('<data>', at)) {
    const end = xml.indexOf('</data>', at);
    if (end < 0 || end > to) throw new CorruptImageError(`${name}: dmg property list is malformed (<data> without </data>)`);
    readMish(Buffer.from(xml.slice(at + 6, end), 'base64'), koly, name, out);
    at = end;
  }
}

/** The blkx tables from a binary resource fork (dmg_read_resource_fork): its data, a sequence of length-prefixed resources. */
function readResourceFork(fork: Buffer, koly: Koly, name: string, out: Entry[]): void {
  const bad = (why: string): never => {
    throw new CorruptImageError(`${name}: dmg resource fork ${why}`);
  };
  if (fork.length < 16) bad('is too short');
  const dataOffset = fork.readUInt32BE(0);
  const dataLength = fork.readUInt32BE(8);
  if (dataOffset > fork.length || dataLength === 0 || dataOffset + dataLength > fork.length) bad('has its data outside it');
  let at = dataOffset;
  const end = dataOffset + dataLength;
  while (at < end) {
    if (at + 4 > end) bad('ends inside a resource length');
    const n = fork.readUInt32BE(at);
    at += 4;
    if (n === 0 || n > end - at) bad('has a resource longer than its data');
    readMish(fork.subarray(at, at + n), koly, name, out);
    at += n;
  }
}

/** Read the block tables the trailer points at and sort their chunks; overlapping chunks are corruption. */
export async function readChunks(file: BlockNode, koly: Koly): Promise<ChunkTable> {
  const name = file.name;
  const entries: Entry[] = [];
  const readWhole = async (offset: number, length: number, what: string): Promise<Buffer> => {
    if (length > MAX_TABLES_BYTES) throw new CorruptImageError(`${name}: dmg ${what} is ${length} bytes, more than ${MAX_TABLES_BYTES}`);
    const buf = Buffer.alloc(length);
    await file.read(offset, buf);
    return buf;
  };
  // As QEMU: the resource fork when there is one, else the XML property list.
  if (koly.rsrcForkLength > 0) readResourceFork(await readWhole(koly.rsrcForkOffset, koly.rsrcForkLength, 'resource fork'), koly, name, entries);
  else if (koly.xmlLength > 0) readPlist((await readWhole(koly.xmlOffset, koly.xmlLength, 'property list')).toString('latin1'), koly, name, entries);
  else throw new CorruptImageError(`${name}: dmg trailer points at no block tables`);
  if (entries.length === 0 && koly.sectorCount > 0) throw new CorruptImageError(`${name}: dmg has no block tables (blkx)`);
  entries.sort((a, b) => a.start - b.start);
  const t: ChunkTable = {
    count: entries.length,
    type: new Uint32Array(entries.length),
    start: new Float64Array(entries.length),
    length: new Float64Array(entries.length),
    host: new Float64Array(entries.length),
    hostLength: new Float64Array(entries.length),
  };
  entries.forEach((e, i) => {
    if (i > 0 && e.start < t.start[i - 1]! + t.length[i - 1]!) {
      throw new CorruptImageError(`${name}: dmg chunks overlap at sector ${e.start / SECTOR}`);
    }
    t.type[i] = e.type;
    t.start[i] = e.start;
    t.length[i] = e.length;
    t.host[i] = e.host;
    t.hostLength[i] = e.hostLength;
  });
  return t;
}
