// Persistent dirty bitmaps (qcow2.txt, "Bitmaps extension" and "Bitmap directory").
// tsmount does not update bitmap data. Before its first change to an image it marks
// every bitmap in use (flag bit 0), as QEMU does when it opens an image read-write:
// QEMU then treats them as inconsistent, exactly as after a QEMU that crashed.
import type { BlockNode } from '../../types.js';
import { CorruptImageError } from '../../errors.js';

/** Bitmaps extension layout. */
const EXT = { nbBitmaps: 0, directorySize: 8, directoryOffset: 16, length: 24 } as const;
/** Bitmap directory entry layout. */
const DIR = { flags: 12, granularityBits: 17, nameSize: 18, extraDataSize: 20, fixed: 24 } as const;
export const BME_FLAG_IN_USE = 1;
const BME_FLAG_AUTO = 2;
/** QEMU's QCOW2_MAX_BITMAPS and QCOW2_MAX_BITMAP_DIRECTORY_SIZE. */
const MAX_BITMAPS = 65535;
const MAX_DIRECTORY = 65535 * 1024;

export interface BitmapDirectory {
  offset: number;
  /** The directory bytes as on disk. */
  data: Buffer;
  /** Byte offsets of each entry's flags field within `data`. */
  flagOffsets: number[];
  /** Each bitmap's table: offset and entry count. */
  tables: { offset: number; entries: number }[];
  /** Each bitmap as qemu-img info lists it (QEMU's flag names, in-use before auto). */
  bitmaps: { flags: string[]; name: string; granularity: number }[];
}

/** Every byte range the bitmaps hold a reference to: directory, tables, data clusters. */
export async function bitmapRanges(file: BlockNode, dir: BitmapDirectory, clusterSize: number, name: string): Promise<{ offset: number; length: number }[]> {
  const out = [{ offset: dir.offset, length: dir.data.length }];
  for (const t of dir.tables) {
    if (t.entries === 0) continue;
    if (t.entries * 8 > 64 * 1024 * 1024 || t.offset + t.entries * 8 > file.size) throw new CorruptImageError(`${name}: qcow2 bitmap table lies outside the file`);
    out.push({ offset: t.offset, length: t.entries * 8 });
    const table = Buffer.alloc(t.entries * 8);
    await file.read(t.offset, table);
    for (let i = 0; i < t.entries; i++) {
      const off = Number(table.readBigUInt64BE(i * 8) & 0x00fffffffffffe00n);
      if (off !== 0) out.push({ offset: off, length: clusterSize });
    }
  }
  return out;
}

/** The bitmap directory, from the extension bytes of the header cluster. */
export async function readBitmapDirectory(file: BlockNode, ext: Uint8Array, name: string): Promise<BitmapDirectory | undefined> {
  const bad = (msg: string): never => {
    throw new CorruptImageError(`${name}: qcow2 bitmaps extension: ${msg}`);
  };
  if (ext.length < EXT.length) bad('too short');
  const dv = new DataView(ext.buffer, ext.byteOffset, ext.byteLength);
  const nb = dv.getUint32(EXT.nbBitmaps, false);
  const size = dv.getBigUint64(EXT.directorySize, false);
  const offset = dv.getBigUint64(EXT.directoryOffset, false);
  if (nb === 0) return undefined;
  if (nb > MAX_BITMAPS) bad(`${nb} bitmaps`);
  if (size > BigInt(MAX_DIRECTORY) || size < BigInt(DIR.fixed)) bad(`directory size ${size}`);
  if (offset + size > BigInt(file.size)) bad('directory lies outside the file');
  const data = Buffer.alloc(Number(size));
  await file.read(Number(offset), data);
  const flagOffsets: number[] = [];
  const tables: { offset: number; entries: number }[] = [];
  const bitmaps: BitmapDirectory['bitmaps'] = [];
  let pos = 0;
  for (let i = 0; i < nb; i++) {
    if (pos + DIR.fixed > data.length) bad(`entry ${i} runs past the directory`);
    const nameSize = data.readUInt16BE(pos + DIR.nameSize);
    const extra = data.readUInt32BE(pos + DIR.extraDataSize);
    const end = pos + DIR.fixed + extra + nameSize;
    if (end > data.length) bad(`entry ${i} runs past the directory`);
    flagOffsets.push(pos + DIR.flags);
    const t = data.readBigUInt64BE(pos);
    if (t >= 2n ** 53n) bad(`entry ${i} has a table offset out of range`);
    tables.push({ offset: Number(t), entries: data.readUInt32BE(pos + 8) });
    const flags = data.readUInt32BE(pos + DIR.flags);
    const bits = data[pos + DIR.granularityBits]!;
    // QEMU refuses granularities outside 2^9..2^31 (BME_MIN/MAX_GRANULARITY_BITS).
    if (bits < 9 || bits > 31) bad(`entry ${i} has granularity bits ${bits}`);
    bitmaps.push({
      flags: [...(flags & BME_FLAG_IN_USE ? ['in-use'] : []), ...(flags & BME_FLAG_AUTO ? ['auto'] : [])],
      name: data.toString('utf8', end - nameSize, end),
      granularity: 2 ** bits,
    });
    pos = Math.ceil(end / 8) * 8;
  }
  return { offset: Number(offset), data, flagOffsets, tables, bitmaps };
}

/** Set the in-use flag of every bitmap, in place; true if anything changed. */
export async function markBitmapsInUse(file: BlockNode, dir: BitmapDirectory): Promise<boolean> {
  let changed = false;
  for (const at of dir.flagOffsets) {
    const flags = dir.data.readUInt32BE(at);
    if (flags & BME_FLAG_IN_USE) continue;
    dir.data.writeUInt32BE((flags | BME_FLAG_IN_USE) >>> 0, at);
    changed = true;
  }
  if (changed) await file.write(dir.offset, dir.data);
  return changed;
}
