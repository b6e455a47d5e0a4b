// The alignment filter against an in-memory node: the node below sees only aligned
// requests; unaligned heads and tails are read-modify-written; bytes around a write
// survive; overlapping unaligned writes do not lose each other's bytes.
import { expect } from 'chai';
import { AlignFilter } from '../../drivers/filters/align.js';
import { MemoryNode, latch } from '../helpers/memory-node.js';
import { pattern } from '../helpers/images.js';

const A = 512;

function expectAligned(node: MemoryNode): void {
  for (const o of node.ops) {
    if (o.op === 'flush' || o.op === 'truncate') continue;
    expect(o.offset % A, `${o.op} at ${o.offset}`).to.equal(0);
    expect(o.length % A, `${o.op} of ${o.length}`).to.equal(0);
  }
}

describe('AlignFilter (unit, in-memory node)', function () {
  it('passes aligned reads and writes through unchanged, one request each', async function () {
    const inner = new MemoryNode(64 * A);
    const f = new AlignFilter(inner, A);
    await f.write(2 * A, pattern(4 * A, 1));
    const back = Buffer.alloc(4 * A);
    await f.read(2 * A, back);
    expect(back.equals(pattern(4 * A, 1))).to.equal(true);
    expect(inner.ops).to.deep.equal([
      { op: 'write', offset: 2 * A, length: 4 * A },
      { op: 'read', offset: 2 * A, length: 4 * A },
    ]);
  });

  it('reads an unaligned head, body and tail with aligned requests', async function () {
    const disk = pattern(64 * A, 2);
    const inner = new MemoryNode(disk);
    const f = new AlignFilter(inner, A);
    for (const [off, len] of [
      [1, 10],
      [A - 1, 2],
      [100, 5 * A],
      [3 * A + 7, 9 * A - 20],
      [63 * A + 1, A - 1],
    ] as const) {
      const got = Buffer.alloc(len);
      await f.read(off, got);
      expect(got.equals(disk.subarray(off, off + len)), `read ${off}+${len}`).to.equal(true);
    }
    expectAligned(inner);
  });

  it('read-modify-writes only the head and tail sectors of an unaligned write, keeping the bytes around it', async function () {
    const disk = pattern(64 * A, 3);
    const inner = new MemoryNode(disk);
    const f = new AlignFilter(inner, A);
    const data = pattern(6 * A + 100, 4);
    const at = 2 * A + 300;
    await f.write(at, data);
    const want = Buffer.from(disk);
    data.copy(want, at);
    expect(inner.data.equals(want)).to.equal(true);
    expectAligned(inner);
    // Head sector and tail sector read, then one aligned write over the whole span.
    expect(inner.ops).to.deep.equal([
      { op: 'read', offset: 2 * A, length: A },
      { op: 'read', offset: 8 * A, length: A },
      { op: 'write', offset: 2 * A, length: 7 * A },
    ]);
  });

  it('writes inside one sector with one read and one write of that sector', async function () {
    const inner = new MemoryNode(pattern(8 * A, 5));
    const f = new AlignFilter(inner, A);
    await f.write(A + 10, Buffer.from([1, 2, 3]));
    expect(inner.ops).to.deep.equal([
      { op: 'read', offset: A, length: A },
      { op: 'write', offset: A, length: A },
    ]);
    expect([...inner.data.subarray(A + 10, A + 13)]).to.deep.equal([1, 2, 3]);
  });

  it('keeps both of two overlapping unaligned writes into one sector in flight together', async function () {
    const inner = new MemoryNode(8 * A);
    const f = new AlignFilter(inner, A);
    const gate = latch();
    inner.gate = gate.promise;
    const w1 = f.write(A + 1, Buffer.alloc(10, 0xaa));
    const w2 = f.write(A + 100, Buffer.alloc(10, 0xbb));
    gate.release();
    await Promise.all([w1, w2]);
    expect(inner.data.subarray(A + 1, A + 11).every((b) => b === 0xaa)).to.equal(true);
    expect(inner.data.subarray(A + 100, A + 110).every((b) => b === 0xbb)).to.equal(true);
  });

  it('matches a plain buffer over many random unaligned writes, reads and zeroes', async function () {
    const size = 128 * A;
    const inner = new MemoryNode(size);
    const f = new AlignFilter(inner, A);
    const model = Buffer.alloc(size);
    let x = 12345;
    const rnd = (n: number): number => {
      x = (x * 1103515245 + 12345) >>> 0;
      return x % n;
    };
    for (let i = 0; i < 300; i++) {
      const off = rnd(size - 1);
      const len = 1 + rnd(Math.min(size - off, 5 * A));
      const kind = rnd(3);
      if (kind === 0) {
        const d = pattern(len, i + 10);
        await f.write(off, d);
        d.copy(model, off);
      } else if (kind === 1) {
        await f.zero(off, len, rnd(2) === 0);
        model.fill(0, off, off + len);
      } else {
        const got = Buffer.alloc(len);
        await f.read(off, got);
        expect(got.equals(model.subarray(off, off + len)), `read ${off}+${len} at step ${i}`).to.equal(true);
      }
    }
    expect(inner.data.equals(model)).to.equal(true);
    expectAligned(inner);
  });

  it("zeroes the aligned body with the node's zero (passing unmap) and writes zeros into the head and tail", async function () {
    const inner = new MemoryNode(pattern(16 * A, 6));
    const f = new AlignFilter(inner, A);
    await f.zero(A + 5, 4 * A, true);
    const zeros = inner.ops.filter((o) => o.op === 'zero');
    expect(zeros).to.deep.equal([{ op: 'zero', offset: 2 * A, length: 3 * A, unmap: true }]);
    expect(inner.data.subarray(A + 5, 5 * A + 5).every((b) => b === 0)).to.equal(true);
    expect(inner.data.subarray(0, A + 5).equals(pattern(16 * A, 6).subarray(0, A + 5))).to.equal(true);
    expect(inner.data.subarray(5 * A + 5).equals(pattern(16 * A, 6).subarray(5 * A + 5))).to.equal(true);
    expectAligned(inner);
  });

  it('zeroes by writing zeros when the node below has no zero operation', async function () {
    const inner = new MemoryNode(pattern(16 * A, 7), { noZero: true });
    const f = new AlignFilter(inner, A);
    await f.zero(2 * A, 4 * A, false);
    expect(inner.count('write')).to.be.greaterThan(0);
    expect(inner.data.subarray(2 * A, 6 * A).every((b) => b === 0)).to.equal(true);
  });

  it('forwards size, name, read-only, flush and close', async function () {
    const inner = new MemoryNode(8 * A, { readOnly: true, name: 'm0' });
    const f = new AlignFilter(inner, A);
    expect([f.size, f.name, f.readOnly]).to.deep.equal([8 * A, 'm0', true]);
    await f.flush();
    expect(inner.count('flush')).to.equal(1);
    await f.close();
    expect(inner.closed).to.equal(true);
  });
});
