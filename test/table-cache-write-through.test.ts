// The write-through side of the one metadata table cache (used by qcow, qed, vmdk
// and the paged block maps): pinning while a write is in flight, loads that raced
// a change, partial pages, put and peek.
import { expect } from 'chai';
import type { BlockNode } from '../drivers/types.js';
import { TableCache } from '../cache/table-cache.js';

/** A file in memory whose reads and writes can be held until released. */
function slowFile(size: number): BlockNode & { data: Buffer; reads: number; holdWrites: boolean; release(): void } {
  const data = Buffer.alloc(size);
  let waiting: (() => void)[] = [];
  const f = {
    data,
    reads: 0,
    holdWrites: false,
    size,
    readOnly: false,
    name: 'mem.img',
    release(): void {
      const w = waiting;
      waiting = [];
      w.forEach((r) => r());
    },
    async read(offset: number, dst: Uint8Array): Promise<void> {
      f.reads++;
      dst.set(data.subarray(offset, offset + dst.length));
    },
    async write(offset: number, src: Uint8Array): Promise<void> {
      if (f.holdWrites) await new Promise<void>((r) => waiting.push(r));
      data.set(src, offset);
    },
    async flush(): Promise<void> {},
    async blockStatus(offset: number, length: number) {
      return [{ offset, length, kind: 'data' as const }];
    },
    async close(): Promise<void> {},
  };
  return f;
}

describe('TableCache write-through', () => {
  it('writes through to the cached table and the file', async () => {
    const file = slowFile(4096);
    const cache = new TableCache({ name: 't', file, tableSize: 512, maxBytes: 4096, barriers: false });
    const t = await cache.get(512);
    await cache.writeThrough(512, 8, Buffer.from([1, 2, 3, 4]));
    expect([...t.data.subarray(8, 12)]).to.deep.equal([1, 2, 3, 4]);
    expect([...file.data.subarray(520, 524)]).to.deep.equal([1, 2, 3, 4]);
    expect(t.dirty).to.equal(false);
    expect(cache.hasDirty()).to.equal(false);
  });

  it('keeps a table pinned while its write is in flight, though the LRU would evict it', async () => {
    const file = slowFile(64 * 1024);
    const cache = new TableCache({ name: 't', file, tableSize: 512, maxBytes: 0, barriers: false, minTables: 2 });
    await cache.get(0);
    file.holdWrites = true;
    const w = cache.writeThrough(0, 0, Buffer.from([9]));
    // Push table 0 out of a two-table LRU.
    for (let k = 1; k <= 4; k++) await cache.get(k * 512);
    const reads = file.reads;
    const again = await cache.get(0);
    expect(file.reads).to.equal(reads);
    expect(again.data[0]).to.equal(9);
    file.release();
    await w;
  });

  it('does not cache nor hand out a load that raced a change', async () => {
    const file = slowFile(4096);
    const cache = new TableCache({ name: 't', file, tableSize: 512, maxBytes: 4096, barriers: false });
    file.data[0] = 1;
    const load = cache.get(0);
    // The entry reaches the file (and nothing cached yet) while the load is in flight.
    file.data[0] = 2;
    cache.patch(0, 0, Buffer.from([2]));
    await load;
    expect((await cache.get(0)).data[0]).to.equal(2);
  });

  it('reads a short last page, and put caches a table that is on disk already', async () => {
    const file = slowFile(4096);
    const cache = new TableCache({ name: 't', file, tableSize: 512, maxBytes: 4096, barriers: false });
    expect((await cache.get(1024, 100)).data.length).to.equal(100);
    const reads = file.reads;
    cache.put(2048, Buffer.alloc(512, 7));
    expect((await cache.get(2048)).data[5]).to.equal(7);
    expect(cache.peek(2048)?.data[0]).to.equal(7);
    expect(file.reads).to.equal(reads);
  });

  it('drops its copy when the write fails, so the next get reads the file', async () => {
    const file = slowFile(4096);
    const cache = new TableCache({ name: 't', file, tableSize: 512, maxBytes: 4096, barriers: false });
    await cache.get(0);
    file.write = () => Promise.reject(new Error('EIO'));
    let failed = false;
    await cache.writeThrough(0, 0, Buffer.from([5])).catch(() => (failed = true));
    expect(failed).to.equal(true);
    expect(cache.peek(0)).to.equal(undefined);
    expect((await cache.get(0)).data[0]).to.equal(0);
  });
});
