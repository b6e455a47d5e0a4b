// The cloop driver beyond the conformance table (which reads create_compressed_fs's
// images of several block sizes against qemu-img convert): the original data, each
// block inflated once by a sequential read through the graph's cache (a counter of
// the compressed reads), and damaged indexes and streams that fail only the reads
// they touch.
import { expect } from 'chai';
import fs from 'node:fs';
import path from 'node:path';
import { cacheBudget, cacheOver, formatOf } from '../drivers/open.js';
import { cloopDriver } from '../drivers/format/cloop/index.js';
import { CorruptImageError, TsmountError, UnsupportedError } from '../drivers/errors.js';
import type { BlockNode } from '../drivers/types.js';
import { runOk, tempDir } from './helpers/qemu.js';
import { probeFormat } from '../drivers/format/index.js';
import { MemoryNode } from './helpers/memory-node.js';
import { nodeMd5, openTestImage, patch, readBytes, u32be, u64be } from './helpers/images.js';
import { cloopCreate, cloopV4, type CloopV4Compressor } from './helpers/ro-images.js';
import { exercise, rng, withDeadline } from './helpers/corrupt.js';
import crypto from 'node:crypto';
import zlib from 'node:zlib';

const KiB = 1024;
const MiB = 1024 * KiB;
const BS = 64 * KiB;
const SIZE = 5 * MiB + 12345;
const BLOCKS = Math.ceil(SIZE / BS);
const INDEX_AT = 136;

/** The original data, padded with zeros to whole blocks as create_compressed_fs pads it. */
function padded(src: string): Buffer {
  const b = Buffer.alloc(BLOCKS * BS);
  fs.readFileSync(src).copy(b);
  return b;
}

function md5(b: Buffer): string {
  return crypto.createHash('md5').update(b).digest('hex');
}

function offsetOf(file: string, block: number): number {
  return Number(readBytes(file, INDEX_AT + block * 8, 8).readBigUInt64BE(0));
}

async function failure(p: Promise<unknown>): Promise<unknown> {
  return p.then(() => undefined, (e: unknown) => e);
}

describe('cloop: images made by create_compressed_fs', function () {
  this.timeout(120_000);
  let t: ReturnType<typeof tempDir>;
  let image: string;
  let want: Buffer;
  before(async () => {
    t = tempDir('cloop');
    image = path.join(t.dir, 'disk.cloop');
    want = padded(await cloopCreate(image, SIZE, BS));
  });
  after(() => t.cleanup());

  const copy = (name: string): string => {
    const f = path.join(t.dir, name);
    fs.copyFileSync(image, f);
    return f;
  };

  it('reads the data it was given, padded to whole blocks (probed); the node decodes whole blocks', async () => {
    const node = await openTestImage(image);
    try {
      expect(formatOf(node)).to.equal('cloop');
      expect(node.size).to.equal(BLOCKS * BS);
      expect(node.chunkSize, 'offered through the graph filters').to.equal(BS);
      expect(await nodeMd5(node, 100_003)).to.equal(md5(want));
    } finally {
      await node.close();
    }
  });

  it('a sequential read through the default cache inflates each block once (counted), whatever the request size', async () => {
    const indexEnd = INDEX_AT + (BLOCKS + 1) * 8;
    for (const request of [4 * KiB, 100_003, 128 * KiB, MiB]) {
      const file = new MemoryNode(fs.readFileSync(image), { readOnly: true, name: image });
      const node = await cloopDriver.open(file, { readOnly: true, cache: 'writeback', metadataCacheBytes: MiB, openBacking: () => Promise.reject(new Error('no backing files')) });
      const top = cacheOver(node, 'writeback', cacheBudget(64 * MiB).data);
      const out = Buffer.alloc(top.size);
      for (let o = 0; o < top.size; o += 4 * request) {
        // Four requests in flight at once, as the kernel's readahead sends them.
        await Promise.all([0, 1, 2, 3].map((k) => {
          const at = o + k * request;
          return at < top.size ? top.read(at, out.subarray(at, Math.min(top.size, at + request))) : undefined;
        }));
      }
      expect(md5(out), `read in ${request}-byte requests`).to.equal(md5(want));
      // Each read of compressed bytes is one block's (the cloop node reads block by block).
      const reads = file.ops.flatMap((o) => (o.op === 'read' && o.offset >= indexEnd ? [o.offset] : []));
      expect(reads, `${request}-byte requests: one compressed read per block`).to.have.length(BLOCKS);
      expect(new Set(reads).size).to.equal(BLOCKS);
      await top.close();
    }
  });

  it('refuses a version it does not read, naming it, and headers out of bounds', async () => {
    const cases: { what: string; edit: (f: string) => void; kind: typeof TsmountError; says: RegExp }[] = [
      { what: 'version', edit: (f) => patch(f, 12, Buffer.from('9.9')), kind: UnsupportedError, says: /cloop version 9\.9 is not supported/ },
      { what: 'block size not a multiple of 512', edit: (f) => patch(f, 128, u32be(1000)), kind: CorruptImageError, says: /block size 1000/ },
      { what: 'zero block size', edit: (f) => patch(f, 128, u32be(0)), kind: CorruptImageError, says: /block size 0/ },
      { what: 'huge block size', edit: (f) => patch(f, 128, u32be(0x80000000)), kind: CorruptImageError, says: /larger than/ },
      { what: 'an index past the end of the file', edit: (f) => patch(f, 132, u32be(0xffffffff)), kind: CorruptImageError, says: /index of 4294967296 offsets runs past the end/ },
    ];
    for (const c of cases) {
      const f = copy('bad-header.cloop');
      c.edit(f);
      const err = await failure(openTestImage(f, { format: 'cloop' }));
      expect(err, c.what).to.be.instanceOf(c.kind);
      expect((err as Error).message, c.what).to.match(c.says).and.to.include(f);
      expect((err as Error).message.split('\n')).to.have.length(1);
    }
    const cut = copy('cut-header.cloop');
    fs.truncateSync(cut, 100);
    expect(await failure(openTestImage(cut, { format: 'cloop' }))).to.be.instanceOf(CorruptImageError);
  });

  /** Open a damaged copy; the damaged block fails with EIO, every other block still reads. */
  async function onlyBlockFails(f: string, block: number, says: RegExp): Promise<void> {
    const node: BlockNode = await openTestImage(f);
    try {
      const err = await failure(node.read(block * BS + 100, Buffer.alloc(1000)));
      expect(err).to.be.instanceOf(CorruptImageError);
      expect((err as TsmountError).errno).to.equal(5);
      expect((err as Error).message).to.match(says).and.to.include(`block ${block}`);
      // The entry edited is the end of `block` and the start of the next: the next may fail too.
      for (const b of [block - 1, block + 2]) {
        const buf = Buffer.alloc(BS);
        await node.read(b * BS, buf);
        expect(buf.equals(want.subarray(b * BS, (b + 1) * BS)), `block ${b}`).to.equal(true);
      }
    } finally {
      await node.close();
    }
  }

  it('an index entry that goes backwards fails that block only', async () => {
    const f = copy('backwards.cloop');
    patch(f, INDEX_AT + 11 * 8, u64be(BigInt(offsetOf(f, 10) - 1)));
    // Block 10 ends before it starts.
    await onlyBlockFails(f, 10, /bad compressed length/);
  });

  it('an index entry past the end of the file fails that block only', async () => {
    const f = copy('past-eof.cloop');
    // Block 20 ends past the end of the file.
    patch(f, INDEX_AT + 21 * 8, u64be(BigInt(fs.statSync(f).size + 4096)));
    await onlyBlockFails(f, 20, /past the end of the file/);
  });

  it('a broken zlib stream fails that block only', async () => {
    const f = copy('broken.cloop');
    const at = offsetOf(f, 30);
    patch(f, at + 2, Buffer.alloc(64, 0xff));
    await onlyBlockFails(f, 30, /does not decompress/);
  });

  it('a file cut inside the last blocks fails those blocks, not the open', async () => {
    const f = copy('cut.cloop');
    fs.truncateSync(f, offsetOf(f, BLOCKS - 2) + 10);
    const node = await openTestImage(f);
    try {
      expect(await failure(node.read((BLOCKS - 1) * BS, Buffer.alloc(512)))).to.be.instanceOf(CorruptImageError);
      expect(await failure(node.read((BLOCKS - 2) * BS, Buffer.alloc(512)))).to.be.instanceOf(CorruptImageError);
      const buf = Buffer.alloc(BS);
      await node.read(0, buf);
      expect(buf.equals(want.subarray(0, BS))).to.equal(true);
    } finally {
      await node.close();
    }
  });
});

describe('cloop V4.0: built from the published layout (cloop.h); QEMU reads only V2.0', function () {
  this.timeout(120_000);
  let t: ReturnType<typeof tempDir>;
  /** Text (LZ4 and zlib shrink it) and random bytes (stored as they are), not a block multiple. */
  const data = Buffer.concat([
    Buffer.from('a line of text that compresses well, again and again\n'.repeat(40_000)),
    crypto.randomBytes(300 * KiB),
    Buffer.alloc(200 * KiB),
    Buffer.from('the end'),
  ]);
  const blocks = Math.ceil(data.length / BS);
  const want = Buffer.concat([data, Buffer.alloc(blocks * BS - data.length)]);
  const mixed = (i: number): CloopV4Compressor => (['zlib', 'lz4', 'xz', 'lzo', 'none'] as const)[i % 5]!;
  before(() => (t = tempDir('cloop-v4')));
  after(() => t.cleanup());

  for (const headerLast of [false, true]) {
    const hows: [string, (i: number) => CloopV4Compressor][] = [
      ['zlib', () => 'zlib'],
      ['lz4', () => 'lz4'],
      ['xz', () => 'xz'],
      ['lzo1x', () => 'lzo'],
      ['none', () => 'none'],
      ['mixed', mixed],
    ];
    for (const [name, how] of hows) {
      it(`reads ${name} blocks with the header ${headerLast ? 'last' : 'first'} (probed), a short last block padded with zeros`, async () => {
        const f = path.join(t.dir, `${name}-${headerLast}.cloop`);
        await cloopV4(f, data, BS, how, headerLast);
        const node = await openTestImage(f);
        try {
          expect(formatOf(node)).to.equal('cloop');
          expect(node.size).to.equal(blocks * BS);
          expect(await nodeMd5(node, 100_003)).to.equal(md5(want));
        } finally {
          await node.close();
        }
      });
    }
  }

  it('a V4 header at the end loses to a format whose header is at the start', async () => {
    const v4 = path.join(t.dir, 'tail.cloop');
    await cloopV4(v4, data, BS, () => 'zlib', true);
    const tail = fs.readFileSync(v4).subarray(-136);
    const q = path.join(t.dir, 'head.qcow2');
    await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', q, '1M']);
    const head = fs.readFileSync(q).subarray(0, 4096);
    expect(probeFormat(head, q, tail).name).to.equal('qcow2');
    expect(probeFormat(Buffer.alloc(4096), v4, tail).name).to.equal('cloop');
  });

  it('a block of a compressor cloop.h does not define fails with EIO naming it; the others read', async () => {
    const f = path.join(t.dir, 'unknown.cloop');
    await cloopV4(f, data, BS, (i) => (i === 5 ? 'unknown' : 'zlib'), false);
    const node = await openTestImage(f);
    try {
      const err = await failure(node.read(5 * BS, Buffer.alloc(512)));
      expect(err).to.be.instanceOf(UnsupportedError);
      expect((err as TsmountError).errno).to.equal(5);
      expect((err as Error).message).to.match(/block 5 .*unknown compressor \(9\)/);
      const buf = Buffer.alloc(BS);
      await node.read(6 * BS, buf);
      expect(buf.equals(want.subarray(6 * BS, 7 * BS))).to.equal(true);
    } finally {
      await node.close();
    }
  });

  for (const kind of ['xz', 'lzo'] as const) {
    it(`a damaged ${kind} block is that read's EIO, naming the block; the others read`, async () => {
      const f = path.join(t.dir, `bad-${kind}.cloop`);
      await cloopV4(f, data, BS, () => kind, false);
      // Block 2's bytes: flip one in the middle of its stream. xz checks a CRC; LZO has
      // no checksum (a flipped literal would read as wrong data, in the cloop module
      // too), and this block's middle byte is an instruction that then runs past the end.
      const img = fs.readFileSync(f);
      const start = Number(img.readBigUInt64BE(136 + 2 * 8) & ((1n << 60n) - 1n));
      const end = Number(img.readBigUInt64BE(136 + 3 * 8) & ((1n << 60n) - 1n));
      const mid = (start + end) >> 1;
      img[mid] = img[mid]! ^ 0x55;
      fs.writeFileSync(f, img);
      const node = await openTestImage(f);
      try {
        const err = await failure(node.read(2 * BS, Buffer.alloc(512)));
        expect((err as TsmountError).errno).to.equal(5);
        expect((err as Error).message).to.match(/block 2 /);
        const buf = Buffer.alloc(BS);
        await node.read(3 * BS, buf);
        expect(buf.equals(want.subarray(3 * BS, 4 * BS))).to.equal(true);
      } finally {
        await node.close();
      }
    });
  }

  it('damaged V4 images (either header place) give a clean error or EIO, never a crash or a hang', async () => {
    const random = rng(0xc100);
    for (const headerLast of [false, true]) {
      const f = path.join(t.dir, `damaged-${headerLast}.cloop`);
      await cloopV4(f, data, BS, mixed, headerLast);
      const image = fs.readFileSync(f);
      const mut = path.join(t.dir, 'mut.cloop');
      for (let round = 0; round < 40; round++) {
        let bytes = Buffer.from(image);
        if (round % 4 === 3) bytes = bytes.subarray(0, Math.floor(random() * bytes.length));
        else {
          // The header and index, wherever they are, and the data after them.
          const from = headerLast ? Math.max(0, bytes.length - 4096) : 0;
          for (let k = 0; k < 1 + Math.floor(random() * 8); k++) bytes[from + Math.floor(random() * Math.min(4096, bytes.length - from))] = Math.floor(random() * 256);
        }
        fs.writeFileSync(mut, bytes);
        await withDeadline(exercise(mut, 'cloop'), `V4 ${headerLast ? 'header last' : 'header first'}, round ${round}`);
      }
    }
  });
});

describe('cloop: a 4 GiB image read end to end under the default cache', function () {
  this.timeout(600_000);
  // 4096 blocks of 1 MiB, each its own number then zeros, V2.0 as create_compressed_fs
  // lays it out (built here: the tool would take a minute to compress 4 GiB of zeros).
  const CHUNK = MiB;
  const COUNT = 4096;
  const DEFAULT_CACHE_SIZE = 64 * MiB;

  function image(): Buffer {
    const header = Buffer.alloc(INDEX_AT);
    header.write('#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\nexit $?\n', 'latin1');
    header.writeUInt32BE(CHUNK, 128);
    header.writeUInt32BE(COUNT, 132);
    const index = Buffer.alloc((COUNT + 1) * 8);
    const blocks: Buffer[] = [];
    const plain = Buffer.alloc(CHUNK);
    let at = INDEX_AT + index.length;
    for (let i = 0; i < COUNT; i++) {
      plain.writeUInt32BE(i, 0);
      const z = zlib.deflateSync(plain, { level: 1 });
      index.writeBigUInt64BE(BigInt(at), i * 8);
      blocks.push(z);
      at += z.length;
    }
    index.writeBigUInt64BE(BigInt(at), COUNT * 8);
    return Buffer.concat([header, index, ...blocks]);
  }

  it('decodes each block once in 128 KiB and 1 MiB requests (four in flight), and holds no more than the cache', async () => {
    const bytes = image();
    const indexEnd = INDEX_AT + (COUNT + 1) * 8;
    for (const request of [128 * KiB, MiB]) {
      const file = new MemoryNode(bytes, { readOnly: true, name: 'big.cloop' });
      const node = await cloopDriver.open(file, { readOnly: true, cache: 'writeback', metadataCacheBytes: cacheBudget(DEFAULT_CACHE_SIZE).metadata, openBacking: () => Promise.reject(new Error('no backing files')) });
      const top = cacheOver(node, 'writeback', cacheBudget(DEFAULT_CACHE_SIZE).data);
      expect(top.size).to.equal(4 * 1024 * MiB);
      const zeros = Buffer.alloc(CHUNK);
      const bufs = [0, 1, 2, 3].map(() => Buffer.alloc(request));
      const base = process.memoryUsage();
      let peak = 0;
      let bad = -1;
      try {
        for (let o = 0; o < top.size; o += 4 * request) {
          await Promise.all(bufs.map((b, k) => top.read(o + k * request, b)));
          for (let k = 0; k < 4; k++) {
            const at = o + k * request;
            const block = Math.floor(at / CHUNK);
            const inBlock = at % CHUNK;
            const b = bufs[k]!;
            const head = inBlock === 0 ? 4 : 0;
            if ((head && b.readUInt32BE(0) !== block) || !b.subarray(head).equals(zeros.subarray(0, b.length - head))) bad = at;
          }
          if (o % (256 * MiB) === 0) {
            const m = process.memoryUsage();
            peak = Math.max(peak, m.arrayBuffers - base.arrayBuffers);
          }
          if (bad >= 0) break;
        }
        expect(bad, `${request}-byte requests: wrong bytes at ${bad}`).to.equal(-1);
        const reads = file.ops.flatMap((op) => (op.op === 'read' && op.offset >= indexEnd ? [op.offset] : []));
        expect(reads, `${request}-byte requests: one compressed read per block`).to.have.length(COUNT);
        expect(new Set(reads).size).to.equal(COUNT);
        // Decoded blocks beyond the cache budget are garbage the collector has not taken
        // yet; what the reader holds is bounded by the cache, not by the 4 GiB read.
        expect(peak, 'external memory growth during the read').to.be.below(DEFAULT_CACHE_SIZE + 256 * MiB);
      } finally {
        await top.close();
      }
    }
  });
});
