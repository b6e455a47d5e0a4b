// The FUSE workers' splice path (fs/fuse-worker.ts Splicer, on unless TSMOUNT_FUSE_SPLICE=0): a
// READ the read map covers goes from the host file through a pipe into /dev/fuse. The
// oracle is qemu-img convert -O raw; reads go around the page cache (iflag=direct) so
// that they reach the server, and the counters tsmount --list shows say that splice
// answered them.
import { expect } from 'chai';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { convertToRaw, createImage, md5File, qemuIo, run, tempDir } from './helpers/qemu.js';
import { MountTracker, mountCounters, pieceMd5, tsmount } from './helpers/mount.js';

const KiB = 1024;
const MiB = 1 << 20;

/** md5 of the flat file read with O_DIRECT in `bs` blocks (a range: skip and count blocks). */
async function directMd5(file: string, bs: number, skip?: number, count?: number): Promise<string> {
  const range = skip !== undefined ? ` skip=${skip} count=${count}` : '';
  const r = await run('sh', ['-c', `dd if='${file}' iflag=direct bs=${bs}${range} status=none | md5sum`]);
  expect(r.code, r.stderr).to.equal(0);
  return r.stdout.split(' ')[0]!;
}

/** Read the whole file until splice has answered `atLeast` reads (workers start after the mount; the map fills on misses). */
async function untilSpliced(flat: string, mp: string, want: string, atLeast: number): Promise<number> {
  for (let pass = 0; ; pass++) {
    // 256 KiB: a 1 MiB reply needs a pipe larger than an unprivileged pipe-max-size allows.
    expect(await directMd5(flat, 256 * KiB), `pass ${pass}`).to.equal(want);
    const deadline = Date.now() + 3000;
    let n = 0;
    for (;;) {
      n = (await mountCounters(mp)).splicedReads ?? 0;
      if (n >= atLeast || Date.now() > deadline) break;
      await new Promise((r) => setTimeout(r, 250));
    }
    if (n >= atLeast || pass >= 10) return n;
  }
}

describe('FUSE workers: the splice path (TSMOUNT_FUSE_SPLICE)', function () {
  this.timeout(600_000);
  const mounts = new MountTracker();
  let tmp: { dir: string; cleanup: () => void };
  let old: string | undefined;
  before(() => {
    tmp = tempDir('fuse-splice');
    old = process.env.TSMOUNT_FUSE_SPLICE;
    process.env.TSMOUNT_FUSE_SPLICE = '1';
    delete process.env.TSMOUNT_FUSE_WORKERS;
  });
  afterEach(() => mounts.cleanup());
  after(() => {
    if (old === undefined) delete process.env.TSMOUNT_FUSE_SPLICE;
    else process.env.TSMOUNT_FUSE_SPLICE = old;
    tmp.cleanup();
  });

  const dir = (name: string): string => {
    const p = path.join(tmp.dir, name);
    fs.mkdirSync(p, { recursive: true });
    return p;
  };

  it('reads a qcow2 as qemu-img convert does: zeros inside a read, holes, and a last cluster cut by the end of the disk', async () => {
    // 64 MiB + 100 KiB: the last 64 KiB granule is only partly inside the disk.
    const size = 64 * MiB + 100 * KiB;
    const img = path.join(tmp.dir, 'img.qcow2');
    await createImage(img, 'qcow2', size);
    await qemuIo(img, 'qcow2', [
      'write -P 0x11 0 3M',
      'write -z 1M 64k', // a zero cluster in the middle of data
      'write -P 0x22 5M 64k',
      'write -P 0x33 7M 2M',
      'write -z 8M 128k',
      'write -P 0x44 20M 5M',
      `write -P 0x55 ${63 * MiB} ${MiB + 100 * KiB}`, // data up to the very end
    ]);
    const raw = path.join(tmp.dir, 'img.raw.out');
    await convertToRaw(img, raw, 'qcow2');
    const mp = dir('m-qcow2');
    await mounts.mount([img, mp]);
    const flat = path.join(mp, 'img.raw');
    const want = await md5File(raw);
    expect(await untilSpliced(flat, mp, want, 32), 'reads answered by splice').to.be.at.least(32);
    // The map is full now: every range below is answered by a worker, most by splice.
    const before = (await mountCounters(mp)).splicedReads ?? 0;
    const ranges: [bs: number, skip: number, count: number, what: string][] = [
      [MiB, 0, 4, 'data, a zero cluster, data, a hole'],
      [64 * KiB, 15, 3, 'across the zero cluster at 1M'],
      [4 * KiB, 1023, 2, 'a page each side of the zero cluster boundary at 4M'],
      [128 * KiB, 63, 3, 'data, zeros and data around 8M'],
      [MiB, 63, 2, 'the last MiB and the cut cluster, up to the end'],
      [244 * KiB, 268, 1, 'the last 244 KiB, ending exactly at the end (crossing into the cut granule)'],
      [4 * KiB, (size - 8 * KiB) / (4 * KiB), 2, 'the last two pages'],
      [4 * KiB, (size - 8 * KiB) / (4 * KiB), 8, 'the last two pages, asked past the end'],
      [36 * KiB, (64 * MiB) / (36 * KiB) | 0, 3, 'unaligned to the granules, into the end'],
    ];
    for (const [bs, skip, count, what] of ranges) {
      expect(await directMd5(flat, bs, skip, count), what).to.equal(await pieceMd5(raw, bs, skip, count));
    }
    // Four readers at once over different quarters.
    const quarter = (16 * MiB) / (256 * KiB);
    const jobs = [];
    for (let q = 0; q < 4; q++) jobs.push(Promise.all([directMd5(flat, 256 * KiB, q * quarter, quarter), pieceMd5(raw, 256 * KiB, q * quarter, quarter)]));
    for (const [got, exp] of await Promise.all(jobs)) expect(got).to.equal(exp);
    expect(await directMd5(flat, MiB)).to.equal(want);
    // Counters are published once a second.
    let after = before;
    for (const deadline = Date.now() + 5000; after <= before && Date.now() < deadline; ) {
      await new Promise((r) => setTimeout(r, 250));
      after = (await mountCounters(mp)).splicedReads ?? 0;
    }
    expect(after, 'the ranges were spliced').to.be.above(before);
    await mounts.unmount(mp);
  });

  it('TSMOUNT_FUSE_SPLICE=0: the workers answer with pread, none by splice', async () => {
    const img = path.join(tmp.dir, 'off.qcow2');
    await createImage(img, 'qcow2', 16 * MiB);
    await qemuIo(img, 'qcow2', ['write -P 0x66 0 16M']);
    const raw = path.join(tmp.dir, 'off.raw.out');
    await convertToRaw(img, raw, 'qcow2');
    const mp = dir('m-off');
    process.env.TSMOUNT_FUSE_SPLICE = '0';
    try {
      await mounts.mount([img, mp]);
    } finally {
      process.env.TSMOUNT_FUSE_SPLICE = '1';
    }
    const flat = path.join(mp, 'off.raw');
    const want = await md5File(raw);
    let c = await mountCounters(mp);
    for (let pass = 0; pass < 10 && (c.workerReads ?? 0) < 16; pass++) {
      expect(await directMd5(flat, 256 * KiB)).to.equal(want);
      await new Promise((r) => setTimeout(r, 1200));
      c = await mountCounters(mp);
    }
    expect(c.workerReads ?? 0).to.be.at.least(16);
    expect(c.splicedReads ?? 0).to.equal(0);
    await mounts.unmount(mp);
  });

  it('a splice cut short by the end of the host file leaves no half reply behind (raw image truncated under the mount)', async () => {
    const img = path.join(tmp.dir, 'cut.img');
    const data = crypto.randomBytes(8 * MiB);
    fs.writeFileSync(img, data);
    const mp = dir('m-cut');
    // Writable: a read-only raw image would be passed through to the kernel.
    await mounts.mount(['--rw', '-f', 'raw', img, mp]);
    const flat = path.join(mp, 'cut.raw');
    expect(await untilSpliced(flat, mp, await md5File(img), 4)).to.be.at.least(4);
    // The host file loses its last 2 MiB behind the server's back: a splice from there
    // returns short, the pipe is thrown away and the read answered some other way.
    fs.truncateSync(img, 6 * MiB + 4 * KiB);
    const r = await run('sh', ['-c', `dd if='${flat}' iflag=direct bs=256k skip=24 count=8 status=none | od -An -tx1 | sort -u | head -3`]);
    expect(r.code, r.stderr).to.equal(0);
    // Whatever the tail reads as (the first page, then zeros), the reads after it are whole and right.
    for (let i = 0; i < 3; i++) {
      expect(await directMd5(flat, MiB, 0, 6), `round ${i}`).to.equal(crypto.createHash('md5').update(data.subarray(0, 6 * MiB)).digest('hex'));
    }
    await mounts.unmount(mp);
  });
});
