// The metadata table cache against an in-memory file: hits and shared loads, dirty
// tracking, changes made during a write-out staying dirty, dependency-ordered flush
// with barriers, dirty tables pushed out of the LRU kept and written, errors reported.
import { expect } from 'chai';
import { TableCache } from '../../cache/table-cache.js';
import { MemoryNode, latch } from '../helpers/memory-node.js';
import { pattern } from '../helpers/images.js';

const T = 512;

function make(file: MemoryNode, name = 'l2', maxTables = 8, barriers = true): TableCache {
  return new TableCache({ name, file, tableSize: T, maxBytes: maxTables * T, barriers });
}

const tick = (): Promise<void> => new Promise((r) => setImmediate(r));

describe('TableCache (unit, in-memory file)', function () {
  it('reads a table once: later gets and concurrent gets share it', async function () {
    const file = new MemoryNode(pattern(64 * T, 1));
    const c = make(file);
    const [a, b] = await Promise.all([c.get(2 * T), c.get(2 * T)]);
    expect(a).to.equal(b);
    expect(await c.get(2 * T)).to.equal(a);
    expect(file.ops).to.deep.equal([{ op: 'read', offset: 2 * T, length: T }]);
    expect(a.data.equals(file.data.subarray(2 * T, 3 * T))).to.equal(true);
  });

  it('tracks dirty tables and writes each once per flush', async function () {
    const file = new MemoryNode(64 * T);
    const c = make(file);
    const fresh = c.getNew(4 * T);
    expect(file.count('read'), 'a new table is not read').to.equal(0);
    expect(fresh.dirty).to.equal(true);
    const old = await c.get(5 * T);
    expect(old.dirty).to.equal(false);
    old.data[0] = 0x42;
    c.markDirty(old);
    expect(c.hasDirty()).to.equal(true);
    await c.flush();
    expect(file.ops.filter((o) => o.op === 'write')).to.deep.equal([
      { op: 'write', offset: 4 * T, length: T },
      { op: 'write', offset: 5 * T, length: T },
    ]);
    expect(file.data[5 * T]).to.equal(0x42);
    expect(c.hasDirty()).to.equal(false);
    await c.flush();
    expect(file.count('write'), 'nothing dirty: nothing written').to.equal(2);
  });

  it('keeps a table dirty when it changes while its write-out is in flight', async function () {
    const file = new MemoryNode(64 * T);
    const c = make(file);
    const t = c.getNew(T);
    t.data[0] = 1;
    const gate = latch();
    file.gate = gate.promise;
    const f = c.flush();
    await tick();
    t.data[0] = 2;
    c.markDirty(t);
    gate.release();
    await f;
    file.gate = undefined;
    expect(file.data[T], 'the snapshot taken at flush').to.equal(1);
    expect(t.dirty).to.equal(true);
    await c.flush();
    expect(file.data[T]).to.equal(2);
  });

  it('writes the tables it depends on first, with a flush of the file between (and none without barriers)', async function () {
    for (const barriers of [true, false]) {
      const file = new MemoryNode(64 * T);
      const refcounts = make(file, 'refcount', 8, barriers);
      const l2 = make(file, 'l2', 8, barriers);
      l2.dependOn(refcounts);
      l2.getNew(10 * T);
      refcounts.getNew(20 * T);
      await l2.flush();
      const order = file.ops.map((o) => (o.op === 'write' ? `w${o.offset / T}` : o.op));
      expect(order, `barriers=${barriers}`).to.deep.equal(barriers ? ['w20', 'flush', 'w10'] : ['w20', 'w10']);
      // A clean dependency costs no write and no flush.
      file.ops.length = 0;
      l2.markDirty(await l2.get(10 * T));
      await l2.flush();
      expect(file.ops.map((o) => o.op)).to.deep.equal(['write']);
    }
  });

  it('keeps dirty tables pushed out of the LRU, serves them, and writes them back', async function () {
    const file = new MemoryNode(64 * T);
    const c = make(file, 'l2', 4);
    const tables = [];
    for (let i = 0; i < 10; i++) {
      const t = c.getNew(i * T);
      t.data[0] = i + 1;
      tables.push(t);
    }
    // The first ones were evicted while dirty; get() returns the very same objects, unread.
    expect(await c.get(0)).to.equal(tables[0]);
    expect(file.count('read')).to.equal(0);
    await tick();
    await c.flush();
    for (let i = 0; i < 10; i++) expect(file.data[i * T], `table ${i}`).to.equal(i + 1);
    expect(c.hasDirty()).to.equal(false);
  });

  it('reports a failed write-back of evicted tables at the next flush', async function () {
    const file = new MemoryNode(64 * T);
    const c = make(file, 'l2', 4);
    file.failNextWrite = new Error('EIO on write-back');
    for (let i = 0; i < 6; i++) c.getNew(i * T);
    await tick();
    await tick();
    let err: unknown;
    await c.flush().catch((e: unknown) => (err = e));
    expect(String(err)).to.match(/EIO on write-back/);
  });

  it('forgets a dropped table: it is neither written nor served', async function () {
    const file = new MemoryNode(pattern(64 * T, 2));
    const c = make(file);
    const t = c.getNew(3 * T);
    t.data.fill(9);
    c.drop(3 * T);
    await c.flush();
    expect(file.count('write')).to.equal(0);
    const again = await c.get(3 * T);
    expect(again).to.not.equal(t);
    expect(again.data.equals(file.data.subarray(3 * T, 4 * T))).to.equal(true);
  });
});
