// Reading a FAT file system back from the disk as it is now (after writes): the FAT,
// cluster chains, and directories with their long names. Used by the write-back to
// see what a guest or mtools made of the disk; it trusts nothing it reads.
import { SECTOR, type Layout } from './layout.js';
import { ATTR_DIRECTORY, ATTR_LFN, ATTR_VOLUME_ID, DIRENT, fromDosDateTime, lfnChecksum, lfnPart } from './names.js';

export interface ReadEntry {
  name: string;
  dir: boolean;
  first: number;
  size: number;
  mtimeMs: number;
}

export class Inconsistent extends Error {}

export class FatReader {
  private fat: Buffer = Buffer.alloc(0);

  constructor(
    private readonly l: Layout,
    private readonly read: (offset: number, dst: Uint8Array) => Promise<void>,
  ) {}

  async load(): Promise<void> {
    this.fat = Buffer.alloc(this.l.sectorsPerFat * SECTOR);
    await this.read(this.l.fatStart * SECTOR, this.fat);
  }

  /** The FAT entry of cluster c. */
  next(c: number): number {
    switch (this.l.fatType) {
      case 32:
        return this.fat.readUInt32LE(c * 4) & 0x0fffffff;
      case 16:
        return this.fat.readUInt16LE(c * 2);
      default: {
        const v = this.fat.readUInt16LE((c * 3) >> 1);
        return c & 1 ? v >> 4 : v & 0xfff;
      }
    }
  }

  /** The clusters of a chain; `used` marks them, and a cluster used twice or a bad link is an inconsistency. */
  chain(first: number, used: Uint8Array, what: string): number[] {
    const out: number[] = [];
    const last = this.l.clusterCount + 1;
    const eocMin = this.l.eoc - 7;
    let c = first;
    for (;;) {
      if (c < 2 || c > last) throw new Inconsistent(`${what}: chain points at cluster ${c}`);
      if (used[c]) throw new Inconsistent(`${what}: cluster ${c} is in two chains`);
      used[c] = 1;
      out.push(c);
      const n = this.next(c);
      if (n >= eocMin) return out;
      c = n;
    }
  }

  /** The byte offset of a cluster on the disk. */
  clusterOffset(c: number): number {
    return this.l.dataStart * SECTOR + (c - 2) * this.l.clusterBytes;
  }

  /** The root directory's bytes (and, on FAT32, its chain marked used). */
  async rootBytes(used: Uint8Array): Promise<Buffer> {
    if (this.l.fatType === 32) return this.chainBytes(this.chain(2, used, 'root directory'));
    const b = Buffer.alloc(this.l.rootEntries * DIRENT);
    await this.read(this.l.rootStart * SECTOR, b);
    return b;
  }

  async chainBytes(chain: number[]): Promise<Buffer> {
    const cb = this.l.clusterBytes;
    const b = Buffer.alloc(chain.length * cb);
    await Promise.all(chain.map((c, i) => this.read(this.clusterOffset(c), b.subarray(i * cb, (i + 1) * cb))));
    return b;
  }
}

/** The entries of a directory's bytes, long names assembled and checked against their short entry. */
export function parseDirectory(b: Buffer, fat32: boolean): ReadEntry[] {
  const out: ReadEntry[] = [];
  let parts: string[] = [];
  let sum = -1;
  let expect = 0;
  for (let at = 0; at + DIRENT <= b.length; at += DIRENT) {
    const b0 = b[at]!;
    if (b0 === 0) break;
    const attr = b[at + 11]!;
    if (b0 === 0xe5) {
      parts = [];
      continue;
    }
    if ((attr & 0x3f) === ATTR_LFN) {
      const seq = b0 & 0x1f;
      if (b0 & 0x40) {
        parts = new Array<string>(seq).fill('');
        sum = b[at + 13]!;
        expect = seq;
      } else if (seq !== expect || b[at + 13] !== sum) {
        parts = [];
        continue;
      }
      if (seq >= 1 && seq <= parts.length) parts[seq - 1] = lfnPart(b, at);
      expect = seq - 1;
      continue;
    }
    if (attr & ATTR_VOLUME_ID) {
      parts = [];
      continue;
    }
    const short = b.toString('latin1', at, at + 11);
    const long = parts.length && expect === 0 && lfnChecksum(short) === sum ? parts.join('') : undefined;
    parts = [];
    if (short.startsWith('.  ') || short.startsWith('.. ')) continue;
    const name = long ?? shortName(short, b[at + 12]!);
    out.push({
      name,
      dir: (attr & ATTR_DIRECTORY) !== 0,
      // FAT12/16 keep other things in the high word (OS/2's extended attributes).
      first: (fat32 ? b.readUInt16LE(at + 20) * 65536 : 0) + b.readUInt16LE(at + 26),
      size: b.readUInt32LE(at + 28),
      mtimeMs: fromDosDateTime(b.readUInt16LE(at + 24), b.readUInt16LE(at + 22)),
    });
  }
  return out;
}

/** A short name as a file name: NT's case bits (0x08 base, 0x10 extension in lower case), 0x05 for 0xE5. */
function shortName(short: string, caseBits: number): string {
  let base = short.slice(0, 8).trimEnd();
  let ext = short.slice(8).trimEnd();
  if (base.charCodeAt(0) === 0x05) base = '\u00e5' + base.slice(1);
  if (caseBits & 0x08) base = base.toLowerCase();
  if (caseBits & 0x10) ext = ext.toLowerCase();
  return ext ? `${base}.${ext}` : base;
}
