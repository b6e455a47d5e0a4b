// The inflate workers give exactly what decompressCluster gives: the same bytes for
// good clusters, the same error (class and message) for bad ones.
import { expect } from 'chai';
import zlib from 'node:zlib';
import { spawn } from 'node:child_process';
import { decompress as fzstdDecompress } from 'fzstd';
import { COMPRESSION, decompressCluster, zstdFrameLength } from '../drivers/format/qcow2/compress.js';
import { zstdNative } from '../drivers/util/native-codecs.js';
import { libdeflate } from '../drivers/util/libdeflate.js';
import { acquireInflatePool, decompressClusters, inflateStats } from '../drivers/format/qcow2/inflate-pool.js';
import { poolExits, settleWorkers, workersEnding } from '../drivers/util/worker-pools.js';

const CS = 64 * 1024;

function noise(n: number, seed: number): Buffer {
  const b = Buffer.alloc(n);
  let x = seed >>> 0 || 1;
  for (let i = 0; i < n; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    b[i] = i % 3 === 0 ? x & 0xff : 0x41 + (x & 7);
  }
  return b;
}

/** One zstd frame holding `data` as a single raw block (RFC 8878), 2-byte content size. */
function zstdRaw(data: Buffer): Buffer {
  const h = Buffer.alloc(5 + 2 + 3);
  h.writeUInt32LE(0xfd2fb528, 0);
  h[4] = 0x60; // single segment, 2-byte frame content size
  h.writeUInt16LE(data.length - 256, 5);
  const bh = (data.length << 3) | 1; // last block, raw
  h[7] = bh & 0xff;
  h[8] = (bh >> 8) & 0xff;
  h[9] = (bh >> 16) & 0xff;
  return Buffer.concat([h, data]);
}

type Outcome = { bytes: Buffer } | { error: string; name: string };

async function outcome(p: Promise<Buffer>): Promise<Outcome> {
  try {
    return { bytes: Buffer.from(await p) };
  } catch (err) {
    return { error: (err as Error).message, name: (err as Error).constructor.name };
  }
}

describe('qcow2 inflate workers', function () {
  const a = noise(CS, 1);
  const b = noise(CS, 2);
  const zlibCases: [string, Buffer][] = [
    ['a cluster', zlib.deflateRawSync(a)],
    ['a cluster and trailing bytes', Buffer.concat([zlib.deflateRawSync(b), Buffer.alloc(300, 0x5a)])],
    ['an invalid block type', Buffer.alloc(64, 0xff)],
    ['a stream cut short', zlib.deflateRawSync(a).subarray(0, 1000)],
    ['a stream of more than a cluster', zlib.deflateRawSync(Buffer.concat([a, b.subarray(0, 100)]))],
    ['a stream of far more than a cluster', zlib.deflateRawSync(Buffer.concat([a, b]))],
    ['a stream of less than a cluster', zlib.deflateRawSync(a.subarray(0, CS - 1))],
    // What QEMU reads and libdeflate refuses: zlib decides in the worker.
    ['a cluster without a final block', zlib.deflateRawSync(b, { finishFlush: zlib.constants.Z_SYNC_FLUSH })],
    ['nothing', Buffer.alloc(0)],
  ];
  const zstdCases: [string, Buffer][] = [
    ['a zstd cluster', zstdRaw(b)],
    ['a zstd cluster and trailing bytes', Buffer.concat([zstdRaw(a), Buffer.alloc(100, 1)])],
    ['a short zstd frame', zstdRaw(a).subarray(0, 5000)],
    ['not a zstd frame', Buffer.alloc(600, 7)],
    ['a zstd frame of less than a cluster', zstdRaw(a.subarray(0, CS - 4096))],
  ];

  for (const [type, cases] of [
    [COMPRESSION.zlib, zlibCases],
    [COMPRESSION.zstd, zstdCases],
  ] as const) {
    it(`${type === COMPRESSION.zlib ? 'zlib' : 'zstd'}: one batch of good and bad clusters, as decompressCluster gives them`, async function () {
      // Nodes other tests left open may hold the workers too.
      const idle = inflateStats().running === 0;
      // With libzstd loaded, zstd clusters skip the workers (native-codecs.ts).
      const native = type === COMPRESSION.zstd && (await zstdNative()) !== undefined;
      const release = acquireInflatePool();
      try {
        // Packed back to back in shared memory, as readCompressedGroup reads them; then in a plain buffer (copied to the workers).
        const total = cases.reduce((n, [, c]) => n + c.length, 0);
        for (const shared of [true, false]) {
          const src = shared ? Buffer.from(new SharedArrayBuffer(total)) : Buffer.alloc(total);
          const parts = [];
          let at = 0;
          for (const [title, c] of cases) {
            src.set(c, at);
            parts.push({ from: at, to: at + c.length, what: `case ${title}` });
            at += c.length;
          }
          const before = inflateStats();
          const got = await Promise.all(decompressClusters(type, src, parts, CS).map(outcome));
          const after = inflateStats();
          let good = 0;
          for (let i = 0; i < cases.length; i++) {
            const want = await outcome(decompressCluster(type, cases[i]![1], CS, parts[i]!.what));
            expect(got[i], `${cases[i]![0]} (shared ${shared})`).to.deep.equal(want);
            if ('bytes' in want) good++;
          }
          if (native) {
            expect(after.workers - before.workers, 'clusters from the workers').to.equal(0);
            expect(after.inThread - before.inThread, 'clusters through libzstd').to.equal(cases.length);
          } else if (process.env.TSMOUNT_INFLATE_WORKERS !== '0') {
            // Every good cluster came from a worker; only the bad ones were redone in-thread (for their error).
            expect(after.running).to.be.greaterThan(0);
            expect(after.workers - before.workers, 'clusters from the workers').to.equal(good);
            expect(after.inThread - before.inThread, 'clusters redone in-thread').to.equal(cases.length - good);
            // libdeflate (where it loads) decoded every good one but the one without a final block.
            if (type === COMPRESSION.zlib && libdeflate('raw')) expect(after.libdeflate - before.libdeflate, 'clusters through libdeflate').to.equal(good - 1);
          }
        }
      } finally {
        release();
      }
      if (idle) expect(inflateStats().running, 'workers end with the last user').to.equal(0);
    });
  }

  it('zstd: libzstd (when it loads) decodes every frame fzstd decodes to a cluster, to the same bytes', async function () {
    const native = await zstdNative();
    if (!native) this.skip();
    for (const [title, c] of zstdCases) {
      let ref: Uint8Array | undefined;
      try {
        ref = fzstdDecompress(c.subarray(0, zstdFrameLength(c, title)));
      } catch {
        ref = undefined;
      }
      const dst = new Uint8Array(CS);
      let n = -1;
      try {
        n = await native(c.subarray(0, zstdFrameLength(c, title)), dst);
      } catch {
        n = -1;
      }
      if (n === CS) expect(ref && Buffer.from(ref).equals(Buffer.from(dst)), title).to.equal(true);
      else expect(ref === undefined || ref.length !== CS, `${title}: libzstd refused what fzstd decodes to a cluster`).to.equal(true);
    }
  });

  it('hands each cluster to `use`, and resolves to a copy only where `keep` says so', async function () {
    const release = acquireInflatePool();
    try {
      const packed = [zlib.deflateRawSync(a), zlib.deflateRawSync(b), Buffer.alloc(64, 0xff)];
      const src = Buffer.from(new SharedArrayBuffer(packed.reduce((n, c) => n + c.length, 0)));
      const used: Buffer[] = [];
      let at = 0;
      const parts = packed.map((c, i) => {
        src.set(c, at);
        at += c.length;
        return { from: at - c.length, to: at, what: `c${i}`, use: (x: Uint8Array) => void (used[i] = Buffer.from(x)), keep: () => i === 0 };
      });
      const got = await Promise.all(decompressClusters(COMPRESSION.zlib, src, parts, CS).map(outcome));
      expect(used[0]!.equals(a) && used[1]!.equals(b)).to.equal(true);
      expect(used[2]).to.equal(undefined);
      expect(got[0]).to.deep.equal({ bytes: a });
      expect(got[1]).to.deep.equal({ bytes: Buffer.alloc(0) });
      expect(got[2]).to.deep.equal(await outcome(decompressCluster(COMPRESSION.zlib, packed[2]!, CS, 'c2')));
    } finally {
      release();
    }
  });

  it('an unsupported compression type fails as decompressCluster fails', async function () {
    const release = acquireInflatePool();
    try {
      const [p] = decompressClusters(2, Buffer.alloc(10), [{ from: 0, to: 10, what: 'x' }], CS);
      expect(await outcome(p!)).to.deep.equal(await outcome(decompressCluster(2, Buffer.alloc(10), CS, 'x')));
    } finally {
      release();
    }
  });
});

describe('worker pools end without aborting the process', function () {
  // Node aborts a process whose worker was stopped while it built a zlib stream (seen
  // once in CI, from a short tsimg convert). Each run is a new process; TSMOUNT_SOAK=1 runs many more.
  const runs = process.env.TSMOUNT_SOAK === '1' ? 300 : 12;
  this.timeout(process.env.TSMOUNT_SOAK === '1' ? 1_800_000 : 180_000);
  const child = new URL('./helpers/pool-exit.js', import.meta.url).pathname;

  it('the last release ends the workers by a message: they exit by themselves (code 0), none is terminated', async function () {
    if (inflateStats().running !== 0 || process.env.TSMOUNT_INFLATE_WORKERS === '0') this.skip();
    // A pool an earlier test released may still have workers on their way out: their
    // exits would be counted as this pool's (CI saw 3 clean exits for 2 workers once).
    for (let i = 0; i < 100 && workersEnding() > 0; i++) await new Promise((r) => setTimeout(r, 50));
    expect(workersEnding(), 'workers of an earlier pool still ending').to.equal(0);
    const before = poolExits();
    const release = acquireInflatePool();
    const packed = zlib.deflateRawSync(noise(CS, 3));
    const running = await (async () => {
      try {
        // One cluster per worker first (a worker stopped before it started exits with 0 too),
        // then a batch in flight when the pool is released, as an abandoned read leaves one.
        const n = inflateStats().running || 4;
        const parts = Array.from({ length: n }, () => ({ from: 0, to: packed.length, what: 'x' }));
        await Promise.all(decompressClusters(COMPRESSION.zlib, packed, parts, CS));
        const all = decompressClusters(COMPRESSION.zlib, packed, parts, CS);
        for (const p of all) p.catch(() => undefined);
        return inflateStats().running;
      } finally {
        release();
      }
    })();
    expect(running).to.be.greaterThan(0);
    await settleWorkers(5000);
    for (let i = 0; i < 100 && poolExits().clean - before.clean < running; i++) await new Promise((r) => setTimeout(r, 50));
    const after = poolExits();
    expect({ clean: after.clean - before.clean, other: after.other - before.other }).to.deep.equal({ clean: running, other: 0 });
  });
  for (const [mode, what] of [
    ['first', 'one cluster inflated, the pool released, the process ends by itself'],
    ['inflight', 'the pool released with batches in the workers, then process.exit after settleWorkers'],
    ['encode', 'deflate jobs in the decode pool, then process.exit after settleWorkers'],
  ] as const) {
    it(`${what} (${runs} processes)`, async function () {
      for (let i = 0; i < runs; i++) {
        const r = await new Promise<{ code: number | null; signal: string | null; stderr: string }>((resolve) => {
          const p = spawn(process.execPath, [child, mode], { stdio: ['ignore', 'ignore', 'pipe'] });
          let stderr = '';
          p.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
          p.on('close', (code, signal) => resolve({ code, signal, stderr }));
        });
        expect(r, `run ${i}`).to.deep.equal({ code: 0, signal: null, stderr: '' });
      }
    });
  }
});
