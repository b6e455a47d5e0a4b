// Virtual FAT disks from a directory tree (fat:DIR, QEMU's vvfat): the layout QEMU
// chooses, and trees that fsck.fat finds clean and mtools copies back byte for byte.
import { expect } from 'chai';
import fs from 'node:fs';
import path from 'node:path';
import { openGraph } from '../drivers/open.js';
import type { BlockNode } from '../drivers/types.js';
import { parseVvfatSpec, vvfatSpecFromOptions } from '../drivers/protocol/vvfat/spec.js';
import { parseOptionList } from '../drivers/protocol/remote.js';
import { lfnChecksum, shortBytes, writeLfn } from '../drivers/protocol/vvfat/names.js';
import { parseDirectory } from '../drivers/protocol/vvfat/fat-reader.js';
import { VvfatNode } from '../drivers/protocol/vvfat/node.js';
import { run, runOk, tempDir } from './helpers/qemu.js';
import { MountTracker, tsmount } from './helpers/mount.js';
import { listTree, makeTree, treeDiff } from './helpers/fat-tree.js';
import { pattern } from './helpers/images.js';
import { freePort, startServer } from './helpers/servers.js';

const MTOOLS_ENV = { ...process.env, MTOOLS_SKIP_CHECK: '1', LANG: 'C.UTF-8', LC_ALL: 'C.UTF-8' };
const HD_OFFSET = 63 * 512;

async function openFat(spec: string): Promise<BlockNode> {
  const [node] = await openGraph([spec], { readOnly: true, cache: 'writeback', cacheSize: 32 << 20, locking: 'off', forceShare: false, shareRw: false });
  return node!;
}

/**
 * fsck.fat -n must say nothing but its version and the summary line. `overflow` names
 * files of 4 GiB - 1: dosfstools 4.2 adds up their chain (2^32 bytes) in 32 bits, gets
 * 0 and reports it; that report, and only that one, is expected for them.
 */
async function fsckClean(part: string, overflow: string[] = []): Promise<void> {
  const r = await run('fsck.fat', ['-n', part]);
  let out = r.stdout;
  for (const f of overflow) out = out.replace(`${f}\n  File size is 4294967295 bytes, cluster chain length is 0 bytes.\n  Truncating file to 0 bytes.\n`, '');
  const lines = out.trim().split('\n').filter((l) => l && !/^fsck\.fat \d/.test(l) && !/: \d+ files, \d+\/\d+ clusters$/.test(l) && !(overflow.length && l === 'Leaving filesystem unchanged.'));
  expect({ code: overflow.length ? 0 : r.code, messages: lines, stderr: r.stderr.trim() }).to.deep.equal({ code: 0, messages: [], stderr: '' });
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

/** fsck.fat -n of the file system at `offset` in `flat`, through a read-only loop device. */
async function fsckAt(flat: string, offset: number, overflow: string[] = []): Promise<void> {
  const loop = (await runOk('losetup', ['-r', '-o', String(offset), '-f', '--show', flat])).trim();
  try {
    await fsckClean(loop, overflow);
  } finally {
    await runOk('losetup', ['-d', loop]);
  }
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

  describe('long names', () => {
    it('round-trip any Unicode name (surrogate pairs too) through LFN entries, and a wrong checksum falls back to the short name', () => {
      const name = 'emoji-😀 ünïcødé ファイル with a long tail.txt';
      const short = shortBytes('EMOJI-~1', 'TXT');
      const buf = Buffer.alloc(32 * 8);
      const end = writeLfn(buf, 0, name, lfnChecksum(short));
      buf.write(short, end, 11, 'latin1');
      buf[end + 11] = 0x20;
      expect(parseDirectory(buf, false).map((e) => e.name)).to.deep.equal([name]);
      buf[13] = (buf[13]! + 1) & 0xff; // the first LFN entry's checksum
      expect(parseDirectory(buf, false).map((e) => e.name)).to.deep.equal(['EMOJI-~1.TXT']);
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
      const mp = sub('mp-f32');
      await mounts.mount([`fat:32:${dir}`, mp]);
      const flat = path.join(mp, 'small.raw');
      expect(await runOk('sfdisk', ['-d', flat])).to.match(/start=\s*63, size=\s*\d+, type=b, bootable/);
      await fsckAt(flat, HD_OFFSET);
      const loop = (await runOk('losetup', ['-r', '-o', String(HD_OFFSET), '-f', '--show', flat])).trim();
      try {
        expect(await runOk('fsck.fat', ['-n', '-v', loop])).to.match(/32 bit entries/);
      } finally {
        await runOk('losetup', ['-d', loop]);
      }
      await mounts.unmount(mp);
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
        const floppy = m.v.startsWith('floppy');
        const offset = floppy ? 0 : HD_OFFSET;
        const mp = sub(`mp-tree${i}`);
        await mounts.mount([`fat:${m.v}${dir}`, mp]);
        const flat = path.join(mp, `tree${i}.raw`);
        await fsckAt(flat, offset);
        if (!floppy) expect(await runOk('sfdisk', ['-d', flat])).to.match(/start=\s*63,.*bootable/);
        const out = path.join(tmp.dir, `out${i}`);
        await mcopyOut(flat, offset, out);
        expect(treeDiff(want, listTree(out), { mtimes: true })).to.deep.equal([]);
        await mounts.unmount(mp);

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
      await fsckAt(flat, HD_OFFSET);
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
      expect(ms).to.be.below(10_000);

      const mp = sub('mp3');
      await mounts.mount([`fat:32:${dir}`, mp]);
      const flat = path.join(mp, 'large.raw');
      const list = await mtools('mdir', ['-i', `${flat}@@${HD_OFFSET}`, '::/']);
      expect(list).to.match(/BIG\s+BIN\s+4294967295 .* big\.bin/);
      const sublist = await mtools('mdir', ['-i', `${flat}@@${HD_OFFSET}`, '::/dir7']);
      expect(sublist).to.match(/sparse file number 999\.dat/);
      // fsck.fat checks every chain against its file's size (the 4 GiB - 1 one it cannot add up).
      await fsckAt(flat, HD_OFFSET, ['/big.bin']);
      // Where mtools says the big file lies, its first and last bytes are the host file's.
      // (Streaming all 4 GiB through mcopy takes minutes on a loaded machine.)
      const chain = /<(\d+)-(\d+)>/.exec(await mtools('mshowfat', ['-i', `${flat}@@${HD_OFFSET}`, '::/big.bin']));
      expect(chain, 'one run of clusters').to.not.equal(null);
      const [first, last] = [Number(chain![1]), Number(chain![2])];
      const boot = Buffer.alloc(512);
      const fd2 = fs.openSync(flat, 'r');
      try {
        fs.readSync(fd2, boot, 0, 512, HD_OFFSET);
        const cb = boot[13]! * 512;
        expect(last - first + 1).to.equal(Math.ceil(0xffffffff / cb));
        const dataStart = HD_OFFSET + (boot.readUInt16LE(14) + 2 * boot.readUInt32LE(36)) * 512;
        const head = Buffer.alloc(20);
        fs.readSync(fd2, head, 0, 20, dataStart + (first - 2) * cb);
        expect(head.toString()).to.equal('head of the big file');
        const end = Buffer.alloc(tail.length);
        fs.readSync(fd2, end, 0, tail.length, dataStart + (last - 2) * cb + ((0xffffffff - tail.length) % cb));
        expect(end.equals(tail)).to.equal(true);
      } finally {
        fs.closeSync(fd2);
      }
      await mounts.unmount(mp);
    });
  });

  describe('rw: writes through the disk come back to the directory', () => {
    for (const v of ['', '32:']) {
      it(`fat:rw:${v}DIR with --rw: mcopy, mmd, mdel, mren and overwrites (larger, smaller, empty) land on the host`, async () => {
        const dir = sub(`rw${v.replace(':', '')}`);
        makeTree(dir, { seed: 77, depth: 2, width: 6, maxBytes: 4 << 20 });
        fs.writeFileSync(path.join(dir, 'to delete.txt'), 'bye\n');
        fs.writeFileSync(path.join(dir, 'Old Name.txt'), 'rename me\n');
        fs.writeFileSync(path.join(dir, 'grow.bin'), Buffer.alloc(5000, 1));
        fs.writeFileSync(path.join(dir, 'shrink.bin'), Buffer.alloc(300_000, 2));
        fs.writeFileSync(path.join(dir, 'empty me.bin'), Buffer.alloc(1000, 3));
        fs.mkdirSync(path.join(dir, 'old dir', 'deeper'), { recursive: true });
        fs.writeFileSync(path.join(dir, 'old dir', 'deeper', 'kept.bin'), pattern(50_000, 9));
        fs.mkdirSync(path.join(dir, 'gone dir'));
        fs.writeFileSync(path.join(dir, 'gone dir', 'inside'), 'x');
        const mp = sub(`mp-rw${v.replace(':', '')}`);
        const log = path.join(tmp.dir, `rw${v.replace(':', '')}.log`);
        await mounts.mount(['--rw', '--log', log, `fat:rw:${v}${dir}`, mp]);
        const flat = path.join(mp, path.basename(dir) + '.raw');
        const at = `${flat}@@${HD_OFFSET}`;
        const src = (name: string, data: Buffer): string => {
          const p = path.join(tmp.dir, name);
          fs.writeFileSync(p, data);
          return p;
        };
        const newData = pattern(123_457, 5);
        await mtools('mcopy', ['-i', at, src('n1', newData), '::/brand new file.dat']);
        await mtools('mmd', ['-i', at, '::/new dir']);
        await mtools('mmd', ['-i', at, '::/new dir/nested']);
        await mtools('mcopy', ['-i', at, src('n2', pattern(9000, 6)), '::/new dir/nested/ünïcødé ファイル.txt']);
        await mtools('mdel', ['-i', at, '::/to delete.txt']);
        await mtools('mdeltree', ['-i', at, '::/gone dir']);
        // A new directory in the freed cluster: known by its first cluster, it looks like a rename of the old one.
        await mtools('mmd', ['-i', at, '::/reused cluster']);
        await mtools('mcopy', ['-i', at, src('n6', pattern(3000, 10)), '::/reused cluster/only.bin']);
        await mtools('mren', ['-i', at, '::/Old Name.txt', '::/New Name.txt']);
        await mtools('mmove', ['-i', at, '::/brand new file.dat', '::/new dir/Moved File.dat']);
        await mtools('mren', ['-i', at, '::/old dir', '::/Renamed Dir']);
        await mtools('mcopy', ['-o', '-i', at, src('n3', pattern(70_000, 7)), '::/grow.bin']);
        await mtools('mcopy', ['-o', '-i', at, src('n4', pattern(10, 8)), '::/shrink.bin']);
        await mtools('mcopy', ['-o', '-i', at, src('n5', Buffer.alloc(0)), '::/empty me.bin']);

        // Each mtools command closed the flat file, which flushed: the host has it all already.
        const host = listTree(dir);
        const expectFile = (rel: string, data: Buffer): void => {
          expect(fs.readFileSync(path.join(dir, rel)).equals(data), rel).to.equal(true);
        };
        expectFile('new dir/Moved File.dat', newData);
        expectFile('new dir/nested/ünïcødé ファイル.txt', pattern(9000, 6));
        expectFile('New Name.txt', Buffer.from('rename me\n'));
        expectFile('grow.bin', pattern(70_000, 7));
        expectFile('Renamed Dir/deeper/kept.bin', pattern(50_000, 9));
        expect(fs.readdirSync(path.join(dir, 'reused cluster'))).to.deep.equal(['only.bin']);
        expectFile('shrink.bin', pattern(10, 8));
        expectFile('empty me.bin', Buffer.alloc(0));
        for (const gone of ['to delete.txt', 'Old Name.txt', 'gone dir', 'brand new file.dat', 'old dir']) expect(host.has(gone), gone).to.equal(false);

        // The disk and the host agree, and the disk is still a clean FAT.
        const out = path.join(tmp.dir, `rw-out${v.replace(':', '')}`);
        await mcopyOut(flat, HD_OFFSET, out);
        expect(treeDiff(host, listTree(out))).to.deep.equal([]);
        await fsckAt(flat, HD_OFFSET);
        await mounts.unmount(mp);
        expect(treeDiff(host, listTree(dir))).to.deep.equal([]);
        expect(fs.readFileSync(log, 'utf8')).to.not.match(/warning/);
      });
    }

    it('refuses to overwrite a host file changed since the mount, with a log line', async () => {
      const dir = sub('conflict');
      fs.writeFileSync(path.join(dir, 'shared.txt'), 'original\n');
      fs.writeFileSync(path.join(dir, 'other.txt'), 'other\n');
      const mp = sub('mp-conflict');
      const log = path.join(tmp.dir, 'conflict.log');
      await mounts.mount(['--rw', '--log', log, `fat:rw:${dir}`, mp]);
      const at = `${path.join(mp, 'conflict.raw')}@@${HD_OFFSET}`;
      fs.writeFileSync(path.join(dir, 'shared.txt'), 'changed on the host\n');
      const g = path.join(tmp.dir, 'guest.txt');
      fs.writeFileSync(g, 'written by the guest\n');
      await mtools('mcopy', ['-o', '-i', at, g, '::/shared.txt']);
      await mtools('mdel', ['-i', at, '::/other.txt']);
      await mounts.unmount(mp);
      expect(fs.readFileSync(path.join(dir, 'shared.txt'), 'utf8')).to.equal('changed on the host\n');
      expect(fs.existsSync(path.join(dir, 'other.txt'))).to.equal(false);
      expect(fs.readFileSync(log, 'utf8')).to.match(/not applied to the host: changes to shared\.txt: the host file was changed since the mount/);
    });

    it('puts off a FAT in the middle of an update, and says so at close if it never becomes consistent', async () => {
      const dir = sub('half-written');
      const warnings: string[] = [];
      const node = await VvfatNode.open(`fat:rw:${dir}`, { readOnly: false, cache: 'writeback', warn: (t) => warnings.push(t) });
      // A root entry of 100,000 bytes whose first cluster is still free in the FAT.
      const rootSector = Buffer.alloc(512);
      const rootAt = (63 + 1 + 2 * 252) * 512;
      await node.read(rootAt, rootSector);
      rootSector.write('BAD     TXT', 32, 'latin1');
      rootSector[32 + 11] = 0x20;
      rootSector.writeUInt16LE(50, 32 + 26);
      rootSector.writeUInt32LE(100_000, 32 + 28);
      await node.write(rootAt, rootSector);
      await node.flush();
      expect(fs.readdirSync(dir)).to.deep.equal([]);
      expect(warnings).to.deep.equal([]);
      await node.close();
      expect(fs.readdirSync(dir)).to.deep.equal([]);
      expect(warnings.join('\n')).to.match(/writes not applied to .*half-written: the FAT is not consistent \(\/BAD\.TXT: chain points at cluster 0\)/);
    });

    it("maps mtools writes back as QEMU's own vvfat does (qemu-nbd fat:rw: as the reference), where QEMU gets them right", async () => {
      // QEMU's rw vvfat, served by qemu-nbd and mounted through tsmount's NBD client,
      // takes the same mtools commands as tsmount's vvfat; both directories must end
      // the same. Only what QEMU 7.2 maps back correctly is replayed: new files, new
      // directories, files in them, file renames. Tried here and left out (README):
      // QEMU aborts on a directory rename (an assertion in handle_renames_and_mkdirs),
      // and a deletion followed by an overwrite left the overwritten file with the
      // deleted file's 4 bytes; tsmount does all of these (the test above).
      const seed = (dir: string): void => {
        fs.writeFileSync(path.join(dir, 'hello.txt'), 'hello\n');
        fs.writeFileSync(path.join(dir, 'Old Name.txt'), 'rename me\n');
        fs.mkdirSync(path.join(dir, 'old'));
        fs.writeFileSync(path.join(dir, 'old', 'kept.bin'), pattern(300_000, 3));
      };
      const ours = sub('ref-ours');
      const theirs = sub('ref-qemu');
      seed(ours);
      seed(theirs);
      const n1 = path.join(tmp.dir, 'ref-n1');
      fs.writeFileSync(n1, pattern(123_457, 4));
      const n2 = path.join(tmp.dir, 'ref-n2');
      fs.writeFileSync(n2, pattern(9000, 5));
      const script = async (at: string): Promise<void> => {
        await mtools('mcopy', ['-i', at, n1, '::/brand new file.dat']);
        await mtools('mmd', ['-i', at, '::/new dir']);
        await mtools('mcopy', ['-i', at, n2, '::/new dir/inside it.txt']);
        await mtools('mren', ['-i', at, '::/Old Name.txt', '::/New Name.txt']);
      };

      const mpOurs = sub('mp-ref-ours');
      await mounts.mount(['--rw', `fat:rw:${ours}`, mpOurs]);
      await script(`${path.join(mpOurs, 'ref-ours.raw')}@@${HD_OFFSET}`);
      await mounts.unmount(mpOurs);

      const port = await freePort();
      const qemu = await startServer('qemu-nbd', ['-f', 'vvfat', '-t', '-b', '127.0.0.1', '-p', String(port), `fat:rw:${theirs}`], { port });
      try {
        const mpQemu = sub('mp-ref-qemu');
        await mounts.mount(['--rw', '-f', 'raw', `nbd://127.0.0.1:${port}`, mpQemu]);
        await script(`${path.join(mpQemu, 'nbd.raw')}@@${HD_OFFSET}`);
        await mounts.unmount(mpQemu);
      } finally {
        await qemu.stop();
      }
      expect(qemu.output()).to.not.match(/assert|abort/i);
      const want = listTree(theirs);
      expect([...want.keys()].sort()).to.include.members(['brand new file.dat', 'new dir/inside it.txt', 'New Name.txt', 'old/kept.bin']);
      expect(treeDiff(want, listTree(ours))).to.deep.equal([]);
    });

    it('fat:rw:DIR without --rw mounts read-only and leaves the directory alone', async () => {
      const dir = sub('rw-ro');
      fs.writeFileSync(path.join(dir, 'keep.txt'), 'keep\n');
      const mp = sub('mp-rw-ro');
      await mounts.mount([`fat:rw:${dir}`, mp]);
      const flat = path.join(mp, 'rw-ro.raw');
      expect(fs.statSync(flat).mode & 0o222).to.equal(0);
      const r = await run('mdel', ['-i', `${flat}@@${HD_OFFSET}`, '::/keep.txt'], { env: MTOOLS_ENV });
      expect(r.code).to.not.equal(0);
      await mounts.unmount(mp);
      expect(fs.readFileSync(path.join(dir, 'keep.txt'), 'utf8')).to.equal('keep\n');
    });
  });
});
