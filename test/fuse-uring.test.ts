// FUSE over io_uring (fs/fuse-uring.ts), the TSMOUNT_FUSE_URING=1 experiment: the
// kernel hands requests to one io_uring queue per CPU instead of /dev/fuse. Needs a
// kernel with CONFIG_FUSE_IO_URING and root to set fuse.enable_uring (restored after).
// TSMOUNT_FUSE_WORKERS=0 turns the /dev/fuse workers off, so reads counted as the
// workers' can only have been answered by the queues. The oracle is qemu-img convert.
import { expect } from 'chai';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { convertFromRaw, convertToRaw, createImage, md5File, qemuIo, run, runOk, runTimingPbkdf, tempDir } from './helpers/qemu.js';
import { MountTracker, mountCounters, mountedPid, TSMOUNT, tsmount } from './helpers/mount.js';
import type { ListedMount } from '../mount-helpers/list.js';
import { possibleCpus } from '../fs/fuse-uring.js';

const MiB = 1 << 20;
const KiB = 1024;
const PARAM = '/sys/module/fuse/parameters/enable_uring';

async function directMd5(file: string, bs = '1M'): Promise<string> {
  const r = await run('sh', ['-c', `dd if='${file}' iflag=direct bs=${bs} status=none | md5sum`]);
  expect(r.code, r.stderr).to.equal(0);
  return r.stdout.split(' ')[0]!;
}

/** A kernel CPU list ("0-1,4") as numbers. */
function cpuList(text: string): number[] {
  const out: number[] = [];
  for (const part of text.trim().split(',').filter(Boolean)) {
    const [a, b] = part.split('-').map(Number);
    for (let c = a!; c <= (b ?? a!); c++) out.push(c);
  }
  return out;
}

/** Each thread of process `pid`: the CPUs it may run on. */
function threadCpus(pid: number): number[][] {
  const out: number[][] = [];
  for (const t of fs.readdirSync(`/proc/${pid}/task`)) {
    const m = /^Cpus_allowed_list:\s*(\S+)$/m.exec(fs.readFileSync(`/proc/${pid}/task/${t}/status`, 'utf8'));
    if (m) out.push(cpuList(m[1]!));
  }
  return out;
}

async function queueReads(mp: string, atLeast: number): Promise<number> {
  const deadline = Date.now() + 5000;
  for (;;) {
    const r = await tsmount(['--list', '--output', 'json']);
    expect(r.code, r.stderr).to.equal(0);
    const n = (JSON.parse(r.stdout) as ListedMount[]).find((x) => x.mountpoint === mp)?.counters?.workerReads ?? 0;
    if (n >= atLeast || Date.now() > deadline) return n;
    await new Promise((res) => setTimeout(res, 250));
  }
}

/** Why the suite cannot run here, or undefined when it can. */
function cannotRun(): string | undefined {
  if (!fs.existsSync(PARAM)) return `${PARAM} is missing: the kernel has no CONFIG_FUSE_IO_URING`;
  try {
    fs.accessSync(PARAM, fs.constants.W_OK);
  } catch {
    return `${PARAM} is not writable: setting fuse.enable_uring needs root`;
  }
  return undefined;
}

describe('FUSE over io_uring (TSMOUNT_FUSE_URING=1)', function () {
  this.timeout(600_000);
  const mounts = new MountTracker();
  let tmp: { dir: string; cleanup: () => void };
  let oldParam: string | undefined;
  const oldEnv = { uring: process.env.TSMOUNT_FUSE_URING, workers: process.env.TSMOUNT_FUSE_WORKERS };

  before(function () {
    const why = cannotRun();
    if (why) {
      // eslint-disable-next-line no-console
      console.log(`      skipped: ${why}`);
      this.skip();
    }
    oldParam = fs.readFileSync(PARAM, 'utf8').trim();
    fs.writeFileSync(PARAM, 'Y');
    process.env.TSMOUNT_FUSE_URING = '1';
    process.env.TSMOUNT_FUSE_WORKERS = '0';
    tmp = tempDir('fuse-uring');
  });
  afterEach(() => mounts.cleanup());
  after(() => {
    if (oldParam !== undefined) fs.writeFileSync(PARAM, oldParam);
    for (const [k, v] of [['TSMOUNT_FUSE_URING', oldEnv.uring], ['TSMOUNT_FUSE_WORKERS', oldEnv.workers]] as const) {
      if (v === undefined) delete process.env[k];
      else process.env[k] = v;
    }
    tmp?.cleanup();
  });

  const dir = (name: string): string => {
    const p = path.join(tmp.dir, name);
    fs.mkdirSync(p, { recursive: true });
    return p;
  };

  it('reads a qcow2 as qemu-img convert does, the reads answered by the queues', async () => {
    const img = path.join(tmp.dir, 'img.qcow2');
    await createImage(img, 'qcow2', 64 * MiB, {});
    await qemuIo(img, 'qcow2', ['write -P 0x11 0 3M', 'write -P 0x22 5M 64k', 'write -z 6M 1M', 'write -P 0x33 7M 2M', 'write -P 0x55 63M 1M']);
    const raw = path.join(tmp.dir, 'img.raw.out');
    await convertToRaw(img, raw, 'qcow2');
    const want = await md5File(raw);
    const mp = dir('m-read');
    await mounts.mount([img, mp]);
    const flat = path.join(mp, 'img.raw');
    // The first pass goes to the main thread and fills the read map; later ones hit it in the queues.
    let served = 0;
    for (let pass = 0; pass < 10 && served < 16; pass++) {
      expect(await directMd5(flat), `pass ${pass}`).to.equal(want);
      served = await queueReads(mp, 16);
    }
    expect(served, 'reads answered by the io_uring queues').to.be.at.least(16);
    for (const bs of ['1M', '64k', '4k']) expect(await directMd5(flat, bs), `bs=${bs}`).to.equal(want);
    // Four readers at once.
    const all = await Promise.all([0, 1, 2, 3].map(() => directMd5(flat, '128k')));
    for (const got of all) expect(got).to.equal(want);
    await mounts.unmount(mp);
    expect(mountedPid(mp)).to.equal(undefined);
  });

  it('pins each queue thread to the CPU it serves, and never outside the CPUs the server was given (taskset)', async function () {
    const mine = cpuList(/^Cpus_allowed_list:\s*(\S+)$/m.exec(fs.readFileSync('/proc/self/status', 'utf8'))![1]!);
    const queues = [...Array(possibleCpus()).keys()].filter((c) => mine.includes(c));
    if (queues.length < 2) {
      // eslint-disable-next-line no-console
      console.log(`      skipped: the test process may run on CPUs ${mine.join(',')} only; pinning needs two`);
      this.skip();
    }
    const img = path.join(tmp.dir, 'pin.qcow2');
    await createImage(img, 'qcow2', 16 * MiB, {});
    await qemuIo(img, 'qcow2', ['write -P 0x3c 0 5M', 'write -P 0x4d 9M 2M']);
    const raw = path.join(tmp.dir, 'pin.raw.out');
    await convertToRaw(img, raw, 'qcow2');
    const want = await md5File(raw);

    const mp = dir('m-pin');
    await mounts.mount([img, mp]);
    const pid = mountedPid(mp)!;
    const pinned = threadCpus(pid).filter((c) => c.length === 1).map((c) => c[0]!);
    for (const q of queues) expect(pinned, `a thread pinned to CPU ${q} (queue ${q})`).to.include(q);
    expect(await directMd5(path.join(mp, 'pin.raw'), '64k')).to.equal(want);
    await mounts.unmount(mp);

    // Started on CPU 0 alone (taskset): queue 1's thread must not pin itself to CPU 1;
    // every thread of the server stays on CPU 0, and the mount serves as before.
    const mp0 = dir('m-pin0');
    mounts.track(mp0);
    await runOk('taskset', ['-c', '0', process.execPath, TSMOUNT, img, mp0]);
    const all = threadCpus(mountedPid(mp0)!);
    expect(all.length).to.be.above(2);
    for (const c of all) expect(c, 'CPUs a thread of the server may run on').to.deep.equal([0]);
    for (let pass = 0; pass < 3; pass++) expect(await directMd5(path.join(mp0, 'pin.raw'), '64k')).to.equal(want);
    await mounts.unmount(mp0);
  });

  it('decrypts a LUKS image in the queues (the cipher code loaded once its map names a cipher), as qemu-img reads it', async () => {
    const secret = ['--object', 'secret,id=s0,data=ring pass'];
    const img = path.join(tmp.dir, 'enc.luks');
    const opts = `driver=luks,key-secret=s0,file.filename=${img}`;
    const made = await runTimingPbkdf('qemu-img', ['create', '-q', ...secret, '-f', 'luks', '-o', 'key-secret=s0,iter-time=10', img, '16M']);
    expect(made.code, made.stderr).to.equal(0);
    await runOk('qemu-io', [...secret, '--image-opts', '-c', 'write -P 0x5c 1M 3M', '-c', 'write -P 0x6d 9M 5M', opts]);
    const raw = path.join(tmp.dir, 'enc.raw.out');
    await runOk('qemu-img', ['convert', ...secret, '--image-opts', opts, '-O', 'raw', raw]);
    const want = await md5File(raw);
    const mp = dir('m-enc');
    await mounts.mount(['--secret', 'ring pass', img, mp]);
    const flat = path.join(mp, 'enc.raw');
    let served = 0;
    for (let pass = 0; pass < 10 && served < 16; pass++) {
      expect(await directMd5(flat), `pass ${pass}`).to.equal(want);
      served = await queueReads(mp, 16);
    }
    expect(served, 'reads the io_uring queues decrypted').to.be.at.least(16);
    for (const bs of ['64k', '4k']) expect(await directMd5(flat, bs), `bs=${bs}`).to.equal(want);
    await mounts.unmount(mp);
  });

  it('inflates compressed qcow2 clusters (zlib and zstd), streamOptimized vmdk grains and compressed qcow clusters in the queues, as qemu-img reads them', async () => {
    // Hex text: every cluster compresses, and no two are alike.
    const raw = path.join(tmp.dir, 'text.raw');
    fs.writeFileSync(raw, Buffer.from(crypto.randomBytes(8 * MiB).toString('hex')));
    const want = await md5File(raw);
    const kinds = [['z.qcow2', ['-O', 'qcow2', '-c']], ['zs.qcow2', ['-O', 'qcow2', '-c', '-o', 'compression_type=zstd']], ['z.vmdk', ['-O', 'vmdk', '-o', 'subformat=streamOptimized']], ['z.qcow', ['-O', 'qcow', '-c']]] as const;
    for (const [name, args] of kinds) {
      const img = path.join(tmp.dir, name);
      await convertFromRaw(raw, img, [...args]);
      const mp = dir(`m-${name}`);
      await mounts.mount([img, mp]);
      const flat = path.join(mp, name.replace(/\.\w+$/, '.raw'));
      let served = 0;
      for (let pass = 0; pass < 10 && served < 16; pass++) {
        expect(await directMd5(flat), `${name}: pass ${pass}`).to.equal(want);
        served = await queueReads(mp, 16);
      }
      expect(served, `${name}: reads the io_uring queues inflated`).to.be.at.least(16);
      for (const bs of ['64k', '4k', '3k']) expect(await directMd5(flat, bs), `${name}: bs=${bs}`).to.equal(want);
      await mounts.unmount(mp);
    }
  });

  it('serves through /dev/fuse when the kernel does not offer io_uring (enable_uring=N)', async () => {
    const img = path.join(tmp.dir, 'off.qcow2');
    await createImage(img, 'qcow2', 16 * MiB, {});
    await qemuIo(img, 'qcow2', ['write -P 0x66 1M 2M']);
    const raw = path.join(tmp.dir, 'off.raw.out');
    await convertToRaw(img, raw, 'qcow2');
    fs.writeFileSync(PARAM, 'N');
    try {
      const mp = dir('m-off');
      await mounts.mount([img, mp]);
      for (const bs of ['1M', '4k']) expect(await directMd5(path.join(mp, 'off.raw'), bs), `bs=${bs}`).to.equal(await md5File(raw));
      await mounts.unmount(mp);
    } finally {
      fs.writeFileSync(PARAM, 'Y');
    }
  });

  it('falls back to /dev/fuse when a queue does not start (the kernel is told, the mount serves on)', async () => {
    const img = path.join(tmp.dir, 'fail.qcow2');
    await createImage(img, 'qcow2', 16 * MiB, {});
    await qemuIo(img, 'qcow2', ['write -P 0x77 0 4M', 'write -P 0x78 12M 1M']);
    const raw = path.join(tmp.dir, 'fail.raw.out');
    await convertToRaw(img, raw, 'qcow2');
    // The last queue fails: the first ones have registered by then, the ring is not complete.
    process.env.TSMOUNT_FUSE_URING_FAIL_QUEUE = String(possibleCpus() - 1);
    try {
      const mp = dir('m-fail');
      await mounts.mount([img, mp]);
      const flat = path.join(mp, 'fail.raw');
      for (const bs of ['1M', '4k']) expect(await directMd5(flat, bs), `bs=${bs}`).to.equal(await md5File(raw));
      // Give the failed start time to happen, then read again: still served.
      await new Promise((r) => setTimeout(r, 2000));
      expect(await directMd5(flat)).to.equal(await md5File(raw));
      await mounts.unmount(mp);
      expect(mountedPid(mp)).to.equal(undefined);
    } finally {
      delete process.env.TSMOUNT_FUSE_URING_FAIL_QUEUE;
    }
  });

  it('writes through the queues, overwrites in place from the queues themselves: qemu-img sees them after the unmount', async () => {
    const img = path.join(tmp.dir, 'rw.qcow2');
    await createImage(img, 'qcow2', 32 * MiB, {});
    const mp = dir('m-rw');
    await mounts.mount(['--rw', img, mp]);
    const flat = path.join(mp, 'rw.raw');
    const expected = Buffer.alloc(32 * MiB);
    const fd = await fs.promises.open(flat, 'r+');
    try {
      for (const [at, n] of [[0, MiB], [3 * MiB + 512, 200 * KiB], [16 * MiB, 4 * MiB], [32 * MiB - 4096, 4096]] as const) {
        const data = crypto.randomBytes(n);
        data.copy(expected, at);
        expect((await fd.write(data, 0, n, at)).bytesWritten).to.equal(n);
      }
      await fd.sync();
      // Overwrites of what is allocated now: once the map has it, the queues write them.
      let inPlace = 0;
      for (let pass = 0; pass < 20 && inPlace === 0; pass++) {
        for (let i = 0; i < 32; i++) {
          const at = crypto.randomInt(0, MiB / 4096) * 4096;
          const data = crypto.randomBytes(4096);
          data.copy(expected, at);
          await fd.write(data, 0, 4096, at);
        }
        inPlace = (await mountCounters(mp)).workerWrites ?? 0;
        if (inPlace === 0) await new Promise((r) => setTimeout(r, 300));
      }
      expect(inPlace, 'writes the queues wrote in place').to.be.greaterThan(0);
      await fd.sync();
      const back = Buffer.alloc(32 * MiB);
      await fd.read(back, 0, back.length, 0);
      expect(back.equals(expected), 'read back through the mount').to.equal(true);
    } finally {
      await fd.close();
    }
    await mounts.unmount(mp);
    const raw = path.join(tmp.dir, 'rw.raw.out');
    await convertToRaw(img, raw, 'qcow2');
    expect(fs.readFileSync(raw).equals(expected), 'qemu-img convert of the written image').to.equal(true);
  });
});
