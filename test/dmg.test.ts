// dmg (Apple UDIF), read-only: the images hdiutil made (shared/samples/dmg, each with
// the md5 of its disk) read byte for byte, in-process and through a real FUSE mount
// (probed, without -f); generated images with every chunk type and several
// partitions read as the generator's input and as dmg2img decodes them; a chunk type
// nobody knows fails its reads with EIO and says why; --rw is refused; each chunk is
// decompressed once by a sequential read; damaged tables, chunks and streams give one
// clean line or EIO.
import { expect } from 'chai';
import { spawn } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { formatOf } from '../drivers/open.js';
import { dmgDriver, DmgNode } from '../drivers/format/dmg/index.js';
import { ClusterCache, DEFAULT_BLOCK_SIZE } from '../cache/cluster-cache.js';
import { TsmountError } from '../drivers/errors.js';
import { md5File, run, tempDir } from './helpers/qemu.js';
import { MountTracker, mountedPid, TSMOUNT, tsmount, waitFor } from './helpers/mount.js';
import { nodeMd5, openTestImage, testOptions } from './helpers/images.js';
import { MemoryNode } from './helpers/memory-node.js';
import { buildUdif, everyChunkImage, sampleData, writeUdif, type GenImage } from './helpers/udif.js';
import { isClean, rng } from './helpers/corrupt.js';

const KiB = 1024;
const MiB = 1024 * KiB;
/** The samples, as the project's docs place them: ../shared/samples from the repository's root. */
const SAMPLES = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../../shared/samples/dmg');

interface Sample {
  file: string;
  md5: string;
  size: number;
}

function samples(): Sample[] {
  const list = path.join(SAMPLES, 'MD5SUMS.tsv');
  if (!fs.existsSync(list)) return [];
  return fs
    .readFileSync(list, 'utf8')
    .split('\n')
    .filter((l) => l.trim() !== '')
    .map((l) => {
      const [file, md5, size] = l.split('\t');
      return { file: path.join(SAMPLES, file!), md5: md5!, size: Number(size) };
    });
}

const md5 = (b: Uint8Array): string => crypto.createHash('md5').update(b).digest('hex');

async function readAll(node: { size: number; read(o: number, d: Uint8Array): Promise<void> }, chunk: number): Promise<Buffer> {
  const out = Buffer.alloc(node.size);
  for (let off = 0; off < node.size; off += chunk) await node.read(off, out.subarray(off, Math.min(node.size, off + chunk)));
  return out;
}

/** Open a generated image held in memory straight through the driver, as the graph would. */
async function openInMemory(img: GenImage, metadataCacheBytes = 1 << 20): Promise<DmgNode> {
  const file = new MemoryNode(img.image, { readOnly: true, name: 'gen.dmg' });
  const node = await dmgDriver.open(file, { ...testOptions({ metadataCacheBytes }), openBacking: () => Promise.reject(new Error('no backing')) });
  if (!(node instanceof DmgNode)) throw new Error('dmg driver did not return a DmgNode');
  return node;
}

describe('dmg: images made by hdiutil (shared/samples/dmg)', function () {
  this.timeout(120_000);
  const list = samples();
  before(function () {
    if (list.length === 0) {
      console.log(`    (skipped: no dmg samples at ${SAMPLES}; they come with the project's shared folder)`);
      this.skip();
    }
  });

  for (const name of ['compression-raw', 'compression-zlib', 'compression-bz2', 'compression-adc', 'compression-lzfse', 'gpt', 'raw', 'zlib-compressed']) {
    it(`${name}.dmg reads as its md5 says (probed without -f)`, async function () {
      const s = list.find((x) => path.basename(x.file) === `${name}.dmg`);
      if (!s) this.skip();
      const node = await openTestImage(s!.file);
      try {
        expect(formatOf(node)).to.equal('dmg');
        expect(node.size).to.equal(s!.size);
        expect(await nodeMd5(node, MiB)).to.equal(s!.md5);
        expect(await nodeMd5(node, 100_003), 'odd-sized reads across chunk edges').to.equal(s!.md5);
      } finally {
        await node.close();
      }
    });
  }

  it('the LZFSE sample exercises LZFSE (bvx2) and LZVN (bvxn) blocks', function () {
    const s = list.find((x) => path.basename(x.file) === 'compression-lzfse.dmg');
    if (!s) this.skip();
    const bytes = fs.readFileSync(s!.file).toString('latin1');
    expect(bytes).to.contain('bvx2');
    expect(bytes).to.contain('bvxn');
  });
});

describe('dmg: through a real FUSE mount', function () {
  this.timeout(120_000);
  let tmp: ReturnType<typeof tempDir>;
  const mounts = new MountTracker();
  before(() => (tmp = tempDir('dmg-mount')));
  afterEach(() => mounts.cleanup());
  after(() => tmp.cleanup());

  it('mounts the bzip2 sample without -f, read-only, and reads its md5; LZFSE too', async function () {
    const list = samples();
    const picks = ['compression-bz2.dmg', 'compression-lzfse.dmg'].map((n) => list.find((s) => path.basename(s.file) === n));
    if (picks.some((p) => !p)) {
      console.log(`    (skipped: no dmg samples at ${SAMPLES})`);
      this.skip();
    }
    for (const s of picks) {
      const mp = path.join(tmp.dir, `mnt-${path.basename(s!.file, '.dmg')}`);
      fs.mkdirSync(mp);
      await mounts.mount([s!.file, mp]);
      const flat = path.join(mp, `${path.basename(s!.file, '.dmg')}.raw`);
      expect(fs.statSync(flat).size).to.equal(s!.size);
      expect(await md5File(flat)).to.equal(s!.md5);
      expect(() => fs.openSync(flat, 'r+'), 'the flat file is read-only').to.throw();
      await mounts.unmount(mp);
    }
  });

  it('cat of the flat file (kernel readahead, the default cache) decompresses each chunk once: 52 MiB in 1 MiB chunks, partitions off 64 KiB', async function () {
    const MiB1 = 1024 * KiB;
    const chunks = (kind: 'zlib' | 'bzip2' | 'lzfse' | 'adc', n: number, seed: number) => Array.from({ length: n }, (_, i) => ({ kind, data: sampleData(MiB1, seed + i) }));
    const img = buildUdif([
      { name: 'first (Apple_HFS : 0)', chunks: [...chunks('zlib', 40, 1000), { kind: 'raw', data: sampleData(7 * 512, 1) }] },
      { name: 'second (Apple_HFS : 1)', chunks: [...chunks('bzip2', 4, 2000), ...chunks('lzfse', 4, 3000), ...chunks('adc', 4, 4000)] },
    ]);
    const file = path.join(tmp.dir, 'big.dmg');
    writeUdif(file, img);
    const mp = path.join(tmp.dir, 'mnt-big');
    fs.mkdirSync(mp);
    mounts.track(mp);
    const child = spawn(process.execPath, [TSMOUNT, '--foreground', file, mp], { stdio: ['ignore', 'ignore', 'pipe'], env: { ...process.env, DEBUG: 'tsmount:dmg' } });
    mounts.trackChild(child);
    let stderr = '';
    child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
    await waitFor(() => mountedPid(mp) !== undefined || child.exitCode !== null, 30_000, 'the mount');
    expect(mountedPid(mp), stderr).to.not.equal(undefined);
    const cat = await run('sh', ['-c', `cat '${path.join(mp, 'big.raw')}' | md5sum`], { timeoutMs: 300_000 });
    expect(cat.stdout.split(' ')[0]).to.equal(md5(img.disk));
    await mounts.unmount(mp);
    await new Promise((r) => (child.exitCode !== null ? r(undefined) : child.once('exit', r)));
    const decoded = stderr.split('\n').filter((l) => /decode chunk \d+/.test(l)).map((l) => Number(/decode chunk (\d+)/.exec(l)![1]));
    expect(decoded.length, 'decompressions').to.equal(52);
    expect(new Set(decoded).size, 'distinct chunks').to.equal(52);
  });

  it('refuses --rw with one line naming the image, and mounts nothing', async function () {
    const file = path.join(tmp.dir, 'gen.dmg');
    writeUdif(file, everyChunkImage({ kinds: ['zlib', 'raw'] }));
    const mp = path.join(tmp.dir, 'mnt-rw');
    fs.mkdirSync(mp);
    const before = await md5File(file);
    const r = await tsmount(['--rw', file, mp]);
    expect(r.code).to.not.equal(0);
    const lines = r.stderr.trim().split('\n');
    expect(lines, r.stderr).to.have.length(1);
    expect(lines[0]).to.contain('gen.dmg').and.to.match(/read-only/);
    expect(fs.readFileSync('/proc/mounts', 'utf8')).to.not.contain(mp);
    expect(await md5File(file)).to.equal(before);
  });
});

describe('dmg: generated images with every chunk type', function () {
  this.timeout(120_000);
  let tmp: ReturnType<typeof tempDir>;
  before(() => (tmp = tempDir('dmg-gen')));
  after(() => tmp.cleanup());

  for (const tables of ['xml', 'rsrc'] as const) {
    it(`raw, zlib, bzip2, ADC, LZFSE, zero and ignore chunks in three partitions (tables in the ${tables === 'xml' ? 'XML property list' : 'binary resource fork'}) read as the generator's input`, async function () {
      const img = everyChunkImage({ tables });
      const file = path.join(tmp.dir, `every-${tables}.dmg`);
      writeUdif(file, img);
      const node = await openTestImage(file);
      try {
        expect(formatOf(node)).to.equal('dmg');
        expect(node.size).to.equal(img.disk.length);
        const want = md5(img.disk);
        expect(await nodeMd5(node, 128 * KiB)).to.equal(want);
        expect(await nodeMd5(node, 4096 + 512 + 3)).to.equal(want);
        // Block status: zero and ignore chunks are holes, the rest is data.
        const st = await node.blockStatus(0, node.size);
        expect(st.some((e) => e.kind === 'zero')).to.equal(true);
        expect(st.some((e) => e.kind === 'data')).to.equal(true);
      } finally {
        await node.close();
      }
    });
  }

  it('dmg2img decodes the generated image (every type it knows: all but LZFSE) to the same disk, and so does tsmount', async function () {
    const which = await run('sh', ['-c', 'command -v dmg2img']);
    if (which.code !== 0) {
      console.log('    (skipped: dmg2img is not installed; scripts/setup.sh installs it)');
      this.skip();
    }
    const img = everyChunkImage({ kinds: ['raw', 'zlib', 'bzip2', 'adc', 'zero', 'ignore'] });
    const file = path.join(tmp.dir, 'for-dmg2img.dmg');
    writeUdif(file, img);
    const out = path.join(tmp.dir, 'dmg2img.img');
    const r = await run('dmg2img', ['-s', '-i', file, '-o', out]);
    expect(r.code, r.stderr + r.stdout).to.equal(0);
    const theirs = fs.readFileSync(out);
    expect(md5(theirs), 'dmg2img against the generator').to.equal(md5(img.disk));
    const node = await openTestImage(file);
    try {
      expect(await nodeMd5(node, 128 * KiB), 'tsmount against dmg2img').to.equal(md5(theirs));
    } finally {
      await node.close();
    }
  });

  it('qemu-img reads the zlib/raw/zero image the same (the types QEMU decodes)', async function () {
    const img = everyChunkImage({ kinds: ['raw', 'zlib', 'zero', 'ignore'] });
    const file = path.join(tmp.dir, 'for-qemu.dmg');
    writeUdif(file, img);
    const out = path.join(tmp.dir, 'qemu.raw');
    const r = await run('qemu-img', ['convert', '-f', 'dmg', '-O', 'raw', file, out]);
    expect(r.code, r.stderr).to.equal(0);
    expect(await md5File(out)).to.equal(md5(img.disk));
  });

  it('a chunk of a type nobody knows fails its reads with EIO and a reason; the chunks around it still read', async function () {
    const a = sampleData(64 * KiB, 1);
    const b = sampleData(64 * KiB, 2);
    const c = sampleData(64 * KiB, 3);
    const img = buildUdif([{ name: 'p', chunks: [{ kind: 'zlib', data: a }, { kind: 'unknown', data: b }, { kind: 'raw', data: c }] }]);
    const node = await openInMemory(img);
    try {
      const err = await node.read(64 * KiB + 100, Buffer.alloc(1000)).then(
        () => undefined,
        (e: unknown) => e,
      );
      expect(err).to.be.instanceOf(TsmountError);
      expect((err as TsmountError).errno).to.equal(5); // EIO
      expect((err as Error).message).to.contain('type 0x8000000a').and.to.contain('gen.dmg');
      const whole = await node.read(0, Buffer.alloc(3 * 64 * KiB)).then(
        () => 'read',
        (e: unknown) => (e instanceof TsmountError ? 'EIO' : String(e)),
      );
      expect(whole, 'never zeros in place of data').to.equal('EIO');
      const head = Buffer.alloc(64 * KiB);
      await node.read(0, head);
      expect(head.equals(a)).to.equal(true);
      const tail = Buffer.alloc(64 * KiB);
      await node.read(128 * KiB, tail);
      expect(tail.equals(c)).to.equal(true);
    } finally {
      await node.close();
    }
  });

  it('sectors no block table maps (a trailer claiming more) fail with EIO, as in QEMU; the mapped ones read', async function () {
    const a = sampleData(64 * KiB, 4);
    const img = buildUdif([{ name: 'p', chunks: [{ kind: 'zlib', data: a }] }]);
    img.image.writeBigUInt64BE(BigInt((128 * KiB) / 512), img.image.length - 512 + 0x1ec);
    const node = await openInMemory(img);
    try {
      expect(node.size).to.equal(128 * KiB);
      const err = await node.read(64 * KiB - 512, Buffer.alloc(1024)).then(
        () => undefined,
        (e: unknown) => e,
      );
      expect((err as TsmountError).errno).to.equal(5);
      expect((err as Error).message).to.contain('no dmg block table maps sector 128');
      const head = Buffer.alloc(64 * KiB);
      await node.read(0, head);
      expect(head.equals(a)).to.equal(true);
    } finally {
      await node.close();
    }
  });

  it('a sequential read of the whole image under the cluster cache decompresses every chunk exactly once', async function () {
    const img = everyChunkImage();
    const compressed = img.stored.filter((s) => ['zlib', 'bzip2', 'adc', 'lzfse'].includes(s.kind)).length;
    for (const request of [128 * KiB, 4 * KiB, 1 * MiB]) {
      const node = await openInMemory(img, 16 * MiB);
      const top = new ClusterCache(node, { mode: 'writeback', maxBytes: 48 * MiB, blockSize: DEFAULT_BLOCK_SIZE });
      try {
        const got = await readAll(top, request);
        expect(md5(got)).to.equal(md5(img.disk));
        expect(node.decoded.loads, `decompressions with ${request}-byte reads`).to.equal(compressed);
      } finally {
        await top.close();
      }
    }
  });

  it('with the smallest budget it still decodes each chunk once when read in order (two chunks are always kept)', async function () {
    const img = everyChunkImage();
    const compressed = img.stored.filter((s) => ['zlib', 'bzip2', 'adc', 'lzfse'].includes(s.kind)).length;
    const node = await openInMemory(img, 0);
    try {
      const got = await readAll(node, 128 * KiB);
      expect(md5(got)).to.equal(md5(img.disk));
      expect(node.decoded.loads).to.equal(compressed);
    } finally {
      await node.close();
    }
  });

  it('a qcow2 whose last cluster holds the end of a dmg is still probed as qcow2', async function () {
    const img = everyChunkImage({ kinds: ['raw'] });
    const raw = path.join(tmp.dir, 'holds-dmg.raw');
    const pad = (64 * KiB - (img.image.length % (64 * KiB))) % (64 * KiB);
    fs.writeFileSync(raw, Buffer.concat([Buffer.alloc(pad, 1), img.image]));
    const q = path.join(tmp.dir, 'holds-dmg.qcow2');
    const r = await run('qemu-img', ['convert', '-O', 'qcow2', raw, q]);
    expect(r.code, r.stderr).to.equal(0);
    const b = fs.readFileSync(q);
    expect(b.toString('latin1', b.length - 512, b.length - 508), 'the file ends with a koly trailer').to.equal('koly');
    const node = await openTestImage(q);
    try {
      expect(formatOf(node)).to.equal('qcow2');
    } finally {
      await node.close();
    }
  });

  it('refuses to open read-write, in one line', async function () {
    const file = path.join(tmp.dir, 'rw.dmg');
    writeUdif(file, everyChunkImage({ kinds: ['raw'] }));
    const err = await openTestImage(file, { rw: true }).then(
      (n) => n.close().then(() => undefined),
      (e: unknown) => e,
    );
    expect(isClean(err), String(err)).to.equal(true);
    expect((err as Error).message).to.match(/rw\.dmg: dmg images can only be opened read-only/);
  });
});

describe('dmg: damaged images', function () {
  this.timeout(120_000);
  let tmp: ReturnType<typeof tempDir>;
  let img: GenImage;
  before(() => {
    tmp = tempDir('dmg-bad');
    img = everyChunkImage();
  });
  after(() => tmp.cleanup());

  const kolyAt = (b: Buffer): number => b.length - 512;
  async function outcome(bytes: Buffer): Promise<{ open: 'refused' | 'opened'; message?: string; readErrors: number }> {
    const file = path.join(tmp.dir, 'bad.dmg');
    fs.writeFileSync(file, bytes);
    let node;
    try {
      node = await openTestImage(file, { format: 'dmg' });
    } catch (err) {
      expect(isClean(err), String((err as Error).stack)).to.equal(true);
      return { open: 'refused', message: (err as Error).message, readErrors: 0 };
    }
    let readErrors = 0;
    try {
      // A damaged trailer may claim petabytes: the first 16 MiB are enough.
      const end = Math.min(node.size, 16 * MiB);
      for (let off = 0; off < end; off += 256 * KiB) {
        await node.read(off, Buffer.alloc(Math.min(256 * KiB, end - off))).catch((err: unknown) => {
          expect(isClean(err), String((err as Error).stack)).to.equal(true);
          readErrors++;
        });
      }
    } finally {
      await node.close();
    }
    return { open: 'opened', readErrors };
  }

  it('a property list claiming 33 MiB is refused before anything that size is allocated', async function () {
    // A sparse file big enough that the claim is inside it.
    const b = Buffer.from(img.image);
    const file = path.join(tmp.dir, 'big.dmg');
    const size = 40 * MiB;
    fs.writeFileSync(file, '');
    fs.truncateSync(file, size);
    const fd = fs.openSync(file, 'r+');
    const k = Buffer.from(b.subarray(kolyAt(b)));
    k.writeBigUInt64BE(BigInt(MiB), 0xd8);
    k.writeBigUInt64BE(BigInt(33 * MiB), 0xe0);
    fs.writeSync(fd, k, 0, 512, size - 512);
    fs.closeSync(fd);
    const before = process.memoryUsage().arrayBuffers;
    const err = await openTestImage(file).then(
      (n) => n.close().then(() => undefined),
      (e: unknown) => e,
    );
    expect(isClean(err), String(err)).to.equal(true);
    expect((err as Error).message).to.match(/property list is \d+ bytes, more than/);
    expect(process.memoryUsage().arrayBuffers - before).to.be.below(16 * MiB);
  });

  it('forks, sizes and offsets pointing outside the file give one line at open', async function () {
    const cases: { what: string; field: number; value: bigint; match: RegExp }[] = [
      { what: 'plist past the trailer', field: 0xd8, value: BigInt(img.image.length), match: /property list .* outside the file/ },
      { what: 'plist length past the trailer', field: 0xe0, value: 1n << 40n, match: /property list .* outside the file/ },
      { what: 'a resource fork outside', field: 0x30, value: 1n << 50n, match: /resource fork .* outside the file/ },
      { what: 'data fork after the trailer', field: 0x18, value: 1n << 40n, match: /data fork starts after the trailer/ },
      { what: 'sector count beyond 2^53 bytes', field: 0x1ec, value: 1n << 62n, match: /out of range|too large/ },
      { what: 'a segmented image', field: 56, value: (1n << 32n) | 3n, match: /segmented dmg images \(3 segments\) are not supported/ },
    ];
    for (const c of cases) {
      const b = Buffer.from(img.image);
      b.writeBigUInt64BE(c.value, kolyAt(b) + c.field);
      const o = await outcome(b);
      expect(o.open, c.what).to.equal('refused');
      expect(o.message, c.what).to.match(c.match).and.to.contain('bad.dmg');
    }
  });

  it('a chunk whose bytes lie past the end of the file (a truncated data fork) is refused at open', async function () {
    // Move the trailer and tables to a shorter file: chunk data is cut, the tables still say where it was.
    const cut = img.stored.find((s) => s.kind === 'lzfse')!;
    const dataEnd = cut.offset + 10;
    const meta = img.image.subarray(img.stored[img.stored.length - 1]!.offset + img.stored[img.stored.length - 1]!.length);
    const b = Buffer.concat([img.image.subarray(0, dataEnd), meta]);
    const k = kolyAt(b);
    const xmlLength = Number(b.readBigUInt64BE(k + 0xe0));
    b.writeBigUInt64BE(BigInt(k - xmlLength), k + 0xd8);
    const o = await outcome(b);
    expect(o.open).to.equal('refused');
    expect(o.message).to.match(/lies past the end of the data/);
  });

  it('a truncated file (the trailer gone) is refused in one line', async function () {
    for (const n of [0, 100, 511, img.image.length >> 1, img.image.length - 1]) {
      const o = await outcome(img.image.subarray(0, n));
      expect(o.open, `cut at ${n}`).to.equal('refused');
    }
  });

  it('each compressed stream damaged fails only its own chunk with EIO', async function () {
    for (const s of img.stored.filter((x) => ['zlib', 'bzip2', 'adc', 'lzfse'].includes(x.kind))) {
      const b = Buffer.from(img.image);
      for (let i = s.offset + 2; i < s.offset + Math.min(s.length, 40); i++) b[i]! ^= 0x5a;
      const o = await outcome(b);
      expect(o.open, s.kind).to.equal('opened');
      expect(o.readErrors, `${s.kind} chunk at sector ${s.sector}`).to.be.at.least(1);
    }
  });

  it('random damage to the tables and trailer: a clean line or clean reads, never a crash or a hang', async function () {
    const tablesStart = img.stored[img.stored.length - 1]!.offset + img.stored[img.stored.length - 1]!.length;
    const rnd = rng(0x5eed);
    for (let round = 0; round < 40; round++) {
      const b = Buffer.from(img.image);
      const flips = 1 + Math.floor(rnd() * 6);
      for (let k = 0; k < flips; k++) {
        const at = tablesStart + Math.floor(rnd() * (b.length - tablesStart));
        b[at] = Math.floor(rnd() * 256);
      }
      const started = Date.now();
      await outcome(b);
      expect(Date.now() - started, `round ${round}`).to.be.below(10_000);
    }
  });
});
