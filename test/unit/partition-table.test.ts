// The partition table parser on hand-made (and hostile) tables, and the window filter
// that shows one partition: offsets shifted, nothing outside the window reachable.
import { expect } from 'chai';
import { crc32 } from 'node:zlib';
import { readPartitionTable, MAX_GPT_ENTRIES, MAX_LOGICAL, type Reader } from '../../drivers/partition/table.js';
import { WindowFilter } from '../../drivers/filters/window.js';
import { Filter } from '../../drivers/filters/filter.js';
import type { BlockNode, Extent } from '../../drivers/types.js';
import { MemoryNode } from '../helpers/memory-node.js';
import { pattern } from '../helpers/images.js';

const S = 512;
const MiB = 1 << 20;

function reader(disk: Buffer): { read: Reader; bytes: () => number } {
  let bytes = 0;
  return {
    read: async (offset, length) => {
      expect(offset + length, 'reads stay inside the disk').to.be.at.most(disk.length);
      bytes += length;
      return disk.subarray(offset, offset + length);
    },
    bytes: () => bytes,
  };
}

/** An MBR (or EBR) sector at `at` with the given entries (start and count in sectors). */
function mbr(disk: Buffer, at: number, entries: { type: number; start: number; count: number }[]): void {
  entries.forEach((e, i) => {
    const o = at + 446 + 16 * i;
    disk[o + 4] = e.type;
    disk.writeUInt32LE(e.start, o + 8);
    disk.writeUInt32LE(e.count, o + 12);
  });
  disk.writeUInt16LE(0xaa55, at + 510);
}

/** A GPT with `entries` (first and last LBA, name) in an array of `count` entries. */
function gpt(size: number, entries: { first: number; last: number; name?: string }[], count = 128, entrySize = 128): Buffer {
  const disk = Buffer.alloc(size);
  mbr(disk, 0, [{ type: 0xee, start: 1, count: size / S - 1 }]);
  const array = Buffer.alloc(count * entrySize);
  entries.forEach((e, i) => {
    const o = i * entrySize;
    array.fill(0x11, o, o + 16); // a non-zero type GUID
    array.writeBigUInt64LE(BigInt(e.first), o + 32);
    array.writeBigUInt64LE(BigInt(e.last), o + 40);
    if (e.name) array.write(e.name, o + 56, 'utf16le');
  });
  array.copy(disk, 2 * S, 0, Math.min(array.length, disk.length - 2 * S));
  const h = Buffer.alloc(92);
  h.write('EFI PART', 0, 'latin1');
  h.writeUInt32LE(0x10000, 8);
  h.writeUInt32LE(92, 12);
  h.writeBigUInt64LE(1n, 24);
  h.writeBigUInt64LE(2n, 72);
  h.writeUInt32LE(count, 80);
  h.writeUInt32LE(entrySize, 84);
  h.writeUInt32LE(crc32(array), 88);
  h.writeUInt32LE(crc32(h), 16);
  h.copy(disk, S);
  return disk;
}

describe('partition table parser (unit, hand-made tables)', function () {
  it('reads primary and logical MBR partitions, numbering logical ones from 5', async function () {
    const disk = Buffer.alloc(64 * MiB);
    mbr(disk, 0, [
      { type: 0x83, start: 2048, count: 2048 },
      { type: 0x05, start: 8192, count: 32768 },
    ]);
    mbr(disk, 8192 * S, [{ type: 0x83, start: 2048, count: 4096 }, { type: 0x05, start: 8192, count: 8192 }]);
    mbr(disk, (8192 + 8192) * S, [{ type: 0x07, start: 2048, count: 2048 }]);
    const t = await readPartitionTable(reader(disk).read, disk.length);
    expect(t.scheme).to.equal('mbr');
    expect(t.warnings).to.deep.equal([]);
    expect(t.partitions.map((p) => [p.number, p.start / S, p.length / S, p.type])).to.deep.equal([
      [1, 2048, 2048, '83'],
      [5, 10240, 4096, '83'],
      [6, 18432, 2048, '07'],
    ]);
  });

  it('leaves out entries past the end of the disk and entries overlapping earlier ones', async function () {
    const disk = Buffer.alloc(8 * MiB);
    mbr(disk, 0, [
      { type: 0x83, start: 2048, count: 4096 },
      { type: 0x83, start: 4096, count: 2048 }, // inside partition 1
      { type: 0x83, start: 8192, count: 0xffffffff }, // far past the end
      { type: 0x83, start: 0xffffffff, count: 0xffffffff },
    ]);
    const t = await readPartitionTable(reader(disk).read, disk.length);
    expect(t.partitions.map((p) => p.number)).to.deep.equal([1]);
    expect(t.warnings.join('\n')).to.match(/partition 2 overlaps partition 1/).and.match(/partition 3 reaches past the end/).and.match(/partition 4 reaches past the end/);
  });

  it('stops an EBR chain that loops, and one longer than the cap, after reading little', async function () {
    // Two EBRs whose next links point at each other (relative to the extended partition).
    const loop = Buffer.alloc(8 * MiB);
    mbr(loop, 0, [{ type: 0x05, start: 2048, count: 8192 }]);
    mbr(loop, 2048 * S, [{ type: 0x83, start: 1, count: 1 }, { type: 0x05, start: 4, count: 1 }]);
    mbr(loop, 2052 * S, [{ type: 0x83, start: 1, count: 1 }, { type: 0x05, start: 4, count: 1 }]);
    const r = reader(loop);
    const t = await readPartitionTable(r.read, loop.length);
    expect(t.partitions.map((p) => p.number)).to.deep.equal([5, 6]);
    expect(t.warnings.join('\n')).to.match(/loops back/);
    expect(r.bytes()).to.be.at.most(4 * S);

    // A chain of more EBRs than the cap, each a step further: stopped at the cap.
    const long = Buffer.alloc(8 * MiB);
    mbr(long, 0, [{ type: 0x05, start: 2048, count: 12000 }]);
    for (let i = 0; i < 2 * MAX_LOGICAL; i++) mbr(long, (2048 + 4 * i) * S, [{ type: 0x83, start: 1, count: 1 }, { type: 0x05, start: 4 * (i + 1), count: 1 }]);
    const rl = reader(long);
    const tl = await readPartitionTable(rl.read, long.length);
    expect(tl.partitions).to.have.length(MAX_LOGICAL);
    expect(tl.warnings.join('\n')).to.match(/more than 128 logical/);
    expect(rl.bytes()).to.be.at.most((MAX_LOGICAL + 1) * S);
  });

  it('reads GPT entries with their names, and caps or refuses hostile headers', async function () {
    const disk = gpt(16 * MiB, [{ first: 2048, last: 4095, name: 'boot' }, { first: 4096, last: 8191 }, { first: 6000, last: 7000 }, { first: 9000, last: 1e12 }]);
    const t = await readPartitionTable(reader(disk).read, disk.length);
    expect(t.scheme).to.equal('gpt');
    expect(t.partitions.map((p) => [p.number, p.start / S, p.length / S, p.name])).to.deep.equal([
      [1, 2048, 2048, 'boot'],
      [2, 4096, 4096, undefined],
    ]);
    expect(t.warnings.join('\n')).to.match(/partition 3 overlaps partition 2/).and.match(/partition 4 reaches past the end/);

    // A header claiming 2^32-1 entries: at most MAX_GPT_ENTRIES are read (and no checksum over the rest).
    const huge = gpt(16 * MiB, [{ first: 2048, last: 4095 }], 128);
    huge.writeUInt32LE(0xffffffff, S + 80);
    const hh = huge.subarray(S, S + 92);
    hh.writeUInt32LE(0, 16);
    hh.writeUInt32LE(crc32(hh), 16);
    const r = reader(huge);
    const th = await readPartitionTable(r.read, huge.length);
    expect(th.partitions.map((p) => p.number)).to.deep.equal([1]);
    expect(th.warnings.join('\n')).to.match(/only the first 1024/);
    expect(r.bytes()).to.be.at.most(2 * S + MAX_GPT_ENTRIES * 128);

    // Entry size out of range, array past the end, a broken checksum: no partitions, one line why.
    const bad = (patch: (h: Buffer) => void, fixCrc = true): Buffer => {
      const d = gpt(4 * MiB, [{ first: 2048, last: 4095 }]);
      const h = d.subarray(S, S + 92);
      patch(h);
      if (fixCrc) {
        h.writeUInt32LE(0, 16);
        h.writeUInt32LE(crc32(h), 16);
      }
      return d;
    };
    for (const [d, why] of [
      [bad((h) => h.writeUInt32LE(1 << 30, 84)), /entry size/],
      [bad((h) => h.writeBigUInt64LE(1n << 60n, 72)), /outside the disk/],
      [bad((h) => h.writeUInt32LE(5, 88)), /entry array checksum/],
      [bad((h) => h.writeUInt32LE(5, 80), false), /header checksum/],
    ] as [Buffer, RegExp][]) {
      const tb = await readPartitionTable(reader(d).read, d.length);
      expect(tb.partitions).to.deep.equal([]);
      expect(tb.warnings.join('\n')).to.match(why);
    }
  });

  it('finds nothing on a disk without a table, or one shorter than a sector', async function () {
    expect((await readPartitionTable(reader(Buffer.alloc(4096)).read, 4096)).scheme).to.equal('none');
    expect((await readPartitionTable(reader(Buffer.alloc(100)).read, 100)).scheme).to.equal('none');
  });
});

describe('WindowFilter (unit, in-memory node)', function () {
  /** A node whose block status says data in the first half, unallocated in the second, with a backing node. */
  class Layered extends MemoryNode {
    readonly backing: BlockNode = new MemoryNode(pattern(64 * 1024, 2), { name: 'base' });
    override async blockStatus(offset: number, length: number): Promise<Extent[]> {
      const half = this.size / 2;
      return [
        { offset: 0, length: half, kind: 'data' as const },
        { offset: half, length: half, kind: 'unallocated' as const },
      ].filter((e) => e.offset < offset + length && offset < e.offset + e.length);
    }
  }

  it('shifts reads, writes, zeroes and block status by its offset, and never closes the disk', async function () {
    const disk = new Layered(pattern(128 * 1024, 1));
    const w = new WindowFilter(disk, 48 * 1024, 32 * 1024, 'p1');
    expect(w.size).to.equal(32 * 1024);
    expect(w.name).to.equal('memory (p1)');
    const b = Buffer.alloc(1024);
    await w.read(1000, b);
    expect(b.equals(disk.data.subarray(48 * 1024 + 1000, 48 * 1024 + 2024))).to.equal(true);
    await w.write(0, Buffer.alloc(512, 7));
    expect(disk.data[48 * 1024]).to.equal(7);
    await w.zero!(512, 512, false);
    expect(disk.ops.at(-1)).to.deep.equal({ op: 'zero', offset: 48 * 1024 + 512, length: 512, unmap: false });
    expect(await w.blockStatus(0, 32 * 1024)).to.deep.equal([
      { offset: 0, length: 16 * 1024, kind: 'data' },
      { offset: 16 * 1024, length: 16 * 1024, kind: 'unallocated' },
    ]);
    expect(w.truncate).to.equal(undefined);
    // The backing layer is seen through the same window; where it is shorter, the window shrinks.
    expect(w.backing!.size).to.equal(16 * 1024);
    const bb = Buffer.alloc(100);
    await w.backing!.read(0, bb);
    expect(bb.equals(pattern(64 * 1024, 2).subarray(48 * 1024, 48 * 1024 + 100))).to.equal(true);
    await w.close();
    expect(disk.closed).to.equal(false);
    expect(w).to.be.instanceOf(Filter);
  });

  it('refuses a window outside the node', function () {
    const disk = new MemoryNode(4096);
    expect(() => new WindowFilter(disk, 4096 - 511, 512, 'p1')).to.throw(RangeError);
    expect(() => new WindowFilter(disk, -1, 10, 'p1')).to.throw(RangeError);
  });
});
