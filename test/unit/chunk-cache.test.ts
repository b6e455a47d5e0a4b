// The cluster cache over a node that decodes whole chunks (BlockNode.chunkSize: cloop's
// compressed blocks): the graph builder caches such a node in its chunks, scans
// included, and shares a chunk being read, so a sequential read of the whole disk
// reads (decodes) every chunk exactly once, whatever the request size.
import { expect } from 'chai';
import { ClusterCache, SCAN_READ_MIN } from '../../cache/cluster-cache.js';
import { cacheBudget, cacheOver } from '../../drivers/open.js';
import { MemoryNode, latch } from '../helpers/memory-node.js';
import { pattern } from '../helpers/images.js';
import { IoError } from '../../drivers/errors.js';

const KiB = 1024;
const MiB = 1024 * KiB;
/** The default --cache-size (mount-helpers/tsmount-cli.ts). */
const DEFAULT_CACHE = 64 * MiB;

/** A node that makes its bytes a chunk at a time: the counter is the decodes it did. */
class ChunkNode extends MemoryNode {
  constructor(data: Buffer, readonly chunkSize: number) {
    super(data, { readOnly: true });
  }
  /** Chunks decoded, by chunk offset: every chunk a read below covered (such reads must cover whole chunks). */
  decoded(): Map<number, number> {
    const m = new Map<number, number>();
    for (const o of this.ops) {
      if (o.op !== 'read') continue;
      const end = o.offset + o.length;
      if (o.offset % this.chunkSize !== 0 || (end % this.chunkSize !== 0 && end !== this.size)) throw new Error(`read [${o.offset}, ${end}) is not whole chunks`);
      for (let c = o.offset; c < end; c += this.chunkSize) m.set(c, (m.get(c) ?? 0) + 1);
    }
    return m;
  }
}

function graph(disk: Buffer, chunk: number, cacheSize = DEFAULT_CACHE): { inner: ChunkNode; top: ClusterCache } {
  const inner = new ChunkNode(disk, chunk);
  return { inner, top: cacheOver(inner, 'writeback', cacheBudget(cacheSize).data) };
}

async function readAll(node: ClusterCache, request: number, inFlight = 1): Promise<Buffer> {
  const out = Buffer.alloc(node.size);
  const offsets: number[] = [];
  for (let o = 0; o < node.size; o += request) offsets.push(o);
  // Several requests at once, as the kernel's readahead sends them.
  for (let i = 0; i < offsets.length; i += inFlight) {
    await Promise.all(offsets.slice(i, i + inFlight).map((o) => node.read(o, out.subarray(o, Math.min(node.size, o + request)))));
  }
  return out;
}

describe('ClusterCache over a node that decodes whole chunks (unit)', function () {
  const sizes = [4 * KiB, 100_003, 128 * KiB, 256 * KiB, MiB + 512];
  for (const chunk of [64 * KiB, 256 * KiB, 3 * 512 * 100]) {
    for (const request of sizes) {
      it(`a sequential read in ${request}-byte requests decodes each ${chunk}-byte chunk once, under the default cache`, async () => {
        // Not a chunk multiple: the last chunk is short.
        const disk = pattern(40 * chunk + 12_345, chunk);
        const { inner, top } = graph(disk, chunk);
        expect((await readAll(top, request, 4)).equals(disk)).to.equal(true);
        const decoded = inner.decoded();
        expect(decoded.size, 'chunks decoded').to.equal(41);
        for (const [offset, times] of decoded) {
          expect(offset % chunk, 'chunk-aligned').to.equal(0);
          expect(times, `chunk at ${offset} decoded`).to.equal(1);
        }
        // A second pass is served from the cache, but for scans: they cache only the chunks at their edges.
        if (request >= SCAN_READ_MIN) return;
        const reads = inner.count('read');
        await readAll(top, request);
        expect(inner.count('read')).to.equal(reads);
      });
    }
  }

  it('requests in flight together share the read of their chunk', async () => {
    const disk = pattern(8 * 64 * KiB, 9);
    const { inner, top } = graph(disk, 64 * KiB);
    const gate = latch();
    inner.gate = gate.promise;
    const reads = [0, 4096, 62_000, 30_000, 66_000].map(async (o) => {
      const b = Buffer.alloc(5000);
      await top.read(o, b.subarray(0, Math.min(5000, disk.length - o)));
      return b;
    });
    gate.release();
    await Promise.all(reads);
    expect(inner.count('read')).to.equal(2);
  });

  it('a chunk whose read failed is not kept: the next read asks again', async () => {
    const disk = pattern(4 * 64 * KiB, 10);
    const { inner, top } = graph(disk, 64 * KiB);
    const read = inner.read.bind(inner);
    let fail = true;
    inner.read = async (offset, dst) => {
      if (fail) {
        fail = false;
        throw new IoError('decode failed');
      }
      return read(offset, dst);
    };
    const b = Buffer.alloc(100);
    const err = await top.read(10, b).then(() => undefined, (e: unknown) => e);
    expect(err).to.be.instanceOf(IoError);
    await top.read(10, b);
    expect(b.equals(disk.subarray(10, 110))).to.equal(true);
  });

  it('keeps one chunk larger than its budget (decoding it takes that memory anyway); cache=none reads straight through', async () => {
    const disk = pattern(4 * MiB, 11);
    const inner = new ChunkNode(disk, 2 * MiB);
    const tiny = cacheOver(inner, 'writeback', MiB);
    const b = Buffer.alloc(4096);
    for (const at of [5000, 9000, 100_000]) {
      await tiny.read(at, b);
      expect(b.equals(disk.subarray(at, at + 4096))).to.equal(true);
    }
    expect(inner.ops).to.deep.equal([{ op: 'read', offset: 0, length: 2 * MiB }]);
    await tiny.read(3 * MiB, b);
    await tiny.read(0, b);
    expect(inner.count('read'), 'one chunk at a time').to.equal(3);
    const direct = new ChunkNode(disk, 64 * KiB);
    const none = cacheOver(direct, 'none', DEFAULT_CACHE);
    await none.read(5000, b);
    expect(b.equals(disk.subarray(5000, 9096))).to.equal(true);
    expect(direct.ops).to.deep.equal([{ op: 'read', offset: 5000, length: 4096 }]);
  });
});
