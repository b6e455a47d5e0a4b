// The allocating writes of the table-mapped formats that write a new block whole (vdi,
// vmdk, qed, qcow): the block's zeros are allocated without writing them where the file
// can (writeIntoNew -> allocateZeros), so a 4 KiB write into a new 1 MiB VDI block
// writes 4 KiB, not a megabyte; where the file cannot, or the rest of the block reads
// from a backing file, the block goes as one write as before. qemu-img is the judge.
import { expect } from 'chai';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { qcowDriver } from '../drivers/format/qcow/index.js';
import { qedDriver } from '../drivers/format/qed/index.js';
import { vdiDriver } from '../drivers/format/vdi/index.js';
import { vmdkDriver } from '../drivers/format/vmdk/index.js';
import type { BlockNode, FormatDriver } from '../drivers/types.js';
import { ZeroingFile } from './helpers/counting-file.js';
import { checkImage, createImage, run, tempDir } from './helpers/qemu.js';
import { openTestImage } from './helpers/images.js';

const KiB = 1024;
const MiB = 1 << 20;
const SIZE = 64 * MiB;

interface Case {
  format: string;
  driver: FormatDriver;
  /** The unit a write allocates: a VDI block, a VMDK grain, a qcow cluster. */
  unit: number;
  options: Record<string, string | number>;
  /** qemu-img check knows the format (qcow v1 it does not). */
  checks: boolean;
  backing: boolean;
  /** New blocks' table entries wait for the flush: the flushes of the test's flush (barriers included). */
  deferred?: { flushes: number };
  /** Bytes of the file its metadata may leave as holes. */
  holes?: number;
}

const CASES: Case[] = [
  { format: 'vdi', driver: vdiDriver, unit: MiB, options: {}, checks: true, backing: false },
  { format: 'vmdk', driver: vmdkDriver, unit: 64 * KiB, options: { subformat: 'monolithicSparse' }, checks: true, backing: true, deferred: { flushes: 2 } },
  // qed's L2 tables (4 clusters) are made by growing the file: holes until written.
  { format: 'qed', driver: qedDriver, unit: 64 * KiB, options: {}, checks: true, backing: true, holes: 4 * 64 * KiB },
  { format: 'qcow', driver: qcowDriver, unit: 4 * KiB, options: {}, checks: false, backing: true, deferred: { flushes: 3 } },
];

function openOver(c: Case, file: BlockNode, base?: string): Promise<BlockNode> {
  return c.driver.open(file, {
    readOnly: false,
    cache: 'writeback',
    metadataCacheBytes: MiB,
    openBacking: () => (base ? openTestImage(base, { rw: false }) : Promise.reject(new Error('no backing files'))),
  });
}

describe('mapped formats: a new block\'s zeros', function () {
  this.timeout(120_000);
  let tmp: { dir: string; cleanup: () => void };
  before(() => (tmp = tempDir('mapped-write-path')));
  after(() => tmp.cleanup());

  /** The image file on disk: clean by qemu-img check where it checks the format, and its guest bytes `want`. */
  async function expectImageHolds(c: Case, img: string, want: Buffer): Promise<void> {
    if (c.checks) {
      const r = await checkImage(img, c.format);
      expect(r.code, r.output).to.equal(0);
    }
    await run('qemu-img', ['convert', '-f', c.format, '-O', 'raw', img, `${img}.raw`], { cwd: path.dirname(img) });
    expect(fs.readFileSync(`${img}.raw`).equals(want), c.format).to.equal(true);
  }

  for (const c of CASES) {
    it(`${c.format}: a partial write into a new ${c.unit / KiB} KiB block allocates its zeros and writes the data alone; a whole block or a refusing file write the block once`, async () => {
      const img = path.join(tmp.dir, `zr.${c.format}`);
      await createImage(img, c.format, SIZE, c.options);
      const file = new ZeroingFile(fs.readFileSync(img));
      const node = await openOver(c, file);
      const want = Buffer.alloc(SIZE);
      const put = async (at: number, data: Buffer): Promise<void> => {
        await node.write(at, data);
        data.copy(want, at);
      };
      const at = 5 * c.unit + 300;
      const data = crypto.randomBytes(1000);
      await put(at, data);
      expect(file.zeroed).to.have.length(1);
      expect(file.zeroed[0]!.length).to.equal(c.unit);
      // Into the new block: the 1000 bytes, nothing else (the tables are written elsewhere).
      const z = file.zeroed[0]!;
      const into = file.writes.filter((w) => w.offset < z.offset + z.length && w.offset + w.length > z.offset);
      expect(into, JSON.stringify(file.writes)).to.deep.equal([{ offset: z.offset + 300, length: 1000, parts: 1 }]);
      // Past the first write, a block's table exists: the writes are data alone.
      const dataWrites = (): typeof file.writes => file.writes.filter((w) => w.length >= 1000);
      // An overwrite: in place, nothing zeroed.
      await put(at + 10, Buffer.alloc(10, 7));
      expect(file.zeroed).to.have.length(1);
      // A whole block: written as it is.
      file.writes.length = 0;
      await put(9 * c.unit, crypto.randomBytes(c.unit));
      expect(file.zeroed).to.have.length(1);
      expect(dataWrites().map((w) => w.length)).to.deep.equal([c.unit]);
      // Where the file says no: zeros and data as one write of the block.
      file.refuse = true;
      file.writes.length = 0;
      await put(12 * c.unit + c.unit / 2, crypto.randomBytes(1000));
      expect(dataWrites().map((w) => w.length)).to.deep.equal([c.unit]);
      await node.flush();
      await node.close();
      const out = path.join(tmp.dir, `zr-out.${c.format}`);
      fs.writeFileSync(out, file.data);
      await expectImageHolds(c, out, want);
    });

    if (c.backing) {
      it(`${c.format}: over a backing file's data the block keeps its bytes (written with the data); past its end the zeros are allocated`, async () => {
        // A vmdk's backing file must be a vmdk (QEMU's rule); qcow takes a raw one.
        const baseRaw = path.join(tmp.dir, `zr-base-${c.format}.raw`);
        const baseBytes = crypto.randomBytes(8 * MiB);
        fs.writeFileSync(baseRaw, baseBytes);
        const baseFormat = c.format === 'vmdk' ? 'vmdk' : 'raw';
        const base = `${baseRaw}.${baseFormat}`;
        await run('qemu-img', ['convert', '-f', 'raw', '-O', baseFormat, baseRaw, base]);
        const img = path.join(tmp.dir, `zr-over.${c.format}`);
        await createImage(img, c.format, SIZE, c.options, { file: base, format: baseFormat });
        const file = new ZeroingFile(fs.readFileSync(img));
        const node = await openOver(c, file, base);
        const want = Buffer.alloc(SIZE);
        baseBytes.copy(want);
        try {
          await node.write(MiB + 100, Buffer.alloc(100, 9));
          want.fill(9, MiB + 100, MiB + 200);
          expect(file.zeroed, 'inside the backing file').to.have.length(0);
          await node.write(20 * MiB + 100, Buffer.alloc(100, 9));
          want.fill(9, 20 * MiB + 100, 20 * MiB + 200);
          expect(file.zeroed, 'past its end').to.have.length(1);
          await node.flush();
        } finally {
          await node.close();
        }
        const out = path.join(tmp.dir, `zr-over-out.${c.format}`);
        fs.writeFileSync(out, file.data);
        await run('qemu-img', ['rebase', '-u', '-b', base, '-F', baseFormat, '-f', c.format, out]);
        await expectImageHolds({ ...c, checks: false }, out, want);
      });
    }

    if (c.deferred) {
      const { flushes } = c.deferred;
      it(`${c.format}: new blocks' table entries wait for the flush, behind one barrier (not one per block); the image before it reads as before the writes`, async () => {
        const img = path.join(tmp.dir, `later.${c.format}`);
        await createImage(img, c.format, SIZE, c.options);
        const file = new ZeroingFile(fs.readFileSync(img));
        const node = await openOver(c, file);
        const want = Buffer.alloc(SIZE);
        for (let i = 0; i < 20; i++) {
          const data = crypto.randomBytes(3000);
          await node.write(i * 3 * c.unit + 700, data);
          data.copy(want, i * 3 * c.unit + 700);
        }
        // Read back before the flush: the entries in memory say where.
        const back = Buffer.alloc(3000);
        await node.read(57 * c.unit + 700, back);
        expect(back.equals(want.subarray(57 * c.unit + 700, 57 * c.unit + 3700))).to.equal(true);
        const before = Buffer.from(file.data);
        const flushesBefore = file.count('flush');
        await node.flush();
        // One barrier before the entries (and one before the L1 entries of new tables), one flush after them.
        expect(file.count('flush') - flushesBefore).to.equal(flushes);
        await node.close();
        // Killed before the flush: a clean image without the new grains (they leak, as QEMU's do).
        const early = path.join(tmp.dir, `later-early.${c.format}`);
        fs.writeFileSync(early, before);
        await expectImageHolds(c, early, Buffer.alloc(SIZE));
        const out = path.join(tmp.dir, `later-out.${c.format}`);
        fs.writeFileSync(out, file.data);
        await expectImageHolds(c, out, want);
      });
    }

    if (c.format === 'qcow') {
      it('qcow: past 64 Ki waiting entries (256 MiB of 4 KiB clusters) they go to the file without a flush; all read back after it', async () => {
        const img = path.join(tmp.dir, 'many.qcow');
        const size = 320 * MiB;
        await createImage(img, 'qcow', size);
        const node = await openTestImage(img, { rw: true });
        const want = Buffer.alloc(size);
        try {
          const chunk = crypto.randomBytes(MiB);
          for (let at = 0; at < 260 * MiB; at += MiB) {
            chunk.writeUInt32LE(at, 0);
            await node.write(at, chunk);
            chunk.copy(want, at);
          }
          // The header's L1 offset (byte 40), and the first L1 entry on disk already.
          const fd = fs.openSync(img, 'r');
          const head = Buffer.alloc(48);
          fs.readSync(fd, head, 0, 48, 0);
          const l1 = Buffer.alloc(8);
          fs.readSync(fd, l1, 0, 8, Number(head.readBigUInt64BE(40)));
          fs.closeSync(fd);
          expect(l1.readBigUInt64BE(0), 'L1 entry 0 before the flush').to.not.equal(0n);
          await node.flush();
        } finally {
          await node.close();
        }
        await run('qemu-img', ['convert', '-f', 'qcow', '-O', 'raw', img, `${img}.raw`]);
        expect(fs.readFileSync(`${img}.raw`).equals(want)).to.equal(true);
      });
    }

    it(`${c.format}: a real image file after 200 partial writes into new blocks reads back as written, qemu-img agreeing, its blocks allocated`, async () => {
      const img = path.join(tmp.dir, `zr-real.${c.format}`);
      await createImage(img, c.format, SIZE, c.options);
      const node = await openTestImage(img, { rw: true });
      const want = Buffer.alloc(SIZE);
      try {
        for (let i = 0; i < 200; i++) {
          const data = crypto.randomBytes(1 + ((i * 7919) % (c.unit + 5000)));
          const at = Math.min(SIZE - data.length, ((i * 104729) % 64) * MiB + ((i * 4093) % c.unit));
          await node.write(at, data);
          data.copy(want, at);
        }
        await node.flush();
      } finally {
        await node.close();
      }
      await expectImageHolds(c, img, want);
      // Allocated as written zeros would be: no holes inside the blocks.
      const st = fs.statSync(img);
      expect(st.blocks * 512, 'blocks on disk').to.be.at.least(st.size - c.unit - (c.holes ?? 0));
    });
  }
});
