// FUSE worker threads (fs/fuse-worker.ts): cloned /dev/fuse descriptors whose threads
// answer READs from the shared read map (fs/read-map.ts) with pread(2) from the host
// files, and hand everything else to the main thread. The oracle is qemu-img convert
// -O raw; reads go around the page cache (iflag=direct) so that they reach the server.
// That the workers really answered is read from the counters tsmount --list shows.
import { expect } from 'chai';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { convertFromRaw, convertToRaw, createImage, md5File, qemuIo, run, runOk, runTimingPbkdf, tempDir } from './helpers/qemu.js';
import { tsimg } from './helpers/images.js';
import { MountTracker, mountCounters, mountedPid, pieceMd5, tsmount } from './helpers/mount.js';
import { openGraph } from '../drivers/open.js';
import type { BlockNode } from '../drivers/types.js';
import { granuleShift, ReadMap } from '../fs/read-map.js';
import { countWritten, GRANULE, granuleOf, H_CHANGING, H_WRITES_IN_FLIGHT, lookup, newTable, publish, STREAM_DEFLATE_RAW, STREAM_VMDK_GRAIN, STREAM_ZSTD, WINDOW } from '../fs/read-map-table.js';
import { fillRuns, readRuns, RUN, writeInPlace } from '../fs/read-map-runs.js';
import { FlatFs } from '../fs/flatfs.js';
import { threadCiphers } from './helpers/read-map.js';

const KiB = 1024;
const MiB = 1 << 20;

/** md5 of a flat file read with O_DIRECT (through the server, not the page cache). */
async function directMd5(file: string, bs = '1M', skip?: number, count?: number): Promise<string> {
  const range = skip !== undefined ? ` skip=${skip} count=${count}` : '';
  const r = await run('sh', ['-c', `dd if='${file}' iflag=direct bs=${bs}${range} status=none | md5sum`]);
  expect(r.code, r.stderr).to.equal(0);
  return r.stdout.split(' ')[0]!;
}

/** The workers' read count once the server has published it (once a second). */
async function workerReads(mp: string, atLeast = 1): Promise<number> {
  const deadline = Date.now() + 5000;
  for (;;) {
    const n = (await mountCounters(mp)).workerReads ?? 0;
    if (n >= atLeast || Date.now() > deadline) return n;
    await new Promise((r) => setTimeout(r, 250));
  }
}

/** The mount's counters once the workers' in-place writes reach `atLeast` (published once a second), or after 5 s. */
async function untilWorkerWrites(mp: string, atLeast: number): Promise<Awaited<ReturnType<typeof mountCounters>>> {
  const deadline = Date.now() + 5000;
  for (;;) {
    const c = await mountCounters(mp);
    if ((c.workerWrites ?? 0) >= atLeast || Date.now() > deadline) return c;
    await new Promise((r) => setTimeout(r, 250));
  }
}

/**
 * Read the whole flat file until the workers answer some of it: they start after the
 * mount is ready (a second or so on a loaded machine), and the map fills on misses.
 */
async function untilWorkersServe(flat: string, mp: string, want: string, atLeast: number): Promise<number> {
  for (let pass = 0; ; pass++) {
    expect(await directMd5(flat), `pass ${pass}`).to.equal(want);
    const n = await workerReads(mp, atLeast);
    if (n >= atLeast || pass >= 10) return n;
  }
}

/** Run `fn` with these environment variables set (undefined: unset); the mounts it starts inherit them. */
async function withEnv<T>(env: Record<string, string | undefined>, fn: () => Promise<T>): Promise<T> {
  const old = Object.fromEntries(Object.keys(env).map((k) => [k, process.env[k]]));
  const set = (vars: Record<string, string | undefined>): void => {
    for (const [k, v] of Object.entries(vars)) {
      if (v === undefined) delete process.env[k];
      else process.env[k] = v;
    }
  };
  set(env);
  try {
    return await fn();
  } finally {
    set(old);
  }
}

/** qemu-img check knows the format (not vpc, not qcow v1). */
const qemuChecks = (format: string): boolean => format !== 'vpc' && format !== 'qcow';

describe('FUSE worker threads (cloned /dev/fuse, shared read map)', function () {
  this.timeout(600_000);
  const mounts = new MountTracker();
  let tmp: { dir: string; cleanup: () => void };
  before(() => {
    tmp = tempDir('fuse-workers');
    delete process.env.TSMOUNT_FUSE_WORKERS;
  });
  afterEach(() => mounts.cleanup());
  after(() => tmp.cleanup());

  const dir = (name: string): string => {
    const p = path.join(tmp.dir, name);
    fs.mkdirSync(p, { recursive: true });
    return p;
  };

  /**
   * A 16 MiB qcow2 whose first half qemu-io wrote with `fill`, mounted --rw, its flat file
   * open, and its first 4 KiB written (qcow2's first-change hook ran, its window walked):
   * `write(at)` writes 4 KiB of random bytes there and keeps `ref` in step.
   */
  const halfWrittenMount = async (name: string, fill: number) => {
    const size = 16 * MiB;
    const img = path.join(tmp.dir, `${name}.qcow2`);
    await createImage(img, 'qcow2', size);
    await qemuIo(img, 'qcow2', [`write -P 0x${fill.toString(16)} 0 8M`]);
    const ref = Buffer.alloc(size);
    ref.fill(fill, 0, 8 * MiB);
    const mp = dir(`m-${name}`);
    await mounts.mount(['--rw', img, mp]);
    const flat = path.join(mp, `${name}.raw`);
    const fd = await fs.promises.open(flat, 'r+');
    const write = async (at: number): Promise<void> => {
      const data = crypto.randomBytes(4096);
      await fd.write(data, 0, data.length, at);
      data.copy(ref, at);
    };
    try {
      await write(0);
    } catch (err) {
      await fd.close();
      throw err;
    }
    await new Promise((r) => setTimeout(r, 300));
    return { img, ref, mp, flat, fd, write };
  };

  /**
   * Random 4 KiB writes (every eighth 12 KiB, every fourth `unaligned` bytes past a page)
   * into [0, range) of the mounted flat file, keeping `ref` in step, 64 at a time until
   * the workers wrote some in place (the first are the JS thread's, until the workers run
   * and the map has the blocks), or 20 rounds: how many were written, and by the workers.
   */
  const writeUntilWorkersDo = async (mp: string, flat: string, ref: Buffer, range: number, unaligned: number): Promise<{ writes: number; served: number }> => {
    let writes = 0;
    let served = 0;
    const fd = await fs.promises.open(flat, 'r+');
    try {
      for (let pass = 0; pass < 20 && served === 0; pass++) {
        for (let i = 0; i < 64; i++) {
          const at = crypto.randomInt(0, range / 4096) * 4096 + (i % 4 === 0 ? unaligned : 0);
          const data = crypto.randomBytes(i % 8 === 0 ? 3 * 4096 : 4096);
          const n = Math.min(data.length, ref.length - at);
          await fd.write(data, 0, n, at);
          data.copy(ref, at, 0, n);
          writes++;
        }
        served = (await mountCounters(mp)).workerWrites ?? 0;
        if (served === 0) await new Promise((r) => setTimeout(r, 300));
      }
    } finally {
      await fd.close();
    }
    return { writes, served };
  };

  /** The flat file reads `ref` through the mount; unmounted, the qcow2 is `qemu-img check` clean and converts to `ref`. */
  const expectWrittenQcow2 = async (mp: string, flat: string, img: string, ref: Buffer): Promise<void> => {
    const want = crypto.createHash('md5').update(ref).digest('hex');
    expect(await directMd5(flat), 'read back through the mount').to.equal(want);
    await mounts.unmount(mp);
    await runOk('qemu-img', ['check', img]);
    const back = `${img}-back.raw`;
    await convertToRaw(img, back, 'qcow2');
    expect(await md5File(back)).to.equal(want);
  };

  /** Data, zeros written as such, holes and a run at the very end: every kind of granule. */
  const writes = ['write -P 0x11 0 3M', 'write -P 0x22 5M 64k', 'write -z 6M 1M', 'write -P 0x33 7M 2M', 'write -P 0x44 20M 5M', 'write -P 0x55 63M 1M'];

  // Data in the extent files of a vmdk (flat, or sparse in a file of its own) is the
  // workers' too (Extent.elsewhere), and a fixed VHD's (the file's bytes, footer after).
  const cases: [format: string, opts: Record<string, string>][] = [
    ['qcow2', {}],
    ['vmdk', { subformat: 'monolithicSparse' }],
    ['vhdx', { block_size: '1M' }],
    ['vmdk', { subformat: 'monolithicFlat' }],
    ['vmdk', { subformat: 'twoGbMaxExtentSparse' }],
    ['vpc', { subformat: 'fixed' }],
    ['qcow2', { data_file: 'DATA' }],
  ];
  /** An image's name for its case: the format, and the subformat (or data file) where a format has several cases. */
  const caseName = (format: string, opts: Record<string, string>): string =>
    opts.data_file ? `${format}-datafile` : opts.subformat && opts.subformat !== 'monolithicSparse' ? `${format}-${opts.subformat}` : format;
  /** The options for `img`: a data file named by absolute path beside it (qemu-img 7.2 resolves a relative one against its working directory). */
  const optsFor = (opts: Record<string, string>, img: string): Record<string, string> => (opts.data_file ? { ...opts, data_file: `${img}.data` } : opts);
  for (const [format, opts] of cases) {
    const name = caseName(format, opts);
    it(`reads a ${name} as qemu-img convert does, served by the workers, with 4 concurrent readers`, async () => {
      const img = path.join(tmp.dir, `img-${name}.${format}`);
      await createImage(img, format, 64 * MiB, optsFor(opts, img));
      await qemuIo(img, format, writes);
      const raw = path.join(tmp.dir, `img-${name}.raw`);
      await convertToRaw(img, raw, format);
      const mp = dir(`m-${name}`);
      // A fixed VHD is probed as raw, as QEMU probes it: say its format. A read-only
      // monolithicFlat vmdk goes to the kernel (passthrough, fuse-dev.test.ts): not here.
      await mounts.mount(['-f', format, ...(opts.subformat === 'monolithicFlat' ? ['-o', 'nopassthrough'] : []), img, mp]);
      const flat = path.join(mp, `img-${name}.raw`);
      const want = await md5File(raw);
      // The first pass publishes the map (misses served on the JS thread); the next ones hit it.
      expect(await untilWorkersServe(flat, mp, want, 32), 'reads answered by the workers').to.be.at.least(32);
      expect(await directMd5(flat)).to.equal(want);
      // Four readers at once, 64 KiB requests over different quarters, twice over.
      const quarter = 16 * MiB / (64 * KiB);
      const jobs = [];
      for (let round = 0; round < 2; round++) {
        for (let q = 0; q < 4; q++) jobs.push(Promise.all([directMd5(flat, '64k', q * quarter, quarter), pieceMd5(raw, 64 * KiB, q * quarter, quarter)]));
      }
      for (const [got, exp] of await Promise.all(jobs)) expect(got).to.equal(exp);
      // Unaligned reads across granules and across data and zeros.
      const fd = await fs.promises.open(flat, 'r');
      const rawFd = await fs.promises.open(raw, 'r');
      try {
        for (const [at, n] of [[5 * MiB - 100, 200 * KiB], [6 * MiB + 1, 1536 * KiB], [64 * MiB - 4096, 4096], [3 * MiB - 1, 2]] as const) {
          const a = Buffer.alloc(n);
          const b = Buffer.alloc(n);
          await fd.read(a, 0, n, at);
          await rawFd.read(b, 0, n, at);
          expect(a.equals(b), `bytes at ${at}+${n}`).to.equal(true);
        }
      } finally {
        await fd.close();
        await rawFd.close();
      }
      // Unmounting with the workers running leaves nothing behind.
      await mounts.unmount(mp);
      expect(mountedPid(mp)).to.equal(undefined);
    });
  }

  /** Where the compressed stream of the cluster (grain) at guest `at` starts in `file`, a 64 KiB-cluster qcow2, a qcow or a streamOptimized vmdk. */
  const streamAt = (file: string, format: string, at: number): number => {
    const image = fs.readFileSync(file);
    if (format === 'qcow') {
      // QEMU's QCowHeader: cluster_bits at 32, l2_bits at 33, l1_table_offset at 40; an L2 entry's bit 63 marks a compressed cluster.
      const cb = image[32]!;
      const lb = image[33]!;
      const l2 = Number(image.readBigUInt64BE(Number(image.readBigUInt64BE(40)) + Math.floor(at / 2 ** (cb + lb)) * 8));
      const entry = image.readBigUInt64BE(l2 + (Math.floor(at / 2 ** cb) % 2 ** lb) * 8);
      expect(Number(entry >> 63n), `the cluster at ${at} is compressed`).to.equal(1);
      return Number(entry & ((1n << BigInt(63 - cb)) - 1n));
    }
    if (format === 'qcow2') {
      const l1 = Number(image.readBigUInt64BE(40));
      const l2 = Number(image.readBigUInt64BE(l1) & 0x00fffffffffffe00n);
      const entry = image.readBigUInt64BE(l2 + (at / (64 * KiB)) * 8);
      expect(Number((entry >> 62n) & 1n), `the cluster at ${at} is compressed`).to.equal(1);
      return Number(entry & ((1n << 54n) - 1n));
    }
    // streamOptimized: the grain's marker (its sector number, then its stream's size) on a sector boundary.
    for (let pos = 512; pos + 12 <= image.length; pos += 512) {
      if (image.readBigUInt64LE(pos) === BigInt(at / 512) && image.readUInt32LE(pos + 8) > 0 && image.readUInt32LE(pos + 8) < 2 * 64 * KiB) return pos + 12;
    }
    throw new Error(`no grain marker for ${at}`);
  };

  const compressedCases = [
    { format: 'qcow2', stem: 'z', name: 'a compressed qcow2 (zlib)', opts: ['-O', 'qcow2', '-c', '-o', 'cluster_size=65536'], reason: /guest offset 0x80000/ },
    { format: 'qcow2', stem: 'zs', name: 'a compressed qcow2 (zstd)', opts: ['-O', 'qcow2', '-c', '-o', 'cluster_size=65536,compression_type=zstd'], reason: /guest offset 0x80000/ },
    { format: 'vmdk', stem: 'z', name: 'a streamOptimized vmdk', opts: ['-O', 'vmdk', '-o', 'subformat=streamOptimized'], reason: /compressed grain at 0x/ },
    { format: 'qcow', stem: 'z', name: 'a compressed qcow (v1)', opts: ['-O', 'qcow', '-c'], reason: /qcow compressed cluster at 0x/ },
  ];
  for (const c of compressedCases) {
    it(`inflates ${c.name} in the workers: every byte as qemu-img convert reads it, 4 readers, unaligned reads; a damaged cluster is the JS thread's EIO, its neighbours read`, async () => {
      // Per MiB: 512 KiB of random bytes (a qcow2 stores them as they are: they do not shrink) and 512 KiB of hex text.
      const src = Buffer.alloc(16 * MiB);
      for (let at = 0; at < src.length; at += MiB) {
        crypto.randomBytes(512 * KiB).copy(src, at);
        Buffer.from(crypto.randomBytes(256 * KiB).toString('hex')).copy(src, at + 512 * KiB);
      }
      const raw = path.join(tmp.dir, `${c.stem}src-${c.format}.raw`);
      fs.writeFileSync(raw, src);
      const img = path.join(tmp.dir, `${c.stem}.${c.format}`);
      await convertFromRaw(raw, img, c.opts);
      const mp = dir(`m-${c.stem}-${c.format}`);
      await mounts.mount([img, mp]);
      const flat = path.join(mp, `${c.stem}.raw`);
      const want = await md5File(raw);
      // 16 READs of 1 MiB per pass: every one has compressed clusters.
      expect(await untilWorkersServe(flat, mp, want, 16), 'reads answered by the workers').to.be.at.least(16);
      const quarter = (4 * MiB) / (64 * KiB);
      const jobs = [];
      for (let q = 0; q < 4; q++) jobs.push(Promise.all([directMd5(flat, '64k', q * quarter, quarter), pieceMd5(raw, 64 * KiB, q * quarter, quarter)]));
      for (const [got, exp] of await Promise.all(jobs)) expect(got).to.equal(exp);
      const fd = await fs.promises.open(flat, 'r');
      try {
        for (const [at, n] of [[512 * KiB - 100, 200], [512 * KiB + 7, 64 * KiB], [MiB - 1, 2], [3 * MiB + 600 * KiB + 5, 900 * KiB], [16 * MiB - 4096, 4096]] as const) {
          const a = Buffer.alloc(n);
          await fd.read(a, 0, n, at);
          expect(a.equals(src.subarray(at, at + n)), `bytes at ${at}+${n}`).to.equal(true);
        }
      } finally {
        await fd.close();
      }
      await mounts.unmount(mp);
      // The compressed cluster at 512 KiB damaged: EIO for it, and its reason in the log (the JS thread's).
      const bad = path.join(tmp.dir, `${c.stem}-bad.${c.format}`);
      fs.copyFileSync(img, bad);
      const fdw = fs.openSync(bad, 'r+');
      try {
        fs.writeSync(fdw, Buffer.alloc(64, 0xff), 0, 64, streamAt(img, c.format, 512 * KiB));
      } finally {
        fs.closeSync(fdw);
      }
      const log = path.join(tmp.dir, `${c.stem}-bad-${c.format}.log`);
      const mp2 = dir(`m-${c.stem}-bad-${c.format}`);
      await mounts.mount(['--log', log, bad, mp2]);
      const flat2 = path.join(mp2, `${c.stem}-bad.raw`);
      for (let pass = 0; pass < 3; pass++) {
        const r = await run('dd', [`if=${flat2}`, 'of=/dev/null', 'iflag=direct', 'bs=64k', 'skip=8', 'count=1']);
        expect(r.code, 'the damaged cluster').to.not.equal(0);
        expect(r.stderr).to.match(/Input\/output error/);
        // Its neighbours, a MiB and more after it, the workers serving them once the map has them.
        expect(await directMd5(flat2, '64k', 9, 23)).to.equal(await pieceMd5(raw, 64 * KiB, 9, 23));
      }
      expect(await workerReads(mp2, 1)).to.be.at.least(1);
      await mounts.unmount(mp2);
      expect(fs.readFileSync(log, 'utf8')).to.match(c.reason);
    });
  }

  it('reads a backing chain (qcow2 over qcow2 over raw) as qemu-img convert does', async () => {
    const base = path.join(tmp.dir, 'base.raw');
    fs.writeFileSync(base, '');
    fs.truncateSync(base, 32 * MiB);
    const fd = fs.openSync(base, 'r+');
    fs.writeSync(fd, Buffer.alloc(4 * MiB, 0x61), 0, 4 * MiB, 2 * MiB);
    fs.writeSync(fd, Buffer.alloc(MiB, 0x62), 0, MiB, 20 * MiB);
    fs.closeSync(fd);
    const mid = path.join(tmp.dir, 'mid.qcow2');
    await createImage(mid, 'qcow2', 32 * MiB, {}, { file: base, format: 'raw' });
    await qemuIo(mid, 'qcow2', ['write -P 0x71 3M 64k', 'write -z 4M 512k', 'write -P 0x72 10M 2M']);
    const top = path.join(tmp.dir, 'top.qcow2');
    await createImage(top, 'qcow2', 32 * MiB, {}, { file: mid, format: 'qcow2' });
    await qemuIo(top, 'qcow2', ['write -P 0x81 2M 128k', 'write -P 0x82 11M 64k', 'write -z 20M 256k']);
    const raw = path.join(tmp.dir, 'top.raw.out');
    await convertToRaw(top, raw, 'qcow2');
    const mp = dir('m-chain');
    await mounts.mount([top, mp]);
    const flat = path.join(mp, 'top.raw');
    const want = await md5File(raw);
    expect(await untilWorkersServe(flat, mp, want, 16)).to.be.at.least(16);
    for (const bs of ['1M', '64k', '4k']) expect(await directMd5(flat, bs), `bs=${bs}`).to.equal(want);
  });

  for (const [format, opts] of cases) {
    const name = caseName(format, opts);
    it(`a read after a write sees the new data in a ${name} (two writer/reader pairs, many rounds)`, async () => {
      const img = path.join(tmp.dir, `rw-${name}.${format}`);
      await createImage(img, format, 64 * MiB, optsFor(opts, img));
      await qemuIo(img, format, ['write -P 0x11 0 16M', 'write -P 0x22 32M 16M']);
      const mp = dir(`m-rw-${name}`);
      await mounts.mount(['--rw', '-f', format, img, mp]);
      const flat = path.join(mp, `rw-${name}.raw`);
      // Reads first, so the map holds the ranges the writes then change.
      const rawOut = path.join(tmp.dir, `rw-${name}.raw.out`);
      await convertToRaw(img, rawOut, format);
      await untilWorkersServe(flat, mp, await md5File(rawOut), 16);
      const fd = await fs.promises.open(flat, 'r+');
      try {
        // Two pairs, each in its own half: allocated data (0-32M) and clusters that
        // start unallocated (the second half has holes until written).
        const pair = async (seed: number, base: number): Promise<void> => {
          let x = seed;
          const rand = (n: number): number => {
            x = (x * 1103515245 + 12345) % 2147483648;
            return x % n;
          };
          for (let round = 0; round < 60; round++) {
            const len = (1 + rand(16)) * 64 * KiB - (rand(2) ? 512 * rand(4) : 0);
            const at = base + rand(32 * MiB - len);
            // A read of the range just before the write: the map has it.
            const before = Buffer.alloc(len);
            await fd.read(before, 0, len, at);
            const data = crypto.randomBytes(len);
            const w = await fd.write(data, 0, len, at);
            expect(w.bytesWritten).to.equal(len);
            const after = Buffer.alloc(len);
            const r = await fd.read(after, 0, len, at);
            expect(r.bytesRead).to.equal(len);
            expect(after.equals(data), `round ${round}: ${at}+${len} reads what was written`).to.equal(true);
          }
        };
        await Promise.all([pair(7, 0), pair(11, 32 * MiB)]);
      } finally {
        await fd.close();
      }
      const served = (await mountCounters(mp)).workerReads ?? 0;
      expect(served, 'reads answered by the workers on a writable file').to.be.at.least(16);
      await mounts.unmount(mp);
      // The image is consistent for qemu-img after all that (vpc: qemu-img has no check).
      if (qemuChecks(format)) {
        const check = await run('qemu-img', ['check', '-q', '-f', format, img]);
        expect(check.code, check.stdout + check.stderr).to.equal(0);
      }
    });
  }

  it('serves everything on the JS thread with TSMOUNT_FUSE_WORKERS=0', async () => {
    const img = path.join(tmp.dir, 'nw.qcow2');
    await createImage(img, 'qcow2', 64 * MiB);
    await qemuIo(img, 'qcow2', writes);
    const raw = path.join(tmp.dir, 'nw.raw.out');
    await convertToRaw(img, raw, 'qcow2');
    const mp = dir('m-nw');
    await withEnv({ TSMOUNT_FUSE_WORKERS: '0' }, () => mounts.mount([img, mp]));
    const flat = path.join(mp, 'nw.raw');
    const want = await md5File(raw);
    expect(await directMd5(flat)).to.equal(want);
    expect(await directMd5(flat)).to.equal(want);
    // The server publishes its counters once a second: wait for the reads to show.
    let c = await mountCounters(mp);
    for (const deadline = Date.now() + 5000; (c.reads ?? 0) < 64 && Date.now() < deadline; c = await mountCounters(mp)) await new Promise((r) => setTimeout(r, 200));
    expect(c.workerReads ?? 0).to.equal(0);
    expect(c.reads).to.be.at.least(64);
    await mounts.unmount(mp);
  });

  it('serves a writable raw image (no passthrough by default) through the workers, writes included', async () => {
    const img = path.join(tmp.dir, 'plain.img');
    fs.writeFileSync(img, crypto.randomBytes(8 * MiB));
    const mp = dir('m-raw');
    await mounts.mount(['--rw', '-f', 'raw', img, mp]);
    const flat = path.join(mp, 'plain.raw');
    expect(await untilWorkersServe(flat, mp, await md5File(img), 4)).to.be.at.least(4);
    const fd = await fs.promises.open(flat, 'r+');
    try {
      for (let i = 0; i < 32; i++) {
        const at = ((i * 7919) % 120) * 64 * KiB + (i % 3) * 512;
        const data = crypto.randomBytes(64 * KiB);
        await fd.write(data, 0, data.length, at);
        const back = Buffer.alloc(data.length);
        await fd.read(back, 0, back.length, at);
        expect(back.equals(data), `write ${i} at ${at}`).to.equal(true);
      }
    } finally {
      await fd.close();
    }
    await mounts.unmount(mp);
  });

  it('fills a sparse raw image\'s holes from the workers in place: every byte where it belongs, holes left read as zeros, st_blocks grows', async () => {
    const img = path.join(tmp.dir, 'sparse.img');
    fs.closeSync(fs.openSync(img, 'w'));
    fs.truncateSync(img, 32 * MiB);
    const ref = Buffer.alloc(32 * MiB);
    const mp = dir('m-sparse');
    await mounts.mount(['--rw', '-f', 'raw', img, mp]);
    const flat = path.join(mp, 'sparse.raw');
    const zeros = crypto.createHash('md5').update(ref).digest('hex');
    // Until the workers run and the map has the holes (published as the file's bytes).
    expect(await untilWorkersServe(flat, mp, zeros, 4), 'reads answered by the workers').to.be.at.least(4);
    const blocksBefore = fs.statSync(flat).blocks;
    const fd = await fs.promises.open(flat, 'r+');
    try {
      // Every MiB a hole when its 1 MiB write comes (dd: one page-aligned request each): the
      // workers write (nearly) all of them.
      const src = path.join(tmp.dir, 'sparse-src.raw');
      fs.writeFileSync(src, crypto.randomBytes(32 * MiB));
      const order = [...Array(32).keys()].sort(() => Math.random() - 0.5);
      await runOk('sh', ['-c', order.map((m) => `dd if='${src}' of='${flat}' bs=1M skip=${m} seek=${m} count=1 conv=notrunc status=none`).join(' && ')]);
      fs.readFileSync(src).copy(ref);
      // And a few unaligned small ones over them.
      for (let i = 0; i < 8; i++) {
        const at = crypto.randomInt(0, 32 * MiB - 5000);
        const data = crypto.randomBytes(3000 + i);
        await fd.write(data, 0, data.length, at);
        data.copy(ref, at);
      }
    } finally {
      await fd.close();
    }
    // The counters reach tsmount --list once a second.
    let served = 0;
    for (let i = 0; i < 20 && served < 16; i++) {
      served = (await mountCounters(mp)).workerWrites ?? 0;
      if (served < 16) await new Promise((r) => setTimeout(r, 250));
    }
    expect(served, 'writes the workers wrote in place').to.be.at.least(16);
    const want = crypto.createHash('md5').update(ref).digest('hex');
    expect(await directMd5(flat), 'read back through the mount').to.equal(want);
    // st_blocks is counted again after the workers' writes (the kernel keeps attributes for a second).
    let blocks = 0;
    for (let i = 0; i < 30 && blocks < blocksBefore + 8 * 2048; i++) {
      blocks = (await fs.promises.stat(flat)).blocks;
      if (blocks < blocksBefore + 8 * 2048) await new Promise((r) => setTimeout(r, 250));
    }
    expect(blocks, 'st_blocks after the writes').to.be.at.least(blocksBefore + 8 * 2048);
    await mounts.unmount(mp);
    expect(await md5File(img)).to.equal(want);
  });

  it('takes 1 MiB writes from 12 writers at once through the workers\' request slots, every byte where it belongs', async () => {
    // A WRITE the workers hand over stays in a shared request slot until it is written.
    const src = path.join(tmp.dir, 'slots-src.raw');
    fs.writeFileSync(src, crypto.randomBytes(24 * MiB));
    const img = path.join(tmp.dir, 'slots.qcow2');
    await createImage(img, 'qcow2', 24 * MiB);
    const mp = dir('m-slots');
    await mounts.mount(['--rw', img, mp]);
    const flat = path.join(mp, 'slots.raw');
    // Until the workers run (they start after the mount is ready): they read every request from then on.
    const zeros = crypto.createHash('md5').update(Buffer.alloc(24 * MiB)).digest('hex');
    expect(await untilWorkersServe(flat, mp, zeros, 4), 'reads answered by the workers').to.be.at.least(4);
    for (let round = 0; round < 2; round++) {
      await Promise.all(
        Array.from({ length: 12 }, (_, w) =>
          runOk('sh', ['-c', `for i in 0 1; do dd if='${src}' of='${flat}' bs=1M skip=$((${w} * 2 + $i)) seek=$((${w} * 2 + $i)) count=1 conv=notrunc status=none; done`]),
        ),
      );
      expect(await directMd5(flat), `round ${round}`).to.equal(await md5File(src));
    }
    await mounts.unmount(mp);
    await runOk('qemu-img', ['check', img]);
    const back = path.join(tmp.dir, 'slots-back.raw');
    await convertToRaw(img, back, 'qcow2');
    expect(await md5File(back)).to.equal(await md5File(src));
  });
  it('overwrites allocated qcow2 clusters from the workers in place, and leaves allocating writes to the JS thread, every byte where qemu-img finds it', async () => {
    const img = path.join(tmp.dir, 'inplace.qcow2');
    await createImage(img, 'qcow2', 16 * MiB);
    // The first half allocated (COPIED clusters), the second never written.
    await qemuIo(img, 'qcow2', ['write -P 0x11 0 8M']);
    const ref = Buffer.alloc(16 * MiB);
    ref.fill(0x11, 0, 8 * MiB);
    const mp = dir('m-inplace');
    await mounts.mount(['--rw', img, mp]);
    const flat = path.join(mp, 'inplace.raw');
    const { writes, served } = await writeUntilWorkersDo(mp, flat, ref, 16 * MiB, 512);
    expect(served, 'writes the workers wrote in place').to.be.greaterThan(0);
    expect(await directMd5(flat), 'read back through the mount').to.equal(crypto.createHash('md5').update(ref).digest('hex'));
    await mounts.unmount(mp);
    await runOk('qemu-img', ['check', img]);
    const back = path.join(tmp.dir, 'inplace-back.raw');
    await convertToRaw(img, back, 'qcow2');
    expect(await md5File(back)).to.equal(crypto.createHash('md5').update(ref).digest('hex'));
    // Clusters of the second half that a write allocated are the JS thread's: qemu-img map shows them allocated.
    expect(writes).to.be.greaterThan(served);
  });

  // The table-mapped formats take overwrites of allocated blocks from the workers too,
  // byte-granular ones included (vpc, vmdk, vhdx and parallels sit behind the alignment filter).
  const mappedWrites: [format: string, opts: Record<string, string>][] = [
    ['vdi', {}],
    ['vpc', { force_size: 'on' }],
    ['vmdk', { subformat: 'monolithicSparse' }],
    ['vhdx', { block_size: '1M' }],
    ['parallels', {}],
    ['qed', {}],
    ['qcow', {}],
    ['vmdk', { subformat: 'monolithicFlat' }],
    ['vmdk', { subformat: 'twoGbMaxExtentSparse' }],
    ['vpc', { subformat: 'fixed', force_size: 'on' }],
    ['qcow2', { data_file: 'DATA' }],
  ];
  for (const [format, opts] of mappedWrites) {
    const name = caseName(format, opts);
    it(`overwrites allocated ${name} blocks from the workers in place, unaligned writes included, every byte where qemu-img finds it`, async () => {
      const size = 16 * MiB;
      const img = path.join(tmp.dir, `inplace-${name}.${format}`);
      await createImage(img, format, size, optsFor(opts, img));
      await qemuIo(img, format, ['write -P 0x11 0 8M']);
      const ref = Buffer.alloc(size);
      ref.fill(0x11, 0, 8 * MiB);
      const mp = dir(`m-inplace-${name}`);
      await mounts.mount(['--rw', '-f', format, img, mp]);
      const flat = path.join(mp, `inplace-${name}.raw`);
      const { served } = await writeUntilWorkersDo(mp, flat, ref, 8 * MiB, 100);
      expect(served, 'writes the workers wrote in place').to.be.greaterThan(0);
      const want = crypto.createHash('md5').update(ref).digest('hex');
      expect(await directMd5(flat), 'read back through the mount').to.equal(want);
      await mounts.unmount(mp);
      if (qemuChecks(format)) await runOk('qemu-img', ['check', '-f', format, img]);
      const back = path.join(tmp.dir, `inplace-${name}-back.raw`);
      await convertToRaw(img, back, format);
      expect(await md5File(back)).to.equal(want);
    });
  }

  it('reads and overwrites a qcow whose 4 KiB clusters were written in random order (no two together in the file) from the workers, every byte where qemu-img finds it', async () => {
    const size = 32 * MiB;
    const img = path.join(tmp.dir, 'scattered.qcow');
    await createImage(img, 'qcow', size);
    // The first 8 MiB cluster by cluster in a shuffled order, each its own pattern: a 64 KiB
    // piece of the disk is 16 clusters from all over the file, never one host run.
    const clusters = [...Array((8 * MiB) / 4096).keys()].sort(() => Math.random() - 0.5);
    for (let i = 0; i < clusters.length; i += 512) {
      await qemuIo(img, 'qcow', clusters.slice(i, i + 512).map((c) => `write -P 0x${((c % 251) + 1).toString(16)} ${c * 4096} 4k`));
    }
    const raw = path.join(tmp.dir, 'scattered.raw');
    await convertToRaw(img, raw, 'qcow');
    const ref = fs.readFileSync(raw);
    const mp = dir('m-scattered');
    await mounts.mount(['--rw', img, mp]);
    const flat = path.join(mp, 'scattered.raw');
    expect(await untilWorkersServe(flat, mp, await md5File(raw), 8), 'reads answered by the workers').to.be.at.least(8);
    // 4 KiB reads of every scattered cluster: one granule of the map each.
    const before = await workerReads(mp);
    expect(await directMd5(flat, '4k', 0, 2048)).to.equal(await pieceMd5(raw, 4096, 0, 2048));
    expect((await workerReads(mp, before + 1024)) - before, 'of 2048 scattered 4 KiB reads, by the workers').to.be.at.least(1024);
    const { served } = await writeUntilWorkersDo(mp, flat, ref, 8 * MiB, 100);
    expect(served, 'overwrites of scattered clusters the workers wrote in place').to.be.greaterThan(0);
    const want = crypto.createHash('md5').update(ref).digest('hex');
    expect(await directMd5(flat), 'read back through the mount').to.equal(want);
    await mounts.unmount(mp);
    const back = path.join(tmp.dir, 'scattered-back.raw');
    await convertToRaw(img, back, 'qcow');
    expect(await md5File(back)).to.equal(want);
  });

  for (const c of [
    { name: 'luks', format: 'luks', opts: 'key-secret=s0,iter-time=10', driver: 'driver=luks,key-secret=s0' },
    { name: 'qcow2 with LUKS encryption', format: 'qcow2', opts: 'encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10', driver: 'driver=qcow2,encrypt.key-secret=s0' },
  ]) {
    it(`decrypts a mounted ${c.name} image in the workers: every byte as qemu-img reads it, before and after writes through the mount${c.format === 'luks' ? ', overwrites of whole sectors encrypted and written by the workers' : ''}`, async () => {
      const pass = 'worker pass';
      const secret = ['--object', `secret,id=s0,data=${pass}`];
      const img = path.join(tmp.dir, `enc.${c.format}`);
      const opts = (file: string): string => `${c.driver},file.filename=${file}`;
      const made = await runTimingPbkdf('qemu-img', ['create', '-q', ...secret, '-f', c.format, '-o', c.opts, img, '16M']);
      expect(made.code, made.stderr).to.equal(0);
      // Pieces written last first: a qcow2's clusters lie against the guest's order (its IVs count host sectors).
      const io = [...Array(16).keys()].reverse().map((i) => `write -P 0x${(0x41 + i).toString(16)} ${i * MiB} 640k`);
      await runOk('qemu-io', [...secret, '--image-opts', ...io.flatMap((x) => ['-c', x]), opts(img)]);
      const raw = path.join(tmp.dir, `enc-${c.format}.raw`);
      await runOk('qemu-img', ['convert', ...secret, '--image-opts', opts(img), '-O', 'raw', raw]);
      const ref = fs.readFileSync(raw);
      const mp = dir(`m-enc-${c.format}`);
      await mounts.mount(['--rw', '--secret', pass, img, mp]);
      const flat = path.join(mp, 'enc.raw');
      const md5 = (b: Buffer): string => crypto.createHash('md5').update(b).digest('hex');
      expect(await untilWorkersServe(flat, mp, md5(ref), 8), 'reads the workers decrypted').to.be.at.least(8);
      // Writes through the mount (parts of sectors too: the main thread's), then read by the workers again.
      const fd = await fs.promises.open(flat, 'r+');
      try {
        for (let i = 0; i < 48; i++) {
          const at = i % 2 === 0 ? crypto.randomInt(0, 4095) * 4096 + (i % 3 === 0 ? 512 : 0) : crypto.randomInt(1, 16 * MiB - 8192);
          const data = crypto.randomBytes(i % 2 === 0 ? 4096 : 1 + crypto.randomInt(0, 6000));
          await fd.write(data, 0, data.length, at);
          data.copy(ref, at);
        }
      } finally {
        await fd.close();
      }
      if (c.format === 'luks') {
        // LUKS: an overwrite needs nothing of the format; a worker encrypts it with its own cipher (read-map-runs.ts writeInPlace).
        const { served } = await writeUntilWorkersDo(mp, flat, ref, 16 * MiB, 100);
        expect(served, 'overwrites the workers encrypted and wrote').to.be.greaterThan(0);
      }
      const before = await workerReads(mp);
      expect(await untilWorkersServe(flat, mp, md5(ref), before + 8) - before, 'reads the workers decrypted after the writes').to.be.at.least(8);
      // qcow2's encrypted clusters stay the main thread's (Qcow2Node.inPlaceWrites).
      if (c.format === 'qcow2') expect((await mountCounters(mp)).workerWrites ?? 0, 'nothing of an encrypted qcow2 is written around the graph').to.equal(0);
      await mounts.unmount(mp);
      if (c.format === 'qcow2') await runOk('qemu-img', ['check', ...secret, '--image-opts', opts(img)]);
      await runOk('qemu-img', ['convert', ...secret, '--image-opts', opts(img), '-O', 'raw', raw]);
      expect(await md5File(raw), 'qemu-img reads what the mount wrote').to.equal(md5(ref));
    });
  }

  it('overwrites a qcow2 read whole before its first write from the workers in place (the read map walked again at that write)', async () => {
    const size = 16 * MiB;
    const img = path.join(tmp.dir, 'readfirst.qcow2');
    await createImage(img, 'qcow2', size);
    await qemuIo(img, 'qcow2', [`write -P 0x61 0 ${size}`]);
    const ref = Buffer.alloc(size, 0x61);
    const mp = dir('m-readfirst');
    await mounts.mount(['--rw', img, mp]);
    const flat = path.join(mp, 'readfirst.raw');
    // Read whole until the workers answer: the map's windows are walked before any write.
    expect(await untilWorkersServe(flat, mp, crypto.createHash('md5').update(ref).digest('hex'), 4), 'reads answered by the workers').to.be.at.least(4);
    const fd = await fs.promises.open(flat, 'r+');
    try {
      // The first write (the JS thread's: qcow2's first change runs its hook) walks its window again.
      const first = crypto.randomBytes(4096);
      await fd.write(first, 0, first.length, 0);
      first.copy(ref, 0);
      await new Promise((r) => setTimeout(r, 300));
      // Then one 4 KiB write into each of 64 other granules, none written before: a map that
      // kept the read-only entries hands every one of them to the JS thread.
      const granules = [...Array(size / GRANULE - 1).keys()].map((g) => g + 1).sort(() => Math.random() - 0.5).slice(0, 64);
      for (const g of granules) {
        const data = crypto.randomBytes(4096);
        const at = g * GRANULE + crypto.randomInt(0, GRANULE / 4096) * 4096;
        await fd.write(data, 0, data.length, at);
        data.copy(ref, at);
      }
    } finally {
      await fd.close();
    }
    const served = (await untilWorkerWrites(mp, 48)).workerWrites ?? 0;
    expect(served, 'writes the workers wrote in place, of 64').to.be.at.least(48);
    await expectWrittenQcow2(mp, flat, img, ref);
  });

  it('writes the overwrites of a writer that allocates every other write in place (the workers, or the JS thread when its spin took them), every byte where qemu-img finds it', async () => {
    // A new data cluster starts no epoch (only tables and frees do), so the overwrites
    // between allocations stay writable in place; those the JS thread's spin reads are
    // written in place there too (FsOps.writeAround). With every allocation an epoch, the
    // test fails (checked).
    const { img, ref, mp, flat, fd, write } = await halfWrittenMount('mixed', 0x31);
    try {
      // 128 new clusters of the second half, one 4 KiB write each, each after an overwrite in the first.
      const fresh = [...Array(128).keys()].sort(() => Math.random() - 0.5);
      for (const c of fresh) {
        await write(crypto.randomInt(1, (8 * MiB) / 4096) * 4096);
        await write(8 * MiB + c * 64 * KiB + crypto.randomInt(0, 16) * 4096);
      }
    } finally {
      await fd.close();
    }
    expect((await untilWorkerWrites(mp, 96)).workerWrites, 'overwrites written in place, of 128').to.be.at.least(96);
    await expectWrittenQcow2(mp, flat, img, ref);
  });

  it('with the workers parked for an allocating writer, writes its overwrites in place on the JS thread (no change through the graph), every byte where qemu-img finds it', async () => {
    const { img, ref, mp, flat, fd, write } = await halfWrittenMount('parked', 0x41);
    try {
      // 32 allocating writes in a row park the workers (fs/fuse-session.ts writerMode, after 16)...
      for (let c = 0; c < 32; c++) await write(8 * MiB + c * 64 * KiB);
      // ...and the JS thread reads the 64 overwrites that follow itself (it lets the workers go after 256).
      for (let i = 0; i < 64; i++) await write(crypto.randomInt(1, (8 * MiB) / 4096) * 4096);
    } finally {
      await fd.close();
    }
    const c = await untilWorkerWrites(mp, 64);
    expect(c.writerParks, 'the workers parked').to.be.at.least(1);
    expect(c.workerWrites, 'overwrites written in place, of 64').to.be.at.least(64);
    await expectWrittenQcow2(mp, flat, img, ref);
  });

  it('takes a writer\'s allocating 4 KiB writes on the JS thread\'s own descriptor, with readers beside it, every byte where qemu-img finds it', async () => {
    // After a WRITE it served, the JS thread reads the next request itself (spinForWrites):
    // a WRITE or, with the readers, a READ the workers would have served. Both kinds of
    // reply must reach the descriptor the request came from.
    const size = 32 * MiB;
    const img = path.join(tmp.dir, 'jsspin.qcow2');
    await createImage(img, 'qcow2', size);
    const ref = Buffer.alloc(size);
    const mp = dir('m-jsspin');
    await mounts.mount(['--rw', img, mp]);
    const flat = path.join(mp, 'jsspin.raw');
    const fd = await fs.promises.open(flat, 'r+');
    let writing = true;
    try {
      const reader = async (): Promise<void> => {
        const buf = Buffer.alloc(64 * KiB);
        while (writing) await fd.read(buf, 0, buf.length, crypto.randomInt(0, size / buf.length) * buf.length);
      };
      const readers = [reader(), reader()];
      try {
        for (let i = 0; i < 1500; i++) {
          const at = crypto.randomInt(0, size / 4096) * 4096;
          const data = crypto.randomBytes(4096);
          await fd.write(data, 0, data.length, at);
          data.copy(ref, at);
          // A writer alone for a while, then beside the readers again.
          if (i === 500) {
            writing = false;
            await Promise.all(readers);
          }
        }
      } finally {
        writing = false;
        await Promise.all(readers);
      }
    } finally {
      await fd.close();
    }
    await expectWrittenQcow2(mp, flat, img, ref);
  });

  /**
   * dd `count` writes of `bs` bytes into a new qcow2 of `cluster` clusters (each write
   * allocates, so each is the JS thread's to serve) under `env`; every byte read back
   * through the mount and qemu-img check; the transport counters' change over the dd.
   */
  const countedWriter = async (
    name: string,
    env: Record<string, string>,
    o: { count: number; bs: number; cluster: number },
  ): Promise<{ handedOver: number; spinTakes: number; writerParks: number; workerReadsAfter: number }> => {
    const data = path.join(tmp.dir, `${name}-src.raw`);
    const bytes = crypto.randomBytes(o.count * o.bs);
    fs.writeFileSync(data, bytes);
    const want = crypto.createHash('md5').update(bytes).digest('hex');
    const img = path.join(tmp.dir, `${name}.qcow2`);
    await createImage(img, 'qcow2', Math.max(16 * MiB, 2 * o.count * o.bs), { cluster_size: String(o.cluster) });
    const mp = dir(`m-${name}`);
    await withEnv(env, () => mounts.mount(['--rw', img, mp]));
    const flat = path.join(mp, `${name}.raw`);
    // The counters appear once the workers serve (they start after the mount is ready).
    let before = await mountCounters(mp);
    for (const deadline = Date.now() + 10_000; before.handedOver === undefined && Date.now() < deadline; before = await mountCounters(mp)) {
      await new Promise((r) => setTimeout(r, 250));
    }
    expect(before.handedOver, 'workers up').to.not.equal(undefined);
    const r = await run('dd', [`if=${data}`, `of=${flat}`, `bs=${o.bs}`, 'oflag=direct', 'conv=notrunc', 'status=none']);
    expect(r.code, r.stderr).to.equal(0);
    let after = await mountCounters(mp);
    for (const deadline = Date.now() + 5000; (after.handedOver ?? 0) + (after.spinTakes ?? 0) - before.handedOver! - before.spinTakes! < o.count && Date.now() < deadline; ) {
      await new Promise((r) => setTimeout(r, 250));
      after = await mountCounters(mp);
    }
    // A reader after the writer: the workers serve it again (a parked writer's mount lets them go at its first READ).
    const mib = (o.count * o.bs) / MiB;
    expect(await directMd5(flat, '1M', 0, mib)).to.equal(want);
    expect(await directMd5(flat, '1M', 0, mib), 'read again').to.equal(want);
    // The counters are published once a second.
    let read = await mountCounters(mp);
    for (const deadline = Date.now() + 5000; (read.workerReads ?? 0) === (after.workerReads ?? 0) && Date.now() < deadline; ) {
      await new Promise((r) => setTimeout(r, 250));
      expect(await directMd5(flat, '1M', 0, mib), 'read again').to.equal(want);
      read = await mountCounters(mp);
    }
    const human = await tsmount(['--list']);
    expect(human.stdout).to.match(/FUSE workers: reads \d+.*, requests handed to the main thread \d+, read by its spin instead \d+, parked for a writer \d+ times/);
    await mounts.unmount(mp);
    await runOk('qemu-img', ['check', img]);
    return {
      handedOver: after.handedOver! - before.handedOver!,
      spinTakes: after.spinTakes! - before.spinTakes!,
      writerParks: after.writerParks! - before.writerParks!,
      workerReadsAfter: (read.workerReads ?? 0) - (after.workerReads ?? 0),
    };
  };

  it('counts the requests the workers hand over and those the JS thread\'s spin reads instead (tsmount --list), spin on and off', async () => {
    const o = { count: 1024, bs: 4096, cluster: 4096 };
    const on = await countedWriter('spin-on', { TSMOUNT_FUSE_JS_SPIN: '1', TSMOUNT_FUSE_PARK: '0' }, o);
    // Every allocating WRITE went to the JS thread one way or the other (and dd's other requests too).
    expect(on.handedOver + on.spinTakes, JSON.stringify(on)).to.be.at.least(o.count);
    expect(on.spinTakes, JSON.stringify(on)).to.be.above(0);
    expect(on.writerParks, JSON.stringify(on)).to.equal(0);
    const off = await countedWriter('spin-off', { TSMOUNT_FUSE_JS_SPIN: '0', TSMOUNT_FUSE_PARK: '0' }, o);
    expect(off.spinTakes, JSON.stringify(off)).to.equal(0);
    expect(off.handedOver, JSON.stringify(off)).to.be.at.least(o.count);
  });

  for (const [bs, cluster] of [[MiB, 64 * KiB], [4096, 4096]] as const) {
    it(`parks the workers for a writer whose every WRITE allocates (${bs / KiB} KiB writes), and lets them go for the next reader`, async () => {
      const o = { count: bs === MiB ? 64 : 2048, bs, cluster };
      const parked = await countedWriter(`park-${bs}`, { TSMOUNT_FUSE_JS_SPIN: '1' }, o);
      expect(parked.writerParks, JSON.stringify(parked)).to.be.at.least(1);
      // The first WRITEs are handed over until the streak is long enough; the rest the JS thread reads itself.
      expect(parked.handedOver, JSON.stringify(parked)).to.be.below(o.count / 2);
      expect(parked.workerReadsAfter, JSON.stringify(parked)).to.be.above(0);
      const not = await countedWriter(`nopark-${bs}`, { TSMOUNT_FUSE_JS_SPIN: '0', TSMOUNT_FUSE_PARK: '0' }, o);
      expect(not.writerParks, JSON.stringify(not)).to.equal(0);
      expect(not.handedOver, JSON.stringify(not)).to.be.at.least(o.count);
    });
  }

  it('serves a sequential reader from the workers all the way (the map is published ahead of it)', async () => {
    const img = path.join(tmp.dir, 'seq.qcow2');
    await createImage(img, 'qcow2', 4 * WINDOW);
    await qemuIo(img, 'qcow2', [`write -P 0x5a 0 ${4 * WINDOW}`]);
    const mp = dir('m-seq');
    await mounts.mount([img, mp]);
    const flat = path.join(mp, 'seq.raw');
    // Only the first MiB until the workers answer it (they start with the mount; its miss published windows 0 and 1).
    const head = await directMd5(flat, '1M', 0, 1);
    for (let pass = 0; pass < 40 && (await mountCounters(mp)).workerReads === undefined; pass++) {
      expect(await directMd5(flat, '1M', 0, 1)).to.equal(head);
      await new Promise((r) => setTimeout(r, 250));
    }
    let before = await mountCounters(mp);
    for (const deadline = Date.now() + 5000; Date.now() < deadline; ) {
      await new Promise((r) => setTimeout(r, 1100));
      const c = await mountCounters(mp);
      if (c.reads === before.reads) break;
      before = c;
    }
    // One more pass, sequential, 1 MiB at a time: every read by a worker, none on the JS thread.
    const r = await run('dd', [`if=${flat}`, 'of=/dev/null', 'iflag=direct', 'bs=1M', 'status=none']);
    expect(r.code, r.stderr).to.equal(0);
    let after = await mountCounters(mp);
    for (const deadline = Date.now() + 5000; (after.reads ?? 0) < (before.reads ?? 0) + 256 && Date.now() < deadline; after = await mountCounters(mp)) await new Promise((res) => setTimeout(res, 250));
    const reads = (after.reads ?? 0) - (before.reads ?? 0);
    const byWorkers = (after.workerReads ?? 0) - (before.workerReads ?? 0);
    expect(reads).to.be.at.least(256);
    expect(reads - byWorkers, `reads on the JS thread out of ${reads}`).to.be.at.most(2);
    await mounts.unmount(mp);
  });
});

describe('the read map (fs/read-map.ts), in-process', function () {
  this.timeout(120_000);
  let tmp: { dir: string; cleanup: () => void };
  before(() => (tmp = tempDir('read-map')));
  after(() => tmp.cleanup());

  const open = async (file: string, readOnly: boolean, secret?: string): Promise<BlockNode> =>
    (await openGraph([file], { readOnly, cache: 'writeback', cacheSize: 32 << 20, locking: 'off', forceShare: false, shareRw: false, secret }))[0]!;
  /** A 4 KiB write with the map's change around it, and no walk after: the map as the change left it. */
  const changeWrite = async (map: ReadMap, node: BlockNode, at: number, fill: number): Promise<void> => {
    const c = map.beginWrite(at, 4096);
    await node.write(at, Buffer.alloc(4096, fill));
    map.endWrite(c.change);
  };
  /** Every block-status walk of the node from now on, as [offset, length]. */
  const recordWalks = (node: BlockNode): number[][] => {
    const walks: number[][] = [];
    const status = node.blockStatus.bind(node);
    node.blockStatus = (offset, length) => (walks.push([offset, length]), status(offset, length));
    return walks;
  };
  /** [offset, offset + length) as a worker answers it from the map (read-map-runs.ts), or undefined when the map lacks some of it. */
  const readFromMap = (map: ReadMap, offset: number, length: number): Buffer | undefined => {
    const runs: number[] = [];
    const count = readRuns(map.table, offset, length, [0, 0, 0, 0], runs);
    if (count < 0) return undefined;
    const out = Buffer.alloc(length);
    expect(fillRuns(runs, count, out, 0, threadCiphers(map), granuleOf(map.table)), `the runs of ${offset}+${length}`).to.equal(true);
    return out;
  };
  /** A 4 KiB write as the server serves one on the JS thread: the change around it, then wrote() and its walks. */
  const serveWrite = async (map: ReadMap, node: BlockNode, at: number, fill: number): Promise<void> => {
    await changeWrite(map, node, at, fill);
    map.wrote(at, 4096);
    await map.idle();
  };

  it('publishes data, zeros and backing data as host locations holding exactly the guest bytes, and whole zlib clusters as streams the threads inflate', async () => {
    const base = path.join(tmp.dir, 'b.qcow2');
    await createImage(base, 'qcow2', 8 * MiB);
    await qemuIo(base, 'qcow2', ['write -P 0x21 0 2M', 'write -c -P 0x22 4M 64k']);
    const top = path.join(tmp.dir, 't.qcow2');
    await createImage(top, 'qcow2', 8 * MiB, {}, { file: base, format: 'qcow2' });
    await qemuIo(top, 'qcow2', ['write -P 0x31 1M 256k', 'write -z 1536k 64k', 'write -c -P 0x32 3M 64k']);
    const node = await open(top, true);
    try {
      const map = new ReadMap(node);
      map.miss(0, 4096);
      await map.idle();
      const hit = [0, 0, 0, 0];
      const compressed: number[] = [];
      for (let g = 0; g < (8 * MiB) / GRANULE; g++) {
        expect(lookup(map.table, g, hit), `granule at ${g * GRANULE} published`).to.equal(true);
        const want = Buffer.alloc(GRANULE);
        await node.read(g * GRANULE, want);
        if (hit[3]! < 0) {
          // A compressed cluster (the top's at 3M, the backing file's at 4M): its stream, never written in place.
          compressed.push(g * GRANULE);
          expect(hit[2], 'not writable in place').to.equal(0);
          expect(readFromMap(map, g * GRANULE, GRANULE)!.equals(want), `granule at ${g * GRANULE} inflated`).to.equal(true);
          continue;
        }
        const got = Buffer.alloc(GRANULE);
        if (hit[0]! >= 0) fs.readSync(hit[0]!, got, 0, GRANULE, hit[1]!);
        expect(got.equals(want), `granule at ${g * GRANULE}`).to.equal(true);
      }
      expect(compressed).to.deep.equal([3 * MiB, 4 * MiB]);
      // Reads that start, end or lie inside a compressed cluster, and the whole disk.
      for (const [at, n] of [[3 * MiB - 5000, 70_000], [3 * MiB + 100, 1000], [4 * MiB - 1, 65_538], [4 * MiB + 65_535, 1], [0, 8 * MiB]] as const) {
        const want = Buffer.alloc(n);
        await node.read(at, want);
        expect(readFromMap(map, at, n)!.equals(want), `bytes at ${at}+${n}`).to.equal(true);
      }
      // A damaged stream is refused (the main thread answers such a READ, with its error).
      expect(lookup(map.table, (3 * MiB) / GRANULE, hit)).to.equal(true);
      const fd = fs.openSync(top, 'r+');
      try {
        fs.writeSync(fd, Buffer.alloc(64, 0xff), 0, 64, hit[1]!);
      } finally {
        fs.closeSync(fd);
      }
      const runs: number[] = [];
      const count = readRuns(map.table, 3 * MiB, GRANULE, [0, 0, 0, 0], runs);
      expect(count).to.equal(RUN);
      expect(fillRuns(runs, count, Buffer.alloc(GRANULE), 0, undefined, granuleOf(map.table))).to.equal(false);
      // Without the cluster size the threads inflate nothing.
      const ok = readRuns(map.table, 4 * MiB, GRANULE, [0, 0, 0, 0], runs);
      expect(fillRuns(runs, ok, Buffer.alloc(GRANULE), 0)).to.equal(false);
      expect(fillRuns(runs, ok, Buffer.alloc(GRANULE), 0, undefined, GRANULE)).to.equal(true);
    } finally {
      await node.close();
    }
  });

  it('leaves out compressed clusters larger than a granule; 4 KiB zlib clusters are 4 KiB granules; zstd clusters are their frames; streamOptimized vmdk grains are marker and zlib stream; a qcow\'s clusters raw deflate of their exact length', async () => {
    // Hex text: each cluster compresses to about half, and no two clusters are alike.
    const text = Buffer.from(crypto.randomBytes(MiB).toString('hex'));
    const raw = path.join(tmp.dir, 'text.raw');
    fs.writeFileSync(raw, text);
    const cases = [
      { name: 'zstd', args: ['-O', 'qcow2', '-c', '-o', 'cluster_size=65536,compression_type=zstd'], stream: STREAM_ZSTD },
      { name: '128k', args: ['-O', 'qcow2', '-c', '-o', 'cluster_size=131072'], stream: 0 },
      { name: '4k', args: ['-O', 'qcow2', '-c', '-o', 'cluster_size=4096'], stream: STREAM_DEFLATE_RAW },
      { name: '64k', args: ['-O', 'qcow2', '-c', '-o', 'cluster_size=65536'], stream: STREAM_DEFLATE_RAW },
      { name: 'vmdk', args: ['-O', 'vmdk', '-o', 'subformat=streamOptimized'], stream: STREAM_VMDK_GRAIN },
      { name: 'qcow', args: ['-O', 'qcow', '-c'], stream: STREAM_DEFLATE_RAW },
    ];
    for (const c of cases) {
      const img = path.join(tmp.dir, `c-${c.name}.img`);
      await convertFromRaw(raw, img, c.args);
      const node = await open(img, true);
      try {
        const map = new ReadMap(node);
        map.miss(0, 4096);
        await map.idle();
        const unit = granuleOf(map.table);
        const hit = [0, 0, 0, 0, 0];
        let streams = 0;
        for (let g = 0; g < (2 * MiB) / unit; g++) {
          if (!lookup(map.table, g, hit) || hit[3]! >= 0) continue;
          streams++;
          expect(hit[4], `${c.name}: the stream's kind`).to.equal(c.stream);
        }
        if (c.stream === 0) {
          expect(streams, c.name).to.equal(0);
          expect(readFromMap(map, 0, 4096), `${c.name}: the main thread's`).to.equal(undefined);
          continue;
        }
        // qemu-img stores a qcow2 cluster that does not shrink as it is: most are compressed here.
        expect(streams, c.name).to.be.above((MiB / unit) * 1.5);
        for (const [at, n] of [[0, 2 * MiB], [unit - 10, 20], [5 * unit + 3, 3 * unit]] as const) {
          expect(readFromMap(map, at, n)!.equals(text.subarray(at, at + n)), `${c.name}: bytes at ${at}+${n}`).to.equal(true);
        }
        if (c.stream !== STREAM_VMDK_GRAIN) continue;
        // A grain marker whose size is 0, or says more than the entry reaches: refused (the main thread answers).
        expect(lookup(map.table, 1, hit)).to.equal(true);
        const runs: number[] = [];
        const count = readRuns(map.table, unit, unit, [0, 0, 0, 0, 0], runs);
        const fd = fs.openSync(img, 'r+');
        try {
          for (const size of [0, 3 * unit]) {
            const b = Buffer.alloc(4);
            b.writeUInt32LE(size);
            fs.writeSync(fd, b, 0, 4, hit[1]! + 8);
            expect(fillRuns(runs, count, Buffer.alloc(unit), 0, undefined, unit), `marker size ${size}`).to.equal(false);
          }
        } finally {
          fs.closeSync(fd);
        }
      } finally {
        await node.close();
      }
    }
  });

  it('forgets what a write changes before it starts, and drops a walk that a change overlapped', async () => {
    const img = path.join(tmp.dir, 'w.qcow2');
    await createImage(img, 'qcow2', 8 * MiB);
    await qemuIo(img, 'qcow2', ['write -P 0x41 0 4M']);
    const node = await open(img, false);
    try {
      const map = new ReadMap(node);
      const hit = [0, 0];
      map.miss(0, 4096);
      await map.idle();
      expect(lookup(map.table, 0, hit)).to.equal(true);
      expect(lookup(map.table, 100, hit)).to.equal(true);
      const first = map.beginWrite(GRANULE - 1, 2);
      expect(first.drained, 'no worker writes in flight').to.equal(undefined);
      expect(lookup(map.table, 0, hit), 'granule 0, written').to.equal(false);
      expect(lookup(map.table, 1, hit), 'granule 1, written').to.equal(false);
      expect(lookup(map.table, 2, hit), 'granule 2, untouched').to.equal(true);
      // No walk while a change is in flight.
      map.miss(0, 4096);
      await map.idle();
      expect(lookup(map.table, 0, hit)).to.equal(false);
      await node.write(GRANULE - 1, Buffer.from([1, 2]));
      map.endWrite(first.change);
      // A walk that a change of its window starts during is thrown away.
      map.miss(0, 4096);
      const second = map.beginWrite(6 * MiB, 4096);
      await map.idle();
      expect(lookup(map.table, 0, hit), 'walk overlapped by a change').to.equal(false);
      map.endWrite(second.change);
      map.miss(0, 4096);
      await map.idle();
      expect(lookup(map.table, 0, hit)).to.equal(true);
      const got = Buffer.alloc(GRANULE);
      fs.readSync(hit[0]!, got, 0, GRANULE, hit[1]!);
      expect(got[GRANULE - 1]).to.equal(1);
      // A resize forgets everything.
      const resize = map.beginResize();
      expect(lookup(map.table, 2, hit)).to.equal(false);
      map.endResize(resize.change);
    } finally {
      await node.close();
    }
  });

  it('publishes COPIED clusters as writable in place; a change keeps the workers out, waits for their writes, and a new epoch follows a table\'s allocation, not a data cluster\'s', async () => {
    const img = path.join(tmp.dir, 'wip.qcow2');
    // 1 GiB: a write past the first L2 table's 512 MiB allocates a table.
    await createImage(img, 'qcow2', 1024 * MiB);
    await qemuIo(img, 'qcow2', ['write -P 0x41 0 4M']);
    const ro = await open(img, true);
    try {
      const map = new ReadMap(ro);
      const hit = [0, 0, 0];
      map.miss(0, 4096);
      await map.idle();
      expect(lookup(map.table, 0, hit) && hit[2], 'read-only: never writable').to.equal(0);
    } finally {
      await ro.close();
    }
    const node = await open(img, false);
    try {
      const map = new ReadMap(node);
      const hit = [0, 0, 0];
      map.miss(0, 4096);
      await map.idle();
      expect(lookup(map.table, 0, hit) && hit[2], 'before the first write (its hook has not run)').to.equal(0);
      await changeWrite(map, node, 0, 0x42);
      map.miss(0, 4096);
      await map.idle();
      expect(lookup(map.table, 1, hit), 'granule 1').to.equal(true);
      expect(hit[2], 'an allocated COPIED cluster').to.equal(1);
      expect(lookup(map.table, 100, hit), 'granule 100 (unallocated)').to.equal(true);
      expect(hit[0], 'zeros').to.equal(-1);
      expect(hit[2], 'never written in place').to.equal(0);
      // A worker's write in flight: the change waits for it, and keeps the workers out meanwhile.
      Atomics.add(map.table, H_WRITES_IN_FLIGHT, 1);
      const alloc = map.beginWrite(6 * MiB, 4096);
      expect(Atomics.load(map.table, H_CHANGING), 'workers see the change').to.equal(1);
      expect(alloc.drained, 'waits for the worker').to.be.instanceOf(Promise);
      let drained = false;
      void alloc.drained!.then(() => (drained = true));
      await new Promise((r) => setTimeout(r, 20));
      expect(drained).to.equal(false);
      Atomics.sub(map.table, H_WRITES_IN_FLIGHT, 1);
      await alloc.drained;
      // A write that allocates a data cluster (in a table that exists): the cluster holds data only, the epoch holds.
      await node.write(6 * MiB, Buffer.alloc(4096, 0x43));
      map.endWrite(alloc.change);
      expect(Atomics.load(map.table, H_CHANGING)).to.equal(0);
      expect(lookup(map.table, 1, hit) && hit[2], 'writable in place after a data cluster was allocated').to.equal(1);
      // A write that allocates an L2 table: nothing published before is writable any more.
      await changeWrite(map, node, 600 * MiB, 0x45);
      expect(lookup(map.table, 1, hit), 'still read from the map').to.equal(true);
      expect(hit[2], 'not written in place after a table was allocated').to.equal(0);
      // An overwrite changes no refcount: the epoch holds.
      map.miss(0, 4096);
      await map.idle();
      expect(lookup(map.table, 1, hit) && hit[2], 'published again').to.equal(1);
      await changeWrite(map, node, 2 * MiB, 0x44);
      expect(lookup(map.table, 1, hit) && hit[2], 'an overwrite keeps the epoch').to.equal(1);
    } finally {
      await node.close();
    }
  });

  // The table-mapped formats (MappedNode): an allocated block is writable in place once the
  // format allows it (vmdk: its CID changed; vhdx: its data write GUID; vpc: the block's
  // bitmap all set, as QEMU leaves it, or set by its first write), a new table (qed) starts a new epoch, a new data block not.
  const mappedCases: { format: string; opts: Record<string, string>; beforeFirstWrite: number }[] = [
    { format: 'vdi', opts: {}, beforeFirstWrite: 1 },
    { format: 'parallels', opts: {}, beforeFirstWrite: 1 },
    // 4 KiB clusters and two-cluster tables: an L2 table maps 4 MiB.
    { format: 'qed', opts: { cluster_size: '4K', table_size: '2' }, beforeFirstWrite: 1 },
    { format: 'qcow', opts: {}, beforeFirstWrite: 1 },
    { format: 'vpc', opts: { force_size: 'on' }, beforeFirstWrite: 1 },
    { format: 'vmdk', opts: { subformat: 'monolithicSparse' }, beforeFirstWrite: 0 },
    { format: 'vhdx', opts: { block_size: '1M' }, beforeFirstWrite: 0 },
  ];
  for (const c of mappedCases) {
    it(`publishes a ${c.format} image's allocated blocks as writable in place ${c.beforeFirstWrite ? 'from the start' : 'after its first write'}${c.format === 'qed' ? '; a new L2 table starts a new epoch, a new data cluster not' : ''}`, async () => {
      const img = path.join(tmp.dir, `wip-mapped.${c.format}`);
      await createImage(img, c.format, 64 * MiB, c.opts);
      await qemuIo(img, c.format, ['write -P 0x41 0 2M']);
      const node = await open(img, false);
      try {
        const map = new ReadMap(node);
        // Granules by their offset (qcow and this qed map 4 KiB granules).
        const at = (offset: number): number => offset / granuleOf(map.table);
        const hit = [0, 0, 0];
        map.miss(0, 4096);
        await map.idle();
        expect(lookup(map.table, at(64 * KiB), hit), 'granule at 64 KiB published').to.equal(true);
        expect(hit[0], 'in the image file').to.be.at.least(0);
        expect(hit[2], 'writable in place before the first write').to.equal(c.beforeFirstWrite);
        expect(lookup(map.table, at(6400 * KiB), hit) && hit[2], 'granule at 6400 KiB (unallocated): never').to.equal(0);
        // The first write (the format's hook, under the lock, so nothing is walked after
        // it), then an overwrite in place, which walks its granule.
        await serveWrite(map, node, 0, 0x42);
        await serveWrite(map, node, 0, 0x43);
        expect(lookup(map.table, 0, hit), 'granule 0 published after the writes').to.equal(true);
        expect(hit[2], 'writable in place after the first write').to.equal(1);
        expect(lookup(map.table, at(64 * KiB), hit) && hit[2], 'granule at 64 KiB').to.equal(1);
        if (c.format === 'qed') {
          // A data cluster in the first table: the epoch holds.
          await serveWrite(map, node, 3 * MiB, 0x43);
          expect(lookup(map.table, at(64 * KiB), hit) && hit[2], 'after a new data cluster').to.equal(1);
          // A write past the first table's 4 MiB allocates a table: nothing published before is writable (before a walk in the new epoch).
          await changeWrite(map, node, 40 * MiB, 0x45);
          expect(lookup(map.table, at(64 * KiB), hit), 'still read from the map').to.equal(true);
          expect(hit[2], 'not written in place after a table was allocated').to.equal(0);
        }
      } finally {
        await node.close();
      }
      if (qemuChecks(c.format)) await runOk('qemu-img', ['check', '-f', c.format, img]);
    });
  }

  it('publishes encrypted data (LUKS1, LUKS2 with 4 KiB sectors, qcow2 with LUKS) as ciphertext and its cipher, which a reading thread decrypts to the guest bytes, and a LUKS overwrite of whole sectors encrypts and writes; legacy AES (guest-numbered sectors) stays the main thread\'s', async () => {
    const pass = 'map pass';
    const size = 8 * MiB;
    const written: { file: string; at: number; data: Buffer }[] = [];
    const cases = [
      { file: 'e1.luks', args: ['-f', 'luks', '-o', 'iter-time=10'], sector: 512 },
      { file: 'e2.luks', args: ['-f', 'luks', '-o', 'luks-version=2,sector-size=4096,pbkdf=pbkdf2,iter-time=10'], sector: 4096 },
      { file: 'e3.qcow2', args: ['-f', 'qcow2', '-o', 'encrypt.format=luks,encrypt.iter-time=10,cluster_size=4096'], sector: 512 },
      { file: 'e4.qcow2', args: ['-f', 'qcow2', '-o', 'encrypt.format=aes'], sector: 512, legacy: true },
      // A cipher of our own (Serpent) and an IV generator with a hash: the spec a thread is given makes the same cipher.
      { file: 'e5.luks', args: ['-f', 'luks', '-o', 'cipher-alg=serpent-256,cipher-mode=cbc,ivgen-alg=essiv,ivgen-hash-alg=sha256,iter-time=10'], sector: 512 },
    ];
    for (const c of cases) {
      const file = path.join(tmp.dir, c.file);
      const r = await tsimg(['create', '-q', '--secret', pass, ...c.args, file, String(size)]);
      expect(r.code, r.stderr).to.equal(0);
      const node = await open(file, false, pass);
      try {
        // 64 KiB pieces written last first: a qcow2's clusters lie against the guest's order (its IVs count host sectors).
        for (let i = 31; i >= 0; i--) await node.write(i * 256 * KiB, crypto.randomBytes(64 * KiB));
        await node.flush();
        const map = new ReadMap(node);
        map.miss(0, 4096);
        await map.idle();
        const want = Buffer.alloc(size);
        await node.read(0, want);
        if (c.legacy) {
          expect(map.share().ciphers, `${c.file}: no cipher given out`).to.equal(undefined);
          expect(readFromMap(map, 0, 64 * KiB), `${c.file}: its data not in the map`).to.equal(undefined);
          continue;
        }
        expect(map.share().ciphers, `${c.file}: one cipher`).to.have.length(1);
        const got = readFromMap(map, 0, size);
        expect(got, `${c.file}: the whole disk in the map`).to.not.equal(undefined);
        expect(got!.equals(want), `${c.file}: decrypted from the map as the node reads it`).to.equal(true);
        const part = readFromMap(map, 3 * MiB + 8 * KiB, 100 * KiB);
        expect(part!.equals(want.subarray(3 * MiB + 8 * KiB, 3 * MiB + 108 * KiB)), `${c.file}: a read inside`).to.equal(true);
        // Not whole sectors: the thread gives it to the main thread.
        const runs: number[] = [];
        const count = readRuns(map.table, c.sector / 2, c.sector, [0, 0, 0, 0], runs);
        expect(count, `${c.file}: one run`).to.equal(RUN);
        expect(runs[3], `${c.file}: of the cipher`).to.equal(1);
        expect(fillRuns(runs, count, Buffer.alloc(c.sector), 0, threadCiphers(map)), `${c.file}: half sectors`).to.equal(false);
        expect(fillRuns(runs, count, Buffer.alloc(c.sector), 0), `${c.file}: without the cipher`).to.equal(false);
        // A write through the node: what the map says afterwards is decrypted as the node reads it.
        const change = map.beginWrite(MiB, 4096);
        await node.write(MiB, Buffer.alloc(4096, 0x5a));
        map.endWrite(change.change);
        expect(readFromMap(map, MiB, 4096), `${c.file}: forgotten at the write`).to.equal(undefined);
        map.miss(MiB, 4096);
        await map.idle();
        expect(readFromMap(map, MiB, 4096)!.equals(Buffer.alloc(4096, 0x5a)), `${c.file}: the written bytes`).to.equal(true);
        // LUKS: overwrites go around the graph, encrypted by the writing thread; qcow2's stay the main thread's.
        const luks = c.file.endsWith('.luks');
        const hit = [0, 0, 0, 0];
        expect(lookup(map.table, MiB / granuleOf(map.table), hit) && hit[2], `${c.file}: ${luks ? 'writable' : 'read-only'} entries`).to.equal(luks ? 1 : 0);
        expect(writeInPlace(map.table, MiB, 4096, Buffer.alloc(4096), 0, hit, []), `${c.file}: without its cipher, no write around the graph`).to.equal(false);
        if (!luks) continue;
        expect(writeInPlace(map.table, MiB + c.sector / 2, c.sector, Buffer.alloc(c.sector), 0, hit, [], threadCiphers(map)), `${c.file}: half sectors`).to.equal(false);
        const at = 2 * MiB + c.sector;
        const data = crypto.randomBytes(3 * c.sector + 8192);
        // Given at an offset in a larger buffer, as a worker holds a WRITE after its header.
        const request = Buffer.concat([Buffer.alloc(80, 0xee), data]);
        expect(writeInPlace(map.table, at, data.length, request, 80, hit, [], threadCiphers(map)), `${c.file}: whole sectors with the cipher`).to.equal(true);
        written.push({ file, at, data });
      } finally {
        await node.close();
      }
    }
    // Read back by the main thread's own decryption (sector numbers from guest offsets, not the host's).
    expect(written, 'LUKS1, LUKS2 and Serpent written around the graph').to.have.length(3);
    for (const w of written) {
      const node = await open(w.file, true, pass);
      try {
        const back = Buffer.alloc(w.data.length + 1024);
        await node.read(w.at - 512, back);
        expect(back.subarray(512, 512 + w.data.length).equals(w.data), `${path.basename(w.file)}: the bytes a thread encrypted and wrote`).to.equal(true);
      } finally {
        await node.close();
      }
    }
    // A plain qcow2 over a LUKS backing file: its own clusters plain, the rest the backing file's ciphertext.
    const top = path.join(tmp.dir, 'over-luks.qcow2');
    const r = await tsimg(['create', '-q', '-f', 'qcow2', '--secret', pass, '-b', path.join(tmp.dir, 'e1.luks'), '-F', 'luks', top, String(size)]);
    expect(r.code, r.stderr).to.equal(0);
    const node = await open(top, false, pass);
    try {
      for (let i = 0; i < 8; i++) await node.write(i * MiB + 64 * KiB, crypto.randomBytes(64 * KiB));
      const map = new ReadMap(node);
      map.miss(0, 4096);
      await map.idle();
      expect(map.share().ciphers, 'the backing file\'s cipher').to.have.length(1);
      const want = Buffer.alloc(size);
      await node.read(0, want);
      expect(readFromMap(map, 0, size)!.equals(want), 'the chain read from the map').to.equal(true);
    } finally {
      await node.close();
    }
  });

  it('never publishes an AES-encrypted qcow\'s clusters as writable in place (they are sealed under the lock); a plain qcow\'s from the start', async () => {
    const img = path.join(tmp.dir, 'wip-aes.qcow');
    await runOk('qemu-img', ['create', '-q', '-f', 'qcow', '--object', 'secret,id=s0,data=wip', '-o', 'encrypt.format=aes,encrypt.key-secret=s0', img, '16M']);
    const node = await open(img, false, 'wip');
    try {
      expect(node.inPlaceWrites, 'an encrypted qcow').to.not.equal(true);
      const map = new ReadMap(node);
      await serveWrite(map, node, 0, 0x42);
      await serveWrite(map, node, 0, 0x43);
      const hit = [0, 0, 0, 0];
      // Not published at all (no host descriptor), or published read-only.
      expect(lookup(map.table, 0, hit) ? hit[2] : 0, 'granule 0 writable after two writes').to.equal(0);
      const back = Buffer.alloc(4096);
      await node.read(0, back);
      expect(back.equals(Buffer.alloc(4096, 0x43)), 'read back decrypted').to.equal(true);
    } finally {
      await node.close();
    }
    const plain = path.join(tmp.dir, 'wip-plain.qcow');
    await createImage(plain, 'qcow', 16 * MiB);
    const p = await open(plain, false);
    try {
      expect(p.inPlaceWrites, 'a plain qcow').to.equal(true);
    } finally {
      await p.close();
    }
  });

  it('a corrupt image whose refcounts call a writable cluster free: a table allocated there ends its entry\'s writability; a data cluster allocated there is written there by the JS thread alike', async () => {
    // The data cluster of guest 0..64K gets refcount 0, so it is the first free cluster
    // (after the header, the refcount table and block, the L1 and the L2 table).
    const corrupt = async (name: string): Promise<{ img: string; host: number }> => {
      const img = path.join(tmp.dir, name);
      await createImage(img, 'qcow2', 1024 * MiB);
      await qemuIo(img, 'qcow2', ['write -P 0x71 0 4M']);
      const head = Buffer.alloc(64);
      const fd = fs.openSync(img, 'r+');
      try {
        fs.readSync(fd, head, 0, 64, 0);
        const l1 = Number(head.readBigUInt64BE(40));
        const reftable = Number(head.readBigUInt64BE(48));
        const e = Buffer.alloc(8);
        fs.readSync(fd, e, 0, 8, l1);
        fs.readSync(fd, e, 0, 8, Number(e.readBigUInt64BE(0) & 0x00fffffffffffe00n));
        const host = Number(e.readBigUInt64BE(0) & 0x00fffffffffffe00n);
        fs.readSync(fd, e, 0, 8, reftable);
        // 16-bit refcounts, 64 KiB clusters.
        fs.writeSync(fd, Buffer.alloc(2), 0, 2, Number(e.readBigUInt64BE(0)) + (host / (64 * KiB)) * 2);
        return { img, host };
      } finally {
        fs.closeSync(fd);
      }
    };
    const hit = [0, 0, 0];

    // A table there: the workers must not write guest 0 in place any more, and the JS thread refuses it (the overlap check).
    const t = await corrupt('alias-table.qcow2');
    let node = await open(t.img, false);
    try {
      const map = new ReadMap(node);
      await serveWrite(map, node, GRANULE, 0x72);
      expect(lookup(map.table, 0, hit) && hit[2], 'granule 0 writable in place').to.equal(1);
      expect(hit[1], 'at the cluster the refcounts call free').to.equal(t.host);
      await serveWrite(map, node, 600 * MiB, 0x73);
      expect(lookup(map.table, 0, hit) && hit[2], 'granule 0 after an L2 table was allocated at its cluster').to.equal(0);
      await node.write(0, Buffer.alloc(4096, 0x74)).then(
        () => expect.fail('the JS thread wrote over the new table'),
        (e: unknown) => expect(String(e)).to.match(/overlaps with active L2 table/),
      );
    } finally {
      await node.close().catch(() => undefined);
    }

    // A data cluster there: guest 0 and guest 6M share it, whoever writes; the workers may go on writing it.
    const d = await corrupt('alias-data.qcow2');
    node = await open(d.img, false);
    try {
      const map = new ReadMap(node);
      await serveWrite(map, node, GRANULE, 0x75);
      await serveWrite(map, node, 6 * MiB, 0x76);
      expect(lookup(map.table, 0, hit) && hit[2], 'granule 0 after a data cluster was allocated at its cluster').to.equal(1);
      expect(hit[1]).to.equal(d.host);
      // The JS thread's own write of guest 0 lands where a worker's would: guest 6M reads it.
      await node.write(0, Buffer.alloc(4096, 0x77));
      const back = Buffer.alloc(4096);
      await node.read(6 * MiB, back);
      expect(back.equals(Buffer.alloc(4096, 0x77)), 'guest 6M shares the host cluster of guest 0').to.equal(true);
    } finally {
      await node.close().catch(() => undefined);
    }
  });

  it('walks a window again whole at the first write after it was walked read-only, so its other clusters become writable in place', async () => {
    // A file read before its first write (a filesystem on a loop device, mounted, then
    // written): its windows were walked while qcow2 took no writes around it. A write
    // refreshing only its own granules left every other entry read-only for good.
    const img = path.join(tmp.dir, 'rewalk.qcow2');
    await createImage(img, 'qcow2', 8 * MiB);
    await qemuIo(img, 'qcow2', ['write -P 0x51 0 8M']);
    const node = await open(img, false);
    try {
      const map = new ReadMap(node);
      const hit = [0, 0, 0];
      map.miss(0, 4096);
      await map.idle();
      expect(lookup(map.table, 1, hit) && hit[2], 'walked before the first write').to.equal(0);
      // No READ comes to miss() after it: wrote() alone must walk the window again.
      await serveWrite(map, node, 0, 0x52);
      for (const g of [0, 1, 100]) expect(lookup(map.table, g, hit) && hit[2], `granule ${g} writable in place`).to.equal(1);
      // Walked writable now: a further overwrite refreshes its own granules only, and they stay writable.
      await serveWrite(map, node, 5 * MiB, 0x53);
      expect(lookup(map.table, (5 * MiB) / GRANULE, hit) && hit[2], 'the granule written').to.equal(1);
      expect(lookup(map.table, 1, hit) && hit[2], 'granule 1 still').to.equal(1);
    } finally {
      await node.close();
    }
  });

  it('walks a window of an epoch that ended again whole after 16 overwrites in a row, not after fewer (writes among allocations walk nothing)', async () => {
    const img = path.join(tmp.dir, 'stale.qcow2');
    await createImage(img, 'qcow2', 1024 * MiB);
    await qemuIo(img, 'qcow2', ['write -P 0x61 0 4M']);
    const node = await open(img, false);
    const write = (map: ReadMap, at: number): Promise<void> => serveWrite(map, node, at, 0x62);
    try {
      const map = new ReadMap(node);
      const hit = [0, 0, 0];
      await write(map, 0);
      expect(lookup(map.table, 10, hit) && hit[2], 'walked at the first write').to.equal(1);
      // A write that allocates data only: the epoch holds, and no walk for it.
      await write(map, 6 * MiB);
      expect(lookup(map.table, 10, hit) && hit[2], 'after a data cluster was allocated').to.equal(1);
      expect(lookup(map.table, (6 * MiB) / GRANULE, hit), 'the granule allocated, not walked').to.equal(false);
      // One that allocates an L2 table: a new epoch, and no walk for it.
      await write(map, 600 * MiB);
      expect(lookup(map.table, 10, hit) && hit[2], 'after the allocation').to.equal(0);
      for (let i = 0; i < 15; i++) await write(map, GRANULE);
      expect(lookup(map.table, 10, hit) && hit[2], 'after 15 overwrites').to.equal(0);
      expect(lookup(map.table, 1, hit) && hit[2], 'the granule written, refreshed').to.equal(1);
      await write(map, GRANULE);
      expect(lookup(map.table, 10, hit) && hit[2], 'after 16 overwrites in a row').to.equal(1);
    } finally {
      await node.close();
    }
  });

  it('drops the cluster cache\'s copy after the workers wrote around it, and flushes a file only they wrote', async () => {
    const img = path.join(tmp.dir, 'drop.qcow2');
    await createImage(img, 'qcow2', 4 * MiB);
    await qemuIo(img, 'qcow2', ['write -P 0x41 0 4M']);
    const node = await open(img, false);
    try {
      const fsys = new FlatFs([{ name: 'drop.raw', node, writable: true, uid: 0, gid: 0, mode: 0o644, mtime: new Date() }], false);
      const ino = 2;
      const table = fsys.readMapFor(ino)!.table;
      const buf = Buffer.alloc(8192);
      await fsys.write(ino, 0, Buffer.alloc(4096, 0x42), 4096, 0);
      // Cached now: a read across two blocks fills both into the LRU.
      const at = GRANULE - 4096;
      await fsys.read(ino, 0, buf, 8192, at);
      expect(buf[0]).to.equal(0x41);
      fsys.mapMiss(ino, at, 8192);
      await new Promise((r) => setTimeout(r, 50));
      const hit = [0, 0, 0];
      expect(lookup(table, 0, hit) && hit[2], 'granule 0 writable in place').to.equal(1);
      // What a worker does: pwrite(2) to the host location, then count it.
      fs.writeSync(hit[0]!, Buffer.alloc(4096, 0x45), 0, 4096, hit[1]! + at);
      countWritten(table, 4096);
      await fsys.read(ino, 0, buf, 4096, at);
      expect(buf[0], 'not the cached copy').to.equal(0x45);
      await fsys.flush(ino);
      expect(fsys.workerIo().writes).to.equal(1);
    } finally {
      await node.close();
    }
  });

  it('walks only the granules a write touched at the next miss, unless the window\'s epoch ended (then the whole window)', async () => {
    const img = path.join(tmp.dir, 'mend.qcow2');
    await createImage(img, 'qcow2', 1024 * MiB);
    await qemuIo(img, 'qcow2', ['write -P 0x61 0 4M']);
    const node = await open(img, false);
    const walks = recordWalks(node);
    const hit = [0, 0, 0];
    try {
      const map = new ReadMap(node);
      // qcow2 lets writes around it after its first change: that write walks the window (in place from then on).
      await serveWrite(map, node, 0, 0x61);
      expect(walks[0], 'the first write walks the whole window').to.deep.equal([0, WINDOW]);
      // An overwrite on the JS thread (no allocation: the epoch holds), then a miss of a 1 MiB read over it.
      await changeWrite(map, node, MiB + 4096, 0x62);
      expect(lookup(map.table, MiB / GRANULE, hit), 'invalidated by the write').to.equal(false);
      walks.length = 0;
      map.miss(MiB, MiB);
      await map.idle();
      // (The miss also walks the window after it, never walked yet: a sequential reader goes there next.)
      expect(walks.filter((w) => w[0]! < WINDOW), 'only the granule written').to.deep.equal([[MiB, GRANULE]]);
      expect(lookup(map.table, MiB / GRANULE, hit) && hit[2], 'published again, writable in place').to.equal(1);
      walks.length = 0;
      map.miss(MiB, MiB);
      await map.idle();
      expect(walks.filter((w) => w[0]! < WINDOW), 'nothing left to walk').to.deep.equal([]);
      // An allocation of an L2 table ends the epoch: a miss after the next write walks the window whole.
      await changeWrite(map, node, 600 * MiB, 0x63);
      await changeWrite(map, node, 2 * MiB, 0x64);
      walks.length = 0;
      map.miss(2 * MiB, 4096);
      await map.idle();
      expect(walks.filter((w) => w[0]! < WINDOW), 'the whole window, in the new epoch').to.deep.equal([[0, WINDOW]]);
      expect(lookup(map.table, 10, hit) && hit[2], 'the window writable in place again').to.equal(1);
    } finally {
      await node.close();
    }
  });

  it('walks again the whole allocation unit a write touched (a new 1 MiB vdi block), published writable in place', async () => {
    const img = path.join(tmp.dir, 'unit.vdi');
    await createImage(img, 'vdi', 64 * MiB);
    await qemuIo(img, 'vdi', ['write -P 0x61 0 1M']);
    const node = await open(img, false);
    expect(node.allocationUnit, 'the vdi block').to.equal(MiB);
    const walks = recordWalks(node);
    const hit = [0, 0, 0];
    try {
      const map = new ReadMap(node);
      map.miss(0, 4096);
      await map.idle();
      expect(lookup(map.table, (5 * MiB) / GRANULE, hit) && hit[0], 'an unallocated block: zeros').to.equal(-1);
      // 4 KiB into block 5 allocates all of it; a miss elsewhere in the block walks the block.
      await changeWrite(map, node, 5 * MiB + 4096, 0x62);
      walks.length = 0;
      map.miss(5 * MiB + 512 * 1024, 4096);
      await map.idle();
      expect(walks, 'the block, not the window').to.deep.equal([[5 * MiB, MiB]]);
      for (let g = (5 * MiB) / GRANULE; g < (6 * MiB) / GRANULE; g++) expect(lookup(map.table, g, hit) && hit[2], `granule ${g}: the block's data, writable in place`).to.equal(1);
    } finally {
      await node.close();
    }
  });

  it('maps small clusters finely: a 4 KiB granule for qcow and for qcow2 with clusters under 64 KiB (a page at least), 64 KiB for the rest and for raw', async () => {
    const cases: [name: string, format: string, opts: Record<string, string>, granule: number][] = [
      ['g.qcow', 'qcow', {}, 4096],
      ['g4k.qcow2', 'qcow2', { cluster_size: '4096' }, 4096],
      ['g16k.qcow2', 'qcow2', { cluster_size: '16384' }, 16384],
      ['g512.qcow2', 'qcow2', { cluster_size: '512' }, 4096],
      ['g.qcow2', 'qcow2', {}, GRANULE],
      ['g.vdi', 'vdi', {}, GRANULE],
      ['g.raw', 'raw', {}, GRANULE],
    ];
    for (const [name, format, opts, granule] of cases) {
      const img = path.join(tmp.dir, name);
      await createImage(img, format, 8 * MiB, opts);
      const node = await open(img, true);
      try {
        expect(2 ** granuleShift(node), name).to.equal(granule);
        expect(granuleOf(new ReadMap(node).table), name).to.equal(granule);
      } finally {
        await node.close();
      }
    }
    // A 64 KiB qcow2 over a qcow: the backing file's clusters decide.
    const base = path.join(tmp.dir, 'g-base.qcow');
    await createImage(base, 'qcow', 8 * MiB);
    const top = path.join(tmp.dir, 'g-top.qcow2');
    await createImage(top, 'qcow2', 8 * MiB, {}, { file: base, format: 'qcow' });
    const node = await open(top, true);
    try {
      expect(granuleShift(node)).to.equal(12);
    } finally {
      await node.close();
    }
  });

  it('publishes each of a qcow\'s clusters written in random order where it lies, and a read across them reads back as qemu-img reads it', async () => {
    const img = path.join(tmp.dir, 'scatter.qcow');
    await createImage(img, 'qcow', 8 * MiB);
    const clusters = [...Array(256).keys()].sort(() => Math.random() - 0.5);
    await qemuIo(img, 'qcow', clusters.map((c) => `write -P 0x${((c % 251) + 1).toString(16)} ${c * 4096} 4k`));
    const node = await open(img, true);
    try {
      const map = new ReadMap(node);
      map.miss(0, 4096);
      await map.idle();
      const hit = [0, 0, 0];
      for (let g = 0; g < 512; g++) {
        expect(lookup(map.table, g, hit), `granule ${g}`).to.equal(true);
        if (g >= 256) expect(hit[0], `granule ${g}: never written, zeros`).to.equal(-1);
      }
      // 1 MiB written in random order and 1 MiB of zeros, 100 bytes in: runs of the host file and zeros.
      const got = readFromMap(map, 100, 2 * MiB);
      const want = Buffer.alloc(2 * MiB);
      await node.read(100, want);
      expect(got?.equals(want), 'the map\'s runs read as the node reads').to.equal(true);
    } finally {
      await node.close();
    }
  });

  it('never takes one granule for another 2^32 granules away (a qcow2 of 300 TiB, data at 0 and at 256 TiB; a map of 4 KiB granules past 16 TiB)', async () => {
    const TiB = 2 ** 40;
    for (const shift of [12, 16]) {
      const t = newTable(shift);
      const hit = [0, 0, 0];
      publish(t, 5, 3, 4096);
      expect(lookup(t, 5 + 2 ** 32, hit), `shift ${shift}`).to.equal(false);
      publish(t, 5 + 2 ** 32, 3, 8192);
      expect(lookup(t, 5, hit), `shift ${shift}: granule 5, its slot taken`).to.equal(false);
      expect(lookup(t, 5 + 2 ** 32, hit) && hit[1], `shift ${shift}`).to.equal(8192);
    }
    const img = path.join(tmp.dir, 'huge.qcow2');
    await createImage(img, 'qcow2', 300 * TiB);
    await qemuIo(img, 'qcow2', ['write -P 0x11 0 64k', 'write -P 0x22 256T 64k']);
    const node = await open(img, true);
    try {
      const map = new ReadMap(node);
      map.miss(0, 4096);
      await map.idle();
      expect(readFromMap(map, 0, 4096)?.every((b) => b === 0x11), 'granule 0, published').to.equal(true);
      // Granule 2^32 is not in the map yet: the main thread must answer.
      expect(readFromMap(map, 256 * TiB, 4096), 'the granule at 256 TiB').to.equal(undefined);
      map.miss(256 * TiB, 4096);
      await map.idle();
      expect(readFromMap(map, 256 * TiB, 4096)?.every((b) => b === 0x22), 'the bytes at 256 TiB').to.equal(true);
    } finally {
      await node.close();
    }
  });

  it('publishes the window after a miss too, and the window a worker asks for ahead of its reads', async () => {
    const img = path.join(tmp.dir, 'ahead.qcow2');
    await createImage(img, 'qcow2', 4 * WINDOW);
    const node = await open(img, true);
    try {
      const map = new ReadMap(node);
      const hit = [0, 0];
      const per = WINDOW / GRANULE;
      map.miss(0, 4096);
      await map.idle();
      expect(lookup(map.table, 0, hit), 'window 0').to.equal(true);
      expect(lookup(map.table, per, hit), 'window 1, after the miss').to.equal(true);
      expect(lookup(map.table, 2 * per, hit), 'window 2').to.equal(false);
      // What a worker sends (type 'ahead'): one byte in window 2.
      map.miss(2 * WINDOW + 5, 1);
      await map.idle();
      expect(lookup(map.table, 2 * per + 7, hit), 'window 2, asked ahead').to.equal(true);
      expect(lookup(map.table, 3 * per, hit), 'window 3').to.equal(true);
    } finally {
      await node.close();
    }
  });

});

