// The shared base of the table-mapped format nodes: reads through the runs the
// driver maps, writes in place without the lock, flush and close once.
import { expect } from 'chai';
import type { BlockNode } from '../drivers/types.js';
import { MappedNode } from '../drivers/format/mapped-node.js';
import type { MappedRun } from '../drivers/format/mapped.js';

/** A file in memory that counts its flushes and closes. */
function memoryFile(size: number): BlockNode & { data: Buffer; flushes: number; closes: number } {
  const data = Buffer.alloc(size);
  return {
    data,
    flushes: 0,
    closes: 0,
    size,
    readOnly: false,
    name: 'mem.img',
    async read(offset, dst) {
      dst.set(data.subarray(offset, offset + dst.length));
    },
    async write(offset, src) {
      data.set(src, offset);
    },
    async flush() {
      this.flushes++;
    },
    async blockStatus(offset, length) {
      return [{ offset, length, kind: 'data' }];
    },
    async close() {
      this.closes++;
    },
  };
}

/** Blocks of 16 bytes: block b at host 64 + 16 * b once allocated. */
class TestNode extends MappedNode {
  readonly metadata = undefined;
  readonly allocated = new Set<number>();
  allocations = 0;

  mapRange(offset: number, length: number): Promise<MappedRun[]> {
    return this.mapBlocks(offset, length, 16, async (b) => (this.allocated.has(b) ? 64 + 16 * b : 'unallocated'));
  }

  protected async writeLocked(offset: number, src: Uint8Array): Promise<void> {
    for (let pos = offset; pos < offset + src.length; ) {
      const b = Math.floor(pos / 16);
      const next = Math.min(offset + src.length, (b + 1) * 16);
      if (!this.allocated.has(b)) {
        this.allocations++;
        await this.barrier();
        this.allocated.add(b);
      }
      await this.file.write(64 + pos, src.subarray(pos - offset, next - offset));
      pos = next;
    }
  }
}

describe('MappedNode (the base of the table-mapped formats)', () => {
  it('closes once: a second close neither flushes nor closes the file again', async () => {
    const file = memoryFile(1024);
    const node = new TestNode({ file, size: 256, readOnly: false, barriers: true });
    await node.close();
    await node.close();
    expect(file.closes).to.equal(1);
    expect(file.flushes).to.equal(1);
  });

  it('does not flush a read-only image, on flush or on close', async () => {
    const file = memoryFile(1024);
    const node = new TestNode({ file, size: 256, readOnly: true, barriers: true });
    await node.flush();
    await node.close();
    expect(file.flushes).to.equal(0);
    expect(file.closes).to.equal(1);
  });

  it('allocates under the lock, writes in place afterwards, reads back and reports status', async () => {
    const file = memoryFile(1024);
    const node = new TestNode({ file, size: 256, readOnly: false, barriers: false });
    await node.write(20, Buffer.from('hello'));
    expect(node.allocations).to.equal(1);
    await node.write(16, Buffer.from('ab'));
    expect(node.allocations).to.equal(1);
    const out = Buffer.alloc(32);
    await node.read(0, out);
    expect(out.subarray(16, 25).toString('latin1')).to.equal('ab\0\0hello');
    expect(out.subarray(0, 16).every((b) => b === 0)).to.equal(true);
    expect(await node.blockStatus(0, 48)).to.deep.equal([
      { offset: 0, length: 16, kind: 'unallocated' },
      { offset: 16, length: 16, kind: 'data', host: 80 },
      { offset: 32, length: 16, kind: 'unallocated' },
    ]);
    expect(file.flushes).to.equal(0);
  });

  it('flushes between data and table only when barriers are on', async () => {
    const file = memoryFile(1024);
    const node = new TestNode({ file, size: 256, readOnly: false, barriers: true });
    await node.write(0, Buffer.from('x'));
    expect(file.flushes).to.equal(1);
    await node.flush();
    expect(file.flushes).to.equal(2);
  });
});
