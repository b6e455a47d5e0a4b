// qcow2 features beyond the core, against QEMU's own tools: compressed clusters
// (zlib, zstd), extended L2 entries, external data files, lazy refcounts, dirty
// bitmaps, internal snapshots, growing. One table of image variants (test/helpers/
// formats.ts); test/conformance.test.ts reads every row, this file writes and checks it.
import { expect } from 'chai';
import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import fs from 'node:fs';
import path from 'node:path';
import type { BlockNode } from '../drivers/types.js';
import { checkImage, convertToRaw, createImage, imageInfo, md5File, qemuImg, qemuIo, rawMd5, run, runOk, runTimingPbkdf, tempDir } from './helpers/qemu.js';
import { MountTracker } from './helpers/mount.js';
import { expectClean, nodeMd5, openTestImage, pattern } from './helpers/images.js';
import { BadPassphraseError } from '../drivers/errors.js';
import { makeVariant, qcow2FeatureVariants } from './helpers/formats.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const GiB = 1024 * MiB;

/** The variants (compressed clusters, extended L2, data files...): their reads are in test/conformance.test.ts. */
const variants = qcow2FeatureVariants;
type Variant = (typeof variants)[number];

/** Writes every row takes: unaligned, across compressed and partial clusters. */
function writesFor(size: number): { offset: number; data: Buffer }[] {
  const w = [
    [512, 3000],
    [64 * KiB - 100, 200],
    [130 * KiB, 70 * KiB],
    [2 * MiB + 5 * KiB, 1 * KiB],
    [4 * MiB - 7, 4 * MiB + 14],
    [size - 5000, 5000],
  ];
  return w.filter(([o, l]) => o! + l! <= size).map(([o, l], i) => ({ offset: o!, data: pattern(l!, i + 7) }));
}

/** Zero ranges (offset, length, unmap). */
function zerosFor(size: number): [number, number, boolean][] {
  return (
    [
      [0, 64 * KiB, true],
      [8 * MiB, 4 * MiB, false],
      [12 * MiB + 2 * MiB, 2 * MiB, true],
    ] as [number, number, boolean][]
  ).filter(([o, l]) => o + l <= size);
}

describe('qcow2 features', function () {
  this.timeout(180_000);
  let tmp: ReturnType<typeof tempDir>;
  before(() => (tmp = tempDir('qcow2-features')));
  after(() => tmp.cleanup());

  async function make(v: Variant, name: string): Promise<string> {
    const dir = path.join(tmp.dir, name);
    fs.mkdirSync(dir, { recursive: true });
    return (await makeVariant(dir, 'qcow2', v, 'img')).file;
  }

  describe('writing every variant', function () {
    variants.forEach((v, idx) => {
      it(`writes and zeroes an image with ${v.title}; qemu-img reads back what was written and check is clean`, async function () {
        const file = await make(v, `w${idx}`);
        const raw = path.join(path.dirname(file), 'expect.raw');
        await convertToRaw(file, raw, 'qcow2');
        const node = await openTestImage(file, { rw: true });
        const fd = fs.openSync(raw, 'r+');
        try {
          for (const { offset, data } of writesFor(v.size)) {
            await node.write(offset, data);
            fs.writeSync(fd, data, 0, data.length, offset);
          }
          for (const [o, l, unmap] of zerosFor(v.size)) {
            await node.zero!(o, l, unmap);
            fs.writeSync(fd, Buffer.alloc(l), 0, l, o);
          }
          // Rewrite part of what was written, now allocated.
          const again = pattern(10_000, 99);
          await node.write(600, again);
          fs.writeSync(fd, again, 0, again.length, 600);
          expect(await nodeMd5(node)).to.equal(await md5File(raw));
        } finally {
          fs.closeSync(fd);
          await node.close();
        }
        await expectClean(file);
        expect(await rawMd5(file, 'qcow2')).to.equal(await md5File(raw));
      });
    });
  });

  describe('images over 4 GiB', function () {
    it('reads and writes compressed clusters and subclusters straddling 2^31 and 2^32', async function () {
      const file = path.join(tmp.dir, 'big.qcow2');
      const G4 = 4 * GiB;
      await createImage(file, 'qcow2', 5 * GiB, { extended_l2: 'on', cluster_size: 32 * KiB });
      await qemuIo(file, 'qcow2', [`write -c -P 0x11 ${G4} 32k`, `write -P 0x22 ${G4 - KiB} 2k`, `write -P 0x33 ${2 * GiB - 512} 1k`]);
      const node = await openTestImage(file, { rw: true });
      try {
        const b = Buffer.alloc(96 * KiB);
        await node.read(G4 - 32 * KiB, b);
        expect(b.subarray(0, 31 * KiB).every((x) => x === 0)).to.equal(true);
        expect(b.subarray(31 * KiB, 33 * KiB).every((x) => x === 0x22)).to.equal(true);
        expect(b.subarray(33 * KiB, 64 * KiB).every((x) => x === 0x11)).to.equal(true);
        await node.write(G4 + 2148, Buffer.alloc(200, 0x44));
        await node.write(2 * GiB - 256, Buffer.alloc(512, 0x55));
      } finally {
        await node.close();
      }
      await expectClean(file);
      await qemuIo(file, 'qcow2', [
        `read -P 0x22 ${G4 - KiB} 2k`,
        `read -P 0x11 ${G4 + KiB} 1124`,
        `read -P 0x44 ${G4 + 2148} 200`,
        `read -P 0x11 ${G4 + 2348} ${32 * KiB - 2348}`,
        `read -P 0x33 ${2 * GiB - 512} 256`,
        `read -P 0x55 ${2 * GiB - 256} 512`,
        `read -P 0x33 ${2 * GiB + 256} 256`,
      ]);
    });
  });

  describe('compressed clusters', function () {
    it('replaces a compressed cluster by a normal one on a partial write, and frees it', async function () {
      const file = path.join(tmp.dir, 'cfree.qcow2');
      await createImage(file, 'qcow2', 16 * MiB);
      await qemuIo(file, 'qcow2', ['write -c -P 0x11 0 64k', 'write -c -P 0x12 64k 64k']);
      const node = await openTestImage(file, { rw: true });
      try {
        await node.write(100, Buffer.alloc(10, 0xee));
      } finally {
        await node.close();
      }
      const map = JSON.parse(await qemuImg('map', '--output=json', file)) as { start: number; data: boolean; offset?: number }[];
      expect(map[0]!.data).to.equal(true);
      await expectClean(file);
      const info = JSON.parse(await runOk('qemu-img', ['check', '--output=json', file])) as { 'compressed-clusters'?: number };
      expect(info['compressed-clusters']).to.equal(1);
    });
  });

  describe('an external data file', function () {
    // QEMU puts each data cluster at its guest offset in the data file, so guest cluster
    // 0 lies at host 0: a read or write starting inside it was taken to start at the
    // cluster's first byte (host 0 read as "no offset"), through the graph and in the
    // FUSE workers' map alike.
    it('reads and writes inside the cluster at host offset 0 where qemu-io finds them', async function () {
      const file = path.join(tmp.dir, 'dfile.qcow2');
      await createImage(file, 'qcow2', 4 * MiB, { data_file: `${file}.data` });
      await qemuIo(file, 'qcow2', ['write -P 0x11 0 64k', 'write -P 0x22 0x6000 4k', 'write -P 0x33 64k 64k']);
      const node = await openTestImage(file, { rw: true });
      try {
        for (const [at, n, want] of [[0x6000, 4096, 0x22], [0x6800, 100, 0x22], [0x5000, 4096, 0x11], [0x10100, 512, 0x33]] as const) {
          const got = Buffer.alloc(n);
          await node.read(at, got);
          expect(got.equals(Buffer.alloc(n, want)), `bytes at 0x${at.toString(16)}`).to.equal(true);
        }
        await node.write(0x3000, Buffer.alloc(4096, 0x44));
      } finally {
        await node.close();
      }
      await qemuIo(file, 'qcow2', ['read -P 0x11 0 0x3000', 'read -P 0x44 0x3000 4k', 'read -P 0x11 0x4000 0x2000', 'read -P 0x22 0x6000 4k', 'read -P 0x11 0x7000 0x9000', 'read -P 0x33 64k 64k']);
      await expectClean(file);
    });
  });

  describe('lazy refcounts and the dirty bit', function () {
    async function dirtyImage(name: string): Promise<{ file: string; md5: string }> {
      const file = path.join(tmp.dir, name);
      await createImage(file, 'qcow2', 32 * MiB, { lazy_refcounts: 'on' });
      // qemu-io's abort leaves the dirty bit and unwritten refcounts behind.
      await run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x5a 0 300k', '-c', `write -P 0x5b ${2 * MiB} 1M`, '-c', 'abort', file]);
      const hdr = Buffer.alloc(8);
      const fd = fs.openSync(file, 'r');
      fs.readSync(fd, hdr, 0, 8, 72);
      fs.closeSync(fd);
      expect(Number(hdr.readBigUInt64BE(0) & 1n), 'dirty bit').to.equal(1);
      // qemu-img convert repairs nothing on a read-only open either.
      const r = path.join(tmp.dir, `${name}.raw`);
      await convertToRaw(file, r, 'qcow2');
      return { file, md5: await md5File(r) };
    }

    it('reads a dirty image read-only without changing it', async function () {
      const { file, md5 } = await dirtyImage('dirty-ro.qcow2');
      const before = await md5File(file);
      const node = await openTestImage(file);
      try {
        expect(await nodeMd5(node)).to.equal(md5);
      } finally {
        await node.close();
      }
      expect(await md5File(file)).to.equal(before);
    });

    it('rebuilds the refcounts of a dirty image on a writable open and clears the dirty bit', async function () {
      const { file, md5 } = await dirtyImage('dirty-rw.qcow2');
      const node = await openTestImage(file, { rw: true });
      try {
        expect(await nodeMd5(node)).to.equal(md5);
        await node.write(5 * MiB, pattern(128 * KiB, 3));
      } finally {
        await node.close();
      }
      await expectClean(file);
      const info = await imageInfo(file);
      expect(JSON.stringify(info)).to.not.match(/"dirty-flag": ?true/);
    });
  });

  // Persistent dirty bitmaps: test/qcow2-bitmaps.test.ts.

  describe('internal snapshots', function () {
    it('reads the active layer and every snapshot as qemu-img convert -l does', async function () {
      const file = path.join(tmp.dir, 'snap.qcow2');
      await createImage(file, 'qcow2', 32 * MiB);
      await qemuIo(file, 'qcow2', ['write -P 0x11 0 1M', 'write -c -P 0x12 2M 64k']);
      await qemuImg('snapshot', '-c', 'first', file);
      await qemuIo(file, 'qcow2', ['write -P 0x21 512k 1M', 'write -z 2M 64k']);
      await qemuImg('snapshot', '-c', 'second one', file);
      await qemuIo(file, 'qcow2', ['write -P 0x31 0 4k']);
      await qemuImg('resize', file, '48M');
      const node = (await openTestImage(file)) as BlockNode & { snapshots(): { name: string; node: BlockNode }[] };
      try {
        expect(await nodeMd5(node)).to.equal(await rawMd5(file, 'qcow2'));
        const snaps = node.snapshots();
        expect(snaps.map((s) => s.name)).to.deep.equal(['first', 'second one']);
        for (const s of snaps) {
          const out = path.join(tmp.dir, `snap-${s.name}.raw`);
          await runOk('qemu-img', ['convert', '-l', s.name, '-O', 'raw', file, out]);
          expect(s.node.size).to.equal(fs.statSync(out).size);
          expect(await nodeMd5(s.node), s.name).to.equal(await md5File(out));
        }
      } finally {
        await node.close();
      }
    });
  });

  describe('writing to images with internal snapshots', function () {
    for (const opts of [{}, { extended_l2: 'on' }, { cluster_size: 4096 }] as Record<string, string | number>[]) {
      it(`copies shared L2 tables and clusters on write and leaves every snapshot intact (${JSON.stringify(opts)})`, async function () {
        const file = path.join(tmp.dir, `snapw-${Object.keys(opts).join('')}.qcow2`);
        await createImage(file, 'qcow2', 16 * MiB, opts);
        await qemuIo(file, 'qcow2', ['write -P 0x11 0 2M', 'write -c -P 0x12 4M 64k', 'write -P 0x13 8M 4k']);
        await qemuImg('snapshot', '-c', 'one', file);
        await qemuIo(file, 'qcow2', ['write -P 0x21 1M 64k']);
        await qemuImg('snapshot', '-c', 'two', file);
        const before: string[] = [];
        for (const s of ['one', 'two']) {
          const out = path.join(tmp.dir, `snapw-${s}.raw`);
          await runOk('qemu-img', ['convert', '-l', s, '-O', 'raw', file, out]);
          before.push(await md5File(out));
        }
        const raw = path.join(tmp.dir, 'snapw-active.raw');
        await convertToRaw(file, raw, 'qcow2');
        const node = await openTestImage(file, { rw: true });
        const fd = fs.openSync(raw, 'r+');
        try {
          for (const [o, l, seed] of [[100, 5000, 1], [4 * MiB + 10, 100, 2], [8 * MiB, 4096, 3], [MiB - 512, 128 * KiB, 4], [12 * MiB, MiB, 5]] as const) {
            const d = pattern(l, seed);
            await node.write(o, d);
            fs.writeSync(fd, d, 0, d.length, o);
          }
          await node.zero!(MiB + 64 * KiB, 64 * KiB, true);
          fs.writeSync(fd, Buffer.alloc(64 * KiB), 0, 64 * KiB, MiB + 64 * KiB);
        } finally {
          fs.closeSync(fd);
          await node.close();
        }
        await expectClean(file);
        expect(await rawMd5(file, 'qcow2')).to.equal(await md5File(raw));
        for (const [k, s] of ['one', 'two'].entries()) {
          const out = path.join(tmp.dir, `snapw-${s}.raw`);
          await runOk('qemu-img', ['convert', '-l', s, '-O', 'raw', file, out]);
          expect(await md5File(out), s).to.equal(before[k]);
        }
      });
    }
  });

  describe('growing', function () {
    for (const c of [
      { title: '64 KiB clusters, past 4 GiB', cluster: 64 * KiB, from: 64 * MiB, to: 5 * GiB },
      { title: '512-byte clusters, needing a larger L1 table', cluster: 512, from: MiB, to: 64 * MiB },
    ]) {
      it(`grows an image as qemu-img resize does (${c.title})`, async function () {
        const file = path.join(tmp.dir, `grow-${c.cluster}.qcow2`);
        await createImage(file, 'qcow2', c.from, { cluster_size: c.cluster });
        await qemuIo(file, 'qcow2', [`write -P 0x11 0 ${c.from / 2}`]);
        const node = await openTestImage(file, { rw: true });
        try {
          await node.truncate!(c.to);
          expect(node.size).to.equal(c.to);
          await node.write(c.to - 4096, pattern(4096, 5));
          await node.write(c.from - 512, pattern(1024, 6));
        } finally {
          await node.close();
        }
        expect((await imageInfo(file))['virtual-size']).to.equal(c.to);
        await expectClean(file);
        const node2 = await openTestImage(file);
        try {
          const b = Buffer.alloc(4096);
          await node2.read(c.to - 4096, b);
          expect(b.equals(pattern(4096, 5))).to.equal(true);
        } finally {
          await node2.close();
        }
        await qemuIo(file, 'qcow2', [`read -P 0x11 0 ${c.from / 2 - 4096}`]);
      });
    }

    it('shrinks as qemu-img resize --shrink does, also under internal snapshots (v3), which keep their size', async function () {
      const file = path.join(tmp.dir, 'shrink.qcow2');
      await createImage(file, 'qcow2', 16 * MiB);
      await qemuIo(file, 'qcow2', ['write -P 0x11 0 4M', 'write -P 0x22 12M 4M']);
      const node = await openTestImage(file, { rw: true });
      try {
        await node.truncate!(8 * MiB);
        expect(node.size).to.equal(8 * MiB);
      } finally {
        await node.close();
      }
      await expectClean(file);
      await qemuIo(file, 'qcow2', ['read -P 0x11 0 4M', 'read -P 0 4M 4M']);
      await runOk('qemu-img', ['snapshot', '-c', 's', file]);
      // QEMU 7.2 shrinks a v3 image that has snapshots; a snapshot keeps its own size and clusters.
      const again = await openTestImage(file, { rw: true });
      try {
        await again.truncate!(4 * MiB);
        expect(again.size).to.equal(4 * MiB);
      } finally {
        await again.close();
      }
      await expectClean(file);
      await runOk('qemu-img', ['snapshot', '-a', 's', file]);
      await expectClean(file);
      await qemuIo(file, 'qcow2', ['read -P 0x11 0 4M', 'read -P 0 4M 4M']);
      // v2 stores no size per snapshot: qcow2_co_truncate refuses any resize there.
      const v2 = path.join(tmp.dir, 'shrink-v2.qcow2');
      await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'compat=0.10', v2, '16M']);
      await runOk('qemu-img', ['snapshot', '-c', 's', v2]);
      const old = await openTestImage(v2, { rw: true });
      try {
        let err: unknown;
        await old.truncate!(32 * MiB).catch((e: unknown) => (err = e));
        expect(String(err)).to.match(/Can't resize a v2 image which has snapshots/);
      } finally {
        await old.close();
      }
    });
  });

  describe('encryption', function () {
    const PASS = 'sesame';
    const img = (file: string): string[] => ['--object', `secret,id=s0,data=${PASS}`, '--image-opts', `driver=qcow2,file.filename=${file},encrypt.key-secret=s0`];
    const rowsEnc: { title: string; options: string }[] = [
      { title: 'legacy AES (encryption=on)', options: 'encryption=on' },
      { title: 'LUKS, aes-256-xts-plain64', options: 'encrypt.format=luks,encrypt.iter-time=10' },
      { title: 'LUKS, serpent-128-xts-plain64 with sha1', options: 'encrypt.format=luks,encrypt.cipher-alg=serpent-128,encrypt.hash-alg=sha1,encrypt.iter-time=10' },
      { title: 'LUKS with extended L2 entries', options: 'encrypt.format=luks,encrypt.iter-time=10,extended_l2=on' },
    ];
    async function makeEncrypted(file: string, options: string): Promise<void> {
      const r = await runTimingPbkdf('qemu-img', ['create', '-q', '-f', 'qcow2', '--object', `secret,id=s0,data=${PASS}`, '-o', `${options},encrypt.key-secret=s0`, file, '16M']);
      if (r.code !== 0) throw new Error(r.stderr);
      await runOk('qemu-io', [...img(file), '-c', 'write -P 0x41 4k 100k', '-c', `write -z ${MiB} 64k`, '-c', `write -P 0x42 ${2 * MiB} 8k`]);
    }
    async function qemuRawMd5(file: string): Promise<string> {
      const out = `${file}.raw`;
      await runOk('qemu-img', ['convert', '-O', 'raw', ...img(file), out]);
      const m = await md5File(out);
      fs.rmSync(out);
      return m;
    }
    rowsEnc.forEach((row, i) => {
      it(`reads and writes an image encrypted with ${row.title}`, async function () {
        const file = path.join(tmp.dir, `enc-${i}.qcow2`);
        await makeEncrypted(file, row.options);
        let node = await openTestImage(file, { secret: PASS });
        try {
          expect(await nodeMd5(node)).to.equal(await qemuRawMd5(file));
        } finally {
          await node.close();
        }
        node = await openTestImage(file, { rw: true, secret: PASS });
        let ours: string;
        try {
          await node.write(100, pattern(3000, 1));
          await node.write(3 * MiB + 7, pattern(70 * KiB, 2));
          await node.write(2 * MiB + 512, pattern(512, 3));
          await node.zero!(4 * KiB, 64 * KiB, true);
          ours = await nodeMd5(node);
        } finally {
          await node.close();
        }
        expect(await qemuRawMd5(file)).to.equal(ours);
        const c = await run('qemu-img', ['check', ...img(file)]);
        expect(c.code, c.stdout + c.stderr).to.equal(0);
      });
    });

    it('refuses a missing or wrong passphrase with a one-line BadPassphraseError', async function () {
      const file = path.join(tmp.dir, 'enc-pass.qcow2');
      await makeEncrypted(file, 'encrypt.format=luks,encrypt.iter-time=10');
      for (const secret of [undefined, 'wrong']) {
        let err: unknown;
        await openTestImage(file, { secret }).then((n) => n.close(), (e: unknown) => (err = e));
        expect(err).to.be.instanceOf(BadPassphraseError);
        expect(String((err as Error).message).split('\n')).to.have.length(1);
      }
    });
  });

  describe('crash safety', function () {
    const openJs = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../drivers/open.js');
    // Each operation owns a slot of the disk that no later operation touches, so a
    // write acknowledged by flush must read back exactly after the kill.
    const SLOT = 96 * KiB;
    const child = `
      const { openImage } = await import(${JSON.stringify(openJs)});
      const node = await openImage(process.argv[1], { readOnly: false, cache: 'writeback', metadataCacheBytes: 64 * 1024, locking: 'off', forceShare: false, shareRw: false });
      const slots = Math.floor(node.size / ${SLOT});
      process.stdout.write('ready\\n');
      for (let id = 0; id < slots; ) {
        const batch = [];
        const ids = [];
        for (let k = 0; k < 6 && id < slots; k++, id++) {
          const off = id * ${SLOT} + (id % 13) * 512 + (id % 3);
          const len = 1 + ((id * 7919) % 90000);
          const w = node.write(off, Buffer.alloc(len, (id % 250) + 1));
          batch.push(id % 5 === 4 ? w.then(() => node.zero(off, len, id % 2 === 0)) : w);
          ids.push(id);
        }
        await Promise.all(batch);
        await node.flush();
        process.stdout.write(JSON.stringify(ids) + '\\n');
      }
      process.stdout.write('done\\n');`;

    const kinds: { title: string; options: Record<string, string | number>; prep: string[]; snapshot?: boolean }[] = [
      { title: 'a plain image', options: { cluster_size: 4096 }, prep: [] },
      { title: 'lazy_refcounts=on', options: { lazy_refcounts: 'on', cluster_size: 16384 }, prep: [] },
      { title: 'extended L2 entries', options: { extended_l2: 'on', cluster_size: 16384 }, prep: ['write -P 0x77 0 8M'] },
      { title: 'compressed clusters and an internal snapshot', options: { cluster_size: 4096 }, prep: ['write -c -P 0x66 0 4M', 'write -P 0x67 8M 4M'], snapshot: true },
    ];
    for (const kind of kinds) {
      it(`keeps every flushed write and at worst leaks clusters when killed mid-write (${kind.title})`, async function () {
        let total = 0;
        for (let round = 0; round < 3; round++) {
          const f = path.join(tmp.dir, `crash-${kinds.indexOf(kind)}-${round}.qcow2`);
          await createImage(f, 'qcow2', 24 * MiB, kind.options);
          if (kind.prep.length) await qemuIo(f, 'qcow2', kind.prep);
          if (kind.snapshot) await qemuImg('snapshot', '-c', 'snap', f);
          const proc = spawn(process.execPath, ['--input-type=module', '-e', child, f], { stdio: ['ignore', 'pipe', 'pipe'] });
          const acked: number[] = [];
          let started: () => void = () => undefined;
          const ready = new Promise<void>((r) => (started = r));
          // The first acknowledged flush: on a loaded machine the first batch can take
          // longer than any fixed delay, and a kill before it proves nothing.
          let firstAck: () => void = () => undefined;
          const acknowledged = new Promise<void>((r) => (firstAck = r));
          let out = '';
          let stderr = '';
          proc.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
          proc.stdout.on('data', (d: Buffer) => {
            out += d.toString();
            let nl: number;
            while ((nl = out.indexOf('\n')) >= 0) {
              const line = out.slice(0, nl);
              out = out.slice(nl + 1);
              if (line === 'ready') started();
              if (line.startsWith('[')) {
                acked.push(...(JSON.parse(line) as number[]));
                if (acked.length >= 4) firstAck();
              }
            }
          });
          const exited = new Promise<number | null>((r) => proc.once('exit', (code) => r(code)));
          // Kill only once writing is under way (after 'ready' and a first acknowledged
          // flush), at a different moment each round.
          await Promise.race([ready, exited]);
          await Promise.race([acknowledged, exited, new Promise((r) => setTimeout(r, 60_000))]);
          await new Promise((r) => setTimeout(r, 50 + round * 150));
          proc.kill('SIGKILL');
          const code = await exited;
          expect(code === null || code === 0, stderr).to.equal(true);
          const c = await checkImage(f, 'qcow2');
          expect(c.corruptions, c.output).to.equal(0);
          expect(c.checkErrors, c.output).to.equal(0);
          expect([0, 3], c.output).to.include(c.code);
          total += acked.length;
          const raw = `${f}.raw`;
          await convertToRaw(f, raw, 'qcow2');
          const fd = fs.openSync(raw, 'r');
          try {
            for (const id of acked) {
              const off = id * SLOT + (id % 13) * 512 + (id % 3);
              const len = 1 + ((id * 7919) % 90000);
              const b = Buffer.alloc(len);
              fs.readSync(fd, b, 0, len, off);
              const want = id % 5 === 4 ? 0 : (id % 250) + 1;
              expect(b.every((x) => x === want), `slot ${id} after round ${round}`).to.equal(true);
            }
          } finally {
            fs.closeSync(fd);
          }
          fs.rmSync(raw);
        }
        expect(total, 'flushed operations over all rounds').to.be.greaterThan(10);
      });
    }
  });

  describe('through a FUSE mount', function () {
    const mounts = new MountTracker();
    afterEach(() => mounts.cleanup());

    it('shows snapshots as read-only files beside the image and grows the image through truncate', async function () {
      const dir = path.join(tmp.dir, 'fuse');
      fs.mkdirSync(dir);
      const img = path.join(tmp.dir, 'fuse.qcow2');
      await createImage(img, 'qcow2', 16 * MiB);
      await qemuIo(img, 'qcow2', ['write -P 0x11 0 1M']);
      await qemuImg('snapshot', '-c', 'base', img);
      const snapRaw = path.join(tmp.dir, 'fuse-base.raw');
      await runOk('qemu-img', ['convert', '-l', 'base', '-O', 'raw', img, snapRaw]);
      await mounts.mount([img, dir]);
      expect(fs.readdirSync(dir).sort()).to.deep.equal(['fuse.raw', 'fuse@base.raw']);
      expect(await md5File(path.join(dir, 'fuse@base.raw'))).to.equal(await md5File(snapRaw));
      expect(() => fs.openSync(path.join(dir, 'fuse@base.raw'), 'r+')).to.throw();
      await mounts.unmount(dir);

      const img2 = path.join(tmp.dir, 'fuse-grow.qcow2');
      await createImage(img2, 'qcow2', 16 * MiB);
      await mounts.mount(['--rw', '--growable', img2, dir]);
      fs.truncateSync(path.join(dir, 'fuse-grow.raw'), 32 * MiB);
      expect(fs.statSync(path.join(dir, 'fuse-grow.raw')).size).to.equal(32 * MiB);
      expect(() => fs.truncateSync(path.join(dir, 'fuse-grow.raw'), 8 * MiB)).to.throw();
      await mounts.unmount(dir);
      expect((await imageInfo(img2))['virtual-size']).to.equal(32 * MiB);
      await expectClean(img2);
    });
  });
});
