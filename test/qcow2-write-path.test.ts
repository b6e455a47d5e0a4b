// The qcow2 write path (issue 21): an allocating write of many clusters reaches the
// image file as one data write, old head and tail included (QEMU's merge_cow), and
// random allocating writes of mixed sizes through a mount leave an image that
// `qemu-img check` finds clean and that reads back what was written.
import { expect } from 'chai';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { qcow2Driver } from '../drivers/format/qcow2/index.js';
import type { BlockNode } from '../drivers/types.js';
import { CountingFile, ZeroingFile } from './helpers/counting-file.js';
import { checkImage, createImage, run, tempDir } from './helpers/qemu.js';
import { MountTracker } from './helpers/mount.js';
import { openTestImage } from './helpers/images.js';

const KiB = 1024;
const MiB = 1 << 20;
const CS = 64 * KiB;

async function openOver(file: BlockNode): Promise<BlockNode> {
  return qcow2Driver.open(file, {
    readOnly: false,
    cache: 'writeback',
    metadataCacheBytes: MiB,
    openBacking: () => Promise.reject(new Error('no backing files')),
  });
}

describe('qcow2 write path', function () {
  this.timeout(120_000);
  let tmp: { dir: string; cleanup: () => void };
  before(() => (tmp = tempDir('qcow2-write-path')));
  after(() => tmp.cleanup());

  async function emptyImage(name: string, options: Record<string, string | number> = {}): Promise<Buffer> {
    const img = path.join(tmp.dir, name);
    await createImage(img, 'qcow2', 64 * MiB, { cluster_size: CS, ...options });
    return fs.readFileSync(img);
  }

  /** Write the in-memory image out, have qemu-img check it, and convert it to raw: the raw file's name. */
  async function checkedRaw(name: string, bytes: Buffer): Promise<string> {
    const img = path.join(tmp.dir, name);
    fs.writeFileSync(img, bytes);
    const c = await checkImage(img, 'qcow2');
    expect(c.code, c.output).to.equal(0);
    const raw = `${img}.raw`;
    await run('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', img, raw]);
    return raw;
  }

  /** 200 writes of 1 byte to a cluster and a bit, each into clusters nobody wrote yet, at odd places. */
  const partialWrites = (): [number, Buffer][] =>
    Array.from({ length: 200 }, (_, i) => [i * 3 * CS + ((i * 4093) % CS), crypto.randomBytes(1 + ((i * 7919) % (CS + 5000)))]);

  /** The image file on disk: `qemu-img check` clean, and its guest bytes `want`. */
  async function expectImageHolds(img: string, want: Buffer, label = ''): Promise<void> {
    const c = await checkImage(img, 'qcow2');
    expect(c.code, c.output).to.equal(0);
    await run('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', img, `${img}.raw`]);
    expect(fs.readFileSync(`${img}.raw`).equals(want), label).to.equal(true);
  }

  /** checkedRaw, read back whole. */
  async function checkBytes(name: string, bytes: Buffer): Promise<Buffer> {
    return fs.readFileSync(await checkedRaw(name, bytes));
  }

  /** checkedRaw for images of 2 GiB and more: only `length` bytes at each offset are read back. */
  async function checkRanges(name: string, bytes: Buffer, offsets: number[], length: number): Promise<Buffer[]> {
    const raw = await checkedRaw(name, bytes);
    const fd = fs.openSync(raw, 'r');
    try {
      return offsets.map((o) => {
        const b = Buffer.alloc(length);
        fs.readSync(fd, b, 0, length, o);
        return b;
      });
    } finally {
      fs.closeSync(fd);
      fs.rmSync(raw);
    }
  }

  const cases: { what: string; offset: number; length: number; options?: Record<string, string> }[] = [
    { what: 'a 1 MiB write on cluster boundaries', offset: 4 * MiB, length: MiB },
    { what: 'an unaligned write across 5 clusters (old head and tail in the same write)', offset: 4 * MiB + 1000, length: 4 * CS + 5000 },
    { what: 'an unaligned write with extended L2 entries (subcluster head and tail)', offset: 4 * MiB + 3000, length: 3 * CS + 7000, options: { extended_l2: 'on' } },
  ];
  for (const c of cases) {
    it(`issues one data write for ${c.what}`, async () => {
      const file = new CountingFile(await emptyImage('one.qcow2', c.options ?? {}));
      const node = await openOver(file);
      // The L2 table and refcount block exist and are on disk first: every write the
      // request makes is then a data write (metadata waits in the caches for flush).
      await node.write(0, Buffer.from([1]));
      await node.flush();
      file.writes.length = 0;
      const data = crypto.randomBytes(c.length);
      await node.write(c.offset, data);
      const writes = file.writes;
      expect(writes, JSON.stringify(file.writes)).to.have.length(1);
      // The whole clusters (or subclusters) the write touches, in that one write.
      const unit = c.options?.extended_l2 === 'on' ? CS / 32 : CS;
      const a = Math.floor(c.offset / unit) * unit;
      const b = Math.ceil((c.offset + c.length) / unit) * unit;
      expect(writes[0]!.length).to.equal(b - a);
      const back = Buffer.alloc(c.length + 2 * CS);
      await node.read(c.offset - CS, back);
      expect(back.subarray(CS, CS + c.length).equals(data)).to.equal(true);
      expect(back.subarray(0, CS).every((x, i) => x === (c.offset - CS + i === 0 ? 1 : 0))).to.equal(true);
      await node.flush();
      await node.close();
      const raw = await checkBytes('one-out.qcow2', file.data);
      expect(raw.subarray(c.offset, c.offset + c.length).equals(data)).to.equal(true);
      expect(raw.subarray(c.offset - CS, c.offset).every((x) => x === 0)).to.equal(true);
    });
  }

  it('allocates the zeros of a new cluster\'s head and tail without writing them where the file can (QEMU\'s handle_alloc_space), and writes them where it cannot or they are not zeros', async () => {
    for (const options of [{}, { extended_l2: 'on' }] as Record<string, string>[]) {
      const unit = options.extended_l2 === 'on' ? CS / 32 : CS;
      const file = new ZeroingFile(await emptyImage('zr.qcow2', options));
      const node = await openOver(file);
      await node.write(0, Buffer.from([1]));
      await node.flush();
      file.writes.length = 0;
      file.zeroed.length = 0;
      // 4 KiB at 8 KiB + 1000 into a new cluster: the unit(s) it touches zeroed, then the 4 KiB alone.
      const at = 4 * MiB + 8 * KiB + 1000;
      const data = crypto.randomBytes(4 * KiB);
      await node.write(at, data);
      expect(file.zeroed, JSON.stringify(options)).to.have.length(1);
      const a = Math.floor(at / unit) * unit;
      const b = Math.ceil((at + data.length) / unit) * unit;
      expect(file.zeroed[0]!.length).to.equal(b - a);
      expect(file.writes, JSON.stringify(file.writes)).to.deep.equal([{ offset: file.zeroed[0]!.offset + (at - a), length: data.length, parts: 1 }]);
      // An overwrite of that cluster: in place, nothing zeroed.
      await node.write(at + 100, Buffer.alloc(10, 7));
      data.fill(7, 100, 110);
      expect(file.zeroed).to.have.length(1);
      // Where the file says no: the zeros are written with the data, as one write.
      file.refuse = true;
      file.writes.length = 0;
      const other = crypto.randomBytes(3000);
      await node.write(8 * MiB + 5000, other);
      expect(file.writes).to.have.length(1);
      expect(file.writes[0]!.length).to.equal(Math.ceil((8 * MiB + 8000) / unit) * unit - Math.floor((8 * MiB + 5000) / unit) * unit);
      await node.flush();
      await node.close();
      const raw = await checkBytes('zr-out.qcow2', file.data);
      const want = Buffer.alloc(64 * MiB);
      want[0] = 1;
      data.copy(want, at);
      other.copy(want, 8 * MiB + 5000);
      expect(raw.equals(want), JSON.stringify(options)).to.equal(true);
    }
    // Over a backing file with data there: the head and tail are its bytes, written with the data.
    const base = path.join(tmp.dir, 'zr-base.raw');
    fs.writeFileSync(base, crypto.randomBytes(8 * MiB));
    const img = path.join(tmp.dir, 'zr-over.qcow2');
    await createImage(img, 'qcow2', 64 * MiB, { cluster_size: CS }, { file: base, format: 'raw' });
    const over = new ZeroingFile(fs.readFileSync(img));
    const node = await qcow2Driver.open(over, { readOnly: false, cache: 'writeback', metadataCacheBytes: MiB, openBacking: async () => openTestImage(base, { rw: false }) });
    try {
      await node.write(MiB + 100, Buffer.alloc(100, 9));
      expect(over.zeroed, 'inside the backing file').to.have.length(0);
      await node.write(20 * MiB + 100, Buffer.alloc(100, 9));
      expect(over.zeroed, 'past its end').to.have.length(1);
    } finally {
      await node.close();
    }
  });

  it('leaves a new cluster\'s zeros allocated in a real image file (fallocate), as qemu-img reads them: 200 partial writes, read back whole', async () => {
    const img = path.join(tmp.dir, 'zr-real.qcow2');
    await createImage(img, 'qcow2', 64 * MiB, { cluster_size: CS });
    const node = await openTestImage(img, { rw: true });
    const want = Buffer.alloc(64 * MiB);
    for (const [off, data] of partialWrites()) {
      await node.write(off, data);
      data.copy(want, off);
    }
    await node.flush();
    await node.close();
    await expectImageHolds(img, want);
    // Allocated as written data would be (no holes for a later open to take for preallocated metadata).
    const st = fs.statSync(img);
    expect(st.blocks * 512, 'blocks on disk').to.be.at.least(st.size - 4 * CS);
  });

  it('keeps the old bytes of the head and tail when it reallocates over existing data', async () => {
    // Zeroed clusters that keep their host cluster (v3, no unmap) are written in place
    // as one run; the parts the write does not cover keep reading zeros.
    const file = new CountingFile(await emptyImage('zero.qcow2'));
    const node = await openOver(file);
    const first = crypto.randomBytes(MiB);
    await node.write(0, first);
    await node.zero!(0, MiB, false);
    await node.flush();
    file.writes.length = 0;
    const second = crypto.randomBytes(5 * CS);
    await node.write(CS + 100, second);
    expect(file.writes, JSON.stringify(file.writes)).to.have.length(1);
    await node.flush();
    await node.close();
    const raw = await checkBytes('zero-out.qcow2', file.data);
    const want = Buffer.alloc(MiB);
    second.copy(want, CS + 100);
    expect(raw.subarray(0, MiB).equals(want)).to.equal(true);
  });

  /** The L1 table's offset and entries from the header at the start of the image. */
  function l1Of(bytes: Buffer): { offset: number; size: number } {
    return { offset: Number(bytes.readBigUInt64BE(40)), size: bytes.readUInt32BE(36) };
  }

  it('writes a new L2 table\'s L1 entry at the flush, after the table and a barrier, and flushes nothing before', async () => {
    // 64 KiB clusters: one L2 table maps 512 MiB, so these three writes need three tables.
    const img = path.join(tmp.dir, 'l1-later.qcow2');
    await createImage(img, 'qcow2', 2048 * MiB, { cluster_size: CS });
    const file = new CountingFile(fs.readFileSync(img));
    const node = await openOver(file);
    const l1 = l1Of(file.data);
    const at = [0, 512 * MiB, 1024 * MiB + CS];
    const data = at.map(() => crypto.randomBytes(MiB));
    file.ops.length = 0;
    for (let i = 0; i < at.length; i++) await node.write(at[i]!, data[i]!);
    // QEMU's l2_allocate flushes the file twice per new table: a writeback of all
    // that was written so far, in the middle of a long write. Not here.
    expect(file.ops.filter((o) => o.op === 'flush'), 'flushes during the writes').to.have.length(0);
    expect(file.data.subarray(l1.offset, l1.offset + l1.size * 8).every((b) => b === 0), 'L1 on disk before the flush').to.equal(true);
    const back = Buffer.alloc(MiB);
    await node.read(at[1]!, back);
    expect(back.equals(data[1]!)).to.equal(true);

    file.ops.length = 0;
    await node.flush();
    const ops = file.ops;
    const tables = [0, 1, 2].map((i) => Number(file.data.readBigUInt64BE(l1.offset + i * 8) & 0x00fffffffffffe00n));
    expect(tables.every((t) => t > 0)).to.equal(true);
    const inL1 = (o: (typeof ops)[number]): boolean => o.op === 'write' && o.offset >= l1.offset && o.offset < l1.offset + l1.size * 8;
    const firstL1 = ops.findIndex(inL1);
    let lastTable = -1;
    ops.forEach((o, i) => {
      if (o.op === 'write' && tables.includes(o.offset)) lastTable = i;
    });
    expect(firstL1, JSON.stringify(ops)).to.be.greaterThan(-1);
    expect(lastTable, JSON.stringify(ops)).to.be.greaterThan(-1).and.lessThan(firstL1);
    expect(ops.slice(lastTable, firstL1).some((o) => o.op === 'flush'), 'a barrier between the tables and the L1 entries').to.equal(true);
    expect(ops.slice(firstL1).some((o) => o.op === 'flush'), 'the L1 entries flushed').to.equal(true);
    // The three neighbouring entries are one write.
    expect(ops.filter(inL1)).to.have.length(1);
    await node.close();
    const got = await checkRanges('l1-later-out.qcow2', file.data, at, MiB);
    for (let i = 0; i < at.length; i++) expect(got[i]!.equals(data[i]!), `data at ${at[i]}`).to.equal(true);
  });

  it('writes new refcount blocks, their table entries, the L2 tables and the L1 entries in that order at the flush, 512-byte clusters', async () => {
    // 512-byte clusters with 16-bit refcounts: a refcount block counts 128 KiB and an
    // L2 table maps 32 KiB, so 1 MiB of new data makes dozens of each.
    const img = path.join(tmp.dir, 'small-clusters.qcow2');
    await createImage(img, 'qcow2', 64 * MiB, { cluster_size: 512 });
    const file = new CountingFile(fs.readFileSync(img));
    const node = await openOver(file);
    const l1 = l1Of(file.data);
    const reftable = { offset: Number(file.data.readBigUInt64BE(48)), bytes: file.data.readUInt32BE(56) * 512 };
    const data = crypto.randomBytes(MiB);
    file.ops.length = 0;
    await node.write(3 * MiB, data);
    expect(file.ops.filter((o) => o.op === 'flush'), 'flushes during the write').to.have.length(0);
    file.ops.length = 0;
    await node.flush();
    type Op = (typeof file.ops)[number];
    const ops = file.ops;
    const within = (o: Op, at: number, bytes: number): boolean => o.op === 'write' && o.offset >= at && o.offset < at + bytes;
    const inReftable = (o: Op): boolean => within(o, reftable.offset, reftable.bytes);
    const inL1 = (o: Op): boolean => within(o, l1.offset, l1.size * 8);
    const isTable = (o: Op): boolean => o.op === 'write' && !inReftable(o) && !inL1(o);
    /** The last op before `end` that `f` picks, or -1. */
    const lastBefore = (end: number, f: (o: Op) => boolean): number => {
      for (let i = end - 1; i >= 0; i--) if (f(ops[i]!)) return i;
      return -1;
    };
    const flushBetween = (a: number, b: number): boolean => a >= 0 && b > a && ops.slice(a, b).some((o) => o.op === 'flush');
    const refAt = ops.findIndex(inReftable);
    const l1At = ops.findIndex(inL1);
    expect(refAt, JSON.stringify(ops.slice(0, 40))).to.be.greaterThan(0);
    expect(l1At).to.be.greaterThan(refAt);
    expect(ops.filter(isTable).length, 'L2 tables and refcount blocks written').to.be.greaterThan(8);
    // Blocks, flush, refcount table entries, flush, L2 tables, flush, L1 entries.
    expect(flushBetween(lastBefore(refAt, isTable), refAt), 'a flush after the blocks').to.equal(true);
    expect(flushBetween(lastBefore(l1At, inReftable), ops.findIndex((o, i) => i > refAt && isTable(o))), 'a flush after the refcount table entries').to.equal(true);
    expect(flushBetween(lastBefore(l1At, isTable), l1At), 'a flush after the L2 tables').to.equal(true);
    await node.close();
    const [got] = await checkRanges('small-clusters-out.qcow2', file.data, [3 * MiB], MiB);
    expect(got!.equals(data)).to.equal(true);
  });

  it('writes pending L1 entries before it grows the L1 table', async () => {
    const img = path.join(tmp.dir, 'l1-grow.qcow2');
    await createImage(img, 'qcow2', 1024 * MiB, { cluster_size: CS });
    const file = new CountingFile(fs.readFileSync(img));
    const node = await openOver(file);
    const data = crypto.randomBytes(MiB);
    await node.write(600 * MiB, data);
    // 3 GiB needs 6 L1 entries where the table has 2: a new table, copied from memory.
    await node.truncate!(3072 * MiB);
    const more = crypto.randomBytes(MiB);
    await node.write(2560 * MiB, more);
    await node.flush();
    await node.close();
    expect(l1Of(file.data).size).to.equal(6);
    const [a, b] = await checkRanges('l1-grow-out.qcow2', file.data, [600 * MiB, 2560 * MiB], MiB);
    expect(a!.equals(data)).to.equal(true);
    expect(b!.equals(more)).to.equal(true);
  });

  it('pads writes into new clusters with zeros, or with the backing file\'s bytes where it has them: 200 partial writes each, read back whole', async () => {
    // Without a backing file the pads come from one shared zero buffer (qcow2.ts
    // cowPart): a buffer written into by mistake would show here in a later pad.
    const writes = partialWrites;
    for (const options of [{}, { extended_l2: 'on' }] as Record<string, string>[]) {
      const file = new CountingFile(await emptyImage('pads.qcow2', options));
      const node = await openOver(file);
      const want = Buffer.alloc(64 * MiB);
      for (const [off, data] of writes()) {
        await node.write(off, data);
        data.copy(want, off);
      }
      await node.flush();
      await node.close();
      expect((await checkBytes('pads-out.qcow2', file.data)).equals(want), JSON.stringify(options)).to.equal(true);
    }
    // Over a raw backing file of 40 MiB of random bytes (the image is 64 MiB): pads inside
    // it are its bytes, pads past its end zeros, and one pad across its end both.
    const base = path.join(tmp.dir, 'pads-base.raw');
    const baseBytes = crypto.randomBytes(40 * MiB);
    fs.writeFileSync(base, baseBytes);
    for (const options of [{}, { extended_l2: 'on' }] as Record<string, string>[]) {
      const img = path.join(tmp.dir, 'pads-over.qcow2');
      await createImage(img, 'qcow2', 64 * MiB, { cluster_size: CS, ...options }, { file: base, format: 'raw' });
      const node = await openTestImage(img, { rw: true });
      const want = Buffer.alloc(64 * MiB);
      baseBytes.copy(want);
      for (const [off, data] of [...writes(), [40 * MiB - 300, crypto.randomBytes(100)] as [number, Buffer]]) {
        await node.write(off, data);
        data.copy(want, off);
      }
      await node.flush();
      await node.close();
      await expectImageHolds(img, want, JSON.stringify(options));
    }
  });

  describe('through a mount', function () {
    const mounts = new MountTracker();
    afterEach(() => mounts.cleanup());

    for (const extended of [false, true]) {
      it(`random allocating writes of mixed sizes leave a clean image with the data written${extended ? ' (extended L2)' : ''}`, async () => {
        const disk = 32 * MiB;
        const img = path.join(tmp.dir, `mixed-${extended}.qcow2`);
        await createImage(img, 'qcow2', disk, { cluster_size: CS, ...(extended ? { extended_l2: 'on' } : {}) });
        const dir = path.join(tmp.dir, `mnt-${extended}`);
        fs.mkdirSync(dir);
        await mounts.mount(['--rw', img, dir]);
        const flat = path.join(dir, path.basename(img).replace(/\.qcow2$/, '.raw'));
        const model = Buffer.alloc(disk);
        const seed = Date.now() % 100_000;
        let state = seed;
        const rand = (n: number): number => {
          state = (state * 1103515245 + 12345) % 2147483648;
          return state % n;
        };
        const sizes = [1, 512, 4096, 5000, CS - 1, CS, CS + 1, 3 * CS + 777, 256 * KiB, MiB + 4096];
        const fh = await fs.promises.open(flat, 'r+');
        try {
          for (let i = 0; i < 120; i++) {
            const len = sizes[rand(sizes.length)]!;
            const off = rand(disk - len);
            const buf = crypto.randomBytes(len);
            await fh.write(buf, 0, len, off);
            buf.copy(model, off);
          }
          await fh.sync();
          // Read back through the mount before unmounting.
          const back = Buffer.alloc(disk);
          await fh.read(back, 0, disk, 0);
          expect(back.equals(model), `seed ${seed}: the mount reads back what was written`).to.equal(true);
        } finally {
          await fh.close();
        }
        await mounts.unmount(dir);
        const c = await checkImage(img, 'qcow2');
        expect(c.code, `seed ${seed}: ${c.output}`).to.equal(0);
        const raw = path.join(tmp.dir, `mixed-${extended}.raw`);
        await run('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', img, raw]);
        const got = fs.readFileSync(raw);
        const k = got.findIndex((b, i) => b !== model[i]);
        expect(k, `seed ${seed}: first byte that differs`).to.equal(-1);
      });
    }
  });
});
