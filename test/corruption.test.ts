// Bad input (issue 4): images of every registered format with random bytes flipped
// in their first 64 KiB, or cut at a random length, either fail to open with a clean
// one-line error or open and read to the end (errors on some reads are fine, as EIO),
// within a few seconds, without changing the file. Short in CI; TSMOUNT_SOAK=1 runs
// many more mutations.
import { expect } from 'chai';
import fs from 'node:fs';
import path from 'node:path';
import { openGraph, openImage } from '../drivers/open.js';
import { formatDrivers } from '../drivers/format/index.js';
import type { BlockNode } from '../drivers/types.js';
import { createImage, md5File, qemuIo, run, runOk, runTimingPbkdf, tempDir } from './helpers/qemu.js';
import { exercise, exerciseBounded, isClean, rng, withDeadline } from './helpers/corrupt.js';
import { openTestImage } from './helpers/images.js';
import { MUTATION_KINDS, mutate, shapeOf } from '../scripts/lib/mutate.js';
import { makeSeeds, SEED_FORMATS, type Seed } from '../scripts/lib/seeds.js';
import { formatTable } from './helpers/formats.js';
import { everyChunkImage } from './helpers/udif.js';
import { makeSeSparseChain, makeVhdxChild, type SeGrain, type SeSparseLayout, type VhdxChildBlock } from './helpers/deltas.js';

const MiB = 1024 * 1024;
const SOAK = process.env.TSMOUNT_SOAK === '1';
const ROUNDS = SOAK ? 400 : 12;

describe('corrupt images of every format', function () {
  this.timeout(SOAK ? 3_600_000 : 180_000);
  let tmp: ReturnType<typeof tempDir>;
  before(() => {
    tmp = tempDir('corrupt');
  });
  after(() => tmp.cleanup());

  // Every registered format (raw has no metadata to corrupt), made by qemu-img or by its own tool.
  const formats = [...formatDrivers.keys()].filter((f) => f !== 'raw');
  for (const format of formats) {
    it(`${format}: flipped bytes and truncation give a clean error or a full read, never a crash or hang`, async function () {
      const base = path.join(tmp.dir, `base.${format}`);
      // luks needs its passphrase ('x', as exercise() opens with) as a secret object.
      const secretArgs = format === 'luks' ? ['--object', 'secret,id=sec0,data=x', '-o', 'key-secret=sec0,iter-time=10'] : [];
      // Formats qemu-img cannot make (bochs, cloop, dmg) are made by their own tools or
      // generators, as the conformance table says (test/helpers/formats.ts).
      const own = formatTable[format]?.damaged ?? formatTable[format]?.read.find((v) => v.make);
      if (own?.make) await own.make(base, own);
      else {
        const made = await runTimingPbkdf('qemu-img', ['create', '-q', ...secretArgs, '-f', format, base, '16M']);
        if (made.code !== 0) this.skip();
        const io = ['write -P 0xab 0 100k', 'write -P 0xcd 3M 64k', 'write -P 0xef 15M 1M'];
        if (format !== 'luks') await qemuIo(base, format, io).catch(() => undefined);
      }
      const image = fs.readFileSync(base);
      const random = rng(0x5eed ^ format.length * 7919 ^ format.charCodeAt(0));
      const file = path.join(tmp.dir, `mut.${format}`);
      for (let round = 0; round < ROUNDS; round++) {
        const copy = Buffer.from(image);
        let mutated: Buffer = copy;
        if (round % 4 === 3) {
          mutated = copy.subarray(0, Math.floor(random() * copy.length));
        } else {
          const span = Math.min(copy.length, 64 * 1024);
          const flips = 1 + Math.floor(random() * 8);
          for (let k = 0; k < flips; k++) {
            // Mostly the header, where sizes and offsets live.
            const at = random() < 0.5 ? Math.floor(random() * Math.min(span, 512)) : Math.floor(random() * span);
            copy[at] = Math.floor(random() * 256);
          }
        }
        fs.writeFileSync(file, mutated);
        const before = await md5File(file);
        const what = `${format} round ${round}`;
        try {
          await exerciseBounded(file, format);
        } catch (err) {
          throw new Error(`${what}: ${(err as Error).stack ?? String(err)}`);
        }
        expect(await md5File(file), `${what} changed the file`).to.equal(before);
      }
    });
  }
});

describe('dmg: damage where its metadata is, at the end of the file', function () {
  this.timeout(SOAK ? 3_600_000 : 120_000);
  let tmp: ReturnType<typeof tempDir>;
  before(() => (tmp = tempDir('corrupt-dmg')));
  after(() => tmp.cleanup());

  it('flipped bytes in the property list, block tables, trailer and compressed chunks, and cuts anywhere: a clean error or a full read', async function () {
    const img = everyChunkImage();
    const last = img.stored[img.stored.length - 1]!;
    const tables = last.offset + last.length;
    const random = rng(0xd3a9);
    const file = path.join(tmp.dir, 'mut.dmg');
    for (let round = 0; round < ROUNDS * 2; round++) {
      const copy = Buffer.from(img.image);
      let mutated: Buffer = copy;
      if (round % 4 === 3) mutated = copy.subarray(0, Math.floor(random() * copy.length));
      else {
        const flips = 1 + Math.floor(random() * 8);
        for (let k = 0; k < flips; k++) {
          // Mostly the tables and the trailer; sometimes the chunks' stored bytes.
          const at = random() < 0.75 ? tables + Math.floor(random() * (copy.length - tables)) : Math.floor(random() * tables);
          copy[at] = Math.floor(random() * 256);
        }
      }
      fs.writeFileSync(file, mutated);
      const before = await md5File(file);
      const what = `dmg round ${round}`;
      try {
        await exerciseBounded(file, 'dmg');
      } catch (err) {
        throw new Error(`${what}: ${(err as Error).stack ?? String(err)}`);
      }
      expect(await md5File(file), `${what} changed the file`).to.equal(before);
    }
  });
});

describe('qcow2 compressed clusters read together (one pread per request)', function () {
  this.timeout(60_000);
  let tmp: ReturnType<typeof tempDir>;
  let src: Buffer;
  let image: Buffer;
  /** Where each guest cluster's compressed bytes start (64 KiB clusters, one L2 table). */
  let cOffsets: number[];
  before(async () => {
    tmp = tempDir('compressed-group');
    // 1 MiB of hex text: each cluster compresses to about half, so the group spans ~512 KiB.
    src = Buffer.from(Buffer.from(Array.from({ length: MiB / 2 }, (_, i) => (i * 2654435761) >>> 24)).toString('hex'));
    const raw = path.join(tmp.dir, 'src.raw');
    fs.writeFileSync(raw, src);
    const file = path.join(tmp.dir, 'c.qcow2');
    const made = await run('qemu-img', ['convert', '-q', '-f', 'raw', '-O', 'qcow2', '-c', '-o', 'cluster_size=65536', raw, file]);
    expect(made.code, made.stderr).to.equal(0);
    image = fs.readFileSync(file);
    const l1 = Number(image.readBigUInt64BE(40));
    const l2 = Number(image.readBigUInt64BE(l1) & 0x00fffffffffffe00n);
    cOffsets = [];
    for (let i = 0; i < 16; i++) {
      const e = image.readBigUInt64BE(l2 + i * 8);
      expect(Number((e >> 62n) & 1n), `cluster ${i} is compressed`).to.equal(1);
      cOffsets.push(Number(e & ((1n << 54n) - 1n)));
    }
  });
  after(() => tmp.cleanup());

  async function open(bytes: Buffer): Promise<BlockNode> {
    const file = path.join(tmp.dir, 'mut.qcow2');
    fs.writeFileSync(file, bytes);
    return openImage(file, { readOnly: true, format: 'qcow2', cache: 'writeback', metadataCacheBytes: 1 << 20, locking: 'off', forceShare: false, shareRw: false });
  }

  async function readsAs(node: BlockNode, offset: number, length: number): Promise<void> {
    const buf = Buffer.alloc(length);
    await node.read(offset, buf);
    expect(buf.equals(src.subarray(offset, offset + length)), `bytes at 0x${offset.toString(16)}`).to.equal(true);
  }

  it('reads a whole request of compressed clusters as qemu-img wrote them', async function () {
    const node = await open(image);
    try {
      await readsAs(node, 0, MiB);
      await readsAs(node, 100_000, 300_000);
    } finally {
      await node.close();
    }
  });

  it('overlapping reads in flight together share clusters and read the same bytes', async function () {
    const node = await open(image);
    try {
      await Promise.all([readsAs(node, 0, MiB), readsAs(node, 65536, 512 * 1024), readsAs(node, 3 * 65536 + 100, 5000), readsAs(node, 200_000, 700_000)]);
      await Promise.all([readsAs(node, 0, MiB), readsAs(node, 0, MiB), readsAs(node, 15 * 65536, 65536)]);
      // Small reads inside clusters a group read kept.
      for (let i = 0; i < 16; i++) await readsAs(node, i * 65536 + 1000, 3000);
    } finally {
      await node.close();
    }
  });

  it('a damaged cluster fails its request cleanly; its neighbours still read', async function () {
    const bad = Buffer.from(image);
    // Cluster 3's compressed bytes become an invalid deflate block type.
    bad.fill(0xff, cOffsets[3]!, cOffsets[3]! + 64);
    const node = await open(bad);
    try {
      for (let round = 0; round < 2; round++) {
        const err = await withDeadline(node.read(0, Buffer.alloc(MiB)).then(() => undefined, (e: unknown) => e), 'damaged group read');
        expect(isClean(err), String(err)).to.equal(true);
        expect((err as Error).message).to.match(/guest offset 0x30000/);
      }
      await readsAs(node, 0, 3 * 64 * 1024);
      await readsAs(node, 4 * 64 * 1024, 12 * 64 * 1024);
    } finally {
      await node.close();
    }
  });

  it('compressed bytes cut off by the end of the file fail cleanly', async function () {
    const node = await open(image.subarray(0, cOffsets[15]! + 100));
    try {
      const err = await withDeadline(node.read(0, Buffer.alloc(MiB)).then(() => undefined, (e: unknown) => e), 'truncated group read');
      expect(isClean(err), String(err)).to.equal(true);
      await readsAs(node, 0, 15 * 64 * 1024);
    } finally {
      await node.close();
    }
  });
});

// Found by the read map's differential test (read-map-hostile.test.ts): the cluster
// cache reads whole 64 KiB blocks to cache them, so a read of clusters next to a damaged
// one (4 KiB clusters, the same block) failed with the damaged cluster's error, where
// QEMU reads only what was asked and succeeds.
describe('a damaged cluster outside a request, inside the cache block it reads', function () {
  this.timeout(60_000);
  let tmp: ReturnType<typeof tempDir>;
  before(() => (tmp = tempDir('damaged-neighbour')));
  after(() => tmp.cleanup());

  it('fails only the reads that include it, as qemu-io does; its neighbours read through the cache', async function () {
    const src = Buffer.from(Buffer.from(Array.from({ length: 128 * 1024 }, (_, i) => (i * 2654435761) >>> 24)).toString('hex'));
    const raw = path.join(tmp.dir, 'src.raw');
    fs.writeFileSync(raw, src);
    const file = path.join(tmp.dir, 'c4k.qcow2');
    await runOk('qemu-img', ['convert', '-q', '-f', 'raw', '-O', 'qcow2', '-c', '-o', 'cluster_size=4096', raw, file]);
    const image = fs.readFileSync(file);
    const l1 = Number(image.readBigUInt64BE(40));
    const l2 = Number(image.readBigUInt64BE(l1) & 0x00fffffffffffe00n);
    // Cluster 10 (guest 0xa000): its compressed bytes an invalid deflate block type.
    const e = image.readBigUInt64BE(l2 + 10 * 8);
    expect(Number((e >> 62n) & 1n), 'cluster 10 is compressed').to.equal(1);
    const at = Number(e & ((1n << 54n) - 1n));
    image.fill(0xff, at, at + 32);
    fs.writeFileSync(file, image);
    // The oracle: a read across the first two 64 KiB blocks without cluster 10 succeeds, one with it fails.
    expect((await run('qemu-io', ['-f', 'qcow2', '-r', '-c', 'read 0xf000 0x2000', file])).stdout).to.match(/read 8192\/8192 bytes/);
    expect((await run('qemu-io', ['-f', 'qcow2', '-r', '-c', 'read 0x9000 0x8000', file])).stdout).to.match(/read failed/);
    const [node] = await openGraph([file], { readOnly: true, format: 'qcow2', cache: 'writeback', cacheSize: 4 * MiB, locking: 'off', forceShare: false, shareRw: false });
    try {
      for (let round = 0; round < 2; round++) {
        const buf = Buffer.alloc(0x2000);
        await node!.read(0xf000, buf);
        expect(buf.equals(src.subarray(0xf000, 0x11000)), 'bytes at 0xf000').to.equal(true);
        const err = await node!.read(0x9000, Buffer.alloc(0x8000)).then(() => undefined, (x: unknown) => x);
        expect(isClean(err), String(err)).to.equal(true);
        expect((err as Error).message).to.match(/guest offset 0xa000/);
      }
    } finally {
      await node!.close();
    }
  });
});

// The snapshot deltas of issue 14, which qemu-img cannot make: generated
// (test/helpers/deltas.ts), then damaged where their tables live.
describe('corrupt snapshot deltas (seSparse, differencing VHDX)', function () {
  this.timeout(SOAK ? 3_600_000 : 180_000);
  let tmp: ReturnType<typeof tempDir>;
  before(() => {
    tmp = tempDir('corrupt-deltas');
  });
  after(() => tmp.cleanup());

  /** Copies of `file` with bytes flipped in `spans`, or cut short; each exercised against `top`. */
  async function mutateAndExercise(file: string, top: string, format: string, spans: [number, number][], seed: number): Promise<void> {
    const pristine = `${file}.pristine`;
    fs.copyFileSync(file, pristine);
    const size = fs.statSync(pristine).size;
    const random = rng(seed);
    for (let round = 0; round < ROUNDS; round++) {
      fs.copyFileSync(pristine, file);
      if (round % 4 === 3) {
        fs.truncateSync(file, Math.floor(random() * size));
      } else {
        const fd = fs.openSync(file, 'r+');
        try {
          for (let k = 0, flips = 1 + Math.floor(random() * 8); k < flips; k++) {
            const [a, b] = spans[Math.floor(random() * spans.length)]!;
            fs.writeSync(fd, Buffer.from([Math.floor(random() * 256)]), 0, 1, a + Math.floor(random() * (b - a)));
          }
        } finally {
          fs.closeSync(fd);
        }
      }
      const before = await md5File(file);
      const what = `${path.basename(file)} round ${round}`;
      try {
        await withDeadline(exercise(top, format), what);
      } catch (err) {
        throw new Error(`${what}: ${(err as Error).stack ?? String(err)}`);
      }
      expect(await md5File(file), `${what} changed the file`).to.equal(before);
    }
  }

  it('seSparse: flipped header, directory and table bytes, and truncation give a clean error or a full read', async () => {
    const dir = fs.mkdtempSync(path.join(tmp.dir, 'se-'));
    const grains = new Map<number, SeGrain>([
      [0, { kind: 'data', seed: 1 }],
      [1, { kind: 'zero' }],
      [2, { kind: 'unmapped' }],
      [4096 + 3, { kind: 'data', seed: 2 }],
    ]);
    let layout: SeSparseLayout | undefined;
    const { extent, child } = await makeSeSparseChain(dir, {
      size: 24 * MiB,
      grains,
      fillParent: (p) => qemuIo(p, 'vmdk', ['write -P 0x5a 0 2M']),
      mutate: (_b, l) => void (layout = l),
    });
    const l = layout!;
    await mutateAndExercise(extent, child, 'vmdk', [[0, 1024], [l.gdSector * 512, l.gdSector * 512 + 64], [l.gtSector * 512, l.gtSector * 512 + 2 * 32768]], 0x5e5e);
  });

  it('differencing VHDX: flipped locator, BAT and sector bitmap bytes, and truncation give a clean error or a full read', async () => {
    const dir = fs.mkdtempSync(path.join(tmp.dir, 'avhdx-'));
    const parent = path.join(dir, 'parent.vhdx');
    await run('qemu-img', ['create', '-q', '-f', 'vhdx', '-o', 'block_size=1M', parent, '8M']);
    await qemuIo(parent, 'vhdx', ['write -P 0x5a 0 8M']);
    const child = path.join(dir, 'child.avhdx');
    let spans: [number, number][] = [];
    await makeVhdxChild(child, parent, {
      size: 8 * MiB,
      blockSize: MiB,
      blocks: new Map<number, VhdxChildBlock>([
        [0, { kind: 'full', seed: 1 }],
        [1, { kind: 'partial', seed: 2, sectors: [[3, 900]] }],
        [2, { kind: 'zero' }],
      ]),
      mutate: (_f, l) => {
        spans = [
          [l.locatorOffset, l.locatorOffset + 256],
          [l.metaOffset, l.metaOffset + 256],
          [l.batOffset, l.batOffset + 32],
          [l.batOffset + l.chunkRatio * 8, l.batOffset + l.chunkRatio * 8 + 8],
          [l.bitmapOffset!, l.bitmapOffset! + 512],
        ];
      },
    });
    const parentMd5 = await md5File(parent);
    await mutateAndExercise(child, child, 'vhdx', spans, 0xa7d);
    expect(await md5File(parent)).to.equal(parentMd5);
  });
});

// Issue 20: every format and variant the fuzzer starts from (scripts/lib/seeds.ts:
// qcow2 with snapshots, backing and compressed clusters, vmdk sparse, streamOptimized,
// flat and a descriptor with extents, ...), each kind of mutation (scripts/lib/mutate.ts)
// applied to each: bit flips in headers and tables, tables pointing at each other, at
// metadata, at themselves or past the end, copied over each other, absurd values,
// truncation, descriptor numbers, names and extent lists. Every open and read within a
// deadline, no Buffer over the cache plus a fixed bound, the file not written (mtime
// and content).
describe('every format and variant, every kind of mutation', function () {
  this.timeout(SOAK ? 3_600_000 : 240_000);
  let tmp: ReturnType<typeof tempDir>;
  let seeds: Seed[] = [];
  before(async function () {
    this.timeout(300_000);
    tmp = tempDir('corrupt-kinds');
    seeds = await makeSeeds(tmp.dir);
  });
  after(() => tmp.cleanup());

  const PER_KIND = SOAK ? 20 : 1;
  for (const format of SEED_FORMATS) {
    it(`${format}: ${MUTATION_KINDS.length} kinds of mutation over its variants`, async function () {
      const mine = seeds.filter((s) => s.format === format);
      if (mine.length === 0) this.skip();
      let tried = 0;
      // Each kind on one variant in turn (every variant gets every kind with TSMOUNT_SOAK=1).
      for (const [v, seed] of mine.entries()) {
        const image = fs.readFileSync(seed.file);
        const shape = shapeOf(image);
        const random = rng(0x20 ^ seed.name.length * 131 ^ seed.name.charCodeAt(seed.name.length - 1));
        const file = path.join(path.dirname(seed.file), `mut.${path.extname(seed.file).slice(1)}`);
        for (const [k, kind] of MUTATION_KINDS.entries()) {
          if (!SOAK && k % mine.length !== v) continue;
          for (let round = 0; round < PER_KIND; round++) {
            const { out, kind: done } = mutate(image, shape, random, { kind, other: image, selfName: path.basename(file) });
            fs.writeFileSync(file, out);
            const before = await md5File(file);
            const what = `${seed.name} ${done} round ${round}`;
            try {
              await exerciseBounded(file, format);
            } catch (err) {
              throw new Error(`${what}: ${(err as Error).stack ?? String(err)}`);
            }
            expect(await md5File(file), `${what} changed the file`).to.equal(before);
            tried++;
          }
        }
      }
      mutationsTried += tried;
    });
  }
  after(() => console.log(`      ${mutationsTried} mutated images opened and read`));
});
let mutationsTried = 0;

// Loops and absurd values made on purpose, which random mutation is unlikely to hit.
describe('backing chains and extent lists that loop, absurd sizes, hostile snapshot tables', function () {
  this.timeout(120_000);
  let tmp: ReturnType<typeof tempDir>;
  before(() => (tmp = tempDir('corrupt-loops')));
  after(() => tmp.cleanup());

  async function refusedOrRead(file: string, format: string): Promise<string> {
    const before = await md5File(file);
    const { outcome } = await exerciseBounded(file, format);
    expect(await md5File(file), 'the file is unchanged').to.equal(before);
    return outcome;
  }

  /** The error opening `file`, which must be refused. */
  async function refusal(file: string, format: string): Promise<string> {
    try {
      const node = await openTestImage(file, { format });
      await node.close();
    } catch (err) {
      expect(isClean(err), String(err)).to.equal(true);
      return (err as Error).message;
    }
    throw new Error(`${file} opened`);
  }

  /** Rewrite the descriptor embedded in a monolithicSparse vmdk (in place, within its room). */
  function editDescriptor(file: string, edit: (text: string) => string): void {
    const b = fs.readFileSync(file);
    const at = Number(b.readBigUInt64LE(28)) * 512;
    const room = Number(b.readBigUInt64LE(36)) * 512;
    const text = b.subarray(at, at + room).toString('latin1').replace(/\0+$/, '');
    const out = Buffer.alloc(room);
    out.write(edit(text), 'latin1');
    out.copy(b, at);
    fs.writeFileSync(file, b);
  }

  /** Make `child` name `parent` as its backing file (a loop when the chain comes back). */
  async function setBacking(format: string, child: string, parent: string): Promise<void> {
    const dir = path.dirname(child);
    if (format !== 'vmdk') {
      await runOk('qemu-img', ['rebase', '-u', '-f', format, '-b', path.basename(parent), '-F', format, child], { cwd: dir });
      return;
    }
    // qemu-img cannot rebase a vmdk: the descriptor names the parent and its CID.
    const cid = /^CID=(\w+)/m.exec(fs.readFileSync(parent).toString('latin1'))![1]!;
    editDescriptor(child, (t) => t.replace(/^parentFileNameHint=.*\n/m, '').replace(/^parentCID=\w+/m, `parentCID=${cid}`).replace(/^(createType=.*)$/m, `$1\nparentFileNameHint="${path.basename(parent)}"`));
  }

  for (const format of ['qcow2', 'qed', 'vmdk']) {
    it(`${format}: a backing file that is the image itself, and a -> b -> a, are refused cleanly`, async () => {
      const dir = fs.mkdtempSync(path.join(tmp.dir, `${format}-`));
      const a = path.join(dir, `a.${format}`);
      const b = path.join(dir, `b.${format}`);
      await createImage(a, format, '4M');
      await qemuIo(a, format, ['write -P 0x11 0 64k']);
      await createImage(b, format, '4M', {}, { file: `a.${format}`, format });
      await setBacking(format, a, a);
      expect(await refusal(a, format)).to.match(/loop|itself|chain|depth|backing|parent/i);
      await refusedOrRead(a, format);
      await setBacking(format, a, b);
      expect(await refusal(b, format)).to.match(/loop|itself|chain|depth|backing|parent/i);
      await refusedOrRead(b, format);
    });
  }

  /** A descriptor for `extents` (lines "RW n SPARSE \"f\""). */
  function descriptor(extents: string[], extra = ''): string {
    return ['# Disk DescriptorFile', 'version=1', 'CID=fffffffe', 'parentCID=ffffffff', 'createType="twoGbMaxExtentSparse"', '', ...extents, '', 'ddb.virtualHWVersion = "4"', extra, ''].join('\n');
  }

  it('vmdk: an extent list naming the descriptor itself, the same extent thousands of times, and absurd extent sizes', async () => {
    const dir = fs.mkdtempSync(path.join(tmp.dir, 'vmdk-ext-'));
    const d = path.join(dir, 'd.vmdk');
    await createImage(d, 'vmdk', '4M', { subformat: 'twoGbMaxExtentSparse' });
    await qemuIo(d, 'vmdk', ['write -P 0x22 0 64k']);
    const extent = fs.readdirSync(dir).find((f) => f !== 'd.vmdk')!;
    const cases: [string, string][] = [
      ['itself, sparse', descriptor(['RW 8192 SPARSE "d.vmdk"'])],
      ['itself, flat', descriptor(['RW 8192 FLAT "d.vmdk" 0'])],
      ['itself after a real one', descriptor([`RW 8192 SPARSE "${extent}"`, 'RW 8192 SPARSE "d.vmdk"'])],
      ['one extent 5000 times', descriptor(Array.from({ length: 5000 }, () => `RW 8192 SPARSE "${extent}"`))],
      ['2^53 sectors', descriptor([`RW 9007199254740992 SPARSE "${extent}"`])],
      ['2^64 sectors', descriptor([`RW 18446744073709551616 SPARSE "${extent}"`])],
      ['a flat extent at an offset past its end', descriptor([`RW 8192 FLAT "${extent}" 99999999999`])],
      ['a parent that is itself', descriptor([`RW 8192 SPARSE "${extent}"`], 'parentFileNameHint="d.vmdk"').replace('parentCID=ffffffff', 'parentCID=fffffffe')],
    ];
    for (const [what, text] of cases) {
      fs.writeFileSync(d, text);
      const outcome = await refusedOrRead(d, 'vmdk').catch((err: unknown) => {
        throw new Error(`${what}: ${String(err)}`);
      });
      if (/itself, sparse|after a real|2\^64/.test(what)) expect(outcome, what).to.equal('refused');
    }
    // One sparse file named twice reads (as QEMU), but is not opened for writing: each
    // extent would allocate grains over the other's.
    fs.writeFileSync(d, descriptor([`RW 8192 SPARSE "${extent}"`, `RW 8192 SPARSE "${extent}"`]));
    const err = await openTestImage(d, { format: 'vmdk', rw: true }).then((n) => n.close().then(() => undefined), (e: unknown) => e);
    expect(String(err)).to.match(/more than once: it can only be opened read-only/);
  });

  it('qcow2: an absurd disk size, a snapshot table over the header or the L1 table, a snapshot whose L1 is the header, 65536 snapshots', async () => {
    const f = path.join(tmp.dir, 'snap.qcow2');
    await createImage(f, 'qcow2', '4M', { cluster_size: '4k' });
    await qemuIo(f, 'qcow2', ['write -P 0x33 0 64k']);
    await runOk('qemu-img', ['snapshot', '-c', 's1', f]);
    const pristine = fs.readFileSync(f);
    const l1 = Number(pristine.readBigUInt64BE(40));
    const snapTable = Number(pristine.readBigUInt64BE(64));
    const be64 = (v: bigint): Buffer => {
      const b = Buffer.alloc(8);
      b.writeBigUInt64BE(v);
      return b;
    };
    const be32 = (v: number): Buffer => {
      const b = Buffer.alloc(4);
      b.writeUInt32BE(v >>> 0);
      return b;
    };
    const edits: [string, [number, Buffer][]][] = [
      ['disk size 2^63 - 1', [[24, be64(2n ** 63n - 1n)]]],
      ['disk size 2^56', [[24, be64(2n ** 56n)]]],
      ['snapshot table at the header', [[64, be64(0n)]]],
      ['snapshot table at the active L1 table', [[64, be64(BigInt(l1))]]],
      ['snapshot table past the end', [[64, be64(BigInt(pristine.length + 65536))]]],
      ['65536 snapshots', [[60, be32(65536)]]],
      ['the snapshot L1 at the header, 2^30 entries', [[snapTable, be64(0n)], [snapTable + 8, be32(2 ** 30)]]],
      ['the snapshot L1 at the snapshot table', [[snapTable, be64(BigInt(snapTable))]]],
      ['a snapshot whose extra data claims 4 GiB', [[snapTable + 32, be32(0xffffffff)]]],
    ];
    for (const [what, patches] of edits) {
      const b = Buffer.from(pristine);
      for (const [at, v] of patches) v.copy(b, at);
      fs.writeFileSync(f, b);
      await refusedOrRead(f, 'qcow2').catch((err: unknown) => {
        throw new Error(`${what}: ${String(err)}`);
      });
    }
  });
});
