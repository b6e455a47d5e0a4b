// The virtual disk's bytes, described as regions (shared/STYLE.md, nbdkit's floppy):
// the head (MBR, boot sector, FSInfo), two FATs computed from the cluster runs, the
// FAT12/16 root directory, then the data clusters, each a directory's entries, a
// host file's bytes (read on demand) or free (zeros). Nothing is copied at open.
import { SECTOR, chooseLayout, type Layout } from './layout.js';
import { renderHead, mediaOf } from './boot.js';
import { HostFiles } from './host-files.js';
import { allocate, breadthFirst, checkLimits, clustersOf, renderDirectories, scanTree, type FatNode } from './tree.js';
import type { VvfatSpec } from './spec.js';

export class FatImage {
  readonly layout: Layout;
  readonly root: FatNode;
  /** Nodes holding clusters, by first cluster (breadth-first allocation gives them in order). */
  readonly runs: FatNode[];
  readonly size: number;
  readonly label: Buffer;
  /** The first cluster no node holds. */
  readonly nextFree: number;
  private readonly head: Buffer;
  readonly files = new HostFiles();

  constructor(readonly spec: VvfatSpec, readonly name: string, warn: (text: string) => void) {
    this.root = scanTree(spec.dir, warn);
    const order = breadthFirst(this.root);
    const fat32 = (spec.fatType ?? 0) === 32;
    this.layout = chooseLayout(spec, (cb) => order.reduce((n, node) => n + clustersOf(node, cb, fat32), 0), name);
    checkLimits(order, this.layout.rootEntries, name);
    this.nextFree = allocate(order, this.layout.clusterBytes, fat32);
    this.label = Buffer.alloc(11, 0x20);
    this.label.write(spec.label ?? 'QEMU VVFAT', 0, 'utf8');
    renderDirectories(order, this.label);
    this.runs = order.filter((n) => n.clusters > 0);
    const free = this.layout.clusterCount - (this.nextFree - 2);
    this.head = renderHead(this.layout, this.label, free, this.nextFree);
    this.size = this.layout.diskSectors * SECTOR;
  }

  /** The FAT entry of cluster c as built (before any write). */
  fatEntry(c: number): number {
    const l = this.layout;
    if (c === 0) return (l.eoc & ~0xff) | mediaOf(l);
    if (c === 1) return l.eoc;
    const run = this.runAt(c);
    if (run === undefined) return 0;
    return c < run.first + run.clusters - 1 ? c + 1 : l.eoc;
  }

  /** The node whose clusters hold cluster c, if any. */
  runAt(c: number): FatNode | undefined {
    const i = this.runIndex(c);
    const r = this.runs[i];
    return r && c >= r.first && c < r.first + r.clusters ? r : undefined;
  }

  /** Index of the last run starting at or before c (0 when none does). */
  private runIndex(c: number): number {
    let lo = 0;
    let hi = this.runs.length - 1;
    while (lo < hi) {
      const mid = (lo + hi + 1) >> 1;
      if (this.runs[mid]!.first <= c) lo = mid;
      else hi = mid - 1;
    }
    return lo;
  }

  async read(offset: number, dst: Uint8Array): Promise<void> {
    const l = this.layout;
    const fatBytes = l.sectorsPerFat * SECTOR;
    const fatStart = l.fatStart * SECTOR;
    const rootStart = l.rootStart * SECTOR;
    const dataStart = l.dataStart * SECTOR;
    const dataEnd = dataStart + l.clusterCount * l.clusterBytes;
    const pending: Promise<void>[] = [];
    let pos = offset;
    const end = offset + dst.length;
    while (pos < end) {
      const at = pos - offset;
      let stop: number;
      if (pos < fatStart) {
        stop = Math.min(end, fatStart);
        dst.set(this.head.subarray(pos, stop), at);
      } else if (pos < rootStart) {
        const inFat = (pos - fatStart) % fatBytes;
        stop = Math.min(end, pos + fatBytes - inFat, rootStart);
        this.readFat(inFat, dst.subarray(at, at + stop - pos));
      } else if (pos < dataStart) {
        stop = Math.min(end, dataStart);
        copyPadded(this.root.entries!, pos - rootStart, dst.subarray(at, at + stop - pos));
      } else if (pos < dataEnd) {
        stop = Math.min(end, dataEnd);
        pending.push(this.readData(pos - dataStart, dst.subarray(at, at + stop - pos)));
      } else {
        stop = end;
        dst.fill(0, at);
      }
      pos = stop;
    }
    await Promise.all(pending);
  }

  /** Bytes of one FAT from byte `off`. */
  private readFat(off: number, dst: Uint8Array): void {
    const bits = this.layout.fatType;
    if (bits === 12) {
      // Entries in pairs of three bytes.
      const c0 = Math.floor((off * 2) / 3) & ~1;
      const c1 = (Math.ceil(((off + dst.length) * 2) / 3) + 2) & ~1;
      const scratch = Buffer.alloc(((c1 - c0) * 3) / 2);
      this.entries(c0, c1, (c, v) => {
        const b = ((c - c0) * 3) >> 1;
        if (c & 1) {
          scratch[b] = (scratch[b]! & 0x0f) | ((v & 0xf) << 4);
          scratch[b + 1] = v >> 4;
        } else {
          scratch[b] = v & 0xff;
          scratch[b + 1] = (scratch[b + 1]! & 0xf0) | (v >> 8);
        }
      });
      const from = off - (c0 * 3) / 2;
      dst.set(scratch.subarray(from, from + dst.length));
      return;
    }
    const w = bits / 8;
    const c0 = Math.floor(off / w);
    const c1 = Math.ceil((off + dst.length) / w);
    const scratch = Buffer.alloc((c1 - c0) * w);
    if (w === 2) this.entries(c0, c1, (c, v) => scratch.writeUInt16LE(v, (c - c0) * 2));
    else this.entries(c0, c1, (c, v) => scratch.writeUInt32LE(v, (c - c0) * 4));
    const from = off - c0 * w;
    dst.set(scratch.subarray(from, from + dst.length));
  }

  /** Call put(c, value) for the FAT entries c0 <= c < c1 that are not zero. */
  private entries(c0: number, c1: number, put: (c: number, v: number) => void): void {
    const last = this.layout.clusterCount + 1;
    for (let c = c0; c < Math.min(c1, 2); c++) put(c, this.fatEntry(c));
    let i = this.runIndex(Math.max(c0, 2));
    for (; i < this.runs.length; i++) {
      const r = this.runs[i]!;
      if (r.first >= c1) break;
      const a = Math.max(r.first, c0, 2);
      const b = Math.min(r.first + r.clusters, c1, last + 1);
      for (let c = a; c < b; c++) put(c, c < r.first + r.clusters - 1 ? c + 1 : this.layout.eoc);
    }
  }

  /** Data-area bytes from byte `off` (cluster 2 at 0). */
  private async readData(off: number, dst: Uint8Array): Promise<void> {
    const cb = this.layout.clusterBytes;
    const pending: Promise<void>[] = [];
    let pos = 0;
    while (pos < dst.length) {
      const c = 2 + Math.floor((off + pos) / cb);
      const run = this.runAt(c);
      if (!run) {
        // Free clusters up to the next run.
        const i = this.runIndex(c);
        const nextRun = this.runs.slice(i, i + 2).find((r) => r.first > c);
        const stop = nextRun ? Math.min(dst.length, (nextRun.first - 2) * cb - off) : dst.length;
        dst.fill(0, pos, stop);
        pos = stop;
        continue;
      }
      const runStart = (run.first - 2) * cb;
      const within = off + pos - runStart;
      const n = Math.min(dst.length - pos, run.clusters * cb - within);
      const part = dst.subarray(pos, pos + n);
      if (run.dir) copyPadded(run.entries!, within, part);
      else {
        const inFile = Math.max(0, Math.min(n, run.size - within));
        part.fill(0, inFile);
        if (inFile > 0) pending.push(this.files.read(run.hostPath, within, part.subarray(0, inFile)));
      }
      pos += n;
    }
    await Promise.all(pending);
  }
}

/** Copy src from `from` into dst, zeros past its end. */
function copyPadded(src: Buffer, from: number, dst: Uint8Array): void {
  const n = Math.max(0, Math.min(dst.length, src.length - from));
  if (n > 0) dst.set(src.subarray(from, from + n));
  dst.fill(0, n);
}
