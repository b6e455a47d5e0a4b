// The FUSE layer itself (fs/fuse-dev.ts speaks the kernel protocol on /dev/fuse; the
// libfuse 2 backend is the fallback): what it negotiates, fallocate through the flat
// file, concurrent out-of-order replies, mount options, and the fallback's bytes.
import { expect } from 'chai';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { checkImage, createImage, md5File, qemuIo, rawMd5, run, tempDir } from './helpers/qemu.js';
import { MountTracker, tsmount } from './helpers/mount.js';

const MiB = 1 << 20;

describe('FUSE layer: /dev/fuse served directly', function () {
  this.timeout(300_000);
  const mounts = new MountTracker();
  let tmp: { dir: string; cleanup: () => void };
  before(() => (tmp = tempDir('fusedev')));
  afterEach(() => mounts.cleanup());
  after(() => tmp.cleanup());

  const mp = (name: string): string => {
    const p = path.join(tmp.dir, name);
    fs.mkdirSync(p, { recursive: true });
    return p;
  };

  async function filledQcow2(name: string, size = 64 * MiB): Promise<string> {
    const img = path.join(tmp.dir, name);
    await createImage(img, 'qcow2', size);
    await qemuIo(img, 'qcow2', [`write -P 0x11 0 ${size}`]);
    return img;
  }

  it('negotiates 1 MiB requests with the kernel', async () => {
    const img = await filledQcow2('neg.qcow2', 8 * MiB);
    const log = path.join(tmp.dir, 'neg.log');
    const prev = process.env.DEBUG;
    process.env.DEBUG = 'tsmount:fuse';
    try {
      await mounts.mount(['--log', log, img, mp('neg')]);
    } finally {
      if (prev === undefined) delete process.env.DEBUG;
      else process.env.DEBUG = prev;
    }
    await mounts.unmount(path.join(tmp.dir, 'neg'));
    expect(fs.readFileSync(log, 'utf8')).to.match(/FUSE 7\.\d+, flags [0-9a-f]+\/[0-9a-f]+, max_write 1048576/);
  });

  it('punches holes and zeroes ranges with fallocate(2): the image reads zeros there and stays clean', async () => {
    const img = await filledQcow2('falloc.qcow2');
    const dir = mp('falloc');
    await mounts.mount(['--rw', img, dir]);
    const flat = path.join(dir, 'falloc.raw');
    for (const args of [['-p', '-o', `${MiB}`, '-l', `${3 * MiB}`], ['-z', '-o', `${10 * MiB}`, '-l', '100000'], ['-o', '0', '-l', `${MiB}`]]) {
      const r = await run('fallocate', [...args, flat]);
      expect(r.code, `fallocate ${args.join(' ')}: ${r.stderr}`).to.equal(0);
    }
    // The disk never grows through fallocate.
    const past = await run('fallocate', ['-l', `${100 * MiB}`, flat]);
    expect(past.code).to.not.equal(0);
    expect(past.stderr).to.match(/No space left/);
    expect(fs.statSync(flat).size).to.equal(64 * MiB);
    await mounts.unmount(dir);
    const check = await checkImage(img, 'qcow2');
    expect(check.code, check.output).to.equal(0);
    expect(check.corruptions + check.leaks, check.output).to.equal(0);
    await qemuIo(img, 'qcow2', ['read -P 0 1M 3M', 'read -P 0 10M 100000', 'read -P 0x11 0 1M', 'read -P 0x11 4M 6M', 'read -P 0x11 10585760 1000000']);
    // The punched clusters are unallocated now (qemu-img map leaves them out).
    const map = await run('qemu-img', ['map', '--output=json', img]);
    const extents = JSON.parse(map.stdout) as { start: number; length: number; data: boolean }[];
    const at = (off: number): boolean | undefined => extents.find((e) => e.start <= off && off < e.start + e.length)?.data;
    expect(at(2 * MiB)).to.equal(false);
    expect(at(5 * MiB)).to.equal(true);
  });

  it('refuses fallocate on a read-only mount and on snapshot files', async () => {
    const img = await filledQcow2('falloc-ro.qcow2', 8 * MiB);
    const dir = mp('falloc-ro');
    await mounts.mount([img, dir]);
    const r = await run('fallocate', ['-p', '-o', '0', '-l', '4096', path.join(dir, 'falloc-ro.raw')]);
    expect(r.code).to.not.equal(0);
    expect(r.stderr).to.match(/Read-only file system/);
  });

  it('answers many readers at once, each with its own bytes', async () => {
    const img = path.join(tmp.dir, 'par.qcow2');
    const ref = path.join(tmp.dir, 'par.raw');
    const data = Buffer.alloc(64 * MiB);
    for (let i = 0; i < data.length; i += 4) data.writeUInt32LE((i * 2654435761) >>> 0, i);
    fs.writeFileSync(ref, data);
    await run('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', ref, img]);
    const dir = mp('par');
    await mounts.mount([img, dir]);
    const flat = path.join(dir, 'par.raw');
    // Eight dd readers over different ranges at once, with odd block sizes.
    const ranges = Array.from({ length: 8 }, (_, i) => ({ skip: i * 8 * MiB, bs: [4096, 65536, 1 << 20, 12288][i % 4]! }));
    const outs = await Promise.all(
      ranges.map(
        (r) =>
          new Promise<Buffer>((resolve, reject) => {
            const dd = spawn('dd', [`if=${flat}`, `bs=${r.bs}`, `skip=${r.skip}`, `count=${8 * MiB}`, 'iflag=skip_bytes,count_bytes', 'status=none']);
            const chunks: Buffer[] = [];
            dd.stdout.on('data', (c: Buffer) => chunks.push(c));
            dd.on('error', reject);
            dd.on('close', (code) => (code === 0 ? resolve(Buffer.concat(chunks)) : reject(new Error(`dd exited ${code}`))));
          }),
      ),
    );
    outs.forEach((o, i) => expect(o.equals(data.subarray(ranges[i]!.skip, ranges[i]!.skip + 8 * MiB)), `range ${i}`).to.equal(true));
  });

  it('takes concurrent writers of large and odd-sized blocks, each range landing exactly', async () => {
    const img = path.join(tmp.dir, 'pw.qcow2');
    await createImage(img, 'qcow2', 64 * MiB);
    const src = path.join(tmp.dir, 'pw.src');
    const data = Buffer.alloc(64 * MiB);
    for (let i = 0; i < data.length; i += 4) data.writeUInt32LE((i * 2246822519) >>> 0, i);
    fs.writeFileSync(src, data);
    const dir = mp('pw');
    await mounts.mount(['--rw', img, dir]);
    const flat = path.join(dir, 'pw.raw');
    // Eight writers at once, each its own 8 MiB range, block sizes from 4 KiB to 1 MiB
    // and one that is not a multiple of the page size.
    const sizes = [1 << 20, 4096, 200 * 1024, 1 << 20, 65536, 12345, 1 << 20, 300 * 1024];
    await Promise.all(
      sizes.map(
        (bs, i) =>
          new Promise<void>((resolve, reject) => {
            const off = i * 8 * MiB;
            const dd = spawn('dd', [`if=${src}`, `of=${flat}`, `bs=${bs}`, `skip=${off}`, `seek=${off}`, `count=${8 * MiB}`, 'iflag=skip_bytes,count_bytes', 'oflag=seek_bytes', 'conv=notrunc', 'status=none']);
            dd.on('error', reject);
            dd.on('close', (code) => (code === 0 ? resolve() : reject(new Error(`dd bs=${bs} exited ${code}`))));
          }),
      ),
    );
    await mounts.unmount(dir);
    const check = await checkImage(img, 'qcow2');
    expect(check.code, check.output).to.equal(0);
    expect(await rawMd5(img, 'qcow2')).to.equal(await md5File(src));
  });

  it('keeps the set of files fixed: no create, mkdir, rename or unlink', async () => {
    const img = await filledQcow2('fixed.qcow2', 8 * MiB);
    const dir = mp('fixed');
    await mounts.mount(['--rw', img, dir]);
    expect(() => fs.writeFileSync(path.join(dir, 'new.txt'), 'x')).to.throw(/EPERM/);
    expect(() => fs.mkdirSync(path.join(dir, 'sub'))).to.throw(/EPERM/);
    expect(() => fs.renameSync(path.join(dir, 'fixed.raw'), path.join(dir, 'other.raw'))).to.throw(/EPERM/);
    expect(() => fs.unlinkSync(path.join(dir, 'fixed.raw'))).to.throw(/EPERM/);
    expect(fs.readdirSync(dir)).to.deep.equal(['fixed.raw']);
  });

  it('takes libfuse mount options it knows, and refuses others with one line', async () => {
    const img = await filledQcow2('opts.qcow2', 8 * MiB);
    const dir = mp('opts');
    const bad = await tsmount(['-o', 'no_such_thing', img, dir]);
    expect(bad.code).to.not.equal(0);
    expect(bad.stderr.trim().split('\n')).to.have.length(1);
    expect(bad.stderr).to.match(/no_such_thing/);
    await mounts.mount(['--rw', '-o', 'ro,max_read=131072,noatime', img, dir]);
    expect(() => fs.writeFileSync(path.join(dir, 'opts.raw'), 'x', { flag: 'r+' })).to.throw(/EROFS/);
    expect(await md5File(path.join(dir, 'opts.raw'))).to.equal(await rawMd5(img, 'qcow2'));
  });

  /** Mount with TSMOUNT_FUSE=`backend`, write `length` bytes of 0x6b at `offset`, fsync, unmount; judge with qemu. */
  async function writeThrough(backend: string, name: string, offset: number, length: number): Promise<void> {
    const img = await filledQcow2(`${name}.qcow2`, 16 * MiB);
    const dir = mp(name);
    process.env.TSMOUNT_FUSE = backend;
    try {
      await mounts.mount(['--rw', img, dir]);
    } finally {
      delete process.env.TSMOUNT_FUSE;
    }
    const fd = fs.openSync(path.join(dir, `${name}.raw`), 'r+');
    fs.writeSync(fd, Buffer.alloc(length, 0x6b), 0, length, offset);
    fs.fsyncSync(fd);
    fs.closeSync(fd);
    await mounts.unmount(dir);
    const check = await checkImage(img, 'qcow2');
    expect(check.code, check.output).to.equal(0);
    expect(check.corruptions + check.leaks, check.output).to.equal(0);
    await qemuIo(img, 'qcow2', [`read -P 0x6b ${offset} ${length}`, `read -P 0x11 0 ${offset}`, `read -P 0x11 ${offset + length} 1000000`]);
  }

  it('mounts through fusermount3 and its descriptor passing, the path without root (TSMOUNT_FUSE=fusermount)', async () => {
    await writeThrough('fusermount', 'fm', 3 * MiB, 2 * MiB + 7);
  });

  it('falls back to libfuse 2 (TSMOUNT_FUSE=libfuse) with the same bytes and writes', async () => {
    await writeThrough('libfuse', 'native', 1_000_001, 300_000);
  });
});
