// The vpc (VHD) driver against QEMU's own tools and bochs' bximage: images they
// make read identically through tsmount; tsmount's writes read back in qemu-img;
// tsimg create makes the images qemu-img makes; broken images fail cleanly.
import { expect } from 'chai';
import fs from 'node:fs';
import path from 'node:path';
import { formatOf } from '../drivers/open.js';
import { CorruptImageError, ReadOnlyError, TsmountError } from '../drivers/errors.js';
import { calculateGeometry, roundedImageSize, vpcChecksum } from '../drivers/format/vpc/footer.js';
import { vpcDriver } from '../drivers/format/vpc/index.js';
import { CountingFile } from './helpers/counting-file.js';
import type { BlockNode } from '../drivers/types.js';
import type { Mapper } from '../drivers/format/mapped.js';
import { convertToRaw, createImage, imageInfo, md5File, qemuIo, rawMd5, run, runOk, tempDir } from './helpers/qemu.js';
import { MountTracker } from './helpers/mount.js';
import { expectCreateRefused, expectRefusedUnchanged, expectSameShape, nodeMd5, openTestImage, patch, pattern, readBytes, tsimg } from './helpers/images.js';

const KiB = 1024;
const MiB = 1024 * KiB;

/** The vpc driver over an image file in memory, writable, writeback. */
function openWritable(file: BlockNode): Promise<BlockNode> {
  return vpcDriver.open(file, { readOnly: false, cache: 'writeback', metadataCacheBytes: MiB, openBacking: () => Promise.reject(new Error('none')) });
}

/** Rewrite the footer (at `at`) with `edit` applied and a correct checksum. */
function editFooter(file: string, at: number, edit: (b: Buffer) => void): void {
  const b = readBytes(file, at, 512);
  edit(b);
  b.writeUInt32BE(vpcChecksum(b, 64), 64);
  patch(file, at, b);
}

describe('vpc: reading VHD images', function () {
  this.timeout(120_000);
  let t: ReturnType<typeof tempDir>;
  before(() => (t = tempDir('vpc-read')));
  after(() => t.cleanup());

  // Dynamic and fixed images qemu-img makes read as qemu-img convert does: test/conformance.test.ts
  // (its vpc rows in test/helpers/formats.ts).

  it('probes a dynamic VHD as vpc (and opens a fixed one with -f vpc)', async () => {
    const f = path.join(t.dir, 'probe.vhd');
    await createImage(f, 'vpc', '4M');
    const node = await openTestImage(f);
    expect(formatOf(node)).to.equal('vpc');
    expect(node.size).to.equal((await imageInfo(f))['virtual-size']);
    await node.close();
    const fixed = path.join(t.dir, 'probe-fixed.vhd');
    await createImage(fixed, 'vpc', '4M', { subformat: 'fixed' });
    const n2 = await openTestImage(fixed, { format: 'vpc' });
    expect(n2.size).to.equal((await imageInfo(fixed, 'vpc'))['virtual-size']);
    await n2.close();
  });

  it('reads images made by bochs bximage (empty, and converted from raw data)', async () => {
    const empty = path.join(t.dir, 'bx-empty.vhd');
    await runOk('bximage', ['-func=create', '-hd=10M', '-imgmode=vpc', '-q', empty]);
    // bximage sizes a disk by its own CHS geometry; give it a raw file of exactly that size.
    const raw = path.join(t.dir, 'bx.raw');
    fs.writeFileSync(raw, Buffer.concat([pattern(3 * MiB, 7), Buffer.alloc(4 * MiB), pattern(10321920 - 7 * MiB, 8)]));
    const conv = path.join(t.dir, 'bx-data.vhd');
    await run('bximage', ['-func=convert', '-imgmode=vpc', '-q', raw, conv]);
    for (const f of [empty, conv]) {
      expect(readBytes(f, 28, 4).toString('latin1')).to.equal('bxic');
      const node = await openTestImage(f);
      try {
        expect(node.size).to.equal((await imageInfo(f, 'vpc'))['virtual-size']);
        expect(await nodeMd5(node, MiB)).to.equal(await rawMd5(f, 'vpc'));
      } finally {
        await node.close();
      }
    }
    expect(await rawMd5(conv, 'vpc')).to.equal(await md5File(raw));
  });

  // How the guest-visible size follows the creator application (vpc_open's table).
  const apps = ['vpc ', 'qemu', 'qem2', 'win ', 'd2v ', 'CTXS', 'tap\0', 'bxic', 'XYZ '];
  for (const app of apps) {
    it(`sizes a disk whose creator is '${app.replace('\0', '\\0')}' as qemu-img does`, async () => {
      const f = path.join(t.dir, `app-${apps.indexOf(app)}.vhd`);
      await createImage(f, 'vpc', '10M');
      const end = fs.statSync(f).size - 512;
      const edit = (b: Buffer): void => {
        b.write(app, 28, 'latin1');
        // current_size larger than the geometry says, as Hyper-V writes it.
        b.writeBigUInt64BE(BigInt(10 * MiB + 64 * KiB), 48);
      };
      editFooter(f, 0, edit);
      editFooter(f, end, edit);
      const node = await openTestImage(f);
      try {
        expect(node.size).to.equal((await imageInfo(f, 'vpc'))['virtual-size']);
      } finally {
        await node.close();
      }
    });
  }

  it('uses current_size when the geometry is the CHS maximum', async () => {
    const f = path.join(t.dir, 'maxchs.vhd');
    await createImage(f, 'vpc', '10M', { force_size: 'on' });
    const edit = (b: Buffer): void => {
      b.write('qemu', 28, 'latin1');
    };
    editFooter(f, 0, edit);
    editFooter(f, fs.statSync(f).size - 512, edit);
    const node = await openTestImage(f);
    expect(node.size).to.equal(10 * MiB);
    expect(node.size).to.equal((await imageInfo(f, 'vpc'))['virtual-size']);
    await node.close();
  });
});

describe('vpc: CHS geometry matches QEMU', function () {
  this.timeout(120_000);
  let t: ReturnType<typeof tempDir>;
  before(() => (t = tempDir('vpc-chs')));
  after(() => t.cleanup());

  it('rounds requested sizes up to the geometry qemu-img picks', async () => {
    const sizes = [512, 1000000, 10 * MiB, 127 * MiB + 1, 500 * MiB, 2 * 1024 * MiB + 3, 40 * 1024 * MiB, 127 * 1024 * MiB, 130 * 1024 * MiB, 1500 * 1024 * MiB];
    for (const s of sizes) {
      const f = path.join(t.dir, `chs-${s}.vhd`);
      await createImage(f, 'vpc', s);
      const r = roundedImageSize(Math.ceil(s / 512) * 512, false)!;
      expect(r.totalSectors * 512, `size ${s}`).to.equal((await imageInfo(f, 'vpc'))['virtual-size']);
      const footer = readBytes(f, 0, 512);
      const g = calculateGeometry(r.totalSectors);
      expect([footer.readUInt16BE(56), footer[58], footer[59]], `geometry of ${s}`).to.deep.equal([g.cylinders, g.heads, g.sectorsPerTrack]);
      fs.rmSync(f);
    }
  });
});

describe('vpc: writing', function () {
  this.timeout(180_000);
  let t: ReturnType<typeof tempDir>;
  before(() => (t = tempDir('vpc-write')));
  after(() => t.cleanup());

  const variants: { name: string; options: Record<string, string>; bx?: boolean }[] = [
    { name: 'dynamic', options: {} },
    { name: 'fixed', options: { subformat: 'fixed' } },
    { name: 'dynamic force_size', options: { force_size: 'on' } },
    { name: 'bximage-made', options: {}, bx: true },
  ];
  for (const v of variants) {
    it(`unaligned writes to a ${v.name} image read back in qemu-img exactly as written`, async () => {
      const f = path.join(t.dir, `w-${v.name.replace(/\W+/g, '_')}.vhd`);
      if (v.bx) await runOk('bximage', ['-func=create', '-hd=10M', '-imgmode=vpc', '-q', f]);
      else await createImage(f, 'vpc', '10M', v.options);
      if (!v.bx) await qemuIo(f, 'vpc', ['write -P 0x77 3M 1M']);
      const model = Buffer.alloc((await imageInfo(f, 'vpc'))['virtual-size']);
      const before = path.join(t.dir, 'before.raw');
      await convertToRaw(f, before, 'vpc');
      fs.readFileSync(before).copy(model);
      const node = await openTestImage(f, { rw: true, format: 'vpc' });
      const ops: [number, number][] = [
        [1, 100],
        [2 * MiB - 300, 700],
        [3 * MiB + 17, 5000],
        [5 * MiB - 1, 2 * MiB + 2],
        [model.length - 1000, 1000],
      ];
      try {
        let seed = 1;
        for (const [off, len] of ops) {
          const data = pattern(len, seed++);
          await node.write(off, data);
          data.copy(model, off);
        }
        // Concurrent writes into one new block must not allocate it twice.
        const a = pattern(4096, 90);
        const b = pattern(4096, 91);
        await Promise.all([node.write(8 * MiB, a), node.write(8 * MiB + 8192, b)]);
        a.copy(model, 8 * MiB);
        b.copy(model, 8 * MiB + 8192);
        const back = Buffer.alloc(model.length);
        await node.read(0, back);
        expect(back.equals(model)).to.equal(true);
      } finally {
        await node.close();
      }
      const out = path.join(t.dir, 'after.raw');
      await convertToRaw(f, out, 'vpc');
      expect(fs.readFileSync(out).equals(model)).to.equal(true);
    });
  }

  it('after a crash before the flush (new blocks written, their BAT entries not), a new block over the leaked ones reads as zeros around its data', async () => {
    const f = path.join(t.dir, 'leak.vhd');
    await createImage(f, 'vpc', '16M', { force_size: 'on' });
    const empty = fs.readFileSync(f);
    // The BAT entries of new blocks wait for the flush: no flush during the writes.
    const file = new CountingFile(empty);
    const node = await openWritable(file);
    for (const b of [1, 2, 5]) await node.write(b * 2 * MiB, Buffer.alloc(2 * MiB, 0xa0 + b));
    expect(file.count('flush'), 'flushes during the writes').to.equal(0);
    const killed = Buffer.from(file.data);
    await node.close();
    expect(file.count('flush'), 'a barrier, then the flush').to.equal(2);
    // Killed before the flush: the BAT as it was, the three blocks leaked past it.
    fs.writeFileSync(f, killed);
    expect(killed.length).to.be.greaterThan(empty.length + 3 * 2 * MiB);
    await convertToRaw(f, path.join(t.dir, 'leak-before.raw'), 'vpc');
    expect(fs.readFileSync(path.join(t.dir, 'leak-before.raw')).every((x) => x === 0), 'the leaked blocks are not the guest\'s').to.equal(true);
    // A new block now lands on the first leaked one: its other bytes must read as zeros.
    const again = await openTestImage(f, { rw: true, format: 'vpc' });
    const model = Buffer.alloc(16 * MiB);
    try {
      const data = pattern(4096, 5);
      await again.write(3 * 2 * MiB + 100 * KiB, data);
      data.copy(model, 3 * 2 * MiB + 100 * KiB);
      const back = Buffer.alloc(2 * MiB);
      await again.read(3 * 2 * MiB, back);
      expect(back.equals(model.subarray(3 * 2 * MiB, 4 * 2 * MiB))).to.equal(true);
    } finally {
      await again.close();
    }
    const out = path.join(t.dir, 'leak-after.raw');
    await convertToRaw(f, out, 'vpc');
    expect(fs.readFileSync(out).equals(model)).to.equal(true);
  });

  it('sets a block\'s sector bitmap at its first write only where a bit is clear (one write and barrier), and writes a set one not at all; a set one is in place before any write', async () => {
    const f = path.join(t.dir, 'bitmap.vhd');
    await createImage(f, 'vpc', '8M', { force_size: 'on' });
    await qemuIo(f, 'vpc', ['write -P 0x11 0 4M']);
    const d = fs.readFileSync(f);
    const bat = Number(d.readBigUInt64BE(Number(d.readBigUInt64BE(16)) + 16));
    const bitmapAt = (block: number): number => d.readUInt32BE(bat + block * 4) * 512;
    // Block 1's bitmap as a tool that sets only the bits it wrote leaves it.
    d.fill(0, bitmapAt(1), bitmapAt(1) + 512);
    const file = new CountingFile(d);
    const node = await openWritable(file);
    const locked = async (block: number): Promise<boolean> => {
      const runs = await (node as unknown as Mapper).mapRange(block * 2 * MiB, 2 * MiB);
      return runs.some((r) => r.kind === 'data' && r.locked === true);
    };
    try {
      // Mapped before any write: block 0 (all set) in place from the start; block 1 waits for its first write.
      expect(await locked(0), 'block 0 locked before its first write').to.equal(false);
      expect(await locked(1), 'block 1 locked before its first write').to.equal(true);
      expect(file.writes, 'mapping writes nothing').to.have.length(0);
      await node.write(100 * KiB, Buffer.alloc(4096, 0x22));
      expect(file.count('flush'), 'block 0: its bitmap is set').to.equal(0);
      expect(file.writes.map((w) => w.offset)).to.deep.equal([bitmapAt(0) + 512 + 100 * KiB]);
      await node.write(2 * MiB + 100 * KiB, Buffer.alloc(4096, 0x33));
      expect(file.count('flush'), 'block 1: a barrier behind its bitmap').to.equal(1);
      expect(file.writes.map((w) => w.offset)).to.deep.equal([bitmapAt(0) + 512 + 100 * KiB, bitmapAt(1), bitmapAt(1) + 512 + 100 * KiB]);
      expect(file.data.subarray(bitmapAt(1), bitmapAt(1) + 512).every((x) => x === 0xff)).to.equal(true);
      expect(await locked(1), 'block 1 locked after its first write').to.equal(false);
      // Again in either block: in place, nothing more.
      await node.write(2 * MiB + 200 * KiB, Buffer.alloc(4096, 0x44));
      await node.write(200 * KiB, Buffer.alloc(4096, 0x44));
      expect(file.writes).to.have.length(5);
      expect(file.count('flush')).to.equal(1);
    } finally {
      await node.close();
    }
  });

  it('refuses writes on a read-only open', async () => {
    const f = path.join(t.dir, 'ro.vhd');
    await createImage(f, 'vpc', '4M');
    const node = await openTestImage(f);
    try {
      await node.write(0, Buffer.alloc(512)).then(
        () => expect.fail('write succeeded'),
        (e: unknown) => expect(e).to.be.instanceOf(ReadOnlyError),
      );
    } finally {
      await node.close();
    }
  });
});

describe('tsimg create -f vpc', function () {
  this.timeout(120_000);
  let t: ReturnType<typeof tempDir>;
  before(() => (t = tempDir('vpc-create')));
  after(() => t.cleanup());

  const cases: { options: string; size: string }[] = [
    { options: '', size: '10M' },
    { options: 'subformat=dynamic', size: '1000000' },
    { options: 'subformat=fixed', size: '10M' },
    { options: 'force_size=on', size: '10M' },
    { options: 'subformat=fixed,force_size=on', size: '1000000' },
    { options: 'force_size=off', size: '5G' },
  ];
  for (const c of cases) {
    it(`makes the image qemu-img makes with -o '${c.options}' ${c.size}`, async () => {
      const ours = path.join(t.dir, 'ours.vhd');
      const theirs = path.join(t.dir, 'theirs.vhd');
      fs.rmSync(ours, { force: true });
      fs.rmSync(theirs, { force: true });
      const args = ['create', '-q', '-f', 'vpc', ...(c.options ? ['-o', c.options] : []), ours, c.size];
      const r = await tsimg(args, t.dir);
      expect(r.code, r.stderr).to.equal(0);
      await runOk('qemu-img', ['create', '-q', '-f', 'vpc', ...(c.options ? ['-o', c.options] : []), theirs, c.size]);
      await expectSameShape(ours, theirs, 'vpc');
      // Footers agree but for timestamp, uuid and checksum.
      const fa = readBytes(ours, fs.statSync(ours).size - 512, 64);
      const fb = readBytes(theirs, fs.statSync(theirs).size - 512, 64);
      fa.fill(0, 24, 28);
      fb.fill(0, 24, 28);
      expect(fa.equals(fb)).to.equal(true);
      // qemu-io writes into ours, and tsmount reads what it wrote.
      await qemuIo(ours, 'vpc', ['write -P 0x61 64k 64k']);
      const node = await openTestImage(ours, { format: 'vpc' });
      try {
        if (node.size <= 64 * MiB) {
          expect(await nodeMd5(node, MiB)).to.equal(await rawMd5(ours, 'vpc'));
        } else {
          const got = Buffer.alloc(256 * KiB);
          await node.read(0, got);
          const want = Buffer.alloc(256 * KiB);
          want.fill(0x61, 64 * KiB, 128 * KiB);
          expect(got.equals(want)).to.equal(true);
        }
      } finally {
        await node.close();
      }
    });
  }

  it('rejects unknown options, bad subformats and sizes above 2040 GiB with one line', async () => {
    await expectCreateRefused(
      'vpc',
      [
        ['-o', 'cluster_size=64k', 'x.vhd', '1M'],
        ['-o', 'subformat=sparse', 'x.vhd', '1M'],
        ['-o', 'force_size=on', 'x.vhd', '2041G'],
      ],
      t.dir,
      'x.vhd',
    );
  });
});

describe('vpc: broken images', function () {
  this.timeout(120_000);
  let t: ReturnType<typeof tempDir>;
  let good: string;
  before(async () => {
    t = tempDir('vpc-bad');
    good = path.join(t.dir, 'good.vhd');
    await createImage(good, 'vpc', '10M');
    await qemuIo(good, 'vpc', ['write -P 0x42 0 3M']);
  });
  after(() => t.cleanup());

  const breakers: { name: string; apply: (f: string) => void }[] = [
    { name: 'a footer checksum that does not match', apply: (f) => patch(f, 40, Buffer.from([0x99])) },
    { name: 'a dynamic header with the wrong magic', apply: (f) => patch(f, 512, Buffer.from('cxsparsX')) },
    { name: 'a block size that is not a power of two', apply: (f) => patch(f, 512 + 32, Buffer.from([0, 0x20, 0, 1])) },
    { name: 'a BAT entry pointing past the end of the file', apply: (f) => patch(f, 1536 + 4, Buffer.from([0x00, 0x10, 0, 0])) },
    { name: 'a table offset outside the file', apply: (f) => patch(f, 512 + 16, Buffer.from([0, 0, 0, 1, 0, 0, 0, 0])) },
    { name: 'a truncated file', apply: (f) => fs.truncateSync(f, fs.statSync(f).size - 1024 * 1024) },
    { name: 'nothing but a few bytes', apply: (f) => fs.truncateSync(f, 100) },
  ];
  for (const b of breakers) {
    it(`refuses an image with ${b.name}: one-line error, file unchanged`, async () => {
      const f = path.join(t.dir, 'bad.vhd');
      fs.copyFileSync(good, f);
      b.apply(f);
      await expectRefusedUnchanged(f, b.name, 'vpc');
    });
  }

  it('survives random corruption of the metadata: an error or data, never a crash or hang', async () => {
    const f = path.join(t.dir, 'random.vhd');
    const rnd = pattern(4096, 1234);
    for (let i = 0; i < 60; i++) {
      fs.copyFileSync(good, f);
      const at = rnd.readUInt16LE(i * 2) % 2048;
      patch(f, at, Buffer.from([rnd[i * 2 + 1000]!]));
      try {
        const node = await openTestImage(f, { format: 'vpc' });
        try {
          await nodeMd5(node, MiB);
        } finally {
          await node.close();
        }
      } catch (e) {
        expect(e).to.be.instanceOf(TsmountError);
        expect(e instanceof CorruptImageError || (e as Error).message.length > 0).to.equal(true);
      }
    }
  });
});

describe('vpc: through a real FUSE mount', function () {
  this.timeout(120_000);
  const mounts = new MountTracker();
  let t: ReturnType<typeof tempDir>;
  before(() => (t = tempDir('vpc-mount')));
  afterEach(() => mounts.cleanup());
  after(() => t.cleanup());

  it('serves a dynamic VHD as a flat file and writes through it with --rw', async () => {
    const f = path.join(t.dir, 'disk.vhd');
    await createImage(f, 'vpc', '10M');
    await qemuIo(f, 'vpc', ['write -P 0x5c 1M 1M']);
    const mp = path.join(t.dir, 'mnt');
    fs.mkdirSync(mp);
    await mounts.mount(['--rw', f, mp]);
    const flat = path.join(mp, 'disk.raw');
    expect(fs.statSync(flat).size).to.equal((await imageInfo(f, 'vpc'))['virtual-size']);
    expect(await md5File(flat)).to.equal(await rawMd5(f, 'vpc'));
    const data = pattern(10000, 3);
    const fd = fs.openSync(flat, 'r+');
    fs.writeSync(fd, data, 0, data.length, 4 * MiB + 3);
    fs.fsyncSync(fd);
    fs.closeSync(fd);
    const expected = fs.readFileSync(flat);
    await mounts.unmount(mp);
    const out = path.join(t.dir, 'out.raw');
    await convertToRaw(f, out, 'vpc');
    expect(fs.readFileSync(out).equals(expected)).to.equal(true);
    expect(expected.subarray(4 * MiB + 3, 4 * MiB + 3 + data.length).equals(data)).to.equal(true);
  });
});
