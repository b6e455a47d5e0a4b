// The preallocate filter against an in-memory file that grows: a write past the end of
// the data allocates zeros `size` beyond it, on the alignment; above the filter the file
// is as long as its data; close cuts it back; a write of zeros over data written since
// the last preallocation is never skipped (QEMU's filter would skip it).
import { expect } from 'chai';
import { PreallocateFilter } from '../../drivers/filters/preallocate.js';
import { MemoryNode } from '../helpers/memory-node.js';
import { pattern } from '../helpers/images.js';

const KiB = 1024;
const MiB = 1 << 20;

/** A file that grows with writes and zeros past its end, as a regular file does. */
class GrowingFile extends MemoryNode {
  readonly allocations: [number, number][] = [];

  private grow(end: number): void {
    if (end > this.data.length) this.data = Buffer.concat([this.data, Buffer.alloc(end - this.data.length)]);
  }

  override async write(offset: number, src: Uint8Array): Promise<void> {
    this.grow(offset + src.length);
    return super.write(offset, src);
  }

  async allocateZeros(offset: number, length: number): Promise<boolean> {
    this.allocations.push([offset, length]);
    this.grow(offset + length);
    this.data.fill(0, offset, offset + length);
    return true;
  }
}

describe('PreallocateFilter (unit, in-memory file)', function () {
  it('allocates prealloc-size past a write beyond the end, on prealloc-align; shows only the data; cuts back at close', async function () {
    const file = new GrowingFile(MiB);
    const f = new PreallocateFilter(file, { size: 4 * MiB, align: MiB });
    await f.write(MiB + 100, pattern(1000, 1));
    expect(file.allocations).to.deep.equal([[MiB, 5 * MiB]]);
    expect(file.size).to.equal(6 * MiB);
    expect(f.size).to.equal(MiB + 1100);
    // Inside the allocation: nothing more.
    await f.write(2 * MiB, pattern(4096, 2));
    expect(file.allocations).to.have.length(1);
    expect(f.size).to.equal(2 * MiB + 4096);
    await f.close();
    expect(file.size).to.equal(2 * MiB + 4096);
  });

  it('a write of zeros past the end merges with the allocation; one over data written since is never skipped', async function () {
    const file = new GrowingFile(MiB);
    const f = new PreallocateFilter(file, { size: MiB, align: 512 });
    // Zeros past the end: the allocation covers them, nothing else reaches the file.
    expect(await f.allocateZeros!(MiB, 64 * KiB)).to.equal(true);
    expect(file.allocations).to.deep.equal([[MiB, MiB + 64 * KiB]]);
    // Data inside the data's end, past where the known zeros began.
    await f.write(MiB + 4 * KiB, pattern(4 * KiB, 3));
    // Zeros over that data and past the end: they must reach the file.
    expect(await f.allocateZeros!(MiB + 4 * KiB, 128 * KiB)).to.equal(true);
    const back = Buffer.alloc(4 * KiB);
    await f.read(MiB + 4 * KiB, back);
    expect(back.equals(Buffer.alloc(4 * KiB)), 'the data was zeroed').to.equal(true);
    // Zeros wholly past everything written: known zeros, skipped.
    const before = file.allocations.length;
    expect(await f.allocateZeros!(MiB + 256 * KiB, 64 * KiB)).to.equal(true);
    expect(file.allocations).to.have.length(before);
  });

  it('truncate: growth with falloc inside the allocation moves only the data\'s end; any other first gives the allocation back', async function () {
    const file = new GrowingFile(MiB);
    const f = new PreallocateFilter(file, { size: 4 * MiB, align: MiB });
    await f.write(MiB, pattern(512, 4));
    expect(file.size).to.equal(6 * MiB);
    await f.truncate!(3 * MiB, { prealloc: 'falloc' });
    expect(f.size).to.equal(3 * MiB);
    expect(file.ops.filter((o) => o.op === 'truncate')).to.have.length(0);
    await f.truncate!(8 * MiB);
    expect(file.ops.filter((o) => o.op === 'truncate')).to.deep.equal([
      { op: 'truncate', size: 3 * MiB },
      { op: 'truncate', size: 8 * MiB },
    ]);
    expect(f.size).to.equal(8 * MiB);
  });
});
