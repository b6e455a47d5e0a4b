// What was written to a fat:rw: disk, sector by sector, in an unlinked temporary
// file (QEMU keeps its own in a temporary qcow2): the virtual disk under it never
// changes, so the write-back can always compare what is with what was.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { IoError } from '../../errors.js';
import { SECTOR } from './layout.js';

/** Sectors per bitmap chunk: 64 KiB of disk per 16-byte entry of the map. */
const CHUNK = 128;

type Bitmaps = Map<number, Uint8Array>;

function mark(map: Bitmaps, sector: number): void {
  const k = Math.floor(sector / CHUNK);
  let b = map.get(k);
  if (!b) map.set(k, (b = new Uint8Array(CHUNK / 8)));
  const i = sector % CHUNK;
  b[i >> 3]! |= 1 << (i & 7);
}

function has(map: Bitmaps, sector: number): boolean {
  const b = map.get(Math.floor(sector / CHUNK));
  if (!b) return false;
  const i = sector % CHUNK;
  return (b[i >> 3]! & (1 << (i & 7))) !== 0;
}

export class Overlay {
  private readonly written: Bitmaps = new Map();
  /** Sectors written since the last takeFresh(). */
  private fresh: Bitmaps = new Map();

  private constructor(private readonly fd: number) {}

  static async create(size: number): Promise<Overlay> {
    const dir = await fs.promises.mkdtemp(path.join(os.tmpdir(), 'tsmount-vvfat-'));
    const file = path.join(dir, 'overlay');
    const fd = fs.openSync(file, fs.constants.O_RDWR | fs.constants.O_CREAT | fs.constants.O_EXCL, 0o600);
    // Nobody else needs to see it; it goes away with the descriptor.
    fs.rmSync(dir, { recursive: true, force: true });
    fs.ftruncateSync(fd, size);
    return new Overlay(fd);
  }

  /**
   * Whole sectors (the node asks for sector alignment). `fresh` false: a copy the
   * write-back makes itself, not a change to apply.
   */
  async write(offset: number, src: Uint8Array, fresh = true): Promise<void> {
    let done = 0;
    while (done < src.length) {
      done += await new Promise<number>((resolve, reject) =>
        fs.write(this.fd, src, done, src.length - done, offset + done, (err, n) => (err ? reject(new IoError(`vvfat overlay: write failed: ${err.code ?? String(err)}`)) : resolve(n))),
      );
    }
    for (let s = offset / SECTOR; s < (offset + src.length) / SECTOR; s++) {
      mark(this.written, s);
      if (fresh) mark(this.fresh, s);
    }
  }

  /** Read, the written sectors from the overlay and the rest from `base`. */
  async readOver(offset: number, dst: Uint8Array, base: (offset: number, dst: Uint8Array) => Promise<void>): Promise<void> {
    const first = Math.floor(offset / SECTOR);
    const last = Math.ceil((offset + dst.length) / SECTOR);
    const pending: Promise<void>[] = [];
    let s = first;
    while (s < last) {
      const mine = has(this.written, s);
      let e = s + 1;
      while (e < last && has(this.written, e) === mine) e++;
      const from = Math.max(offset, s * SECTOR);
      const to = Math.min(offset + dst.length, e * SECTOR);
      const part = dst.subarray(from - offset, to - offset);
      pending.push(mine ? this.pread(from, part) : base(from, part));
      s = e;
    }
    await Promise.all(pending);
  }

  /** The sectors written since the last call; resets. */
  takeFresh(): Bitmaps {
    const f = this.fresh;
    this.fresh = new Map();
    return f;
  }

  /** Put back what takeFresh() returned (a write-back that did not finish). */
  restoreFresh(f: Bitmaps): void {
    for (const [k, b] of f) {
      const mine = this.fresh.get(k);
      if (mine) for (let i = 0; i < b.length; i++) mine[i]! |= b[i]!;
      else this.fresh.set(k, b);
    }
  }

  private async pread(offset: number, dst: Uint8Array): Promise<void> {
    let done = 0;
    while (done < dst.length) {
      const n = await new Promise<number>((resolve, reject) =>
        fs.read(this.fd, dst, done, dst.length - done, offset + done, (err, bytes) => (err ? reject(new IoError(`vvfat overlay: read failed: ${err.code ?? String(err)}`)) : resolve(bytes))),
      );
      if (n === 0) break;
      done += n;
    }
    dst.fill(0, done);
  }

  async close(): Promise<void> {
    await new Promise<void>((resolve) => fs.close(this.fd, () => resolve()));
  }
}

export { has as sectorIn, CHUNK as SECTORS_PER_CHUNK };
export type { Bitmaps };
