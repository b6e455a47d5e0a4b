// Holes in the flat file: SEEK_DATA/SEEK_HOLE and st_blocks answered from the image's
// block status through its backing chain, so that `cp --sparse=always`, `tar --sparse`
// and `qemu-img map` of the flat file skip what the image never stored. The oracle is
// `qemu-img map` of the image itself; lseek(2) comes from koffi (Node has no SEEK_DATA).
import { expect } from 'chai';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { createImage, mapImage, md5File, qemuIo, run, tempDir } from './helpers/qemu.js';
import { MountTracker, waitFor } from './helpers/mount.js';
import { lseek, SEEK_DATA, SEEK_HOLE } from '../drivers/util/sys.js';
import { allocatedBytes, chainStatus, seek, type Run } from '../fs/extents.js';
import type { BlockNode, Extent } from '../drivers/types.js';

const KiB = 1024;
const MiB = 1 << 20;
const ENXIO = 6;

type Range = [start: number, end: number];

/** The data ranges of an open file, by SEEK_DATA and SEEK_HOLE. */
function seekRanges(file: string): Range[] {
  const fd = fs.openSync(file, 'r');
  try {
    const size = fs.fstatSync(fd).size;
    const out: Range[] = [];
    let pos = 0;
    while (pos < size) {
      const data = lseek(fd, pos, SEEK_DATA);
      if (data === -ENXIO) break;
      expect(data, `SEEK_DATA from ${pos}`).to.be.at.least(pos);
      const hole = lseek(fd, data, SEEK_HOLE);
      expect(hole, `SEEK_HOLE from ${data}`).to.be.greaterThan(data);
      out.push([data, hole]);
      pos = hole;
    }
    return out;
  } finally {
    fs.closeSync(fd);
  }
}

/** Data ranges as qemu-img map reports them (of an image, or of the flat file as raw). */
async function mapRanges(file: string, format: string): Promise<Range[]> {
  const out: Range[] = [];
  for (const e of await mapImage(file, format)) {
    if (!e.data || e.zero) continue;
    const last = out[out.length - 1];
    if (last && last[1] === e.start) last[1] += e.length;
    else out.push([e.start, e.start + e.length]);
  }
  return out;
}

const bytes = (ranges: Range[]): number => ranges.reduce((n, [s, e]) => n + e - s, 0);

/** st_blocks catches up within the attribute timeout (1 s) after a change. */
async function blocksSettle(file: string, want: number): Promise<number> {
  const deadline = Date.now() + 5000;
  for (;;) {
    const got = fs.statSync(file).blocks * 512;
    if (got === want || Date.now() > deadline) return got;
    await new Promise((r) => setTimeout(r, 100));
  }
}

describe('Holes in the flat file (SEEK_DATA/SEEK_HOLE, st_blocks)', function () {
  this.timeout(300_000);
  const mounts = new MountTracker();
  let tmp: { dir: string; cleanup: () => void };
  before(() => (tmp = tempDir('seek')));
  afterEach(() => mounts.cleanup());
  after(() => tmp.cleanup());

  const dir = (name: string): string => {
    const p = path.join(tmp.dir, name);
    fs.mkdirSync(p, { recursive: true });
    return p;
  };

  /**
   * A 64 MiB overlay over a shorter 48 MiB base: data in the base (part of it zeroed
   * in the overlay), data in the overlay, and the tail past the base's end.
   */
  async function chain(format: string, opts: Record<string, string | number> = {}): Promise<string> {
    const base = path.join(tmp.dir, `base.${format}`);
    const top = path.join(tmp.dir, `top.${format}`);
    await createImage(base, format, 48 * MiB, opts);
    await qemuIo(base, format, ['write -P 0x22 8M 2M', 'write -P 0x23 40M 1M']);
    await createImage(top, format, 64 * MiB, opts, { file: base, format });
    await qemuIo(top, format, ['write -P 0x33 20M 1M', 'write -z 8M 1M', 'write -P 0x44 60M 64k', 'write -P 0x45 47M 2M']);
    return top;
  }

  for (const [format, opts] of [['qcow2', {}], ['vmdk', {}]] as const) {
    it(`reports the data of a ${format} and its backing file as qemu-img map does, and holes elsewhere`, async () => {
      const img = await chain(format, opts);
      const expected = await mapRanges(img, format);
      expect(expected.length, 'the fixture has several data ranges').to.be.at.least(4);
      const mp = dir(`m-${format}`);
      await mounts.mount([img, mp]);
      const flat = path.join(mp, `top.raw`);
      expect(seekRanges(flat)).to.deep.equal(expected);
      // qemu-img map of the flat file as raw finds the same through SEEK_DATA/SEEK_HOLE.
      expect(await mapRanges(flat, 'raw')).to.deep.equal(expected);
      expect(fs.statSync(flat).blocks * 512).to.equal(bytes(expected));
    });
  }

  // Data whose file beneath holds a hole reads as zeros: qemu-img map calls it zero
  // (BDRV_BLOCK_RECURSE), and the flat file shows it as a hole, as a raw image's.
  for (const [format, opts] of [
    ['vmdk', { subformat: 'monolithicFlat' }],
    ['vmdk', { subformat: 'twoGbMaxExtentFlat' }],
    ['vpc', { subformat: 'fixed' }],
    ['vdi', { static: 'on' }],
    ['qcow2', { preallocation: 'metadata' }],
  ] as const) {
    it(`shows the holes beneath a ${format} ${Object.values(opts).join(' ')} as qemu-img map's zeros`, async () => {
      const img = path.join(tmp.dir, `h-${Object.values(opts).join('')}.${format}`);
      await createImage(img, format, 32 * MiB, opts);
      await qemuIo(img, format, ['write -P 0x51 1M 64k', 'write -P 0x52 9M 3M', 'write -z 20M 1M', 'write -P 0x53 31M 1M']);
      const expected = await mapRanges(img, format);
      expect(bytes(expected), 'the fixture has holes').to.be.lessThan(8 * MiB);
      const mp = dir(`m-h-${format}-${Object.values(opts).join('')}`);
      // A fixed VHD probes as raw, as in QEMU: say its format.
      await mounts.mount(['-f', format, img, mp]);
      const flat = path.join(mp, fs.readdirSync(mp)[0]!);
      expect(seekRanges(flat)).to.deep.equal(expected);
      expect(fs.statSync(flat).blocks * 512).to.equal(bytes(expected));
      expect(await md5File(flat)).to.equal(await md5File(await rawOf(img, format)));
    });
  }

  /** The image's disk as a raw file, by qemu-img. */
  async function rawOf(img: string, format: string): Promise<string> {
    const out = `${img}.flat`;
    const r = await run('qemu-img', ['convert', '-f', format, '-O', 'raw', img, out]);
    expect(r.code, r.stderr).to.equal(0);
    return out;
  }

  it('reports a vhdx block by block, and an empty image as one hole', async () => {
    const img = path.join(tmp.dir, 'v.vhdx');
    await createImage(img, 'vhdx', 64 * MiB, { block_size: '1M' });
    await qemuIo(img, 'vhdx', ['write -P 0x11 3M 64k', 'write -P 0x12 10M 3M', 'write -P 0x13 63M 1M']);
    const empty = path.join(tmp.dir, 'e.vhdx');
    await createImage(empty, 'vhdx', 64 * MiB, { block_size: '1M' });
    // QEMU's vhdx has no block status (qemu-img map calls all of it data): the oracle
    // is the writes, rounded out to the 1 MiB blocks they allocated.
    const expected: Range[] = [[3 * MiB, 4 * MiB], [10 * MiB, 13 * MiB], [63 * MiB, 64 * MiB]];
    const mp = dir('m-vhdx');
    await mounts.mount([img, empty, mp]);
    expect(seekRanges(path.join(mp, 'v.raw'))).to.deep.equal(expected);
    expect(fs.statSync(path.join(mp, 'v.raw')).blocks * 512).to.equal(bytes(expected));
    expect(seekRanges(path.join(mp, 'e.raw'))).to.deep.equal([]);
    expect(fs.statSync(path.join(mp, 'e.raw')).blocks).to.equal(0);
  });

  it("shows a sparse raw image's holes, also as the backing file of a qcow2", async () => {
    const raw = path.join(tmp.dir, 'sparse.raw');
    fs.writeFileSync(raw, '');
    fs.truncateSync(raw, 32 * MiB);
    const fd = fs.openSync(raw, 'r+');
    fs.writeSync(fd, Buffer.alloc(2 * MiB, 0x5a), 0, 2 * MiB, 4 * MiB);
    fs.closeSync(fd);
    const top = path.join(tmp.dir, 'over-raw.qcow2');
    await createImage(top, 'qcow2', 32 * MiB, {}, { file: raw, format: 'raw' });
    await qemuIo(top, 'qcow2', ['write -P 0x5b 16M 1M']);
    // The host file system may allocate around the written range: its own map is the oracle.
    const hostData = await mapRanges(raw, 'raw');
    expect(bytes(hostData)).to.be.lessThan(8 * MiB);
    const mp = dir('m-raw');
    await mounts.mount(['-f', 'raw', raw, mp]);
    expect(seekRanges(path.join(mp, 'sparse.raw'))).to.deep.equal(hostData);
    await mounts.unmount(mp);
    await mounts.mount([top, mp]);
    expect(seekRanges(path.join(mp, 'over-raw.raw'))).to.deep.equal(await mapRanges(top, 'qcow2'));
  });

  it('lets cp --sparse=always and tar --sparse skip the holes, with the same bytes', async () => {
    const img = await chain('qcow2');
    const mp = dir('m-cp');
    await mounts.mount([img, mp]);
    const flat = path.join(mp, 'top.raw');
    const data = fs.statSync(flat).blocks * 512;
    expect(data).to.be.lessThan(8 * MiB);
    const copy = path.join(tmp.dir, 'copy.raw');
    const cp = await run('cp', ['--sparse=always', flat, copy]);
    expect(cp.code, cp.stderr).to.equal(0);
    expect(await md5File(copy)).to.equal(await md5File(flat));
    // The copy holds the data and little more (the file system's own block rounding).
    expect(fs.statSync(copy).blocks * 512).to.be.at.most(data + 1 * MiB);
    const tar = path.join(tmp.dir, 'top.tar');
    const t = await run('tar', ['--sparse', '-cf', tar, '-C', mp, 'top.raw']);
    expect(t.code, t.stderr).to.equal(0);
    expect(fs.statSync(tar).size).to.be.at.most(data + 1 * MiB);
    const out = dir('untar');
    const x = await run('tar', ['-xf', tar, '-C', out]);
    expect(x.code, x.stderr).to.equal(0);
    expect(await md5File(path.join(out, 'top.raw'))).to.equal(await md5File(flat));
  });

  it('shows a hole punched with fallocate -p as a hole, and a write into a hole as data', async () => {
    const img = path.join(tmp.dir, 'punch.qcow2');
    await createImage(img, 'qcow2', 32 * MiB);
    await qemuIo(img, 'qcow2', ['write -P 0x55 0 16M']);
    const mp = dir('m-punch');
    await mounts.mount(['--rw', img, mp]);
    const flat = path.join(mp, 'punch.raw');
    expect(seekRanges(flat)).to.deep.equal([[0, 16 * MiB]]);
    expect(fs.statSync(flat).blocks * 512).to.equal(16 * MiB);
    const p = await run('fallocate', ['-p', '-o', `${4 * MiB}`, '-l', `${2 * MiB}`, flat]);
    expect(p.code, p.stderr).to.equal(0);
    expect(seekRanges(flat)).to.deep.equal([[0, 4 * MiB], [6 * MiB, 16 * MiB]]);
    expect(await blocksSettle(flat, 14 * MiB)).to.equal(14 * MiB);
    const fd = fs.openSync(flat, 'r+');
    try {
      fs.writeSync(fd, Buffer.alloc(64 * KiB, 0x66), 0, 64 * KiB, 24 * MiB);
      fs.fsyncSync(fd);
    } finally {
      fs.closeSync(fd);
    }
    expect(seekRanges(flat)).to.deep.equal([[0, 4 * MiB], [6 * MiB, 16 * MiB], [24 * MiB, 24 * MiB + 64 * KiB]]);
    expect(await blocksSettle(flat, 14 * MiB + 64 * KiB)).to.equal(14 * MiB + 64 * KiB);
  });

  it('answers a slow request EINTR once the grace period is over, when its caller was signalled', async () => {
    // SEEK_DATA over NBD is a block-status request; nbdkit's delay filter makes it take 3 s.
    const sock = path.join(tmp.dir, 'slow.sock');
    const nbdkit = spawn('nbdkit', ['-f', '--exit-with-parent', '-U', sock, '--filter=delay', 'memory', '64M', 'delay-extents=3'], { stdio: 'ignore' });
    mounts.trackChild(nbdkit);
    await waitFor(() => fs.existsSync(sock), 10_000, 'nbdkit');
    const mp = dir('m-intr');
    await mounts.mount(['-f', 'raw', `nbd+unix:///?socket=${sock}`, mp]);
    const flat = path.join(mp, fs.readdirSync(mp)[0]!);
    // The first stat counts st_blocks (3 s, then the fallback); later lookups are quick.
    await fs.promises.stat(flat);
    const sys = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../drivers/util/sys.js');
    const script = `
      const { lseek, SEEK_DATA } = await import(${JSON.stringify(sys)});
      const fs = await import('node:fs');
      process.on('SIGHUP', () => {});
      const fd = fs.openSync(${JSON.stringify(flat)}, 'r');
      process.stdout.write('open\\n');
      const t = Date.now();
      const r = lseek(fd, 4096, SEEK_DATA);
      process.stdout.write(JSON.stringify({ r, ms: Date.now() - t }) + '\\n');`;
    const child = spawn(process.execPath, ['--input-type=module', '-e', script], { stdio: ['ignore', 'pipe', 'inherit'] });
    mounts.trackChild(child);
    let out = '';
    child.stdout.on('data', (d: Buffer) => (out += d.toString()));
    await waitFor(() => out.includes('open'), 20_000, 'the seeking child to open the file');
    await new Promise((r) => setTimeout(r, 300));
    child.kill('SIGHUP');
    await new Promise((r) => child.on('close', r));
    const got = JSON.parse(out.split('\n')[1]!) as { r: number; ms: number };
    expect(got.r, 'lseek fails with EINTR').to.equal(-4);
    expect(got.ms).to.be.within(900, 2900);
  });

  it('answers ENXIO for SEEK_DATA past the last data and at the end, and SEEK_HOLE at the end of all-data', async () => {
    const img = path.join(tmp.dir, 'full.qcow2');
    await createImage(img, 'qcow2', 4 * MiB);
    await qemuIo(img, 'qcow2', ['write -P 0x77 0 4M']);
    const mp = dir('m-full');
    await mounts.mount([img, mp]);
    const fd = fs.openSync(path.join(mp, 'full.raw'), 'r');
    try {
      expect(lseek(fd, 123, SEEK_DATA)).to.equal(123);
      expect(lseek(fd, 123, SEEK_HOLE)).to.equal(4 * MiB);
      expect(lseek(fd, 4 * MiB, SEEK_DATA)).to.equal(-ENXIO);
      expect(lseek(fd, 4 * MiB, SEEK_HOLE)).to.equal(-ENXIO);
    } finally {
      fs.closeSync(fd);
    }
  });
});

/** An in-memory layer: its extents as given, over an optional backing node. */
function layer(size: number, extents: Extent[], backing?: BlockNode): BlockNode {
  return {
    size, readOnly: true, name: 'mem', backing,
    read: async () => {},
    write: async () => {},
    flush: async () => {},
    close: async () => {},
    blockStatus: async (offset, length) => extents.filter((e) => e.offset < offset + length && e.offset + e.length > offset),
  };
}

describe('Holes through a chain of in-memory layers (fs/extents.ts)', () => {
  const base = layer(100, [{ offset: 0, length: 30, kind: 'data' }, { offset: 30, length: 30, kind: 'unallocated' }, { offset: 60, length: 40, kind: 'data' }]);
  const top = layer(
    160,
    [
      { offset: 0, length: 10, kind: 'zero' },
      { offset: 10, length: 50, kind: 'unallocated' },
      { offset: 60, length: 10, kind: 'data' },
      { offset: 70, length: 90, kind: 'unallocated' },
    ],
    base,
  );

  it('asks the backing node for what a layer leaves unallocated, and calls zero and past-the-end holes', async () => {
    const runs: Run[] = await chainStatus(top, 0, 160);
    expect(runs).to.deep.equal([
      { offset: 0, length: 10, data: false },
      { offset: 10, length: 20, data: true },
      { offset: 30, length: 30, data: false },
      { offset: 60, length: 40, data: true },
      { offset: 100, length: 60, data: false },
    ]);
    expect(await seek(top, 160, 0, SEEK_DATA)).to.equal(10);
    expect(await seek(top, 160, 35, SEEK_DATA)).to.equal(60);
    expect(await seek(top, 160, 65, SEEK_HOLE)).to.equal(100);
    await seek(top, 160, 120, SEEK_DATA).then(
      () => expect.fail('no data after 120'),
      (err: { errno?: number }) => expect(err.errno).to.equal(ENXIO),
    );
  });

  it('counts allocated bytes, and gives up when the budget runs out', async () => {
    expect(await allocatedBytes(top, 160, { maxRuns: 100, deadline: Date.now() + 10_000 })).to.equal(60);
    expect(await allocatedBytes(top, 160, { maxRuns: 2, deadline: Date.now() + 10_000 })).to.equal(undefined);
  });

  it('counts a layer whose block status fails, or leaves a gap, as data', async () => {
    const broken: BlockNode = { ...layer(50, []), blockStatus: async () => Promise.reject(new Error('no')) };
    expect(await chainStatus(broken, 0, 50)).to.deep.equal([{ offset: 0, length: 50, data: true }]);
    const gappy = layer(50, [{ offset: 20, length: 10, kind: 'zero' }]);
    expect(await chainStatus(gappy, 0, 50)).to.deep.equal([
      { offset: 0, length: 20, data: true },
      { offset: 20, length: 10, data: false },
      { offset: 30, length: 20, data: true },
    ]);
  });
});
