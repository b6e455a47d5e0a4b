// The write order qcow2's crash safety rests on (cache/table-cache.ts): an L2 table
// never reaches the disk with an entry whose refcount increment has not.
import { expect } from 'chai';
import { TableCache } from '../cache/table-cache.js';
import type { BlockNode, Extent } from '../drivers/types.js';

/** A file that records writes and can hold one back until released. */
class RecordingFile implements BlockNode {
  readonly readOnly = false;
  readonly name = 'recording';
  size = 1 << 20;
  writes: { offset: number; data: Buffer }[] = [];
  holdOffset: number | undefined;
  release: (() => void) | undefined;
  writeStarted: Promise<void>;
  private started!: () => void;
  constructor() {
    this.writeStarted = new Promise((r) => (this.started = r));
  }
  async read(_o: number, dst: Uint8Array): Promise<void> {
    dst.fill(0);
  }
  async write(offset: number, src: Uint8Array): Promise<void> {
    if (offset === this.holdOffset) {
      this.started();
      await new Promise<void>((r) => (this.release = r));
    }
    this.writes.push({ offset, data: Buffer.from(src) });
  }
  async flush(): Promise<void> {}
  async blockStatus(offset: number, length: number): Promise<Extent[]> {
    return [{ offset, length, kind: 'data' }];
  }
  async close(): Promise<void> {}
}

describe('qcow2 metadata write order (table cache)', function () {
  it('does not write an L2 change made while the refcount blocks it depends on were being written', async function () {
    const file = new RecordingFile();
    const opts = { file, tableSize: 512, maxBytes: 1 << 16, barriers: true };
    const refcounts = new TableCache({ ...opts, name: 'refcount' });
    const l2 = new TableCache({ ...opts, name: 'l2' });
    l2.dependOn(refcounts);
    const block = refcounts.getNew(0);
    const table = l2.getNew(4096);
    file.holdOffset = 0;
    const flushed = l2.flush();
    await file.writeStarted;
    // An allocation while the refcount block is on its way: count cluster 5, point at it.
    block.data[5] = 1;
    refcounts.markDirty(block);
    table.data[7] = 5;
    l2.markDirty(table);
    file.holdOffset = undefined;
    file.release!();
    await flushed;
    const l2Writes = file.writes.filter((w) => w.offset === 4096);
    expect(l2Writes).to.have.length(1);
    expect(l2Writes[0]!.data[7], 'L2 entry written before its refcount').to.equal(0);
    expect(table.dirty).to.equal(true);
    // The next flush writes the refcount block first, then the entry.
    await l2.flush();
    const order = file.writes.map((w) => `${w.offset}:${w.offset === 0 ? w.data[5] : w.data[7]}`);
    expect(order).to.deep.equal(['0:0', '4096:0', '0:1', '4096:5']);
  });
});
