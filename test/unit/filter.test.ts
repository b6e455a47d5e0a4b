// The pass-through filter base and the filters the graph builder adds: every
// operation and optional capability is forwarded unless a filter changes it, a
// capability the node below lacks stays absent, the read-only filter refuses every
// change, and the alignment filter never reaches past the end of a node whose size
// is not a multiple of its unit.
import { expect } from 'chai';
import { Filter } from '../../drivers/filters/filter.js';
import { AlignFilter, aligned } from '../../drivers/filters/align.js';
import { ReadOnlyFilter, guarded } from '../../drivers/filters/read-only.js';
import { ClusterCache } from '../../cache/cluster-cache.js';
import { ReadOnlyError } from '../../drivers/errors.js';
import type { BlockNode } from '../../drivers/types.js';
import { MemoryNode } from '../helpers/memory-node.js';
import { pattern } from '../helpers/images.js';

/** A node with every optional capability, each answering something recognisable. */
class CapableNode extends MemoryNode {
  readonly backing: BlockNode = new MemoryNode(4096, { name: 'base' });
  readonly vmdkCid = 0x1234;
  readonly vhdxIdentity = { dataWriteGuid: '83ed0ec3-24c8-49a6-a959-5e4bf1288bfb', logicalSectorSize: 512 };
  readonly encrypted = true;
  readonly requestAlignment = 512;
  private readonly view = new MemoryNode(8192, { name: 'view', readOnly: true });
  snapshots(): { name: string; id: string; node: BlockNode }[] {
    return [{ name: 's1', id: '1', node: this.view }];
  }
}

/** A node that asks for 512-byte requests. */
class SectorNode extends MemoryNode {
  readonly requestAlignment = 512;
}

describe('Filter base (unit, in-memory node)', function () {
  it('forwards every operation and every optional capability of the node below', async function () {
    const inner = new CapableNode(8192);
    const f = new Filter(inner);
    expect([f.size, f.name, f.readOnly]).to.deep.equal([8192, 'memory', false]);
    expect(f.backing).to.equal(inner.backing);
    expect(f.vmdkCid).to.equal(0x1234);
    expect(f.vhdxIdentity).to.equal(inner.vhdxIdentity);
    expect(f.encrypted).to.equal(true);
    expect(f.requestAlignment).to.equal(512);
    expect(f.snapshots!().map((s) => s.name)).to.deep.equal(['s1']);
    await f.write(0, pattern(512, 1));
    await f.zero!(512, 512, true);
    await f.truncate!(16384);
    await f.flush();
    const back = Buffer.alloc(1024);
    await f.read(0, back);
    expect(back.subarray(0, 512).equals(pattern(512, 1))).to.equal(true);
    expect(inner.ops.map((o) => o.op)).to.deep.equal(['write', 'zero', 'truncate', 'flush', 'read']);
  });

  it('offers no capability the node below lacks, through any depth of filters', function () {
    const inner = new MemoryNode(4096, { noZero: true });
    const deep = new Filter(new Filter(new Filter(inner)));
    expect(deep.zero).to.equal(undefined);
    expect(deep.snapshots).to.equal(undefined);
    expect(deep.backing).to.equal(undefined);
    expect(deep.imageLock).to.equal(undefined);
  });

  it('lets the cluster cache grow a node only where the node can, and zero always', function () {
    const cache = new ClusterCache(new MemoryNode(4096, { noZero: true }), { mode: 'writeback', maxBytes: 1 << 20, blockSize: 4096 });
    expect(typeof cache.zero).to.equal('function');
    expect(typeof cache.truncate).to.equal('function');
  });
});

describe('ReadOnlyFilter (unit)', function () {
  it('refuses writes, zeroing and growth with EROFS and passes reads', async function () {
    const inner = new MemoryNode(pattern(4096, 3), { readOnly: true });
    const f = guarded(inner);
    expect(f).to.be.instanceOf(ReadOnlyFilter);
    expect(guarded(f)).to.equal(f);
    for (const attempt of [() => f.write(0, Buffer.alloc(1)), () => f.zero!(0, 512, false), () => f.truncate!(8192)]) {
      const err = await attempt().then(() => undefined, (e: unknown) => e);
      expect(err).to.be.instanceOf(ReadOnlyError);
      expect((err as ReadOnlyError).errno).to.equal(30);
    }
    const back = Buffer.alloc(4096);
    await f.read(0, back);
    expect(back.equals(pattern(4096, 3))).to.equal(true);
    expect(inner.ops.map((o) => o.op)).to.deep.equal(['read']);
  });

  it('leaves a writable node alone', function () {
    const inner = new MemoryNode(4096);
    expect(guarded(inner)).to.equal(inner);
  });
});

describe('AlignFilter on a node whose size is not a multiple of its unit (unit)', function () {
  it('reads and writes the partial last unit without reaching past the end', async function () {
    const disk = pattern(1000, 4);
    const inner = new SectorNode(disk);
    const f = aligned(inner);
    expect(f).to.be.instanceOf(AlignFilter);
    const back = Buffer.alloc(100);
    await f.read(900, back);
    expect(back.equals(disk.subarray(900, 1000))).to.equal(true);
    await f.write(950, pattern(50, 5));
    const all = Buffer.alloc(1000);
    await f.read(0, all);
    expect(all.subarray(0, 950).equals(disk.subarray(0, 950))).to.equal(true);
    expect(all.subarray(950).equals(pattern(50, 5))).to.equal(true);
    for (const o of inner.ops) if (o.op === 'read' || o.op === 'write') expect(o.offset + o.length, `${o.op} at ${o.offset}`).to.be.at.most(1000);
  });
});
