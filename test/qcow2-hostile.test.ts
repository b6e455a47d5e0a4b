// Hostile qcow2 images (issue 12, "What the server trusts"): writes that would land on
// metadata are refused as QEMU refuses them, the image is marked corrupt and opens
// read-only after that; opening costs little whatever the header claims, and every
// header size over QEMU's limits is refused with one line naming the limit.
// Fixtures are made with qemu-img and then patched.
import { expect } from 'chai';
import fs from 'node:fs';
import path from 'node:path';
import { MetadataRanges } from '../drivers/format/metadata-ranges.js';
import type { BlockNode } from '../drivers/types.js';
import { expectClean, firstL2Offset, nodeMd5, openTestImage, patch, readBytes, TSIMG, u32be, u64be } from './helpers/images.js';
import { convertToRaw, imageInfo, md5File, qemuImg, qemuIo, run, tempDir, type RunResult } from './helpers/qemu.js';
import { mountedPid, MountTracker, tsmount } from './helpers/mount.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const CS = 64 * KiB;
const COPIED = 0x8000000000000000n;

/** Header fields (qcow2.txt). */
const H = { l1Size: 36, l1Offset: 40, reftableOffset: 48, reftableClusters: 56, nbSnapshots: 60, snapshotsOffset: 64 };

function u64(file: string, at: number): number {
  return Number(readBytes(file, at, 8).readBigUInt64BE(0));
}

/** One snapshot table entry (qcow2.txt, "Snapshot table entry"), with the v3 16 bytes of extra data. */
function snapshotEntry(l1Offset: number, l1Entries: number, id: string, name: string, nameBytes = Buffer.byteLength(name)): Buffer {
  const extra = 16;
  const fixed = Buffer.alloc(40);
  fixed.writeBigUInt64BE(BigInt(l1Offset), 0);
  fixed.writeUInt32BE(l1Entries, 8);
  fixed.writeUInt16BE(Buffer.byteLength(id), 12);
  fixed.writeUInt16BE(nameBytes, 14);
  fixed.writeUInt32BE(extra, 36);
  const body = Buffer.concat([fixed, Buffer.alloc(extra), Buffer.from(id), Buffer.from(name)]);
  return Buffer.concat([body, Buffer.alloc((8 - (body.length % 8)) % 8)]);
}

/** Point the image's header at a snapshot table of `entries` written at the next free cluster. */
function addSnapshotTable(file: string, entries: Buffer[], count = entries.length): number {
  const at = Math.ceil(fs.statSync(file).size / CS) * CS;
  patch(file, at, Buffer.concat(entries));
  patch(file, H.nbSnapshots, u32be(count));
  patch(file, H.snapshotsOffset, u64be(BigInt(at)));
  return at;
}

/** stderr is one line that names the image and matches `what`. */
function expectOneLine(stderr: string, file: string, what: RegExp): void {
  const lines = stderr.trim().split('\n');
  expect(lines, stderr).to.have.length(1);
  expect(lines[0]).to.include(path.basename(file));
  expect(lines[0]).to.match(what);
}

/**
 * `tsimg ARGS` under /usr/bin/time: its result, and the CPU seconds and peak RSS it
 * took (CPU, not wall time, so that a loaded test machine does not decide).
 */
async function timedTsimg(args: string[]): Promise<RunResult & { cpuSeconds: number; maxRssKiB: number }> {
  const r = await run('/usr/bin/time', ['-f', 'TIME %U %S %M', process.execPath, TSIMG, ...args]);
  const lines = r.stderr.trimEnd().split('\n');
  const m = /^TIME ([\d.]+) ([\d.]+) (\d+)$/.exec(lines[lines.length - 1] ?? '');
  if (!m) throw new Error(`no /usr/bin/time output: ${r.stderr}`);
  const own = lines.slice(0, -1).filter((l) => !l.startsWith('Command exited with non-zero status'));
  return { ...r, stderr: own.join('\n'), cpuSeconds: Number(m[1]) + Number(m[2]), maxRssKiB: Number(m[3]) };
}

function vmHwmKiB(pid: number): number {
  const m = /VmHWM:\s+(\d+) kB/.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'));
  return Number(m?.[1] ?? 0);
}

describe('qcow2: hostile images', function () {
  this.timeout(300_000);
  const mounts = new MountTracker();
  let tmp: ReturnType<typeof tempDir>;

  before(() => {
    tmp = tempDir('qcow2-hostile');
  });
  afterEach(() => mounts.cleanup());
  after(() => tmp.cleanup());

  const mp = (name: string): string => {
    const p = path.join(tmp.dir, name);
    fs.mkdirSync(p, { recursive: true });
    return p;
  };

  describe('MetadataRanges', function () {
    it('finds overlaps by binary search, with repeats, overlapping ranges and ignored kinds', function () {
      const r = new MetadataRanges();
      r.addAll([
        { offset: 0, length: 100, what: 'header' },
        { offset: 300, length: 100, what: 'l2' },
        { offset: 1000, length: 5000, what: 'big' },
        { offset: 1200, length: 100, what: 'l2' },
      ]);
      r.add(300, 100, 'l2');
      expect(r.find(100, 200)).to.equal(undefined);
      expect(r.find(99, 1)?.what).to.equal('header');
      expect(r.find(399, 1)?.what).to.equal('l2');
      expect(r.find(400, 600)).to.equal(undefined);
      // Inside the big range, past the small one it holds.
      expect(r.find(5000, 10)?.what).to.equal('big');
      expect(r.find(1250, 10, ['big'])?.what).to.equal('l2');
      expect(r.find(1250, 10, ['big', 'l2'])).to.equal(undefined);
      expect(r.find(6000, 10)).to.equal(undefined);
      // A repeated range stays until both copies are gone.
      expect(r.remove(300, 'l2')).to.equal(true);
      expect(r.find(300, 1)?.what).to.equal('l2');
      expect(r.remove(300, 'l2')).to.equal(true);
      expect(r.find(300, 1)).to.equal(undefined);
      expect(r.remove(300, 'l2')).to.equal(false);
      expect(r.remove(1000, 'big')).to.equal(true);
      expect(r.find(5000, 10)).to.equal(undefined);
      expect(r.find(1250, 10)?.what).to.equal('l2');
    });
  });

  describe('writes that would land on metadata', function () {
    for (const target of [
      { what: 'active L1 table', field: H.l1Offset },
      { what: 'refcount table', field: H.reftableOffset },
    ]) {
      it(`an L2 entry pointing at the ${target.what}: EIO, logged, image marked corrupt, tables intact, then read-only only`, async function () {
        const file = path.join(tmp.dir, `at-${target.field}.qcow2`);
        await qemuImg('create', '-q', '-f', 'qcow2', file, '16M');
        await qemuIo(file, 'qcow2', ['write -P 0xaa 0 64k']);
        const l1 = u64(file, H.l1Offset);
        const reftable = u64(file, H.reftableOffset);
        const victim = u64(file, target.field);
        // The reproduction: L2 entry 0 -> 0x8000000000030000 (the L1 table), or the refcount table.
        patch(file, firstL2Offset(file), u64be(COPIED | BigInt(victim)));
        const l1Before = readBytes(file, l1, CS);
        const reftableBefore = readBytes(file, reftable, CS);

        const log = path.join(tmp.dir, `at-${target.field}.log`);
        const dir = mp(`ol-${target.field}`);
        await mounts.mount(['--rw', '--log', log, file, dir]);
        const flat = path.join(dir, path.basename(file).replace(/\.qcow2$/, '.raw'));
        const fd = fs.openSync(flat, 'r+');
        let err: NodeJS.ErrnoException | undefined;
        try {
          fs.writeSync(fd, Buffer.alloc(4096, 0x55), 0, 4096, 0);
        } catch (e) {
          err = e as NodeJS.ErrnoException;
        } finally {
          fs.closeSync(fd);
        }
        expect(err?.code, 'pwrite at 0').to.equal('EIO');
        // Every later write is refused too, even one that overlaps nothing.
        expect(() => {
          const fd2 = fs.openSync(flat, 'r+');
          try {
            fs.writeSync(fd2, Buffer.alloc(4096, 1), 0, 4096, 8 * MiB);
          } finally {
            fs.closeSync(fd2);
          }
        }).to.throw(/EIO/);
        await mounts.unmount(dir);

        const logged = fs.readFileSync(log, 'utf8');
        expect(logged).to.include(`Preventing invalid write on metadata (overlaps with ${target.what})`);
        const info = await imageInfo(file, 'qcow2');
        const spec = info['format-specific'] as { data?: { corrupt?: boolean } } | undefined;
        expect(spec?.data?.corrupt, 'corrupt bit').to.equal(true);
        expect(readBytes(file, l1, CS).equals(l1Before), 'L1 table unchanged').to.equal(true);
        expect(readBytes(file, reftable, CS).equals(reftableBefore), 'refcount table unchanged').to.equal(true);

        // A writable mount is refused with one line; a read-only one works and reads what qemu-img does.
        const again = await tsmount(['--rw', file, mp(`ol-${target.field}-again`)]);
        expect(again.code).to.not.equal(0);
        expectOneLine(again.stderr, file, /marked corrupt.*qemu-img check -r all/);
        expect(mountedPid(path.join(tmp.dir, `ol-${target.field}-again`))).to.equal(undefined);
        const ro = mp(`ol-${target.field}-ro`);
        await mounts.mount([file, ro]);
        const ref = path.join(tmp.dir, `at-${target.field}.raw`);
        await convertToRaw(file, ref, 'qcow2');
        expect(await md5File(path.join(ro, path.basename(flat)))).to.equal(await md5File(ref));
        await mounts.unmount(ro);
      });
    }

    it('a refcount block that calls the L1 table free: the new L2 table written there is refused', async function () {
      const file = path.join(tmp.dir, 'free-l1.qcow2');
      await qemuImg('create', '-q', '-f', 'qcow2', file, '1G');
      await qemuIo(file, 'qcow2', ['write -P 0xaa 0 64k']);
      const l1 = u64(file, H.l1Offset);
      const block = Number(readBytes(file, u64(file, H.reftableOffset), 8).readBigUInt64BE(0));
      // 16-bit refcounts: the L1 table's cluster now counts as free, and is the first free one.
      patch(file, block + (l1 / CS) * 2, Buffer.alloc(2));
      const l1Before = readBytes(file, l1, CS);
      const node = await openTestImage(file, { rw: true });
      let err: unknown;
      try {
        // Past the first L2 table's 512 MiB: a new L2 table is allocated, at the L1 table.
        await node.write(600 * MiB, Buffer.alloc(4096, 1));
        await node.flush();
      } catch (e) {
        err = e;
      }
      expect(String(err)).to.match(/Preventing invalid write on metadata \(overlaps with active L1 table\)/);
      expect(String(err).split('\n')).to.have.length(1);
      await node.write(0, Buffer.alloc(512)).then(
        () => expect.fail('a write after the corruption was taken'),
        (e: unknown) => expect(String(e)).to.match(/marked corrupt/),
      );
      await node.close().catch(() => undefined);
      expect(readBytes(file, l1, CS).equals(l1Before), 'L1 table unchanged').to.equal(true);
      expect(((await imageInfo(file, 'qcow2'))['format-specific'] as { data?: { corrupt?: boolean } }).data?.corrupt).to.equal(true);
    });

    it('a v2 image (no corrupt bit) refuses the write and every later one, and is left as it was', async function () {
      const file = path.join(tmp.dir, 'v2.qcow2');
      await qemuImg('create', '-q', '-f', 'qcow2', '-o', 'compat=0.10', file, '16M');
      await qemuIo(file, 'qcow2', ['write -P 0xaa 0 64k']);
      patch(file, firstL2Offset(file), u64be(COPIED | BigInt(u64(file, H.reftableOffset))));
      const before = await md5File(file);
      const node = await openTestImage(file, { rw: true });
      try {
        for (const off of [0, 8 * MiB]) {
          await node.write(off, Buffer.alloc(4096, 1)).then(
            () => expect.fail(`write at ${off} was taken`),
            (e: unknown) => expect(String(e)).to.match(off === 0 ? /overlaps with refcount table/ : /marked corrupt/),
          );
        }
      } finally {
        await node.close().catch(() => undefined);
      }
      expect(await md5File(file)).to.equal(before);
    });

    it('a healthy image takes writes, grows its tables, and stays clean (no false alarm)', async function () {
      const file = path.join(tmp.dir, 'healthy.qcow2');
      // 512-byte clusters: many L2 tables, refcount blocks and a refcount table that must grow.
      await qemuImg('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=512', file, '64M');
      const reftableBefore = u64(file, H.reftableOffset);
      const l1Before = u64(file, H.l1Offset);
      const node = await openTestImage(file, { rw: true });
      try {
        // A larger L1 table (growth), then 10 MiB of data: the refcount table (8 MiB of clusters) grows too.
        await node.truncate?.(128 * MiB);
        for (let off = 0; off < 128 * MiB; off += 8 * MiB + 4096) await node.write(off, Buffer.alloc(640 * KiB, (off >> 20) + 1));
        await node.flush();
      } finally {
        await node.close();
      }
      expect(u64(file, H.l1Offset), 'L1 table moved').to.not.equal(l1Before);
      expect(u64(file, H.reftableOffset), 'refcount table moved').to.not.equal(reftableBefore);
      const info = await imageInfo(file, 'qcow2');
      expect((info['format-specific'] as { data?: { corrupt?: boolean } }).data?.corrupt).to.equal(false);
      await expectClean(file);
    });
  });

  describe('bounded open', function () {
    it('100 snapshots with 32 MiB L1 tables open in well under 3 s and little memory', async function () {
      const file = path.join(tmp.dir, 'snaps.qcow2');
      await qemuImg('create', '-q', '-f', 'qcow2', file, '1M');
      // Every snapshot's L1 table is 32 MiB (QEMU's limit), all at one place in a sparse tail.
      const l1At = 16 * CS;
      const l1Entries = (32 * MiB) / 8;
      addSnapshotTable(
        file,
        Array.from({ length: 100 }, (_, i) => snapshotEntry(l1At, l1Entries, String(i + 1), `s${i}`)),
      );
      fs.truncateSync(file, l1At + 32 * MiB);
      expect(fs.statSync(file).blocks * 512).to.be.below(1 * MiB);

      // Before: 15 s and 3.3 GB. Now a whole tsimg info (node's start included) stays small.
      const info = await timedTsimg(['info', file]);
      expect(info.code, info.stderr).to.equal(0);
      expect(info.cpuSeconds, 'tsimg info CPU seconds').to.be.below(3);
      expect(info.maxRssKiB * KiB, 'tsimg info peak RSS').to.be.below(300 * MiB);
      const cpu0 = process.cpuUsage();
      const node = (await openTestImage(file)) as BlockNode & { snapshots(): { name: string; node: BlockNode }[] };
      const cpu = process.cpuUsage(cpu0);
      try {
        expect((cpu.user + cpu.system) / 1e6, 'open CPU seconds').to.be.below(1);
        expect(node.snapshots()).to.have.length(100);
      } finally {
        await node.close();
      }

      const dir = mp('snaps');
      await mounts.mount([file, dir]);
      const pid = mountedPid(dir)!;
      expect(fs.readdirSync(dir)).to.have.length(101);
      // A snapshot's flat file reads (zeros: its L1 table is empty), its L1 read on demand.
      const buf = Buffer.alloc(MiB, 1);
      const fd = fs.openSync(path.join(dir, 'snaps@s42.raw'), 'r');
      try {
        expect(fs.readSync(fd, buf, 0, MiB, 0)).to.equal(MiB);
      } finally {
        fs.closeSync(fd);
      }
      expect(buf.equals(Buffer.alloc(MiB))).to.equal(true);
      const hwm = vmHwmKiB(pid);
      await mounts.unmount(dir);
      expect(hwm * KiB, 'server peak RSS').to.be.below(300 * MiB);
    });

    it('a real snapshot still reads as qemu-img convert -l shows it, through the mount', async function () {
      const file = path.join(tmp.dir, 'real.qcow2');
      await qemuImg('create', '-q', '-f', 'qcow2', file, '4M');
      await qemuIo(file, 'qcow2', ['write -P 0x11 0 1M', 'write -P 0x22 3M 64k']);
      await qemuImg('snapshot', '-c', 'before', file);
      await qemuIo(file, 'qcow2', ['write -P 0x33 512k 1M']);
      const ref = path.join(tmp.dir, 'real-before.raw');
      await qemuImg('convert', '-f', 'qcow2', '-O', 'raw', '-l', 'snapshot.name=before', file, ref);
      const dir = mp('real');
      await mounts.mount([file, dir]);
      expect(await md5File(path.join(dir, 'real@before.raw'))).to.equal(await md5File(ref));
      await mounts.unmount(dir);
      // And in-process, after a write to the active layer that copies the shared tables.
      const node = (await openTestImage(file, { rw: true })) as BlockNode & { snapshots(): { name: string; node: BlockNode }[] };
      try {
        await node.write(0, Buffer.alloc(4096, 0x44));
        expect(await nodeMd5(node.snapshots()[0]!.node)).to.equal(await md5File(ref));
      } finally {
        await node.close();
      }
    });
  });

  describe('header sizes over QEMU\'s limits: one line naming the limit', function () {
    const cases: { name: string; what: RegExp; make(file: string): void }[] = [
      { name: 'active L1 table over 32 MiB', what: /32 MiB limit/, make: (f) => patch(f, H.l1Size, u32be((32 * MiB) / 8 + 1)) },
      { name: 'refcount table over 8 MiB', what: /8 MiB limit/, make: (f) => patch(f, H.reftableClusters, u32be((8 * MiB) / CS + 1)) },
      { name: 'more than 65536 snapshots', what: /limit 65536/, make: (f) => patch(f, H.nbSnapshots, u32be(65537)) },
      {
        name: 'a snapshot L1 table over 32 MiB',
        what: /32 MiB limit/,
        make: (f) => {
          addSnapshotTable(f, [snapshotEntry(3 * CS, (32 * MiB) / 8 + 1, '1', 'big')]);
        },
      },
      {
        name: 'a snapshot table over 64 MiB',
        what: /64 MiB limit/,
        make: (f) => {
          // 1100 entries with 64 KiB names each: 70 MB of table (names sparse).
          const nameBytes = 65535;
          const stride = Math.ceil((40 + 16 + 1 + nameBytes) / 8) * 8;
          const at = addSnapshotTable(f, [], 1100);
          const head = snapshotEntry(3 * CS, 0, '1', '', nameBytes).subarray(0, 56);
          const fd = fs.openSync(f, 'r+');
          try {
            for (let i = 0; i < 1100; i++) fs.writeSync(fd, head, 0, head.length, at + i * stride);
          } finally {
            fs.closeSync(fd);
          }
          fs.truncateSync(f, at + 1100 * stride + CS);
        },
      },
    ];
    for (const c of cases) {
      it(c.name, async function () {
        const file = path.join(tmp.dir, `cap-${c.name.replace(/\W+/g, '-')}.qcow2`);
        await qemuImg('create', '-q', '-f', 'qcow2', file, '1M');
        c.make(file);
        const before = await md5File(file);
        const r = await tsmount([file, mp(`cap-${cases.indexOf(c)}`)]);
        expect(r.code).to.not.equal(0);
        expectOneLine(r.stderr, file, c.what);
        // Refused at once: little CPU and memory (the 64 MiB table is read up to its limit).
        const t = await timedTsimg(['info', file]);
        expect(t.code).to.not.equal(0);
        expectOneLine(t.stderr, file, c.what);
        expect(t.cpuSeconds, 'CPU seconds').to.be.below(5);
        expect(t.maxRssKiB * KiB, 'peak RSS').to.be.below(300 * MiB);
        expect(await md5File(file)).to.equal(before);
      });
    }
  });
});
