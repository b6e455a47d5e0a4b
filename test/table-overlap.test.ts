// A table entry corrupted to point at the image's own metadata must not let a guest
// write overwrite it (issue 12, "Metadata overlap on write", for the formats with
// tables other than qcow2): the write fails with EIO and the file is unchanged, as
// QEMU's overlap checks do for qcow2 ("Preventing invalid write on metadata").
import { expect } from 'chai';
import { constants } from 'node:os';
import path from 'node:path';
import { CorruptImageError, TsmountError } from '../drivers/errors.js';
import { MetadataRanges } from '../drivers/format/metadata-ranges.js';
import fs from 'node:fs';
import { createImage, md5File, qemuIo, run, tempDir } from './helpers/qemu.js';
import { MountTracker } from './helpers/mount.js';
import { openTestImage, patch, readBytes, u32le, u64le } from './helpers/images.js';

const KiB = 1024;
const MiB = 1024 * KiB;

describe('metadata ranges', () => {
  it('keeps touching ranges apart, names every range a write overlaps, and finds overlaps at both edges', () => {
    const m = new MetadataRanges('img').add(0, 512, 'header').add(4096, 4096, 'table').add(512, 512, 'more');
    expect(m.overlap(1024, 3072)).to.equal(undefined);
    expect(m.overlap(1023, 1)).to.equal('more');
    expect(m.overlap(511, 2)).to.equal('header, more');
    expect(m.overlap(8191, 100)).to.equal('table');
    expect(m.overlap(8192, 100)).to.equal(undefined);
    expect(m.overlap(0, 0)).to.equal(undefined);
    m.add(8000, 300, 'overlapping');
    expect(m.overlap(8250, 1)).to.equal('overlapping');
    expect(m.overlap(8100, 10)).to.equal('table, overlapping');
    expect(() => m.assertNoOverlap(4000, 8100, 'guest offset 0x0'))
      .to.throw(CorruptImageError, /^img: preventing invalid write on metadata: guest offset 0x0 maps to 0xfa0\+0x1fa4, which overlaps the table, overlapping; the image is corrupt$/);
  });
});

describe('table entries pointing at metadata: a write there fails with EIO and changes nothing', function () {
  this.timeout(120_000);
  let t: ReturnType<typeof tempDir>;
  before(() => (t = tempDir('table-overlap')));
  after(() => t.cleanup());


  /** qemuOpens: false where QEMU itself refuses the damaged image (vhdx checks its whole BAT at open). */
  const cases: { format: string; what: string; make: (f: string) => Promise<void>; says: RegExp; qemuOpens?: false }[] = [
    {
      format: 'vdi',
      what: 'a data offset of 0, so block 0 maps onto the header',
      make: async (f) => {
        await createImage(f, 'vdi', '4M');
        await qemuIo(f, 'vdi', ['write -P 0x11 0 1M']);
        patch(f, 0x158, u32le(0));
      },
      says: /preventing invalid write on metadata: .*overlaps the VDI header/,
    },
    {
      format: 'vhdx',
      what: 'a BAT entry pointing at the BAT itself',
      make: async (f) => {
        await createImage(f, 'vhdx', '8M', { block_size: '1M' });
        await qemuIo(f, 'vhdx', ['write -P 0x11 0 1M']);
        const rt = readBytes(f, 192 * KiB, 64);
        const batAt = Number(rt.readBigUInt64LE(32));
        patch(f, batAt, u64le((BigInt(batAt) << 0n) | 6n));
      },
      says: /VHDX BAT entry 0 \(0x200000\) overlaps the image metadata/,
      qemuOpens: false,
    },
    {
      format: 'qed',
      what: 'an L2 entry pointing at the L1 table',
      make: async (f) => {
        await createImage(f, 'qed', '4M');
        await qemuIo(f, 'qed', ['write -P 0x11 0 64k']);
        const l1 = Number(readBytes(f, 40, 8).readBigUInt64LE(0));
        const l2 = Number(readBytes(f, l1, 8).readBigUInt64LE(0));
        patch(f, l2, u64le(l1));
      },
      says: /preventing invalid write on metadata: .*overlaps the qed L1 table/,
    },
    {
      format: 'qcow',
      what: 'an L2 entry pointing at its own L2 table',
      make: async (f) => {
        await createImage(f, 'qcow', '4M');
        await qemuIo(f, 'qcow', ['write -P 0x11 0 4k']);
        const l1 = Number(readBytes(f, 40, 8).readBigUInt64BE(0));
        const l2 = readBytes(f, l1, 8);
        patch(f, Number(l2.readBigUInt64BE(0)), l2);
      },
      says: /preventing invalid write on metadata: .*overlaps the qcow L2 table/,
    },
    {
      format: 'vpc',
      what: 'a BAT entry pointing at the dynamic header and the BAT',
      make: async (f) => {
        await createImage(f, 'vpc', '8M');
        await qemuIo(f, 'vpc', ['write -P 0x11 0 64k']);
        const bat = Number(readBytes(f, 512 + 16, 8).readBigUInt64BE(0));
        const e = Buffer.alloc(4);
        e.writeUInt32BE(1);
        patch(f, bat, e);
      },
      says: /preventing invalid write on metadata: .*overlaps the VHD dynamic header/,
    },
    {
      format: 'vmdk',
      what: 'a grain table entry pointing at the grain directory',
      make: async (f) => {
        await createImage(f, 'vmdk', '4M');
        await qemuIo(f, 'vmdk', ['write -P 0x11 0 64k']);
        const gd = Number(readBytes(f, 56, 8).readBigUInt64LE(0));
        const gt = readBytes(f, gd * 512, 4).readUInt32LE(0);
        patch(f, gt * 512, u32le(gd));
      },
      says: /preventing invalid write on metadata: .*overlaps the VMDK header and grain tables/,
    },
    // Issue 20: a table entry pointing at another table than its own (every table a
    // writer knows is in the ranges, not only the one being written through).
    {
      format: 'qed',
      what: 'an L2 entry pointing at another L2 table',
      make: async (f) => {
        await createImage(f, 'qed', '16M', { cluster_size: '4k', table_size: 2 });
        await qemuIo(f, 'qed', ['write -P 0x11 0 4k', 'write -P 0x12 4M 4k']);
        const l1 = Number(readBytes(f, 40, 8).readBigUInt64LE(0));
        const l1e = readBytes(f, l1, 16);
        patch(f, Number(l1e.readBigUInt64LE(0)), u64le(l1e.readBigUInt64LE(8)));
      },
      says: /preventing invalid write on metadata: .*overlaps the qed L2 table/,
    },
    {
      format: 'qcow',
      what: 'an L2 entry pointing at another L2 table',
      make: async (f) => {
        await createImage(f, 'qcow', '8M');
        await qemuIo(f, 'qcow', ['write -P 0x11 0 4k', 'write -P 0x12 2M 4k']);
        const l1 = Number(readBytes(f, 40, 8).readBigUInt64BE(0));
        const l1e = readBytes(f, l1, 16);
        patch(f, Number(l1e.readBigUInt64BE(0)), l1e.subarray(8, 16));
      },
      says: /preventing invalid write on metadata: .*overlaps the qcow L2 table/,
    },
    {
      format: 'vmdk',
      what: 'a grain table entry pointing at another grain table',
      make: async (f) => {
        await createImage(f, 'vmdk', '64M');
        await qemuIo(f, 'vmdk', ['write -P 0x11 0 64k']);
        const gd = Number(readBytes(f, 56, 8).readBigUInt64LE(0));
        const gts = readBytes(f, gd * 512, 8);
        patch(f, gts.readUInt32LE(0) * 512, u32le(gts.readUInt32LE(4)));
      },
      says: /preventing invalid write on metadata: .*overlaps the VMDK (header and )?grain table/,
    },
    {
      format: 'parallels',
      what: 'a BAT entry pointing at the BAT',
      make: async (f) => {
        await createImage(f, 'parallels', '4M', { cluster_size: '4k' });
        await qemuIo(f, 'parallels', ['write -P 0x11 0 4k']);
        patch(f, 64, u32le(1));
      },
      says: /preventing invalid write on metadata: .*overlaps the parallels header and BAT/,
    },
  ];

  for (const c of cases) {
    it(`${c.format}: ${c.what}`, async () => {
      const f = path.join(t.dir, `bad.${c.format}`);
      await c.make(f);
      const before = await md5File(f);
      const node = await openTestImage(f, { rw: true, format: c.format });
      let err: unknown;
      try {
        await node.write(0, Buffer.alloc(4 * KiB, 0xee));
        await node.flush();
      } catch (e) {
        err = e;
      } finally {
        await node.close().catch(() => undefined);
      }
      expect(err, 'the write must fail').to.be.instanceOf(TsmountError);
      expect((err as TsmountError).errno).to.equal(constants.errno.EIO);
      expect((err as Error).message).to.match(c.says);
      expect((err as Error).message.startsWith(f)).to.equal(true);
      expect(await md5File(f), 'the image file is unchanged').to.equal(before);
      if (c.qemuOpens !== false) {
        const info = await run('qemu-img', ['info', '-f', c.format, f]);
        expect(info.code, info.stderr).to.equal(0);
      }
    });
  }

  describe('through a --rw mount', () => {
    const mounts = new MountTracker();
    afterEach(() => mounts.cleanup());

    // Every format with tables: the guest's write fails with EIO, the server logs why,
    // and the image (its metadata) is as it was. (vhdx refuses such an image at open.)
    for (const c of cases.filter((c) => c.qemuOpens !== false)) {
      it(`${c.format}: ${c.what}: EIO to the writer, logged, the image unchanged`, async () => {
        const dir = fs.mkdtempSync(path.join(t.dir, `m-${c.format}-`));
        const f = path.join(dir, `img.${c.format}`);
        await c.make(f);
        const before = await md5File(f);
        const mp = path.join(dir, 'mnt');
        fs.mkdirSync(mp);
        const log = path.join(dir, 'server.log');
        await mounts.mount(['--rw', '-f', c.format, '--log', log, f, mp]);
        const w = await run('dd', ['if=/dev/zero', `of=${path.join(mp, 'img.raw')}`, 'bs=4096', 'count=1', 'conv=notrunc,fsync', 'status=none'], { timeoutMs: 60_000 });
        await mounts.unmount(mp);
        expect(w.code, 'the write must fail').to.not.equal(0);
        expect(w.stderr).to.match(/Input\/output error/);
        expect(fs.readFileSync(log, 'utf8')).to.match(c.says);
        expect(await md5File(f), 'the image is unchanged').to.equal(before);
      });
    }
  });

  it('writes to blocks that are where they should be still work (vdi, 1 MiB in place and a new block)', async () => {
    const f = path.join(t.dir, 'good.vdi');
    await createImage(f, 'vdi', '4M');
    await qemuIo(f, 'vdi', ['write -P 0x11 0 1M']);
    const node = await openTestImage(f, { rw: true });
    try {
      await node.write(0, Buffer.alloc(MiB, 0x22));
      await node.write(2 * MiB, Buffer.alloc(64 * KiB, 0x33));
      await node.flush();
    } finally {
      await node.close();
    }
    const r = await run('qemu-io', ['-r', '-f', 'vdi', '-c', 'read -P 0x22 0 1M', '-c', 'read -P 0x33 2M 64k', f]);
    expect(r.stdout).to.not.match(/Pattern verification failed/);
    expect(r.code).to.equal(0);
  });
});
