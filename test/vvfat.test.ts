// Virtual FAT disks from a directory tree (fat:DIR, QEMU's vvfat): the layout QEMU
// chooses, and trees that fsck.fat finds clean and mtools copies back byte for byte.
import { expect } from 'chai';
import fs from 'node:fs';
import path from 'node:path';
import { openGraph } from '../drivers/open.js';
import type { BlockNode } from '../drivers/types.js';
import { parseVvfatSpec, vvfatSpecFromOptions } from '../drivers/protocol/vvfat/spec.js';
import { parseOptionList } from '../drivers/protocol/remote.js';
import { lfnChecksum, shortBytes } from '../drivers/protocol/vvfat/names.js';
import { VvfatNode } from '../drivers/protocol/vvfat/node.js';
import { run, runOk, tempDir } from './helpers/qemu.js';
import { MountTracker, tsmount } from './helpers/mount.js';
import { listTree, makeTree, treeDiff } from './helpers/fat-tree.js';

const MTOOLS_ENV = { ...process.env, MTOOLS_SKIP_CHECK: '1', LANG: 'C.UTF-8', LC_ALL: 'C.UTF-8' };
const HD_OFFSET = 63 * 512;

async function openFat(spec: string, rw = false): Promise<BlockNode> {
  const [node] = await openGraph([spec], { readOnly: !rw, cache: 'writeback', cacheSize: 32 << 20, locking: 'off', forceShare: false, shareRw: false });
  return node!;
}

/** The disk (from `from` on) as a sparse file: the blocks that are not all zeros. */
async function dump(node: BlockNode, file: string, from = 0): Promise<void> {
  const fd = fs.openSync(file, 'w');
  try {
    fs.ftruncateSync(fd, node.size - from);
    const buf = Buffer.alloc(1 << 20);
    for (let o = from; o < node.size; o += buf.length) {
      const b = buf.subarray(0, Math.min(buf.length, node.size - o));
      await node.read(o, b);
      if (b.some((x) => x !== 0)) fs.writeSync(fd, b, 0, b.length, o - from);
    }
  } finally {
    fs.closeSync(fd);
  }
}

/** fsck.fat -n must say nothing but its version and the summary line. */
async function fsckClean(part: string): Promise<void> {
  const r = await run('fsck.fat', ['-n', part]);
  const lines = r.stdout.trim().split('\n').filter((l) => !/^fsck\.fat \d/.test(l) && !/: \d+ files, \d+\/\d+ clusters$/.test(l));
  expect({ code: r.code, messages: lines, stderr: r.stderr.trim() }).to.deep.equal({ code: 0, messages: [], stderr: '' });
}

/** An mtools command in a UTF-8 locale (names with non-ASCII characters); throws if it fails. */
async function mtools(cmd: string, args: string[]): Promise<string> {
  const r = await run(cmd, args, { env: MTOOLS_ENV });
  if (r.code !== 0) throw new Error(`${cmd} ${args.join(' ')} failed (${r.code}): ${r.stderr.trim()}`);
  return r.stdout;
}

/** mcopy -s -m of the whole file system into `out`. */
async function mcopyOut(image: string, offset: number, out: string): Promise<void> {
  fs.mkdirSync(out, { recursive: true });
  await mtools('mcopy', ['-s', '-n', '-m', '-i', `${image}@@${offset}`, '::/', out]);
}

describe('vvfat: virtual FAT disks from a directory (fat:DIR)', function () {
  this.timeout(300_000);
  let tmp: { dir: string; cleanup: () => void };
  const mounts = new MountTracker();
  before(() => {
    tmp = tempDir('vvfat');
  });
  afterEach(() => mounts.cleanup());
  after(() => tmp.cleanup());
  const sub = (name: string): string => {
    const p = path.join(tmp.dir, name);
    fs.mkdirSync(p, { recursive: true });
    return p;
  };

  describe('names', () => {
    it('parses fat:[floppy:][rw:][12:|16:|32:]DIR in any order, and --image-opts', () => {
      expect(parseVvfatSpec('fat:/a/b')).to.deep.equal({ dir: '/a/b', fatType: undefined, floppy: false, rw: false, label: undefined });
      expect(parseVvfatSpec('fat:rw:32:/x')).to.include({ dir: '/x', fatType: 32, rw: true, floppy: false });
      expect(parseVvfatSpec('fat:12:floppy:rw:rel/dir')).to.include({ dir: 'rel/dir', fatType: 12, rw: true, floppy: true });
      expect(() => parseVvfatSpec('fat:64:/x')).to.throw(/unknown virtual FAT option '64'/);
      expect(() => parseVvfatSpec('fat:floppy:32:/x')).to.throw(/floppy is FAT12 or FAT16/);
      expect(() => parseVvfatSpec('fat:label=TWELVE CHARS:/x')).to.throw(/longer than 11 bytes/);
      expect(vvfatSpecFromOptions(parseOptionList('dir=/d,fat-type=32,rw=on,label=MY DISK'))).to.equal('fat:32:rw:label=MY DISK:/d');
      expect(vvfatSpecFromOptions(parseOptionList('dir=/d,floppy=on'))).to.equal('fat:floppy:/d');
      expect(() => vvfatSpecFromOptions(parseOptionList('dir=/d,bogus=1'))).to.throw(/unsupported vvfat option 'bogus'/);
    });

    it('checksums short names as the FAT specification does', () => {
      // Values from a Linux vfat directory: "FILENA~1.TXT" and "README  TXT".
      const sum = (b: string, e: string): number => lfnChecksum(shortBytes(b, e));
      let ref = 0;
      for (const c of Buffer.from('FILENA~1TXT', 'latin1')) ref = (((ref & 1) << 7) + (ref >> 1) + c) & 0xff;
      expect(sum('FILENA~1', 'TXT')).to.equal(ref);
      expect(sum('README', 'TXT')).to.not.equal(sum('README', 'TX'));
    });
  });

  describe('layout: QEMU\'s, byte for byte in the MBR and boot sector', () => {
    let dir: string;
    before(() => {
      dir = sub('small');
      fs.writeFileSync(path.join(dir, 'hello.txt'), 'hello\n');
      fs.mkdirSync(path.join(dir, 'sub'));
    });
    for (const v of ['', '12:', '16:', 'floppy:', 'floppy:12:', 'floppy:16:']) {
      it(`fat:${v}DIR has QEMU's size, partition table and boot sector`, async () => {
        const q = path.join(tmp.dir, 'qemu.raw');
        await runOk('qemu-img', ['convert', '-f', 'vvfat', '-O', 'raw', `fat:${v}${dir}`, q]);
        const node = await openFat(`fat:${v}${dir}`);
        try {
          expect(node.size).to.equal(fs.statSync(q).size);
          const head = v.startsWith('floppy') ? 512 : HD_OFFSET + 512;
          const mine = Buffer.alloc(head);
          await node.read(0, mine);
          const theirs = Buffer.alloc(head);
          const fd = fs.openSync(q, 'r');
          fs.readSync(fd, theirs, 0, head, 0);
          fs.closeSync(fd);
          expect(mine.equals(theirs), 'MBR and boot sector').to.equal(true);
        } finally {
          await node.close();
        }
      });
    }

    it('fat:32:DIR is a FAT32 that sfdisk and fsck.fat accept, with FSInfo and a backup boot sector', async () => {
      const node = await openFat(`fat:32:${dir}`);
      const img = path.join(tmp.dir, 'f32.raw');
      try {
        await dump(node, img);
      } finally {
        await node.close();
      }
      const sf = await runOk('sfdisk', ['-d', img]);
      expect(sf).to.match(/start=\s*63, size=\s*\d+, type=b, bootable/);
      const part = path.join(tmp.dir, 'f32.part');
      await runOk('dd', [`if=${img}`, `of=${part}`, 'bs=512', 'skip=63', 'conv=sparse', 'status=none']);
      await fsckClean(part);
      const r = await runOk('fsck.fat', ['-n', '-v', part]);
      expect(r).to.match(/32 bit entries/);
    });
  });

  describe('random trees: fsck.fat clean, mcopy -s gives every file back with its name', () => {
    const modes: { v: string; bytes: number; width: number; depth: number; skipFsck?: string }[] = [
      { v: '', bytes: 40 << 20, width: 12, depth: 4 },
      { v: '12:', bytes: 8 << 20, width: 8, depth: 3 },
      { v: '32:', bytes: 40 << 20, width: 12, depth: 4 },
      { v: 'floppy:', bytes: 1 << 20, width: 5, depth: 2 },
      { v: 'floppy:12:', bytes: 400 << 10, width: 4, depth: 2 },
    ];
    for (const [i, m] of modes.entries()) {
      it(`fat:${m.v}DIR`, async () => {
        const dir = sub(`tree${i}`);
        makeTree(dir, { seed: 1000 + i, depth: m.depth, width: m.width, maxBytes: m.bytes });
        const want = listTree(dir);
        const node = await openFat(`fat:${m.v}${dir}`);
        const img = path.join(tmp.dir, `tree${i}.raw`);
        const floppy = m.v.startsWith('floppy');
        try {
          await dump(node, img);
        } finally {
          await node.close();
        }
        const part = path.join(tmp.dir, `tree${i}.part`);
        await runOk('dd', [`if=${img}`, `of=${part}`, 'bs=512', `skip=${floppy ? 0 : 63}`, 'conv=sparse', 'status=none']);
        await fsckClean(part);
        if (!floppy) expect(await runOk('sfdisk', ['-d', img])).to.match(/start=\s*63,.*bootable/);
        const out = path.join(tmp.dir, `out${i}`);
        await mcopyOut(img, floppy ? 0 : HD_OFFSET, out);
        expect(treeDiff(want, listTree(out), { mtimes: true })).to.deep.equal([]);
        fs.rmSync(out, { recursive: true });
        fs.rmSync(img);
        fs.rmSync(part);
      });
    }
  });

  describe('through a mount', () => {
    it('tsmount fat:DIR shows DIR.raw, which fdisk, losetup + fsck.fat and mcopy read', async () => {
      const dir = sub('mounted');
      makeTree(dir, { seed: 7, depth: 3, width: 10, maxBytes: 20 << 20 });
      const want = listTree(dir);
      const mp = sub('mp1');
      await mounts.mount([`fat:${dir}`, mp]);
      const flat = path.join(mp, 'mounted.raw');
      expect(await runOk('fdisk', ['-l', flat])).to.match(/mounted\.raw1 \*\s+63\s+1032191\s+1032129/);
      const loop = (await runOk('losetup', ['-r', '-o', String(HD_OFFSET), '-f', '--show', flat])).trim();
      try {
        await fsckClean(loop);
      } finally {
        await runOk('losetup', ['-d', loop]);
      }
      const out = path.join(tmp.dir, 'out-mounted');
      await mcopyOut(flat, HD_OFFSET, out);
      expect(treeDiff(want, listTree(out), { mtimes: true })).to.deep.equal([]);
      await mounts.unmount(mp);
    });

    it('refuses what it cannot do, in one line: no directory, --rw without rw:, a tree FAT16 cannot hold', async () => {
      const mp = sub('mp2');
      const none = await tsmount([`fat:${path.join(tmp.dir, 'nonexistent')}`, mp]);
      expect(none.code).to.not.equal(0);
      expect(none.stderr.trim().split('\n')).to.have.length(1);
      expect(none.stderr).to.match(/cannot read the directory: ENOENT/);
      const dir = sub('big16');
      const rw = await tsmount(['--rw', `fat:${dir}`, mp]);
      expect(rw.stderr.trim()).to.match(/writable only when named fat:rw:DIR/);
      fs.closeSync(fs.openSync(path.join(dir, 'big'), 'w'));
      fs.truncateSync(path.join(dir, 'big'), 600 << 20);
      const big = await tsmount([`fat:${dir}`, mp]);
      expect(big.code).to.not.equal(0);
      expect(big.stderr.trim()).to.match(/does not fit in FAT16.*use fat:32:/);
    });
  });

  describe('FAT32 for large trees', () => {
    it('serves a file of 4 GiB - 1 and a tree of 10 GB in 10,000 sparse files, opened without reading them', async () => {
      const dir = sub('large');
      const big = path.join(dir, 'big.bin');
      const fd = fs.openSync(big, 'w');
      fs.writeSync(fd, Buffer.from('head of the big file'), 0, 20, 0);
      const tail = Buffer.from('the last bytes of a file of 4 GiB - 1');
      fs.writeSync(fd, tail, 0, tail.length, 0xffffffff - tail.length);
      fs.closeSync(fd);
      for (let d = 0; d < 10; d++) {
        const p = path.join(dir, `dir${d}`);
        fs.mkdirSync(p);
        for (let f = 0; f < 1000; f++) {
          const file = path.join(p, `sparse file number ${f}.dat`);
          fs.closeSync(fs.openSync(file, 'w'));
          fs.truncateSync(file, 1_000_000);
        }
      }
      const t0 = process.hrtime.bigint();
      const node = await VvfatNode.open(`fat:32:${dir}`, { readOnly: true, cache: 'writeback' });
      const ms = Number(process.hrtime.bigint() - t0) / 1e6;
      await node.close();
      // The goal is under a second (scripts/BENCHMARKS.md); the bound here leaves room for a busy machine.
      console.log(`      open of 10,001 files, ${((0xffffffff + 10e9) / 1e9).toFixed(1)} GB: ${ms.toFixed(0)} ms`);
      expect(ms).to.be.below(5000);

      const mp = sub('mp3');
      await mounts.mount([`fat:32:${dir}`, mp]);
      const flat = path.join(mp, 'large.raw');
      const list = await mtools('mdir', ['-i', `${flat}@@${HD_OFFSET}`, '::/']);
      expect(list).to.match(/BIG\s+BIN\s+4294967295 .* big\.bin/);
      const sublist = await mtools('mdir', ['-i', `${flat}@@${HD_OFFSET}`, '::/dir7']);
      expect(sublist).to.match(/sparse file number 999\.dat/);
      // The big file back through mtools, compared as it streams.
      const r = await run('sh', ['-c', `mcopy -n -i '${flat}@@${HD_OFFSET}' ::/big.bin - | cmp - '${big}'`], { env: MTOOLS_ENV, timeoutMs: 240_000 });
      expect(r, r.stderr).to.include({ code: 0 });
      await mounts.unmount(mp);
    });
  });
});
