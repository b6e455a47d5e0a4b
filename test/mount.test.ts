// tsmount as a user sees it: real FUSE mounts, judged by qemu-img.
import { expect } from 'chai';
import fs from 'node:fs';
import path from 'node:path';
import { makeFixtures, type Fixture } from '../scripts/fixtures.js';
import { checkImage, convertToRaw, createImage, md5File, qemuIo, rawMd5, run, runOk, tempDir } from './helpers/qemu.js';
import { FIXTURE_DIR, isAlive, mountedPid, MountTracker, tsmount, waitFor } from './helpers/mount.js';
import { pattern } from './helpers/images.js';

const MiB = 1 << 20;

describe('tsmount: mounting images as flat files', function () {
  this.timeout(600_000);
  const mounts = new MountTracker();
  let tmp: { dir: string; cleanup: () => void };
  let fixtures: Fixture[];

  before(async () => {
    tmp = tempDir('mount');
    fixtures = await makeFixtures(FIXTURE_DIR);
  });
  afterEach(() => mounts.cleanup());
  after(() => tmp.cleanup());

  const mp = (name: string): string => {
    const p = path.join(tmp.dir, name);
    fs.mkdirSync(p, { recursive: true });
    return p;
  };

  it('presents every fixture image, each file equal to qemu-img convert', async () => {
    // One mount holding every fixture also shows that many images can share a mount.
    const dir = mp('all');
    const stems = fixtures.map((f) => path.basename(f.file).replace(/\.[^.]*$/, ''));
    await mounts.mount([...fixtures.map((f) => f.file), dir]);
    const listed = fs.readdirSync(dir).sort();
    expect(listed).to.deep.equal(stems.map((s) => `${s}.raw`).sort());
    const wrong: string[] = [];
    for (const [i, f] of fixtures.entries()) {
      const flat = path.join(dir, `${stems[i]}.raw`);
      expect(fs.statSync(flat).size, `${f.name} size`).to.equal(f.size);
      const md5 = await md5File(flat);
      if (md5 !== f.rawMd5) wrong.push(`${f.name}: ${md5} != ${f.rawMd5}`);
    }
    expect(wrong).to.deep.equal([]);
    await mounts.unmount(dir);
  });

  it('serves a flat file that dd, cmp, losetup -r and fdisk -l can use', async () => {
    // A raw disk with an MBR (one Linux partition) and some data, as qcow2.
    const ref = path.join(tmp.dir, 'parted.raw');
    const disk = Buffer.alloc(64 * MiB);
    disk.writeUInt8(0x83, 446 + 4);
    disk.writeUInt32LE(2048, 446 + 8);
    disk.writeUInt32LE(10000, 446 + 12);
    disk.writeUInt16LE(0xaa55, 510);
    pattern(MiB, 7).copy(disk, MiB);
    fs.writeFileSync(ref, disk);
    const img = path.join(tmp.dir, 'parted.qcow2');
    await runOk('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', ref, img]);
    const dir = mp('tools');
    await mounts.mount([img, dir]);
    const flat = path.join(dir, 'parted.raw');
    await runOk('cmp', [flat, ref]);
    const dd = await runOk('dd', [`if=${flat}`, 'of=/dev/null', 'bs=1M', 'status=none']);
    expect(dd).to.equal('');
    const fdisk = await runOk('fdisk', ['-l', flat]);
    expect(fdisk).to.match(/83 Linux/);
    const loop = (await runOk('losetup', ['-r', '-f', '--show', flat])).trim();
    try {
      expect(await md5File(loop)).to.equal(await md5File(ref));
    } finally {
      await runOk('losetup', ['-d', loop]);
    }
    await mounts.unmount(dir);
  });

  it('mounts one image over an existing regular file', async () => {
    const f = fixtures.find((x) => x.name === 'qcow2-v3-c64k')!;
    const target = path.join(tmp.dir, 'over-file.raw');
    fs.writeFileSync(target, 'placeholder');
    await mounts.mount([f.file, target]);
    expect(fs.statSync(target).size).to.equal(f.size);
    expect(await md5File(target)).to.equal(f.rawMd5);
    await mounts.unmount(target);
    expect(fs.readFileSync(target, 'utf8')).to.equal('placeholder');
  });

  it('is read-only by default: writes fail with EROFS and the image is unchanged', async () => {
    const img = path.join(tmp.dir, 'ro.qcow2');
    await createImage(img, 'qcow2', '16M');
    const before = await md5File(img);
    const dir = mp('ro');
    await mounts.mount([img, dir]);
    const r = await run('dd', ['if=/dev/zero', `of=${path.join(dir, 'ro.raw')}`, 'bs=512', 'count=1', 'conv=notrunc']);
    expect(r.code).to.not.equal(0);
    expect(r.stderr).to.match(/Read-only file system/);
    expect(() => fs.openSync(path.join(dir, 'ro.raw'), 'r+')).to.throw(/EROFS/);
    await mounts.unmount(dir);
    expect(await md5File(img)).to.equal(before);
  });

  it('refuses to shrink the disk through O_TRUNC', async () => {
    const img = path.join(tmp.dir, 'trunc.raw');
    fs.writeFileSync(img, Buffer.alloc(MiB, 7));
    const dir = mp('trunc');
    await mounts.mount(['--rw', img, dir]);
    expect(() => fs.truncateSync(path.join(dir, 'trunc.raw'), 0)).to.throw(/EPERM/);
    await mounts.unmount(dir);
    expect(fs.statSync(img).size).to.equal(MiB);
  });

  it('keeps the server attached with --foreground and exits 0 when signalled', async () => {
    const f = fixtures.find((x) => x.name === 'qcow2-v3-c4k')!;
    const dir = mp('fg');
    const child = await mounts.foreground([f.file, dir]);
    expect(child.exitCode).to.equal(null);
    expect(await md5File(path.join(dir, `${path.basename(f.file, '.qcow2')}.raw`))).to.equal(f.rawMd5);
    const exited = new Promise<number | null>((r) => child.on('exit', (c) => r(c)));
    child.kill('SIGTERM');
    expect(await exited).to.equal(0);
    expect(mountedPid(dir)).to.equal(undefined);
  });

  it('-f names the format; raw is never assumed for a qcow2 header', async () => {
    const f = fixtures.find((x) => x.name === 'qcow2-v3-c64k')!;
    const dir = mp('fmt');
    await mounts.mount(['-f', 'raw', f.file, dir]);
    const stem = path.basename(f.file, '.qcow2');
    // As raw, the flat file is the container itself.
    expect(await md5File(path.join(dir, `${stem}.raw`))).to.equal(await md5File(f.file));
    await mounts.unmount(dir);
    await mounts.mount(['-f', 'qcow2', f.file, dir]);
    expect(await md5File(path.join(dir, `${stem}.raw`))).to.equal(f.rawMd5);
    await mounts.unmount(dir);
  });
});


export interface WriteCase {
  what: string;
  offset: number;
  length: number;
}

/** The unaligned writes the issue lists, for a disk of `size` bytes (>= 64 MiB). */
export function unalignedWrites(size: number, clusterSize: number): WriteCase[] {
  return [
    { what: '1 byte', offset: 0, length: 1 },
    { what: '1 byte in the middle of a sector', offset: 12345, length: 1 },
    { what: 'straddling 4 KiB', offset: 4096 - 3, length: 10 },
    { what: 'straddling a cluster', offset: 5 * clusterSize - 100, length: 300 },
    { what: 'straddling 2 MiB', offset: 2 * MiB - 5000, length: 10000 },
    { what: '8 MiB, unaligned', offset: 10 * MiB + 7, length: 8 * MiB },
    { what: 'into unallocated space', offset: 40 * MiB + 123, length: 70000 },
    { what: 'the last sector', offset: size - 512, length: 512 },
    { what: 'the last byte', offset: size - 1, length: 1 },
  ];
}

/** Write through the flat file with dd, and the same bytes into a reference raw file. */
async function applyWrites(flat: string, reference: string, cases: WriteCase[], tmpDir: string): Promise<void> {
  const ref = fs.openSync(reference, 'r+');
  try {
    for (const [i, c] of cases.entries()) {
      const data = pattern(c.length, i);
      const src = path.join(tmpDir, `w${i}.bin`);
      fs.writeFileSync(src, data);
      await runOk('dd', [`if=${src}`, `of=${flat}`, 'bs=1M', `seek=${c.offset}`, 'oflag=seek_bytes', 'conv=notrunc', 'status=none']);
      fs.writeSync(ref, data, 0, data.length, c.offset);
      fs.rmSync(src);
    }
  } finally {
    fs.closeSync(ref);
  }
}

describe('tsmount --rw: writes through the flat file', function () {
  this.timeout(600_000);
  const mounts = new MountTracker();
  let tmp: { dir: string; cleanup: () => void };
  before(() => (tmp = tempDir('rw')));
  afterEach(() => mounts.cleanup());
  after(() => tmp.cleanup());

  const variants: { name: string; format: 'raw' | 'qcow2'; options: Record<string, string | number> }[] = [
    { name: 'raw', format: 'raw', options: {} },
    { name: 'qcow2 v3, 64 KiB clusters', format: 'qcow2', options: {} },
    { name: 'qcow2 v2', format: 'qcow2', options: { compat: '0.10' } },
    { name: 'qcow2, 512-byte clusters', format: 'qcow2', options: { cluster_size: 512 } },
    { name: 'qcow2, 2 MiB clusters', format: 'qcow2', options: { cluster_size: 2 * MiB } },
    { name: 'qcow2, refcount_bits=1', format: 'qcow2', options: { refcount_bits: 1 } },
  ];

  for (const v of variants) {
    it(`leaves a ${v.name} image that qemu-img check passes and reads back as written`, async () => {
      const size = 64 * MiB + 512 * 3;
      const img = path.join(tmp.dir, `w-${variants.indexOf(v)}.${v.format}`);
      await createImage(img, v.format, size, v.options);
      await qemuIo(img, v.format, ['write -P 0x11 1M 3M', 'write -z 20M 1M']);
      const ref = `${img}.ref`;
      await convertToRaw(img, ref, v.format);
      const dir = path.join(tmp.dir, `m${variants.indexOf(v)}`);
      fs.mkdirSync(dir);
      await mounts.mount(['--rw', img, dir]);
      const flat = path.join(dir, path.basename(img).replace(/\.[^.]*$/, '.raw'));
      const cs = Number(v.options.cluster_size ?? 65536);
      await applyWrites(flat, ref, unalignedWrites(size, cs), tmp.dir);
      expect(await md5File(flat), 'read back through the mount').to.equal(await md5File(ref));
      await mounts.unmount(dir);
      if (v.format === 'qcow2') {
        const check = await checkImage(img, v.format);
        expect(check.code, check.output).to.equal(0);
      }
      expect(await rawMd5(img, v.format)).to.equal(await md5File(ref));
    });
  }

  it('writes into an overlay without touching its backing files', async () => {
    const base = path.join(tmp.dir, 'base.qcow2');
    const top = path.join(tmp.dir, 'top.qcow2');
    await createImage(base, 'qcow2', 64 * MiB);
    await qemuIo(base, 'qcow2', ['write -P 0x22 0 64M']);
    await createImage(top, 'qcow2', undefined, {}, { file: 'base.qcow2', format: 'qcow2' });
    const baseMd5 = await md5File(base);
    const ref = path.join(tmp.dir, 'top.ref');
    await convertToRaw(top, ref);
    const dir = path.join(tmp.dir, 'mtop');
    fs.mkdirSync(dir);
    await mounts.mount(['--rw', top, dir]);
    await applyWrites(path.join(dir, 'top.raw'), ref, unalignedWrites(64 * MiB, 65536), tmp.dir);
    await mounts.unmount(dir);
    expect((await checkImage(top, 'qcow2')).code).to.equal(0);
    expect(await md5File(base)).to.equal(baseMd5);
    expect(await rawMd5(top)).to.equal(await md5File(ref));
  });

  it('makes data and metadata durable on fsync, while still mounted', async () => {
    const img = path.join(tmp.dir, 'fsync.qcow2');
    await createImage(img, 'qcow2', 64 * MiB);
    const ref = `${img}.ref`;
    await convertToRaw(img, ref);
    const dir = path.join(tmp.dir, 'mfsync');
    fs.mkdirSync(dir);
    await mounts.mount(['--rw', img, dir]);
    const data = pattern(3 * MiB + 17, 99);
    const fd = fs.openSync(path.join(dir, 'fsync.raw'), 'r+');
    fs.writeSync(fd, data, 0, data.length, 5 * MiB + 3);
    fs.fsyncSync(fd);
    const rfd = fs.openSync(ref, 'r+');
    fs.writeSync(rfd, data, 0, data.length, 5 * MiB + 3);
    fs.closeSync(rfd);
    // qemu-img -U reads the image file itself: after fsync it must see everything.
    expect((await checkImage(img, 'qcow2')).corruptions).to.equal(0);
    expect(await rawMd5(img)).to.equal(await md5File(ref));
    fs.closeSync(fd);
    await mounts.unmount(dir);
    expect((await checkImage(img, 'qcow2')).code).to.equal(0);
  });

  it('loses nothing on a plain umount: the server writes out and exits', async () => {
    const img = path.join(tmp.dir, 'plain.qcow2');
    await createImage(img, 'qcow2', 64 * MiB);
    const ref = `${img}.ref`;
    await convertToRaw(img, ref);
    const dir = path.join(tmp.dir, 'mplain');
    fs.mkdirSync(dir);
    await mounts.mount(['--rw', img, dir]);
    const pid = mountedPid(dir)!;
    await applyWrites(path.join(dir, 'plain.raw'), ref, unalignedWrites(64 * MiB, 65536), tmp.dir);
    await runOk('umount', [dir]);
    await waitFor(() => !isAlive(pid), 30_000, 'the server to exit');
    expect((await checkImage(img, 'qcow2')).code).to.equal(0);
    expect(await rawMd5(img)).to.equal(await md5File(ref));
  });

  it('tsmount -u returns only after the server has exited', async () => {
    const img = path.join(tmp.dir, 'u.raw');
    fs.writeFileSync(img, Buffer.alloc(4 * MiB));
    const dir = path.join(tmp.dir, 'mu');
    fs.mkdirSync(dir);
    await mounts.mount(['--rw', img, dir]);
    const pid = mountedPid(dir)!;
    expect(pid).to.be.greaterThan(0);
    await mounts.unmount(dir);
    expect(isAlive(pid)).to.equal(false);
    expect(mountedPid(dir)).to.equal(undefined);
  });

  it('refuses to unmount a busy mount, with a one-line error', async () => {
    const img = path.join(tmp.dir, 'busy.raw');
    fs.writeFileSync(img, Buffer.alloc(MiB));
    const dir = path.join(tmp.dir, 'mbusy');
    fs.mkdirSync(dir);
    await mounts.mount([img, dir]);
    const fd = fs.openSync(path.join(dir, 'busy.raw'), 'r');
    try {
      const r = await tsmount(['-u', dir]);
      expect(r.code).to.not.equal(0);
      expect(r.stderr.trim().split('\n')).to.have.length(1);
      expect(r.stderr).to.match(/busy/);
    } finally {
      fs.closeSync(fd);
    }
    await mounts.unmount(dir);
  });
});
