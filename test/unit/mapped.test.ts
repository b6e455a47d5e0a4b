// The mapped-format helper against in-memory nodes and a mapper that answers from a
// table: contiguous data is read with one request, zero and unallocated runs, the
// backing node (and zeros past its end), custom runs, block status, in-place writes.
import { expect } from 'chai';
import { mappedStatus, pushRun, readMapped, writeInPlace, type MappedRun, type Mapper } from '../../drivers/format/mapped.js';
import { MemoryNode } from '../helpers/memory-node.js';
import { pattern } from '../helpers/images.js';

const C = 4096;

/** A mapper over fixed clusters: map[i] is a host cluster, 'zero', 'none' (unallocated) or 'custom'. */
function tableMapper(map: (number | 'zero' | 'none' | 'custom')[], file?: MemoryNode): Mapper & { calls: number } {
  const m = {
    calls: 0,
    async mapRange(offset: number, length: number): Promise<MappedRun[]> {
      m.calls++;
      const out: MappedRun[] = [];
      for (let at = offset; at < offset + length; ) {
        const i = Math.floor(at / C);
        const n = Math.min((i + 1) * C, offset + length) - at;
        const e = map[i]!;
        const within = at - i * C;
        if (typeof e === 'number') pushRun(out, { kind: 'data', offset: at, length: n, host: e * C + within, ...(file ? { file } : {}) });
        else if (e === 'zero') pushRun(out, { kind: 'zero', offset: at, length: n });
        else if (e === 'none') pushRun(out, { kind: 'unallocated', offset: at, length: n });
        else pushRun(out, { kind: 'custom', offset: at, length: n, read: async (dst) => void dst.fill(0xcc) });
        at += n;
      }
      return out;
    },
  };
  return m;
}

describe('mapped formats helper (unit, in-memory nodes)', function () {
  const image = pattern(16 * C, 1);
  const backingBytes = pattern(5 * C, 2); // shorter than the 8-cluster disk
  const map: (number | 'zero' | 'none' | 'custom')[] = [3, 4, 5, 'zero', 'none', 9, 'custom', 'none'];

  function expected(): Buffer {
    const out = Buffer.alloc(8 * C);
    map.forEach((e, i) => {
      const dst = out.subarray(i * C, (i + 1) * C);
      if (typeof e === 'number') image.copy(dst, 0, e * C, (e + 1) * C);
      else if (e === 'none' && i * C < backingBytes.length) backingBytes.copy(dst, 0, i * C, Math.min((i + 1) * C, backingBytes.length));
      else if (e === 'custom') dst.fill(0xcc);
    });
    return out;
  }

  it('reads every kind of run, with one request per stretch contiguous on disk, and zeros past the backing node', async function () {
    const file = new MemoryNode(image);
    const backing = new MemoryNode(backingBytes);
    const dst = Buffer.alloc(8 * C);
    await readMapped(tableMapper(map), file, backing, 0, dst);
    expect(dst.equals(expected())).to.equal(true);
    // Clusters 0-2 are host clusters 3-5: one read; cluster 5 is another.
    expect(file.ops).to.deep.equal([
      { op: 'read', offset: 3 * C, length: 3 * C },
      { op: 'read', offset: 9 * C, length: C },
    ]);
    // Cluster 4 reads from the backing node; cluster 7 lies past its end and reads no bytes from it.
    expect(backing.ops).to.deep.equal([{ op: 'read', offset: 4 * C, length: C }]);
  });

  it('reads unaligned requests inside and across runs as the whole read does', async function () {
    const file = new MemoryNode(image);
    const backing = new MemoryNode(backingBytes);
    const want = expected();
    for (const [off, len] of [
      [1, 10],
      [C - 3, 7],
      [2 * C + 100, 3 * C],
      [5 * C - 1, 2 * C + 2],
    ] as const) {
      const dst = Buffer.alloc(len, 0x77);
      await readMapped(tableMapper(map), file, backing, off, dst);
      expect(dst.equals(want.subarray(off, off + len)), `${off}+${len}`).to.equal(true);
    }
  });

  it('reads unallocated runs as zeros without a backing node', async function () {
    const dst = Buffer.alloc(C, 0x55);
    await readMapped(tableMapper(['none']), new MemoryNode(C), undefined, 0, dst);
    expect(dst.every((b) => b === 0)).to.equal(true);
  });

  it('reads data from the file a run names instead of the image file', async function () {
    const extent = new MemoryNode(pattern(4 * C, 3));
    const image0 = new MemoryNode(4 * C);
    const dst = Buffer.alloc(2 * C);
    await readMapped(tableMapper([1, 2], extent), image0, undefined, 0, dst);
    expect(dst.equals(extent.data.subarray(C, 3 * C))).to.equal(true);
    expect(image0.ops).to.deep.equal([]);
  });

  it('reports block status of this layer, merging neighbours of one kind (data only where the host offsets continue)', async function () {
    expect(await mappedStatus(tableMapper(map), 0, 8 * C)).to.deep.equal([
      { offset: 0, length: 3 * C, kind: 'data', host: 3 * C },
      { offset: 3 * C, length: C, kind: 'zero' },
      { offset: 4 * C, length: C, kind: 'unallocated' },
      { offset: 5 * C, length: C, kind: 'data', host: 9 * C },
      // A custom run (decoded, no place in the file) has no host offset.
      { offset: 6 * C, length: C, kind: 'data' },
      { offset: 7 * C, length: C, kind: 'unallocated' },
    ]);
  });

  it('pushRun extends only runs of one kind that continue each other on one file', function () {
    const out: MappedRun[] = [];
    pushRun(out, { kind: 'data', offset: 0, length: 10, host: 100 });
    pushRun(out, { kind: 'data', offset: 10, length: 5, host: 110 });
    pushRun(out, { kind: 'data', offset: 15, length: 5, host: 200 });
    pushRun(out, { kind: 'zero', offset: 20, length: 5 });
    pushRun(out, { kind: 'zero', offset: 25, length: 5 });
    expect(out.map((r) => [r.kind, r.offset, r.length])).to.deep.equal([
      ['data', 0, 15],
      ['data', 15, 5],
      ['zero', 20, 10],
    ]);
  });

  it('writes in place only when every run is allocated data, and writes nothing otherwise', async function () {
    const file = new MemoryNode(image);
    const data = pattern(C + 100, 4);
    expect(await writeInPlace(tableMapper(map), file, 50, data)).to.equal(true);
    expect(file.data.subarray(3 * C + 50, 3 * C + 50 + data.length).equals(data)).to.equal(true);
    const before = Buffer.from(file.data);
    expect(await writeInPlace(tableMapper(map), file, 2 * C, Buffer.alloc(2 * C, 1))).to.equal(false);
    expect(file.data.equals(before)).to.equal(true);
  });
});
