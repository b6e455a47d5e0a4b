// The cluster cache against an in-memory node: hits, eviction, scans that bypass it,
// writes that keep cached copies current, the cache modes' flushes, zero, resize.
import { expect } from 'chai';
import { ClusterCache, SCAN_READ_MIN } from '../../cache/cluster-cache.js';
import type { CacheMode } from '../../drivers/types.js';
import { MemoryNode, latch } from '../helpers/memory-node.js';
import { pattern } from '../helpers/images.js';

const BS = 4096;

function make(disk: Buffer | number, mode: CacheMode = 'writeback', blocks = 16, opts: { noZero?: boolean } = {}): { inner: MemoryNode; cache: ClusterCache } {
  const inner = new MemoryNode(disk, opts);
  return { inner, cache: new ClusterCache(inner, { mode, maxBytes: blocks * BS, blockSize: BS }) };
}

async function read(node: ClusterCache, offset: number, length: number): Promise<Buffer> {
  const b = Buffer.alloc(length);
  await node.read(offset, b);
  return b;
}

describe('ClusterCache (unit, in-memory node)', function () {
  it('serves a second read of cached blocks without asking the node below', async function () {
    const disk = pattern(64 * BS, 1);
    const { inner, cache } = make(disk);
    expect((await read(cache, 100, 2 * BS)).equals(disk.subarray(100, 100 + 2 * BS))).to.equal(true);
    const reads = inner.count('read');
    expect((await read(cache, 200, 3000)).equals(disk.subarray(200, 3200))).to.equal(true);
    expect((await read(cache, BS + 5, BS)).equals(disk.subarray(BS + 5, 2 * BS + 5))).to.equal(true);
    expect(inner.count('read')).to.equal(reads);
  });

  it('reads a run of missing blocks with one request', async function () {
    const { inner, cache } = make(pattern(64 * BS, 2));
    await read(cache, 0, 8 * BS);
    expect(inner.ops).to.deep.equal([{ op: 'read', offset: 0, length: 8 * BS }]);
  });

  it('evicts the least recently used blocks beyond its budget', async function () {
    const disk = pattern(64 * BS, 3);
    const { inner, cache } = make(disk, 'writeback', 4);
    await read(cache, 0, 8 * BS); // blocks 0..7; only the last four fit
    const before = inner.count('read');
    await read(cache, 6 * BS, 2 * BS);
    expect(inner.count('read'), 'blocks 6 and 7 are cached').to.equal(before);
    expect((await read(cache, 0, 2 * BS)).equals(disk.subarray(0, 2 * BS))).to.equal(true);
    expect(inner.count('read'), 'blocks 0 and 1 were evicted').to.equal(before + 1);
  });

  it('lets scans (large reads) and single-block small reads bypass it', async function () {
    const disk = pattern(2 * SCAN_READ_MIN, 4);
    const { inner, cache } = make(disk, 'writeback', 256);
    await read(cache, 0, SCAN_READ_MIN);
    await read(cache, 0, SCAN_READ_MIN);
    expect(inner.count('read')).to.equal(2);
    await read(cache, 10, 100);
    await read(cache, 10, 100);
    expect(inner.count('read')).to.equal(4);
  });

  it('caches nothing with cache=none and directsync', async function () {
    for (const mode of ['none', 'directsync'] as const) {
      const { inner, cache } = make(pattern(16 * BS, 5), mode);
      await read(cache, 0, 2 * BS);
      await read(cache, 0, 2 * BS);
      expect(inner.count('read'), mode).to.equal(2);
    }
  });

  it('passes writes down at once and keeps cached copies current', async function () {
    const disk = pattern(16 * BS, 6);
    const { inner, cache } = make(disk);
    await read(cache, 0, 4 * BS);
    const data = pattern(BS + 10, 7);
    await cache.write(BS - 5, data);
    const want = Buffer.from(disk);
    data.copy(want, BS - 5);
    expect(inner.data.equals(want), 'on the node below before any flush').to.equal(true);
    const reads = inner.count('read');
    expect((await read(cache, 0, 4 * BS)).equals(want.subarray(0, 4 * BS))).to.equal(true);
    expect(inner.count('read')).to.equal(reads);
  });

  it('drops cached blocks a failed write may have touched', async function () {
    const disk = pattern(16 * BS, 8);
    const { inner, cache } = make(disk);
    await read(cache, 0, 2 * BS);
    inner.failNextWrite = new Error('EIO');
    let failed = false;
    await cache.write(100, Buffer.alloc(10, 1)).catch(() => (failed = true));
    expect(failed).to.equal(true);
    expect((await read(cache, 0, 2 * BS)).equals(disk.subarray(0, 2 * BS))).to.equal(true);
  });

  it('does not cache what a read saw while a write to it was in flight', async function () {
    const { inner, cache } = make(16 * BS);
    const gate = latch();
    inner.gate = gate.promise;
    const r = read(cache, 0, 2 * BS);
    const w = cache.write(0, Buffer.alloc(BS, 0xee));
    gate.release();
    await Promise.all([r, w]);
    inner.gate = undefined;
    expect((await read(cache, 0, 2 * BS)).subarray(0, BS).every((b) => b === 0xee)).to.equal(true);
  });

  it('flushes the node below after each write with writethrough, only on flush with writeback, never with unsafe', async function () {
    const cases: [CacheMode, number, number][] = [
      ['writethrough', 2, 3],
      ['directsync', 2, 3],
      ['writeback', 0, 1],
      ['none', 0, 1],
      ['unsafe', 0, 0],
    ];
    for (const [mode, afterWrites, afterFlush] of cases) {
      const { inner, cache } = make(16 * BS, mode);
      await cache.write(0, Buffer.alloc(10, 1));
      await cache.zero(BS, BS, false);
      expect(inner.count('flush'), `${mode} after writes`).to.equal(afterWrites);
      await cache.flush();
      expect(inner.count('flush'), `${mode} after flush`).to.equal(afterFlush);
    }
  });

  it("zeroes with the node's zero, or by writing zeros, and reads zeros afterwards", async function () {
    for (const noZero of [false, true]) {
      const disk = pattern(16 * BS, 9);
      const { inner, cache } = make(disk, 'writeback', 16, { noZero });
      await read(cache, 0, 4 * BS);
      await cache.zero(BS + 1, 2 * BS, true);
      expect(inner.count(noZero ? 'write' : 'zero')).to.be.greaterThan(0);
      const got = await read(cache, 0, 4 * BS);
      expect(got.subarray(BS + 1, 3 * BS + 1).every((b) => b === 0), `noZero=${noZero}`).to.equal(true);
      expect(got.subarray(0, BS + 1).equals(disk.subarray(0, BS + 1))).to.equal(true);
      expect(got.subarray(3 * BS + 1).equals(disk.subarray(3 * BS + 1, 4 * BS))).to.equal(true);
    }
  });

  it('forwards size, name and read-only, and resizes through the node below, dropping what it cached', async function () {
    const disk = pattern(16 * BS, 10);
    const { inner, cache } = make(disk);
    expect([cache.size, cache.name, cache.readOnly]).to.deep.equal([16 * BS, 'memory', false]);
    await read(cache, 0, 2 * BS);
    await cache.truncate!(32 * BS);
    expect(cache.size).to.equal(32 * BS);
    const reads = inner.count('read');
    await read(cache, 0, 2 * BS);
    expect(inner.count('read')).to.equal(reads + 1);
    await cache.close();
    expect(inner.closed).to.equal(true);
  });

  it('refuses a block size that is not a power of two', function () {
    expect(() => new ClusterCache(new MemoryNode(BS), { mode: 'writeback', maxBytes: BS * 4, blockSize: 3000 })).to.throw();
  });
});
