// The FUSE layer itself (fs/fuse-dev.ts speaks the kernel protocol on /dev/fuse; the
// libfuse 2 backend is the fallback): what it negotiates, fallocate through the flat
// file, concurrent out-of-order replies, mount options, and the fallback's bytes.
import { expect } from 'chai';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { checkImage, createImage, md5File, qemuIo, rawMd5, run, tempDir } from './helpers/qemu.js';
import { MountTracker, tsmount } from './helpers/mount.js';
import { mountDevice } from '../fs/mounts.js';

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

  it('widens the kernel\'s readahead to two full READs (2040 KiB), or to what -o max_readahead asks', async () => {
    const img = await filledQcow2('ra.qcow2', 8 * MiB);
    const readahead = (dir: string): number => Number(fs.readFileSync(`/sys/class/bdi/${mountDevice(dir)}/read_ahead_kb`, 'utf8'));
    const dir = mp('ra');
    await mounts.mount([img, dir]);
    expect(readahead(dir)).to.equal(2040);
    await mounts.unmount(dir);
    await mounts.mount(['-o', 'noatime,max_readahead=131072', img, dir]);
    expect(readahead(dir)).to.equal(128);
    expect(await md5File(path.join(dir, 'ra.raw'))).to.equal(await rawMd5(img, 'qcow2'));
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

  describe('FUSE passthrough (the kernel serves a raw image file itself)', () => {
    /** Mount with DEBUG=tsmount:fuse logging into `log`; whether the log says passthrough was negotiated and used. */
    async function mountLogged(args: string[], log: string): Promise<{ negotiated: boolean; used: boolean }> {
      const prev = process.env.DEBUG;
      process.env.DEBUG = 'tsmount:fuse';
      try {
        await mounts.mount(['--log', log, ...args]);
      } finally {
        if (prev === undefined) delete process.env.DEBUG;
        else process.env.DEBUG = prev;
      }
      return { negotiated: false, used: false };
    }
    function logged(log: string): { negotiated: boolean; used: boolean } {
      const text = fs.readFileSync(log, 'utf8');
      const m = /FUSE 7\.\d+, flags [0-9a-f]+\/([0-9a-f]+)/.exec(text);
      return { negotiated: !!m && (parseInt(m[1]!, 16) & 0x20) !== 0, used: /passthrough: host descriptor \d+ is backing file/.test(text) };
    }
    async function filledRaw(name: string, size = 16 * MiB): Promise<string> {
      const img = path.join(tmp.dir, name);
      await createImage(img, 'raw', size);
      await qemuIo(img, 'raw', [`write -P 0x22 0 ${size / 2}`, `write -P 0x33 ${size / 2} ${size / 2}`]);
      return img;
    }

    it('hands a read-only raw image to the kernel: same bytes, mmap included; never a qcow2 or -o nopassthrough', async function () {
      const img = await filledRaw('pt-ro.raw');
      const dir = mp('pt-ro');
      const log = path.join(tmp.dir, 'pt-ro.log');
      await mountLogged([img, dir], log);
      const flat = path.join(dir, 'pt-ro.raw');
      expect(await md5File(flat)).to.equal(await rawMd5(img, 'raw'));
      // mmap goes to the backing file too (python's mmap: a read through the mapping).
      const mm = await run('python3', ['-c', `import mmap,sys; f=open(sys.argv[1],'rb'); m=mmap.mmap(f.fileno(),0,prot=mmap.PROT_READ); print(m[${8 * MiB}:${8 * MiB + 2}].hex())`, flat]);
      expect(mm.stdout.trim(), mm.stderr).to.equal('3333');
      expect(() => fs.writeFileSync(flat, 'x', { flag: 'r+' })).to.throw(/EROFS|EACCES|EPERM/);
      await mounts.unmount(dir);
      const got = logged(log);
      if (!got.negotiated) return this.skip(); // a kernel without CONFIG_FUSE_PASSTHROUGH (before 6.9): served as before
      expect(got.used, fs.readFileSync(log, 'utf8')).to.equal(true);

      const q = await filledQcow2('pt-q.qcow2', 8 * MiB);
      const qlog = path.join(tmp.dir, 'pt-q.log');
      await mountLogged([q, mp('pt-q')], qlog);
      expect(await md5File(path.join(tmp.dir, 'pt-q', 'pt-q.raw'))).to.equal(await rawMd5(q, 'qcow2'));
      await mounts.unmount(path.join(tmp.dir, 'pt-q'));
      expect(logged(qlog).used).to.equal(false);

      const offLog = path.join(tmp.dir, 'pt-off.log');
      await mountLogged(['-o', 'nopassthrough', img, mp('pt-off')], offLog);
      expect(await md5File(path.join(tmp.dir, 'pt-off', 'pt-ro.raw'))).to.equal(await rawMd5(img, 'raw'));
      await mounts.unmount(path.join(tmp.dir, 'pt-off'));
      expect(logged(offLog).used).to.equal(false);
    });

    it('serves a writable raw image here by default, and through the kernel with -o passthrough: writes and fsync land', async function () {
      for (const [name, opts, want] of [['pt-rw', [], false], ['pt-rw-on', ['-o', 'passthrough'], true]] as const) {
        const img = await filledRaw(`${name}.raw`);
        const dir = mp(name);
        const log = path.join(tmp.dir, `${name}.log`);
        await mountLogged(['--rw', ...opts, img, dir], log);
        const flat = path.join(dir, `${name}.raw`);
        const fd = fs.openSync(flat, 'r+');
        fs.writeSync(fd, Buffer.alloc(MiB + 3, 0x6b), 0, MiB + 3, 5 * MiB + 1);
        fs.fsyncSync(fd);
        fs.closeSync(fd);
        const back = Buffer.alloc(4);
        const rfd = fs.openSync(flat, 'r');
        fs.readSync(rfd, back, 0, 4, 6 * MiB + 2);
        fs.closeSync(rfd);
        expect(back.toString('hex')).to.equal('6b6b2222');
        await mounts.unmount(dir);
        const got = logged(log);
        if (want && !got.negotiated) return this.skip(); // no passthrough in this kernel
        expect(got.used, name).to.equal(want);
        expect(fs.statSync(img).size).to.equal(16 * MiB);
        await qemuIo(img, 'raw', [`read -P 0x22 0 ${5 * MiB + 1}`, `read -P 0x6b ${5 * MiB + 1} ${MiB + 3}`, `read -P 0x22 ${6 * MiB + 4} ${2 * MiB - 4}`, `read -P 0x33 ${8 * MiB} ${8 * MiB}`]);
      }
    });

    it('hands a read-only monolithicFlat vmdk\'s extent file to the kernel when it is the disk 1:1; not a longer extent file, not a writable one, not a fixed VHD (its footer follows)', async function () {
      const make = async (name: string, format: string, opts: Record<string, string>): Promise<string> => {
        const img = path.join(tmp.dir, name);
        await createImage(img, format, 8 * MiB, opts);
        await qemuIo(img, format, [`write -P 0x44 0 ${4 * MiB}`, `write -P 0x55 ${6 * MiB} 4096`]);
        return img;
      };
      const vmdk = await make('pt-flat.vmdk', 'vmdk', { subformat: 'monolithicFlat' });
      const cases: [name: string, args: string[], format: string, want: boolean][] = [['pt-flat', [vmdk], 'vmdk', true]];
      // The same descriptor over an extent file with bytes past the disk: they would be readable through the kernel.
      const longDir = path.join(tmp.dir, 'long');
      fs.mkdirSync(longDir);
      fs.copyFileSync(vmdk, path.join(longDir, 'pt-flat.vmdk'));
      fs.copyFileSync(path.join(tmp.dir, 'pt-flat-flat.vmdk'), path.join(longDir, 'pt-flat-flat.vmdk'));
      fs.appendFileSync(path.join(longDir, 'pt-flat-flat.vmdk'), Buffer.alloc(4096, 0x77));
      cases.push(['pt-flat-long', [path.join(longDir, 'pt-flat.vmdk')], 'vmdk', false]);
      cases.push(['pt-flat-rw', ['--rw', '-o', 'passthrough', vmdk], 'vmdk', false]);
      const vpc = await make('pt-fixed.vpc', 'vpc', { subformat: 'fixed', force_size: 'on' });
      cases.push(['pt-fixed', ['-f', 'vpc', vpc], 'vpc', false]);
      for (const [name, args, format, want] of cases) {
        const dir = mp(name);
        const log = path.join(tmp.dir, `${name}.log`);
        await mountLogged([...args, dir], log);
        const image = args[args.length - 1]!;
        const flat = path.join(dir, `${path.basename(image, path.extname(image))}.raw`);
        expect(fs.statSync(flat).size, name).to.equal(8 * MiB);
        expect(await md5File(flat), name).to.equal(await rawMd5(image, format));
        await mounts.unmount(dir);
        const got = logged(log);
        if (want && !got.negotiated) return this.skip(); // no passthrough in this kernel
        expect(got.used, name).to.equal(want);
      }
    });
  });
});
