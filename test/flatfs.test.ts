// The file tree (fs/flatfs.ts) in-process, over in-memory nodes: names resolved once
// to node ids, opens that know from the node whether the file can change, st_blocks
// counted from block status and counted again after a write.
import { expect } from 'chai';
import { constants as osc } from 'node:os';
import { FlatFs, type FlatFile } from '../fs/flatfs.js';
import { ROOT_ID } from '../fs/fuse.js';
import { errnoOf } from '../drivers/errors.js';
import type { BlockNode, Extent } from '../drivers/types.js';
import { GRANULE, lookup } from '../fs/read-map-table.js';

const E = osc.errno;
const BLOCK = 64 * 1024;

/** A disk that allocates 64 KiB blocks as they are written; counts its block-status calls. */
class MemoryDisk implements BlockNode {
  readonly readOnly = false;
  readonly data: Buffer;
  readonly allocated = new Set<number>();
  statusCalls = 0;
  constructor(readonly name: string, readonly size: number) {
    this.data = Buffer.alloc(size);
  }
  async read(offset: number, dst: Uint8Array): Promise<void> {
    dst.set(this.data.subarray(offset, offset + dst.length));
  }
  async write(offset: number, src: Uint8Array): Promise<void> {
    this.data.set(src, offset);
    for (let b = Math.floor(offset / BLOCK); b * BLOCK < offset + src.length; b++) this.allocated.add(b);
  }
  async flush(): Promise<void> {}
  async blockStatus(offset: number, length: number): Promise<Extent[]> {
    this.statusCalls++;
    const out: Extent[] = [];
    for (let pos = offset; pos < offset + length; ) {
      const end = Math.min(offset + length, (Math.floor(pos / BLOCK) + 1) * BLOCK);
      out.push({ offset: pos, length: end - pos, kind: this.allocated.has(Math.floor(pos / BLOCK)) ? 'data' : 'unallocated' });
      pos = end;
    }
    return out;
  }
  async close(): Promise<void> {}
}

function file(name: string, node: BlockNode, writable: boolean): FlatFile {
  return { name, node, writable, uid: 0, gid: 0, mode: 0o644, mtime: new Date(0) };
}

async function errno(p: Promise<unknown>): Promise<number> {
  return p.then(
    () => 0,
    (err: unknown) => errnoOf(err),
  );
}

describe('FlatFs: the file tree by node id', () => {
  it('resolves names once to fixed node ids, and refuses what is not there', async () => {
    const a = new MemoryDisk('a', 1 << 20);
    const b = new MemoryDisk('b', 2 << 20);
    const fsys = new FlatFs([file('a.raw', a, false), file('b.raw', b, false)], false);
    const ea = await fsys.lookup(ROOT_ID, 'a.raw');
    const eb = await fsys.lookup(ROOT_ID, 'b.raw');
    expect([ea.ino, eb.ino]).to.deep.equal([2, 3]);
    expect(eb.attr.size).to.equal(2 << 20);
    expect((await fsys.readdir(ROOT_ID)).map((d) => [d.name, d.ino])).to.deep.equal([['a.raw', 2], ['b.raw', 3]]);
    expect(await errno(fsys.lookup(ROOT_ID, 'c.raw'))).to.equal(E.ENOENT);
    expect(await errno(fsys.lookup(2, 'x'))).to.equal(E.ENOTDIR);
    expect(await errno(fsys.getattr(9))).to.equal(E.ENOENT);
    expect(((await fsys.getattr(ROOT_ID)).mode & 0o170000).toString(8)).to.equal('40000');
  });

  it('serves a mount over a regular file as node 1', async () => {
    const a = new MemoryDisk('a', 1 << 20);
    const fsys = new FlatFs([file('', a, true)], true);
    expect(((await fsys.getattr(ROOT_ID)).mode & 0o170000).toString(8)).to.equal('100000');
    expect(await errno(fsys.readdir(ROOT_ID))).to.equal(E.ENOTDIR);
    expect(await fsys.write(ROOT_ID, 1, Buffer.from('abc'), 3, 10)).to.equal(3);
    expect(a.data.subarray(10, 13).toString()).to.equal('abc');
  });

  it('opens by node id: writability from the file itself, without a getattr', async () => {
    const ro = new MemoryDisk('ro', 1 << 20);
    const rw = new MemoryDisk('rw', 1 << 20);
    const fsys = new FlatFs([file('ro.raw', ro, false), file('rw.raw', rw, true)], false);
    const O_RDWR = 2;
    expect(await fsys.open(2, 0)).to.include({ writable: false, size: 1 << 20 });
    expect(await errno(fsys.open(2, O_RDWR))).to.equal(E.EROFS);
    expect(await fsys.open(3, O_RDWR)).to.include({ writable: true });
    // No st_blocks count (block status) was needed to open.
    expect(ro.statusCalls + rw.statusCalls).to.equal(0);
  });

  it('counts st_blocks from block status once, and again after a write', async () => {
    const d = new MemoryDisk('d', 4 << 20);
    await d.write(0, Buffer.alloc(100));
    const fsys = new FlatFs([file('d.raw', d, true)], false);
    expect((await fsys.getattr(2)).blocks).to.equal(BLOCK / 512);
    const calls = d.statusCalls;
    await fsys.getattr(2);
    expect(d.statusCalls, 'the count is cached').to.equal(calls);
    await fsys.write(2, 1, Buffer.alloc(10, 1), 10, 3 * BLOCK + 5);
    expect((await fsys.getattr(2)).blocks).to.equal((2 * BLOCK) / 512);
    // SEEK_DATA/SEEK_HOLE from the same status.
    expect(await fsys.lseek(2, 1, BLOCK, 3)).to.equal(3 * BLOCK);
    expect(await fsys.lseek(2, 1, 3 * BLOCK, 4)).to.equal(4 * BLOCK);
  });

  it('makes no read map while a write is in flight, and never publishes what a write in flight changes', async () => {
    // The soak's zeros (session 6): a map made while a write was in flight counted -1
    // writes in flight at its end; during the next write it then published the window
    // the walk saw before that write landed, and a worker served zeros from it for good.
    const disk = new GatedDisk('g', 16 * GRANULE);
    const fsys = new FlatFs([file('g.raw', disk, true)], false);
    const ino = 2;
    const data = Buffer.alloc(4096, 0xac);
    const a = fsys.write(ino, 1, data, data.length, 0);
    expect(fsys.readMapFor(ino), 'no map while a write is in flight').to.equal(undefined);
    disk.allow();
    await a;
    const table = fsys.readMapFor(ino)?.table;
    expect(table).to.be.instanceOf(Int32Array);
    // Unwritten granules are published as zeros by a miss.
    fsys.mapMiss(ino, 8 * GRANULE, 4096);
    await settle();
    const hit = [0, 0];
    expect(lookup(table!, 8, hit) && hit[0]).to.equal(-1);
    // A write in flight: a miss publishes nothing, and its granule is gone from the map.
    disk.hold();
    const b = fsys.write(ino, 1, data, data.length, 8 * GRANULE);
    expect(lookup(table!, 8, hit), 'invalidated before the write').to.equal(false);
    fsys.mapMiss(ino, 8 * GRANULE, 4096);
    await settle();
    expect(lookup(table!, 8, hit), 'nothing published during the write').to.equal(false);
    disk.allow();
    await b;
    // After it, a miss publishes what the disk now has (data without a host offset here: not served by workers).
    fsys.mapMiss(ino, 8 * GRANULE, 4096);
    await settle();
    expect(lookup(table!, 8, hit) && hit[0], 'written granule never served as zeros').to.not.equal(-1);
    expect(lookup(table!, 9, hit) && hit[0]).to.equal(-1);
  });
});

/** A MemoryDisk with a host descriptor (its unallocated blocks go into a read map) whose writes wait while closed. */
class GatedDisk extends MemoryDisk {
  readonly hostFd = 99;
  private gate: Promise<void> | undefined;
  private release: (() => void) | undefined;
  constructor(name: string, size: number) {
    super(name, size);
    this.hold();
  }
  hold(): void {
    this.gate = new Promise((r) => (this.release = r));
  }
  allow(): void {
    this.release?.();
  }
  override async write(offset: number, src: Uint8Array): Promise<void> {
    await this.gate;
    return super.write(offset, src);
  }
}

async function settle(): Promise<void> {
  for (let k = 0; k < 10; k++) await new Promise((r) => setImmediate(r));
}

