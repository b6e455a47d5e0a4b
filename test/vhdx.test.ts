// The vhdx driver against QEMU's own tools: images qemu-img makes read identically;
// tsmount's writes pass qemu-img check and read back as written; a crash at any
// point of a write leaves an image whose log replays (in QEMU and in tsmount) to
// the old or the new data; tsimg create makes what qemu-img makes.
import { expect } from 'chai';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { TsmountError, UnsupportedError } from '../drivers/errors.js';
import type { BlockNode } from '../drivers/types.js';
import { fileProtocol } from '../drivers/protocol/index.js';
import { vhdxDriver } from '../drivers/format/vhdx/index.js';
import { crc32cExcluding } from '../drivers/util/crc32c.js';
import { checkImage, convertToRaw, createImage, md5File, qemuIo, rawMd5, run, tempDir } from './helpers/qemu.js';
import { MountTracker } from './helpers/mount.js';
import { CrashingFile } from './helpers/crashing-file.js';
import { expectCreateRefused, expectRefusedUnchanged, expectSameShape, nodeMd5, openTestImage, patch, pattern, readBytes, tsimg } from './helpers/images.js';

const KiB = 1024;
const MiB = 1024 * KiB;

async function nodeBytes(node: BlockNode): Promise<Buffer> {
  const b = Buffer.alloc(node.size);
  await node.read(0, b);
  return b;
}

/** Re-seal a 4 KiB header / 64 KiB region table after editing it. */
function reseal(file: string, offset: number, length: number): void {
  const b = readBytes(file, offset, length);
  b.writeUInt32LE(crc32cExcluding(b, 4), 4);
  patch(file, offset, b);
}

describe('vhdx: reading images qemu-img makes', function () {
  this.timeout(180_000);
  let t: ReturnType<typeof tempDir>;
  before(() => (t = tempDir('vhdx-read')));
  after(() => t.cleanup());

  // Every subformat, block size and log size qemu-img makes reads as qemu-img convert does:
  // test/conformance.test.ts (its vhdx rows in test/helpers/formats.ts).

  it('reads past the first chunk, where the BAT interleaves a sector bitmap entry', async () => {
    // 1 MiB blocks: a chunk is 4096 blocks (4 GiB); block 4096 sits at BAT index 4097.
    const f = path.join(t.dir, 'chunks.vhdx');
    await createImage(f, 'vhdx', '5G', { block_size: '1M' });
    await qemuIo(f, 'vhdx', ['write -P 0x71 4095M 2M', 'write -P 0x72 5119M 1M', 'write -P 0x73 0 1M']);
    const raw = path.join(t.dir, 'chunks.raw');
    await convertToRaw(f, raw, 'vhdx');
    const node = await openTestImage(f);
    try {
      for (const at of [0, 4094 * MiB, 4095 * MiB, 4096 * MiB, 4097 * MiB, 5118 * MiB, 5119 * MiB]) {
        const got = Buffer.alloc(MiB);
        await node.read(at, got);
        expect(got.equals(readBytes(raw, at, MiB)), `at ${at / MiB} MiB`).to.equal(true);
      }
    } finally {
      await node.close();
      fs.rmSync(raw);
    }
  });
});

describe('vhdx: writing', function () {
  this.timeout(180_000);
  let t: ReturnType<typeof tempDir>;
  before(() => (t = tempDir('vhdx-write')));
  after(() => t.cleanup());

  const variants: { name: string; options: Record<string, string> }[] = [
    { name: 'dynamic', options: { block_size: '1M' } },
    { name: 'dynamic, block_state_zero=off', options: { block_size: '1M', block_state_zero: 'off' } },
    { name: 'fixed', options: { subformat: 'fixed', block_size: '1M' } },
    { name: 'fixed, block_state_zero=off', options: { subformat: 'fixed', block_state_zero: 'off', block_size: '1M' } },
    { name: 'dynamic, 8 MiB blocks', options: {} },
  ];
  for (const v of variants) {
    it(`unaligned writes to a ${v.name} image pass qemu-img check and read back as written`, async () => {
      const f = path.join(t.dir, 'w.vhdx');
      fs.rmSync(f, { force: true });
      await createImage(f, 'vhdx', '12M', v.options);
      await qemuIo(f, 'vhdx', ['write -P 0x77 3M 1M']);
      const raw = path.join(t.dir, 'before.raw');
      await convertToRaw(f, raw, 'vhdx');
      const model = fs.readFileSync(raw);
      const node = await openTestImage(f, { rw: true });
      try {
        const ops: [number, number][] = [
          [1, 100],
          [MiB - 300, 700],
          [3 * MiB + 17, 5000],
          [5 * MiB - 1, 3 * MiB + 2],
          [model.length - 1000, 1000],
        ];
        let seed = 1;
        for (const [off, len] of ops) {
          const data = pattern(len, seed++);
          await node.write(off, data);
          data.copy(model, off);
        }
        const a = pattern(4096, 90);
        const b = pattern(4096, 91);
        await Promise.all([node.write(9 * MiB + 512, a), node.write(9 * MiB + 65536, b)]);
        a.copy(model, 9 * MiB + 512);
        b.copy(model, 9 * MiB + 65536);
        expect((await nodeBytes(node)).equals(model)).to.equal(true);
      } finally {
        await node.close();
      }
      const check = await checkImage(f, 'vhdx');
      expect(check.code, check.output).to.equal(0);
      const out = path.join(t.dir, 'after.raw');
      await convertToRaw(f, out, 'vhdx');
      expect(fs.readFileSync(out).equals(model)).to.equal(true);
    });
  }
});

describe('vhdx: the metadata log', function () {
  this.timeout(180_000);
  let t: ReturnType<typeof tempDir>;
  let base: string;
  let oldBytes: Buffer;
  let newBytes: Buffer;
  const WRITE_AT = MiB - 4096;
  const WRITE_LEN = 3 * MiB;
  before(async () => {
    t = tempDir('vhdx-log');
    base = path.join(t.dir, 'base.vhdx');
    await createImage(base, 'vhdx', '8M', { block_size: '1M' });
    await qemuIo(base, 'vhdx', ['write -P 0x31 0 1M']);
    const raw = path.join(t.dir, 'base.raw');
    await convertToRaw(base, raw, 'vhdx');
    oldBytes = fs.readFileSync(raw);
    newBytes = Buffer.from(oldBytes);
    pattern(WRITE_LEN, 5).copy(newBytes, WRITE_AT);
  });
  after(() => t.cleanup());

  /** Open `file` read-write with power lost after `budget` changes, and run the write. */
  async function writeWithCrash(file: string, budget: number): Promise<number> {
    const inner = await fileProtocol.open(file, { readOnly: false, cache: 'writeback' });
    const crashing = new CrashingFile(inner, budget);
    try {
      const node = await vhdxDriver.open(crashing, { readOnly: false, cache: 'writeback', metadataCacheBytes: 1 << 20, openBacking: () => Promise.reject(new Error('no backing')) });
      // The new blocks' BAT entries go through the log at the flush.
      await node
        .write(WRITE_AT, newBytes.subarray(WRITE_AT, WRITE_AT + WRITE_LEN))
        .then(() => node.flush())
        .catch(() => undefined);
    } catch {
      /* the crash may come during open's own header updates */
    } finally {
      await inner.close();
    }
    return crashing.ops;
  }

  it('commits the BAT entries of many new blocks through the log at the flush, with no flush per block', async () => {
    const f = path.join(t.dir, 'many.vhdx');
    fs.copyFileSync(base, f);
    class FlushCounting extends CrashingFile {
      flushes = 0;
      override flush(): Promise<void> {
        this.flushes++;
        return super.flush();
      }
    }
    const inner = await fileProtocol.open(f, { readOnly: false, cache: 'writeback' });
    const counting = new FlushCounting(inner, Infinity);
    const want = Buffer.from(oldBytes);
    try {
      const node = await vhdxDriver.open(counting, { readOnly: false, cache: 'writeback', metadataCacheBytes: 1 << 20, openBacking: () => Promise.reject(new Error('no backing')) });
      // The first write changes the data write GUID in the headers (flushed); the blocks after it flush nothing.
      await node.write(MiB, pattern(MiB, 40));
      pattern(MiB, 40).copy(want, MiB);
      const before = counting.flushes;
      for (let b = 2; b < 8; b++) {
        await node.write(b * MiB, pattern(MiB, 40 + b));
        pattern(MiB, 40 + b).copy(want, b * MiB);
      }
      expect(counting.flushes - before, 'flushes during six allocating writes').to.equal(0);
      const atFlush = counting.flushes;
      await node.flush();
      // One log transaction for all seven blocks, its header updates included (QEMU: one per block).
      expect(counting.flushes - atFlush).to.be.within(1, 10);
      expect((await nodeBytes(node)).equals(want)).to.equal(true);
      await node.close();
    } finally {
      await inner.close();
    }
    const check = await checkImage(f, 'vhdx');
    expect(check.code, check.output).to.equal(0);
    const raw = path.join(t.dir, 'many.raw');
    await convertToRaw(f, raw, 'vhdx');
    expect(fs.readFileSync(raw).equals(want)).to.equal(true);
  });

  it('leaves an image that replays to the old or the new data, after a crash at every point of a write', async () => {
    fs.copyFileSync(base, path.join(t.dir, 'dry.vhdx'));
    const ops = await writeWithCrash(path.join(t.dir, 'dry.vhdx'), Infinity);
    expect(ops).to.be.greaterThan(5);
    let sawPendingLog = false;
    for (let budget = 0; budget <= ops; budget++) {
      const crashed = path.join(t.dir, 'crashed.vhdx');
      fs.copyFileSync(base, crashed);
      await writeWithCrash(crashed, budget);

      // tsmount, read-only: the log is applied in memory and the file is left alone.
      const md5Before = await md5File(crashed);
      const ro = await openTestImage(crashed);
      const ours = await nodeBytes(ro);
      await ro.close();
      expect(await md5File(crashed), `budget ${budget}: read-only open changed the file`).to.equal(md5Before);

      // QEMU refuses a read-only open of a log it has to replay; qemu-img check -r all replays it.
      const info = await run('qemu-img', ['info', crashed]);
      if (info.code !== 0) {
        expect(info.stderr).to.match(/log that needs to be replayed/);
        sawPendingLog = true;
      }
      const byQemu = path.join(t.dir, 'byqemu.vhdx');
      fs.copyFileSync(crashed, byQemu);
      await run('qemu-img', ['check', '-r', 'all', byQemu]);
      const raw = path.join(t.dir, 'byqemu.raw');
      await convertToRaw(byQemu, raw, 'vhdx');
      const theirs = fs.readFileSync(raw);
      expect(ours.equals(theirs), `budget ${budget}: tsmount's in-memory replay differs from QEMU's`).to.equal(true);
      for (let b = 0; b < theirs.length; b += MiB) {
        const got = theirs.subarray(b, b + MiB);
        const ok = got.equals(oldBytes.subarray(b, b + MiB)) || got.equals(newBytes.subarray(b, b + MiB));
        expect(ok, `budget ${budget}: block ${b / MiB} is neither old nor new`).to.equal(true);
      }

      // tsmount, read-write: replays into the file; QEMU then sees a clean image with the same data.
      const rw = await openTestImage(crashed, { rw: true });
      await rw.close();
      const check = await checkImage(crashed, 'vhdx');
      expect(check.code, `budget ${budget}: ${check.output}`).to.equal(0);
      expect(await rawMd5(crashed, 'vhdx')).to.equal(crypto.createHash('md5').update(theirs).digest('hex'));
    }
    expect(sawPendingLog, 'no crash point left a log to replay').to.equal(true);
  });
});

describe('tsimg create -f vhdx', function () {
  this.timeout(120_000);
  let t: ReturnType<typeof tempDir>;
  before(() => (t = tempDir('vhdx-create')));
  after(() => t.cleanup());

  const cases: { options: string; size: string }[] = [
    { options: '', size: '64M' },
    { options: 'subformat=dynamic,block_state_zero=on', size: '1000000' },
    { options: 'subformat=fixed', size: '20M' },
    { options: 'subformat=fixed,block_state_zero=off', size: '20M' },
    { options: 'block_state_zero=off', size: '20M' },
    { options: 'block_size=1M', size: '20M' },
    { options: 'block_size=3000000', size: '20M' },
    { options: 'block_size=256M,log_size=8M', size: '20M' },
    { options: 'block_size=512M', size: '20M' },
    { options: 'block_size=0', size: '3G' },
    { options: 'log_size=1500k', size: '20M' },
    { options: '', size: '0' },
  ];
  for (const c of cases) {
    it(`makes the image qemu-img makes with -o '${c.options}' ${c.size}`, async () => {
      const ours = path.join(t.dir, 'ours.vhdx');
      const theirs = path.join(t.dir, 'theirs.vhdx');
      fs.rmSync(ours, { force: true });
      fs.rmSync(theirs, { force: true });
      const o = c.options ? ['-o', c.options] : [];
      const q = await run('qemu-img', ['create', '-q', '-f', 'vhdx', ...o, theirs, c.size]);
      const r = await tsimg(['create', '-q', '-f', 'vhdx', ...o, ours, c.size], t.dir);
      expect(r.code === 0, `tsimg: ${r.stderr} / qemu-img: ${q.stderr}`).to.equal(q.code === 0);
      if (q.code !== 0) {
        expect(r.stderr.trim().split('\n')).to.have.length(1);
        return;
      }
      const a = await expectSameShape(ours, theirs, 'vhdx');
      // Region table and BAT are the same bytes.
      const rt = readBytes(theirs, 192 * KiB, 64 * KiB);
      expect(readBytes(ours, 192 * KiB, 64 * KiB).equals(rt)).to.equal(true);
      const batAt = Number(rt.readBigUInt64LE(32));
      const batLen = rt.readUInt32LE(40);
      expect(readBytes(ours, batAt, batLen).equals(readBytes(theirs, batAt, batLen))).to.equal(true);
      expect((await checkImage(ours, 'vhdx')).code).to.equal(0);
      if (a['virtual-size'] >= 2 * MiB) {
        await qemuIo(ours, 'vhdx', ['write -P 0x61 1M 64k']);
        const node = await openTestImage(ours);
        try {
          const got = Buffer.alloc(2 * MiB);
          await node.read(0, got);
          const want = Buffer.alloc(2 * MiB);
          want.fill(0x61, MiB, MiB + 64 * KiB);
          expect(got.equals(want)).to.equal(true);
        } finally {
          await node.close();
        }
      }
    });
  }

  it('rejects unknown options and sizes above 64 TiB with one line', async () => {
    await expectCreateRefused(
      'vhdx',
      [
        ['-o', 'force_size=on', 'x.vhdx', '1M'],
        ['-o', 'subformat=diff', 'x.vhdx', '1M'],
        ['x.vhdx', '65T'],
      ],
      t.dir,
      'x.vhdx',
    );
  });
});

describe('vhdx: broken images', function () {
  this.timeout(120_000);
  let t: ReturnType<typeof tempDir>;
  let good: string;
  before(async () => {
    t = tempDir('vhdx-bad');
    good = path.join(t.dir, 'good.vhdx');
    await createImage(good, 'vhdx', '8M', { block_size: '1M' });
    await qemuIo(good, 'vhdx', ['write -P 0x42 0 3M']);
  });
  after(() => t.cleanup());

  const batAt = 2 * MiB;
  const breakers: { name: string; apply: (f: string) => void }[] = [
    {
      name: 'both header copies failing their checksum',
      apply: (f) => {
        patch(f, 64 * KiB + 100, Buffer.from([1]));
        patch(f, 128 * KiB + 100, Buffer.from([1]));
      },
    },
    { name: 'a region table with a bad checksum', apply: (f) => patch(f, 192 * KiB + 100, Buffer.from([1])) },
    {
      name: 'a region table without a BAT',
      apply: (f) => {
        patch(f, 192 * KiB + 16, Buffer.alloc(16, 0xee));
        reseal(f, 192 * KiB, 64 * KiB);
      },
    },
    {
      name: 'a region that overlaps the log',
      apply: (f) => {
        patch(f, 192 * KiB + 32, Buffer.from([0, 0, 0x10, 0, 0, 0, 0, 0]));
        reseal(f, 192 * KiB, 64 * KiB);
      },
    },
    {
      name: 'a BAT entry pointing past the end of the file',
      apply: (f) => {
        const e = Buffer.alloc(8);
        e.writeBigUInt64LE((4096n << 20n) | 6n);
        patch(f, batAt + 8, e);
      },
    },
    {
      name: 'a BAT entry pointing into the metadata',
      apply: (f) => {
        const e = Buffer.alloc(8);
        e.writeBigUInt64LE((3n << 20n) | 6n);
        patch(f, batAt + 16, e);
      },
    },
    { name: 'a bad metadata signature', apply: (f) => patch(f, 3 * MiB, Buffer.from('metadatX')) },
    { name: 'a block size that is not a power of two', apply: (f) => patch(f, 3 * MiB + 64 * KiB, Buffer.from([0, 0, 0x18, 0])) },
    { name: 'a truncated file', apply: (f) => fs.truncateSync(f, fs.statSync(f).size - 2 * MiB) },
    { name: 'a file cut inside the header section', apply: (f) => fs.truncateSync(f, 100 * KiB) },
  ];
  for (const b of breakers) {
    it(`refuses an image with ${b.name}: one-line error, file unchanged`, async () => {
      const f = path.join(t.dir, 'bad.vhdx');
      fs.copyFileSync(good, f);
      b.apply(f);
      await expectRefusedUnchanged(f, b.name);
    });
  }

  it('opens with one damaged header copy, using the other', async () => {
    const f = path.join(t.dir, 'onehdr.vhdx');
    fs.copyFileSync(good, f);
    patch(f, 128 * KiB + 100, Buffer.from([1]));
    const node = await openTestImage(f);
    try {
      expect(await nodeMd5(node, MiB)).to.equal(await rawMd5(good, 'vhdx'));
    } finally {
      await node.close();
    }
  });

  it('fails the read of a partially present block with EIO, and the rest of the disk reads', async () => {
    const f = path.join(t.dir, 'partial.vhdx');
    fs.copyFileSync(good, f);
    const e = Buffer.alloc(8);
    e.writeBigUInt64LE(7n);
    patch(f, batAt + 5 * 8, e);
    const node = await openTestImage(f);
    try {
      const buf = Buffer.alloc(4096);
      await node.read(0, buf);
      let err: unknown;
      await node.read(5 * MiB, buf).catch((x: unknown) => (err = x));
      expect(err).to.be.instanceOf(TsmountError);
      expect((err as TsmountError).errno).to.equal(5);
    } finally {
      await node.close();
    }
  });

  it('refuses a parent flag without a parent locator, and unknown required regions', async () => {
    const f = path.join(t.dir, 'diff.vhdx');
    fs.copyFileSync(good, f);
    patch(f, 3 * MiB + 64 * KiB + 4, Buffer.from([2, 0, 0, 0]));
    let err: unknown;
    await openTestImage(f).catch((x: unknown) => (err = x));
    expect(err).to.be.instanceOf(TsmountError);
    const g = path.join(t.dir, 'unknown-required.vhdx');
    fs.copyFileSync(good, g);
    // An unknown region marked required.
    patch(g, 192 * KiB + 16 + 64, Buffer.concat([Buffer.alloc(16, 0x5a), Buffer.from([0, 0, 0x70, 0, 0, 0, 0, 0]), Buffer.from([0, 0, 0x10, 0]), Buffer.from([1, 0, 0, 0])]));
    patch(g, 192 * KiB + 8, Buffer.from([3, 0, 0, 0]));
    reseal(g, 192 * KiB, 64 * KiB);
    err = undefined;
    await openTestImage(g).catch((x: unknown) => (err = x));
    expect(err).to.be.instanceOf(UnsupportedError);
  });

  it('survives random corruption of the metadata: an error or data, never a crash or hang', async () => {
    const f = path.join(t.dir, 'random.vhdx');
    const rnd = pattern(8192, 4321);
    const spots = [64 * KiB, 128 * KiB, 192 * KiB, 2 * MiB, 3 * MiB, 3 * MiB + 64 * KiB];
    for (let i = 0; i < 60; i++) {
      fs.copyFileSync(good, f);
      const at = spots[i % spots.length]! + (rnd.readUInt16LE(i * 2) % 128);
      patch(f, at, Buffer.from([rnd[i + 4000]!]));
      if (i % 3 === 0) reseal(f, spots[i % spots.length]! < 192 * KiB ? spots[i % spots.length]! : 192 * KiB, spots[i % spots.length]! < 192 * KiB ? 4 * KiB : 64 * KiB);
      try {
        const node = await openTestImage(f);
        try {
          await nodeMd5(node, MiB);
        } finally {
          await node.close();
        }
      } catch (e) {
        expect(e).to.be.instanceOf(TsmountError);
      }
    }
  });
});

describe('vhdx: through a real FUSE mount', function () {
  this.timeout(120_000);
  const mounts = new MountTracker();
  let t: ReturnType<typeof tempDir>;
  before(() => (t = tempDir('vhdx-mount')));
  afterEach(() => mounts.cleanup());
  after(() => t.cleanup());

  it('serves a VHDX as a flat file and writes through it with --rw; qemu-img check passes', async () => {
    const f = path.join(t.dir, 'disk.vhdx');
    await createImage(f, 'vhdx', '16M', { block_size: '1M' });
    await qemuIo(f, 'vhdx', ['write -P 0x5c 1M 1M']);
    const mp = path.join(t.dir, 'mnt');
    fs.mkdirSync(mp);
    await mounts.mount(['--rw', f, mp]);
    const flat = path.join(mp, 'disk.raw');
    expect(fs.statSync(flat).size).to.equal(16 * MiB);
    expect(await md5File(flat)).to.equal(await rawMd5(f, 'vhdx'));
    const data = pattern(3 * MiB, 3);
    const fd = fs.openSync(flat, 'r+');
    fs.writeSync(fd, data, 0, data.length, 4 * MiB + 3);
    fs.fsyncSync(fd);
    fs.closeSync(fd);
    const expected = fs.readFileSync(flat);
    await mounts.unmount(mp);
    expect((await checkImage(f, 'vhdx')).code).to.equal(0);
    const out = path.join(t.dir, 'out.raw');
    await convertToRaw(f, out, 'vhdx');
    expect(fs.readFileSync(out).equals(expected)).to.equal(true);
    expect(expected.subarray(4 * MiB + 3, 4 * MiB + 3 + data.length).equals(data)).to.equal(true);
  });
});

