// vmdk: every subformat qemu-img makes, bximage's VMware4 images, hand-made VMware 3
// and VMware-style streamOptimized files; reads against qemu-img convert, writes
// judged by qemu-img check, creation against qemu-img create, and bad input.
import { expect } from 'chai';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import zlib from 'node:zlib';
import type { BlockNode } from '../drivers/types.js';
import { openImage, formatOf, type ImageOptions } from '../drivers/open.js';
import { probeFormat } from '../drivers/format/index.js';
import { TsmountError, messageOf } from '../drivers/errors.js';
import { checkImage, convertToRaw, createImage, imageInfo, lockBytes, mapImage, md5File, md5Sparse, qemuIo, run, runOk, tempDir } from './helpers/qemu.js';
import { MountTracker } from './helpers/mount.js';
import { nodeMd5, pattern, testOptions, TSIMG, tsimg } from './helpers/images.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const GiB = 1024 * MiB;

const opts = (o: Partial<ImageOptions> = {}): ImageOptions => testOptions({ metadataCacheBytes: 4 * MiB, locking: 'auto', ...o });

/** What qemu-img convert makes of the image: its size and md5. */
async function qemuView(file: string, dir: string): Promise<{ size: number; md5: string }> {
  const raw = path.join(dir, `view-${crypto.randomBytes(4).toString('hex')}.raw`);
  try {
    await convertToRaw(file, raw, 'vmdk');
    return { size: fs.statSync(raw).size, md5: await md5Sparse(raw) };
  } finally {
    fs.rmSync(raw, { force: true });
  }
}

async function expectReadsLikeQemu(file: string, dir: string): Promise<void> {
  const want = await qemuView(file, dir);
  const node = await openImage(file, opts());
  try {
    expect(formatOf(node)).to.equal('vmdk');
    expect(node.size, `${file} size`).to.equal(want.size);
    expect(await nodeMd5(node, 4 * MiB), `${file} bytes`).to.equal(want.md5);
  } finally {
    await node.close();
  }
}


/** Every file of an image (descriptor and extents) and its md5, to show a failed open changed nothing. */
async function filesMd5(dir: string): Promise<Record<string, string>> {
  const out: Record<string, string> = {};
  for (const f of fs.readdirSync(dir, { recursive: true }).map(String).sort()) {
    const p = path.join(dir, f);
    if (fs.statSync(p).isFile()) out[f] = await md5File(p);
  }
  return out;
}

// ---- hand-made images ------------------------------------------------------------

/** A VMware 3 (COWD) sparse file: 4 MiB, 4 KiB grains, two grains allocated. QEMU wants a CID at 0x200. */
function makeCowd(file: string): void {
  const b = Buffer.alloc(56 * 512);
  b.write('COWD', 0, 'latin1');
  b.writeUInt32LE(1, 4); // version
  b.writeUInt32LE(3, 8); // flags
  b.writeUInt32LE(8192, 12); // disk sectors
  b.writeUInt32LE(8, 16); // granularity (sectors)
  b.writeUInt32LE(4, 20); // l1dir offset (sectors)
  b.writeUInt32LE(1, 24); // l1dir size
  b.write('CID=1a2b3c4d\nparentCID=ffffffff\n', 0x200, 'latin1');
  b.writeUInt32LE(5, 4 * 512); // L1[0] -> GT at sector 5 (4096 entries: 32 sectors)
  b.writeUInt32LE(40, 5 * 512 + 0 * 4); // grain 0 -> sector 40
  b.writeUInt32LE(48, 5 * 512 + 3 * 4); // grain 3 -> sector 48
  pattern(4096, 1).copy(b, 40 * 512);
  pattern(4096, 2).copy(b, 48 * 512);
  fs.writeFileSync(file, b);
}

/** streamOptimized as VMware writes it: grains, GT and GD behind markers, the header in a footer. */
function makeVmwareStream(file: string): void {
  const sectors = 4096; // 2 MiB, 64 KiB grains, one grain table
  const header = (gdOffset: bigint): Buffer => {
    const h = Buffer.alloc(512);
    h.write('KDMV', 0, 'latin1');
    h.writeUInt32LE(3, 4);
    h.writeUInt32LE(0x30001, 8); // NL detect, compressed, markers
    h.writeBigUInt64LE(BigInt(sectors), 12);
    h.writeBigUInt64LE(128n, 20);
    h.writeBigUInt64LE(1n, 28); // descriptor at sector 1
    h.writeBigUInt64LE(1n, 36);
    h.writeUInt32LE(512, 44);
    h.writeBigUInt64LE(0n, 48);
    h.writeBigUInt64LE(gdOffset, 56);
    h.writeBigUInt64LE(2n, 64);
    h.set([0x0a, 0x20, 0x0d, 0x0a], 73);
    h.writeUInt16LE(1, 77);
    return h;
  };
  const marker = (val: bigint, size: number, type: number): Buffer => {
    const m = Buffer.alloc(512);
    m.writeBigUInt64LE(val, 0);
    m.writeUInt32LE(size, 8);
    m.writeUInt32LE(type, 12);
    return m;
  };
  const parts: Buffer[] = [header(0xffffffffffffffffn)];
  const desc = Buffer.alloc(512);
  desc.write('# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType="streamOptimized"\n\nRW 4096 SPARSE "x.vmdk"\n', 'latin1');
  parts.push(desc);
  let sector = 2;
  const gt = Buffer.alloc(2048);
  for (const [grain, seed] of [
    [0, 5],
    [3, 6],
    [31, 7],
  ] as const) {
    const z = zlib.deflateSync(pattern(64 * KiB, seed));
    const g = Buffer.alloc(Math.ceil((12 + z.length) / 512) * 512);
    g.writeBigUInt64LE(BigInt(grain * 128), 0);
    g.writeUInt32LE(z.length, 8);
    z.copy(g, 12);
    gt.writeUInt32LE(sector, grain * 4);
    parts.push(g);
    sector += g.length / 512;
  }
  parts.push(marker(4n, 0, 1));
  sector++;
  const gtSector = sector;
  parts.push(gt);
  sector += 4;
  parts.push(marker(1n, 0, 2));
  sector++;
  const gd = Buffer.alloc(512);
  gd.writeUInt32LE(gtSector, 0);
  const gdSector = sector;
  parts.push(gd);
  parts.push(marker(1n, 0, 3));
  parts.push(header(BigInt(gdSector)));
  parts.push(marker(0n, 0, 0));
  fs.writeFileSync(file, Buffer.concat(parts));
}

// ---- the suite ---------------------------------------------------------------------

describe('vmdk', function () {
  this.timeout(600_000);
  let tmp: { dir: string; cleanup: () => void };
  let n = 0;
  const fresh = (name: string): string => {
    const d = path.join(tmp.dir, `${n++}-${name}`);
    fs.mkdirSync(d);
    return d;
  };
  before(() => (tmp = tempDir('vmdk')));
  after(() => tmp.cleanup());

  describe('reads vmdk files made other ways exactly as qemu-img convert does', () => {
    // Every subformat qemu-img create makes: test/conformance.test.ts (its vmdk rows in
    // test/helpers/formats.ts). Here: the files other tools make.
    it('streamOptimized made by qemu-img convert (compressed grains with markers)', async () => {
      const dir = fresh('stream');
      const raw = path.join(dir, 'src.raw');
      const data = Buffer.alloc(8 * MiB);
      pattern(3 * MiB, 9).copy(data, 100 * KiB);
      crypto.randomBytes(512 * KiB).copy(data, 5 * MiB);
      fs.writeFileSync(raw, data);
      const img = path.join(dir, 'disk.vmdk');
      await runOk('qemu-img', ['convert', '-f', 'raw', '-O', 'vmdk', '-o', 'subformat=streamOptimized', raw, img]);
      await expectReadsLikeQemu(img, dir);
      const node = await openImage(img, opts());
      const part = Buffer.alloc(1000);
      await node.read(100 * KiB + 12345, part);
      expect(part.equals(data.subarray(100 * KiB + 12345, 100 * KiB + 13345))).to.equal(true);
      await node.close();
    });

    it("bximage's VMware4 sparse images", async () => {
      const dir = fresh('bximage');
      const img = path.join(dir, 'bx.vmdk');
      await runOk('bximage', ['-func=create', '-hd=10M', '-imgmode=vmware4', '-q', img]);
      await qemuIo(img, 'vmdk', ['write -P 0x5a 1M 100k']);
      await expectReadsLikeQemu(img, dir);
    });

    it('VMware 3 (COWD) sparse files', async () => {
      const dir = fresh('cowd');
      const img = path.join(dir, 'old.vmdk');
      makeCowd(img);
      await expectReadsLikeQemu(img, dir);
    });

    it('streamOptimized as VMware writes it (grain directory in a footer)', async () => {
      const dir = fresh('vmware-stream');
      const img = path.join(dir, 'ovf.vmdk');
      makeVmwareStream(img);
      await expectReadsLikeQemu(img, dir);
      const rw = await openImage(img, opts({ readOnly: false })).catch((e: unknown) => e);
      expect(messageOf(rw)).to.match(/footer.*read-only/);
    });

    it('a hand-written descriptor: relative and absolute extents, VMFS, offsets, lines QEMU skips', async () => {
      const dir = fresh('desc');
      const a = path.join(dir, 'a.bin');
      fs.writeFileSync(a, Buffer.concat([pattern(1 * MiB, 3), pattern(1 * MiB, 4)]));
      const sub = path.join(dir, 'sub');
      fs.mkdirSync(sub);
      await createImage(path.join(sub, 's.vmdk'), 'vmdk', 1 * MiB);
      await qemuIo(path.join(sub, 's.vmdk'), 'vmdk', ['write -P 0x77 4k 8k']);
      const img = path.join(dir, 'hand.vmdk');
      fs.writeFileSync(
        img,
        '# Disk DescriptorFile\r\nversion=1\r\nCID=0000abcd\nparentCID=ffffffff\ncreateType="vmfs"\n\n' +
          'RW 1024 FLAT "a.bin" 2048\n' +
          'RW 1024 ZERO\n' +
          'RDONLY 2048 FLAT "a.bin" 0\n' +
          `RW 2048 VMFS "${a}"\n` +
          'RW 2048 SPARSE "sub/s.vmdk"\n' +
          'NOACCESS 100 FLAT "missing.bin" 0\n',
      );
      expect(probeFormat(fs.readFileSync(img).subarray(0, 4096), img).name).to.equal('vmdk');
      await expectReadsLikeQemu(img, dir);
    });
  });

  it('block status of a 1 TiB sparse vmdk is a few runs, not one per grain (SEEK_DATA took half a minute)', async () => {
    const img = path.join(fresh('sparse-1t'), 'big.vmdk');
    await createImage(img, 'vmdk', '1T');
    await qemuIo(img, 'vmdk', ['write -P 7 900G 64k']);
    const node = await openImage(img, opts());
    try {
      const runs = await node.blockStatus!(0, node.size);
      expect(runs.map((r) => [r.offset / 2 ** 30, r.length, r.kind])).to.deep.equal([
        [0, 900 * 2 ** 30, 'unallocated'],
        [900, 64 * 1024, 'data'],
        [900 + 64 / 2 ** 20, 124 * 2 ** 30 - 64 * 1024, 'unallocated'],
      ]);
    } finally {
      await node.close();
    }
  });

  describe('probing', () => {
    it('recognises sparse files and a descriptor file that stands alone', async () => {
      const dir = fresh('probe');
      await createImage(path.join(dir, 'm.vmdk'), 'vmdk', MiB, { subformat: 'monolithicFlat' });
      await createImage(path.join(dir, 's.vmdk'), 'vmdk', MiB);
      for (const f of ['m.vmdk', 's.vmdk']) {
        const node = await openImage(path.join(dir, f), opts());
        expect(formatOf(node)).to.equal('vmdk');
        await node.close();
      }
      // Comments and blank lines before version=, as QEMU's probe allows.
      expect(probeFormat(Buffer.from('# x\n   \n  \r\nversion=2\nCID=1\n'), 'x').name).to.equal('vmdk');
      expect(() => probeFormat(Buffer.from('hello\nversion=1\n'), 'x')).to.not.throw();
      expect(probeFormat(Buffer.from('hello\nversion=1\n'), 'x').name).to.not.equal('vmdk');
    });
  });

  describe('writes: unaligned writes leave a clean image that reads back as written', () => {
    interface W {
      off: number;
      len: number;
      seed: number;
    }
    const base: W[] = [
      { off: 1000, len: 5000, seed: 1 },
      { off: 3 * 64 * KiB - 100, len: 200, seed: 2 },
      { off: MiB + 7, len: 300_000, seed: 3 },
      { off: 1000, len: 100, seed: 4 }, // over an allocated grain
    ];
    const cases: { name: string; size: number; options: Record<string, string>; writes: W[]; zero?: [number, number] }[] = [
      { name: 'monolithicSparse', size: 16 * MiB, options: {}, writes: [...base, { off: 16 * MiB - 1000, len: 1000, seed: 5 }], zero: [4 * MiB - 3, 200 * KiB] },
      { name: 'monolithicFlat', size: 16 * MiB, options: { subformat: 'monolithicFlat' }, writes: base, zero: [MiB, 64 * KiB] },
      { name: 'zeroed_grain (zeroing whole grains sets GTE=1)', size: 16 * MiB, options: { zeroed_grain: 'on' }, writes: base, zero: [MiB - 64 * KiB, 256 * KiB + 10] },
      { name: 'streamOptimized (new compressed grains appended)', size: 16 * MiB, options: { subformat: 'streamOptimized' }, writes: base, zero: [MiB, 64 * KiB] },
      {
        name: 'twoGbMaxExtentSparse, across the 2 GiB extent boundary',
        size: 2 * GiB + 16 * MiB,
        options: { subformat: 'twoGbMaxExtentSparse' },
        writes: [...base, { off: 2 * GiB - 3000, len: 6000, seed: 6 }, { off: 2 * GiB + 16 * MiB - 512, len: 512, seed: 7 }],
      },
      {
        name: 'twoGbMaxExtentFlat, across the 2 GiB extent boundary',
        size: 2 * GiB + 16 * MiB,
        options: { subformat: 'twoGbMaxExtentFlat' },
        writes: [...base, { off: 2 * GiB - 3000, len: 6000, seed: 6 }],
      },
    ];
    for (const c of cases) {
      it(c.name, async () => {
        const dir = fresh('write');
        const img = path.join(dir, 'disk.vmdk');
        await createImage(img, 'vmdk', c.size, c.options);
        const cidBefore = (await imageInfo(img)) as { 'format-specific'?: { data?: { cid?: number } } };
        const model = path.join(tmp.dir, `model-${n}.raw`);
        await convertToRaw(img, model, 'vmdk');
        const fd = fs.openSync(model, 'r+');
        const node = await openImage(img, opts({ readOnly: false }));
        try {
          for (const w of c.writes) {
            const data = pattern(w.len, w.seed);
            await node.write(w.off, data);
            fs.writeSync(fd, data, 0, w.len, w.off);
          }
          // Read back through the node before closing.
          const w = c.writes[2]!;
          const back = Buffer.alloc(w.len);
          await node.read(w.off, back);
          expect(back.equals(pattern(w.len, w.seed))).to.equal(true);
          if (c.zero) {
            await node.zero!(c.zero[0], c.zero[1], false);
            fs.writeSync(fd, Buffer.alloc(c.zero[1]), 0, c.zero[1], c.zero[0]);
          }
        } finally {
          await node.close();
          fs.closeSync(fd);
        }
        const check = await checkImage(img, 'vmdk');
        expect(check.code, check.output).to.equal(0);
        const got = await qemuView(img, dir);
        expect(got.md5).to.equal(await md5Sparse(model));
        fs.rmSync(model);
        const cidAfter = (await imageInfo(img)) as { 'format-specific'?: { data?: { cid?: number } } };
        expect(cidAfter['format-specific']?.data?.cid).to.not.equal(cidBefore['format-specific']?.data?.cid);
        if (c.options.zeroed_grain) {
          const map = await mapImage(img, 'vmdk');
          const z = map.find((e) => e.start <= MiB && e.start + e.length > MiB);
          expect(z?.zero, JSON.stringify(map)).to.equal(true);
          expect(z?.data).to.equal(false);
        }
      });
    }

    it('refuses writes to VMDK version 3 sparse files that are not compressed, as QEMU does', async () => {
      const dir = fresh('v3');
      const img = path.join(dir, 'v3.vmdk');
      await createImage(img, 'vmdk', MiB);
      const fd = fs.openSync(img, 'r+');
      fs.writeSync(fd, Buffer.from([3, 0, 0, 0]), 0, 4, 4);
      fs.closeSync(fd);
      const err = await openImage(img, opts({ readOnly: false })).catch((e: unknown) => e);
      expect(messageOf(err)).to.match(/version 3 must be read only/);
      await expectReadsLikeQemu(img, dir);
    });
  });

  describe('backing files: parentCID and parentFileNameHint', () => {
    it('reads and writes an overlay, resolved relative to the child; the CID chain is checked on open', async () => {
      const dir = fresh('backing');
      const sub = path.join(dir, 'base');
      fs.mkdirSync(sub);
      const baseImg = path.join(sub, 'base.vmdk');
      await createImage(baseImg, 'vmdk', 8 * MiB);
      await qemuIo(baseImg, 'vmdk', ['write -P 0x12 0 3M']);
      const child = path.join(dir, 'child.vmdk');
      await createImage(child, 'vmdk', undefined, {}, { file: 'base/base.vmdk', format: 'vmdk' });
      await qemuIo(child, 'vmdk', ['write -P 0x34 1M 64k']);
      await expectReadsLikeQemu(child, dir);

      // Writes into partial grains copy the rest from the backing file.
      const node = await openImage(child, opts({ readOnly: false }));
      await node.write(2 * MiB + 100, pattern(1000, 8));
      await node.close();
      expect((await checkImage(child, 'vmdk')).code).to.equal(0);
      await expectReadsLikeQemu(child, dir);

      // The base changes: its CID no longer matches the child's parentCID.
      await qemuIo(baseImg, 'vmdk', ['write -P 0x56 0 512']);
      const before = await filesMd5(dir);
      const err = await openImage(child, opts()).catch((e: unknown) => e);
      expect(err).to.be.instanceOf(TsmountError);
      expect(messageOf(err)).to.match(/parentCID .* does not match/);
      expect(messageOf(err)).to.not.include('\n');
      expect(await filesMd5(dir)).to.deep.equal(before);
      const q = await run('qemu-img', ['convert', '-O', 'raw', child, path.join(dir, 'x.raw')], { cwd: dir });
      expect(q.code).to.not.equal(0);
    });
  });

  describe('locking: every file of the image is locked as QEMU locks it', () => {
    it('holds write locks on the descriptor and on each extent file', async () => {
      const dir = fresh('lock');
      const img = path.join(dir, 'disk.vmdk');
      await createImage(img, 'vmdk', 4 * MiB, { subformat: 'monolithicFlat' });
      const node = await openImage(img, opts({ readOnly: false, locking: 'on' }));
      try {
        expect(lockBytes(img)).to.include.members([100, 101]);
        expect(lockBytes(path.join(dir, 'disk-flat.vmdk'))).to.include.members([100, 101, 201]);
        const r = await run('qemu-io', ['-c', 'write 0 512', img], { cwd: dir });
        expect(r.code + r.stdout + r.stderr).to.match(/lock/);
      } finally {
        await node.close();
      }
      expect(lockBytes(path.join(dir, 'disk-flat.vmdk'))).to.deep.equal([]);
    });
  });

  describe('tsimg create -f vmdk: the files qemu-img create makes', () => {
    // The CID is random and its hex is not zero-padded: compare the descriptor text with it masked.
    const maskText = (b: Buffer): string => b.toString('latin1').replace(/\0+$/, '').replace(/\nCID=[0-9a-f]+\n/, '\nCID=x\n');
    const mask = (b: Buffer): string[] =>
      b.subarray(0, 4).toString('latin1') === 'KDMV'
        ? [b.subarray(0, 0x200).toString('hex'), maskText(b.subarray(0x200, 0x200 + 10240)), b.subarray(0x200 + 10240).toString('hex')]
        : [maskText(b)];
    const cases: { name: string; size: string; options: Record<string, string> }[] = [
      { name: 'default (monolithicSparse)', size: '100M', options: {} },
      { name: 'monolithicFlat', size: '100M', options: { subformat: 'monolithicFlat' } },
      { name: 'twoGbMaxExtentSparse', size: '5G', options: { subformat: 'twoGbMaxExtentSparse' } },
      { name: 'twoGbMaxExtentFlat', size: '3G', options: { subformat: 'twoGbMaxExtentFlat' } },
      { name: 'streamOptimized', size: '100M', options: { subformat: 'streamOptimized' } },
      { name: 'compat6', size: '100M', options: { compat6: 'on' } },
      { name: 'hwversion and lsilogic', size: '100M', options: { hwversion: '7', adapter_type: 'lsilogic' } },
      { name: 'zeroed_grain and buslogic', size: '100M', options: { zeroed_grain: 'on', adapter_type: 'buslogic' } },
      { name: 'legacyESX and toolsversion', size: '12345k', options: { adapter_type: 'legacyESX', toolsversion: '42' } },
      { name: 'file options qemu-img also takes', size: '10M', options: { preallocation: 'full', nocow: 'off', extent_size_hint: '1M' } },
    ];
    for (const c of cases) {
      it(c.name, async () => {
        const dq = fresh('qemu');
        const dt = fresh('ts');
        const o = Object.entries(c.options).map(([k, v]) => `${k}=${v}`);
        await runOk('qemu-img', ['create', '-q', '-f', 'vmdk', ...(o.length ? ['-o', o.join(',')] : []), path.join(dq, 'img.vmdk'), c.size]);
        await runOk(process.execPath, [TSIMG, 'create', '-q', '-f', 'vmdk', ...(o.length ? ['-o', o.join(',')] : []), path.join(dt, 'img.vmdk'), c.size]);
        const files = fs.readdirSync(dq).sort();
        expect(fs.readdirSync(dt).sort()).to.deep.equal(files);
        for (const f of files) {
          const a = path.join(dq, f);
          const b = path.join(dt, f);
          // Small files byte for byte (the random CID aside), big ones (zero extents) by size.
          if (fs.statSync(a).size <= 16 * MiB) expect(mask(fs.readFileSync(b)), f).to.deep.equal(mask(fs.readFileSync(a)));
          else expect(fs.statSync(b).size, f).to.equal(fs.statSync(a).size);
        }
        const info = (await imageInfo(path.join(dt, 'img.vmdk'))) as { 'format-specific'?: { data?: { 'create-type'?: string } } };
        expect(info['format-specific']?.data?.['create-type']).to.equal(c.options.subformat ?? 'monolithicSparse');
        expect((await checkImage(path.join(dt, 'img.vmdk'), 'vmdk')).code).to.equal(0);
        // The multi-GiB ones read like qemu-img in the read tests above; here only check that they open.
        if (!c.size.endsWith('G')) await expectReadsLikeQemu(path.join(dt, 'img.vmdk'), dt);
        else await (await openImage(path.join(dt, 'img.vmdk'), opts())).close();
      });
    }

    it('backing_file: parentCID from the base, parentFileNameHint as given, size from the base', async () => {
      const dir = fresh('create-backing');
      await createImage(path.join(dir, 'base.vmdk'), 'vmdk', 8 * MiB);
      await qemuIo(path.join(dir, 'base.vmdk'), 'vmdk', ['write -P 0x21 0 1M']);
      await runOk(process.execPath, [TSIMG, 'create', '-q', '-f', 'vmdk', '-b', 'base.vmdk', '-F', 'vmdk', path.join(dir, 'top.vmdk')]);
      const info = await imageInfo(path.join(dir, 'top.vmdk'));
      expect(info['virtual-size']).to.equal(8 * MiB);
      expect(info['backing-filename']).to.equal('base.vmdk');
      await expectReadsLikeQemu(path.join(dir, 'top.vmdk'), dir);
    });

    const refusals: { name: string; options: string; re: RegExp }[] = [
      { name: 'compat6 with hwversion', options: 'compat6=on,hwversion=7', re: /compat6 cannot be enabled with hwversion/ },
      { name: 'a flat image with zeroed_grain', options: 'subformat=monolithicFlat,zeroed_grain=on', re: /zeroed grain/ },
      { name: 'a flat image with a backing file', options: 'subformat=twoGbMaxExtentFlat,backing_file=x.vmdk', re: /backing file/ },
      { name: 'a backing format other than vmdk', options: 'backing_file=x.vmdk,backing_fmt=qcow2', re: /must be a vmdk/ },
      { name: 'an unknown subformat', options: 'subformat=bogus', re: /invalid value 'bogus'/ },
      { name: 'an unknown adapter type', options: 'adapter_type=scsi', re: /invalid value 'scsi'/ },
      { name: 'an unknown option', options: 'cluster_size=64k', re: /Invalid parameter 'cluster_size'/ },
    ];
    for (const r of refusals) {
      it(`refuses ${r.name}, leaving no file behind`, async () => {
        const dir = fresh('refuse');
        const res = await tsimg(['create', '-f', 'vmdk', '-o', r.options, path.join(dir, 'img.vmdk'), '10M']);
        expect(res.code).to.equal(1);
        expect(res.stderr.trim()).to.match(r.re);
        expect(res.stderr.trim().split('\n')).to.have.length(1);
        expect(fs.readdirSync(dir)).to.deep.equal([]);
      });
    }
  });

  describe('bad input: one-line errors or EIO, never a crash, a hang or a changed file', () => {
    type Damage = (dir: string, img: string) => void;
    const patch = (file: string, off: number, bytes: number[] | Buffer): void => {
      const fd = fs.openSync(file, 'r+');
      const b = Buffer.from(bytes);
      fs.writeSync(fd, b, 0, b.length, off);
      fs.closeSync(fd);
    };
    const le32 = (v: number): Buffer => {
      const b = Buffer.alloc(4);
      b.writeUInt32LE(v >>> 0);
      return b;
    };
    const le64 = (v: bigint): Buffer => {
      const b = Buffer.alloc(8);
      b.writeBigUInt64LE(v);
      return b;
    };
    // Sparse: 4 MiB, header GD at sector 0x17 etc.; offsets from the header fields.
    const sparse: { name: string; damage: Damage; when: 'open' | 'read'; re: RegExp }[] = [
      { name: 'an unsupported header version', damage: (_d, f) => patch(f, 4, le32(4)), when: 'open', re: /unsupported VMDK version 4/ },
      { name: 'a huge granularity', damage: (_d, f) => patch(f, 20, le64(1n << 40n)), when: 'open', re: /granularity/ },
      { name: 'zero granularity', damage: (_d, f) => patch(f, 20, le64(0n)), when: 'open', re: /invalid/ },
      { name: 'too many grain table entries', damage: (_d, f) => patch(f, 44, le32(100000)), when: 'open', re: /grain table size too big/ },
      { name: 'a capacity beyond 2^53 bytes', damage: (_d, f) => patch(f, 12, le64(1n << 60n)), when: 'open', re: /out of range|too big/ },
      { name: 'a grain directory outside the file', damage: (_d, f) => patch(f, 56, le64(1n << 30n)), when: 'open', re: /outside the file/ },
      { name: 'a truncated file', damage: (_d, f) => fs.truncateSync(f, 20000), when: 'open', re: /truncated/ },
      { name: 'no CID in the descriptor', damage: (_d, f) => patch(f, 0x200, Buffer.alloc(10240)), when: 'open', re: /no CID/ },
      {
        name: 'a grain table entry pointing past the end of the file',
        damage: (_d, f) => {
          const gd = fs.readFileSync(f).readBigUInt64LE(56);
          const gt = fs.readFileSync(f).readUInt32LE(Number(gd) * 512);
          patch(f, gt * 512, le32(0x7fffff00));
        },
        when: 'read',
        re: /outside the file/,
      },
      {
        name: 'a grain directory entry pointing past the end of the file',
        damage: (_d, f) => {
          const gd = fs.readFileSync(f).readBigUInt64LE(56);
          patch(f, Number(gd) * 512, le32(0x7fffff00));
        },
        when: 'read',
        re: /outside the file/,
      },
    ];
    const descriptor: { name: string; damage: Damage; when: 'open' | 'read'; re: RegExp }[] = [
      { name: 'a descriptor without createType', damage: (_d, f) => fs.writeFileSync(f, fs.readFileSync(f, 'latin1').replace('createType', 'kreateType'), 'latin1'), when: 'open', re: /invalid VMDK image descriptor/ },
      { name: 'an unsupported createType', damage: (_d, f) => fs.writeFileSync(f, fs.readFileSync(f, 'latin1').replace('"monolithicFlat"', '"custom"'), 'latin1'), when: 'open', re: /unsupported VMDK image type 'custom'/ },
      { name: 'a flat extent line without an offset', damage: (_d, f) => fs.writeFileSync(f, fs.readFileSync(f, 'latin1').replace(/" 0\n/, '"\n'), 'latin1'), when: 'open', re: /invalid extent line: RW 8192 FLAT/ },
      { name: 'a missing extent file', damage: (d) => fs.rmSync(path.join(d, 'img-flat.vmdk')), when: 'open', re: /cannot open VMDK extent 'img-flat.vmdk'.*no such file/ },
      { name: 'an extent longer than its file', damage: (d) => fs.truncateSync(path.join(d, 'img-flat.vmdk'), 2 * MiB), when: 'read', re: /past the end of its file/ },
      { name: 'a sparse extent that is not vmdk', damage: (_d, f) => fs.writeFileSync(f, fs.readFileSync(f, 'latin1').replace('FLAT "img-flat.vmdk" 0', 'SPARSE "img-flat.vmdk"'), 'latin1'), when: 'open', re: /not in VMDK format/ },
    ];
    const run1 = async (kind: 'sparse' | 'flat', d: { name: string; damage: Damage; when: 'open' | 'read'; re: RegExp }): Promise<void> => {
      const dir = fresh('bad');
      const img = path.join(dir, 'img.vmdk');
      await createImage(img, 'vmdk', 4 * MiB, kind === 'flat' ? { subformat: 'monolithicFlat' } : {});
      await qemuIo(img, 'vmdk', ['write -P 0x42 0 256k']);
      d.damage(dir, img);
      const before = await filesMd5(dir);
      for (const readOnly of [true, false]) {
        let err: unknown;
        let node: BlockNode | undefined;
        try {
          node = await openImage(img, opts({ readOnly }));
          await nodeMd5(node, 4 * MiB);
        } catch (e) {
          err = e;
        } finally {
          await node?.close();
        }
        expect(err, `${d.name} (readOnly ${readOnly})`).to.be.instanceOf(TsmountError);
        expect(messageOf(err)).to.match(d.re);
        expect(messageOf(err)).to.not.include('\n');
        expect((err as TsmountError).errno).to.be.greaterThan(0);
        if (d.when === 'read') expect(node, 'the image opens; the read fails').to.not.equal(undefined);
      }
      expect(await filesMd5(dir)).to.deep.equal(before);
    };
    for (const d of sparse) it(`monolithicSparse with ${d.name}`, () => run1('sparse', d));
    for (const d of descriptor) it(`monolithicFlat with ${d.name}`, () => run1('flat', d));

    it('a compressed grain that does not decompress fails that read with EIO', async () => {
      const dir = fresh('bad-stream');
      const img = path.join(dir, 'ovf.vmdk');
      makeVmwareStream(img);
      // The first grain's deflate data starts at sector 2, after the 12-byte marker header.
      patch(img, 2 * 512 + 12, Buffer.alloc(64, 0xee));
      const node = await openImage(img, opts());
      try {
        const err = await node.read(0, Buffer.alloc(4096)).catch((e: unknown) => e);
        expect(messageOf(err)).to.match(/does not decompress/);
        expect((err as TsmountError).errno).to.equal(5);
        const ok = Buffer.alloc(4096);
        await node.read(3 * 64 * KiB, ok);
        expect(ok.equals(pattern(4096, 6))).to.equal(true);
      } finally {
        await node.close();
      }
    });

    it('survives random corruption of the metadata (200 images)', async () => {
      const dir = fresh('fuzz');
      const pristine = path.join(dir, 'p.vmdk');
      await createImage(pristine, 'vmdk', 2 * MiB, { zeroed_grain: 'on' });
      await qemuIo(pristine, 'vmdk', ['write -P 0x42 0 200k', 'write -z 1M 64k']);
      const good = fs.readFileSync(pristine);
      const metaEnd = 128 * 512; // header, descriptor, both directories and tables
      const img = path.join(dir, 'f.vmdk');
      let rng = 12345;
      const rand = (k: number): number => {
        rng = (rng * 1103515245 + 12345) & 0x7fffffff;
        return rng % k;
      };
      for (let i = 0; i < 200; i++) {
        const b = Buffer.from(good);
        for (let k = 0; k < 1 + rand(8); k++) b[rand(metaEnd)] = rand(256);
        fs.writeFileSync(img, b);
        let node: BlockNode | undefined;
        try {
          node = await openImage(img, opts());
          await nodeMd5(node, 4 * MiB);
        } catch (e) {
          expect(e, `iteration ${i}: ${String(e)}`).to.be.instanceOf(TsmountError);
        } finally {
          await node?.close();
        }
        expect(fs.readFileSync(img).equals(b)).to.equal(true);
      }
    });
  });

  describe('tsmount: a vmdk through a real FUSE mount', () => {
    const mounts = new MountTracker();
    afterEach(() => mounts.cleanup());

    it('mounts a twoGbMaxExtentSparse image --rw, takes unaligned writes, and unmounts to a clean image', async () => {
      const dir = fresh('fuse');
      const img = path.join(dir, 'disk.vmdk');
      await createImage(img, 'vmdk', 2 * GiB + 8 * MiB, { subformat: 'twoGbMaxExtentSparse' });
      await qemuIo(img, 'vmdk', ['write -P 0x61 2047M 2M']);
      const mp = path.join(dir, 'mnt');
      fs.mkdirSync(mp);
      await mounts.mount(['--rw', img, mp]);
      const flat = path.join(mp, 'disk.raw');
      expect(fs.statSync(flat).size).to.equal(2 * GiB + 8 * MiB);
      const fd = fs.openSync(flat, 'r+');
      const data = pattern(10_000, 11);
      fs.writeSync(fd, data, 0, data.length, 2 * GiB - 4321);
      fs.fsyncSync(fd);
      const back = Buffer.alloc(10_000);
      fs.readSync(fd, back, 0, back.length, 2 * GiB - 4321);
      fs.closeSync(fd);
      expect(back.equals(data)).to.equal(true);
      await mounts.unmount(mp);
      expect((await checkImage(img, 'vmdk')).code).to.equal(0);
      const r = await run('qemu-io', ['-U', '-r', '-f', 'vmdk', '-c', `read -v ${2 * GiB - 4321} 16`, img]);
      expect(r.stdout).to.include(data.subarray(0, 16).toString('hex').replace(/(..)/g, '$1 ').trim().slice(0, 11));
      const m = await run('qemu-img', ['compare', '-U', '-f', 'vmdk', img, img]);
      expect(m.code).to.equal(0);
    });
  });
});
