// The bochs driver beyond the conformance table (which reads bximage's growing images,
// both header versions, against qemu-img convert): the original data, the undoable
// and volatile redologs QEMU does not open, holes in block status, refusals that
// name what they refuse, and damaged catalogs that fail only the reads they touch.
import { expect } from 'chai';
import fs from 'node:fs';
import path from 'node:path';
import { formatOf } from '../drivers/open.js';
import { CorruptImageError, TsmountError, UnsupportedError } from '../drivers/errors.js';
import { md5File, tempDir } from './helpers/qemu.js';
import { tsmount } from './helpers/mount.js';
import { nodeMd5, openTestImage, patch, readBytes, u32le } from './helpers/images.js';
import { bochsConvert, bochsSubtype } from './helpers/ro-images.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const SIZE = 8 * MiB;

async function openError(file: string): Promise<unknown> {
  try {
    const node = await openTestImage(file);
    await node.close();
  } catch (err) {
    return err;
  }
  return undefined;
}

describe('bochs: growing images and redologs made by bximage', function () {
  this.timeout(120_000);
  let t: ReturnType<typeof tempDir>;
  let image: string;
  let src: string;
  before(async () => {
    t = tempDir('bochs');
    image = path.join(t.dir, 'disk.img');
    src = await bochsConvert(image, SIZE);
  });
  after(() => t.cleanup());

  const copy = (name: string): string => {
    const f = path.join(t.dir, name);
    fs.copyFileSync(image, f);
    return f;
  };

  it('reads the data bximage was given, byte for byte (probed)', async () => {
    const node = await openTestImage(image);
    try {
      expect(formatOf(node)).to.equal('bochs');
      expect(node.size).to.equal(SIZE);
      expect(await nodeMd5(node, 100_003)).to.equal(await md5File(src));
    } finally {
      await node.close();
    }
  });

  it('reports unallocated extents as holes, allocated ones as data (whatever their bitmaps say)', async () => {
    const node = await openTestImage(image);
    try {
      const st = await node.blockStatus(0, SIZE);
      const at = (o: number): string => st.find((e) => e.offset <= o && o < e.offset + e.length)!.kind;
      expect(at(0)).to.equal('data');
      expect(at(100 * KiB + 77)).to.equal('data');
      expect(at(6 * MiB)).to.equal('unallocated');
      expect(st.length, 'a run per extent at most').to.be.below(SIZE / readBytes(image, 80, 4).readUInt32LE(0));
      expect(st.reduce((n, e) => n + e.length, 0)).to.equal(SIZE);
    } finally {
      await node.close();
    }
  });

  for (const subtype of ['Undoable', 'Volatile']) {
    it(`reads the ${subtype} redolog subtype (same layout; QEMU opens only Growing) as the data written to it`, async () => {
      const f = copy(`${subtype}.img`);
      bochsSubtype(f, subtype);
      const node = await openTestImage(f);
      try {
        expect(formatOf(node)).to.equal('bochs');
        expect(await nodeMd5(node)).to.equal(await md5File(src));
      } finally {
        await node.close();
      }
    });
  }

  it('refuses other subtypes, types and versions with one line naming them', async () => {
    const cases: { what: string; edit: (f: string) => void; says: RegExp }[] = [
      { what: 'subtype', edit: (f) => bochsSubtype(f, 'Z-Undoable'), says: /subtype 'Z-Undoable'/ },
      { what: 'type', edit: (f) => patch(f, 32, Buffer.from('Sparse\0\0', 'latin1')), says: /type 'Sparse'/ },
      { what: 'version', edit: (f) => patch(f, 64, u32le(0x00030000)), says: /version 0x30000/ },
    ];
    for (const c of cases) {
      const f = copy(`refused-${c.what}.img`);
      c.edit(f);
      const err = await openError(f);
      expect(err, c.what).to.be.instanceOf(UnsupportedError);
      expect((err as Error).message).to.match(c.says).and.to.include(f);
      expect((err as Error).message.split('\n')).to.have.length(1);
    }
    // The same through the command line: one line on stderr, a non-zero exit, no mount.
    const f = path.join(t.dir, 'refused-subtype.img');
    const mp = path.join(t.dir, 'mnt');
    fs.mkdirSync(mp, { recursive: true });
    const r = await tsmount([f, mp]);
    expect(r.code).to.not.equal(0);
    expect(r.stderr.trim().split('\n'), r.stderr).to.have.length(1);
    expect(r.stderr).to.include("'Z-Undoable'");
  });

  it('refuses headers whose sizes are out of bounds before using them', async () => {
    const cases: { what: string; at: number; value: number; says: RegExp }[] = [
      { what: 'a huge catalog', at: 72, value: 0x7fffffff, says: /catalog of 2147483647 entries is too large/ },
      { what: 'a catalog too small for the disk', at: 72, value: 3, says: /too small/ },
      { what: 'an extent size not a power of two', at: 80, value: 3 * 4096, says: /extent size 12288/ },
      { what: 'a zero extent size', at: 80, value: 0, says: /extent size 0/ },
      { what: 'a zero bitmap', at: 76, value: 0, says: /bitmap of 0 bytes/ },
      { what: 'a catalog past the end of the file', at: 68, value: 0x7ffff000, says: /not inside the file/ },
    ];
    for (const c of cases) {
      const f = copy('bad-header.img');
      patch(f, c.at, u32le(c.value));
      const err = await openError(f);
      expect(err, c.what).to.be.instanceOf(CorruptImageError);
      expect((err as Error).message, c.what).to.match(c.says);
    }
  });

  it('a catalog entry past the end of the file fails the reads of its extent only (EIO)', async () => {
    const f = copy('bad-entry.img');
    const catalogAt = readBytes(f, 68, 4).readUInt32LE(0);
    patch(f, catalogAt, u32le(0x00fffff0)); // extent 0
    const node = await openTestImage(f);
    try {
      const err = await node.read(0, Buffer.alloc(4096)).then(() => undefined, (e: unknown) => e);
      expect(err).to.be.instanceOf(TsmountError);
      expect((err as TsmountError).errno).to.equal(5);
      expect((err as Error).message).to.match(/extent 0 .*past the end of the file/);
      const buf = Buffer.alloc(MiB);
      await node.read(MiB, buf);
      expect(buf.equals(readBytes(src, MiB, MiB))).to.equal(true);
    } finally {
      await node.close();
    }
  });

  it('a file cut inside the data fails the reads of the sectors it lost', async () => {
    const f = copy('cut.img');
    fs.truncateSync(f, fs.statSync(f).size - 4096);
    const node = await openTestImage(f);
    try {
      const last = SIZE - 8 * KiB;
      const err = await node.read(last, Buffer.alloc(8 * KiB)).then(() => undefined, (e: unknown) => e);
      expect(err).to.be.instanceOf(CorruptImageError);
      const buf = Buffer.alloc(MiB);
      await node.read(MiB, buf);
      expect(buf.equals(readBytes(src, MiB, MiB))).to.equal(true);
    } finally {
      await node.close();
    }
  });
});

