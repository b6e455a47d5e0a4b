// tsimg check for vmdk, vhdx and vdi against qemu-img check (QEMU 7.2), on images
// qemu-img makes with data qemu-io writes, and on copies with corruptions seeded at
// offsets read from their headers. Where QEMU finds a problem, tsimg finds it too
// with the same count; where tsimg does more (every bad vmdk grain instead of the
// first, vhdx blocks that overlap each other, repairs QEMU refuses) the test says so.
import { expect } from 'chai';
import fs from 'node:fs';
import path from 'node:path';
import { convertToRaw, createImage, md5File, qemuIo, run, tempDir, type RunResult } from './helpers/qemu.js';
import { patch, pattern, readBytes, tsimg, u32le, u64le } from './helpers/images.js';
import { CrashingFile } from './helpers/crashing-file.js';
import { makeSeSparseChain, seAllocatedEntry, type SeGrain } from './helpers/deltas.js';
import { fileProtocol } from '../drivers/protocol/index.js';
import { vhdxDriver } from '../drivers/format/vhdx/index.js';
import { vdiDriver } from '../drivers/format/vdi/index.js';

const MiB = 1024 * 1024;
type Json = Record<string, unknown>;

interface Both {
  q: RunResult;
  r: RunResult;
  qj: Json | undefined;
  rj: Json | undefined;
}

function json(s: string): Json | undefined {
  try {
    return JSON.parse(s) as Json;
  } catch {
    return undefined;
  }
}

/** qemu-img check and tsimg check, both --output json, with the same extra arguments. */
async function checkBoth(file: string, extra: string[] = []): Promise<Both> {
  const q = await run('qemu-img', ['check', ...extra, '--output=json', file], { cwd: path.dirname(file) });
  const r = await tsimg(['check', ...extra, '--output', 'json', file], path.dirname(file));
  return { q, r, qj: json(q.stdout), rj: json(r.stdout) };
}

/** Both agree: exit code and corruption, leak and check-error counts. */
async function expectAgree(file: string, code: number, corruptions = 0): Promise<Both> {
  const b = await checkBoth(file);
  expect(b.q.code, b.q.stdout + b.q.stderr).to.equal(code);
  expect(b.r.code, b.r.stdout + b.r.stderr).to.equal(code);
  for (const k of ['corruptions', 'leaks', 'check-errors']) expect(b.rj?.[k], k).to.equal(b.qj?.[k]);
  expect(b.rj?.corruptions ?? 0).to.equal(corruptions);
  // And the human report, line for line.
  const qh = await run('qemu-img', ['check', file], { cwd: path.dirname(file) });
  const rh = await tsimg(['check', file], path.dirname(file));
  expect(rh.stdout).to.equal(qh.stdout);
  return b;
}

/** Every "ERROR"/"VHDX" problem line qemu-img printed is among tsimg's. */
function expectSameLines(b: Both): void {
  const lines = (s: string): string[] => s.split('\n').map((l) => l.replace(/^qemu-img: /, '')).filter((l) => /^(ERROR|VHDX)/.test(l));
  const ours = lines(b.r.stderr);
  for (const l of lines(b.q.stderr)) expect(ours, b.r.stderr).to.include(l);
}

const block = (b: Buffer, i: number): Buffer => b.subarray(i * MiB, (i + 1) * MiB);

async function raw(file: string, format: string): Promise<Buffer> {
  const out = `${file}.raw`;
  await convertToRaw(file, out, format);
  const b = fs.readFileSync(out);
  fs.rmSync(out);
  return b;
}

describe('tsimg check: vdi against qemu-img check', function () {
  this.timeout(180_000);
  let t: ReturnType<typeof tempDir>;
  before(() => (t = tempDir('check-vdi')));
  after(() => t.cleanup());

  /** 16 MiB, 1 MiB blocks: guest blocks 0, 1, 5, 9 hold data blocks 0..3. */
  async function base(name: string): Promise<{ f: string; bmap: number; before: Buffer }> {
    const f = path.join(t.dir, name);
    await createImage(f, 'vdi', '16M');
    await qemuIo(f, 'vdi', ['write -P 0x11 0 1M', 'write -P 0x22 1M 1M', 'write -P 0x33 5M 1M', 'write -P 0x44 9M 1M']);
    const bmap = readBytes(f, 0x154, 4).readUInt32LE(0);
    return { f, bmap, before: await raw(f, 'vdi') };
  }

  it('a clean image checks clean', async () => {
    const { f } = await base('clean.vdi');
    await expectAgree(f, 0);
  });

  it('an index too large, a block used twice, the count wrong: found as QEMU finds them; -r all fixes what QEMU refuses to', async () => {
    const { f, bmap, before } = await base('bad.vdi');
    patch(f, bmap + 1 * 4, u32le(1000)); // guest block 1: too large
    patch(f, bmap + 5 * 4, u32le(0)); // guest block 5: data block 0, which guest block 0 has
    const b = await expectAgree(f, 2, 3);
    expectSameLines(b);

    const copy = path.join(t.dir, 'bad-qemu.vdi');
    fs.copyFileSync(f, copy);
    const q = await run('qemu-img', ['check', '-r', 'all', copy]);
    // QEMU 7.2's vdi_co_check refuses any repair.
    expect(q.code, q.stderr).to.equal(63);

    const r = await tsimg(['check', '-r', 'all', '--output', 'json', f]);
    expect(r.code, r.stdout + r.stderr).to.equal(0);
    expect(json(r.stdout)?.['corruptions-fixed']).to.equal(3);
    await expectAgree(f, 0);
    const after = await raw(f, 'vdi');
    // Blocks whose entries were valid keep their data (block 9 was moved down into the hole); the others read as zeros.
    for (const blk of [0, 9]) expect(after.subarray(blk * MiB, (blk + 1) * MiB).equals(before.subarray(blk * MiB, (blk + 1) * MiB)), `block ${blk}`).to.equal(true);
    for (const blk of [1, 5]) expect(after.subarray(blk * MiB, (blk + 1) * MiB).every((x) => x === 0), `block ${blk}`).to.equal(true);
    // And the repaired image takes new writes where the header says: no block is shared.
    await qemuIo(f, 'vdi', ['write -P 0x55 12M 1M', 'write -P 0x66 13M 1M']);
    await expectAgree(f, 0);
    await qemuIo(f, 'vdi', ['read -P 0x44 9M 1M', 'read -P 0x55 12M 1M', 'read -P 0x66 13M 1M', 'read -P 0x11 0 1M']);
  });

  it('an entry past the end of the file: the count mismatch QEMU sees; -r all unmaps it', async () => {
    const { f, bmap, before } = await base('eof.vdi');
    patch(f, bmap + 14 * 4, u32le(12)); // data block 12 lies past the end of the 4-block file
    const b = await expectAgree(f, 2, 1);
    expectSameLines(b);
    const r = await tsimg(['check', '-r', 'all', f]);
    expect(r.code, r.stdout + r.stderr).to.equal(0);
    await expectAgree(f, 0);
    expect((await raw(f, 'vdi')).equals(before)).to.equal(true);
  });

  it('-r all cut short at every write leaves the valid blocks readable, and a second -r all finishes', async () => {
    const { f, bmap, before } = await base('crash.vdi');
    patch(f, bmap + 1 * 4, u32le(1000));
    patch(f, bmap + 5 * 4, u32le(0));
    const seeded = path.join(t.dir, 'crash-seeded.vdi');
    fs.copyFileSync(f, seeded);
    const opts = { readOnly: false, cache: 'writeback' as const, metadataCacheBytes: 1 << 20, openBacking: () => Promise.reject(new Error('no backing')) };
    let finished = false;
    for (let budget = 0; !finished; budget++) {
      expect(budget, 'the repair never finished').to.be.below(50);
      fs.copyFileSync(seeded, f);
      const inner = await fileProtocol.open(f, { readOnly: false, cache: 'writeback' });
      const crashing = new CrashingFile(inner, budget);
      try {
        const node = await vdiDriver.open(crashing, opts);
        await node.repairMetadata!('all').then(() => (finished = true), () => undefined);
      } finally {
        await inner.close();
      }
      const now = await raw(f, 'vdi');
      for (const blk of [0, 9]) expect(block(now, blk).equals(block(before, blk)), `budget ${budget}: block ${blk}`).to.equal(true);
      const r = await tsimg(['check', '-r', 'all', f]);
      expect(r.code, `budget ${budget}: ${r.stdout}${r.stderr}`).to.equal(0);
      const q = await run('qemu-img', ['check', f]);
      expect(q.code, `budget ${budget}: ${q.stdout}${q.stderr}`).to.equal(0);
      const fixed = await raw(f, 'vdi');
      for (const blk of [0, 9]) expect(block(fixed, blk).equals(block(before, blk)), `budget ${budget}: block ${blk} after the second repair`).to.equal(true);
    }
  });

  it('-r all on a clean image changes nothing', async () => {
    const { f } = await base('noop.vdi');
    const md5 = await md5File(f);
    const r = await tsimg(['check', '-r', 'all', f]);
    expect(r.code).to.equal(0);
    expect(await md5File(f)).to.equal(md5);
  });
});

describe('tsimg check: vmdk against qemu-img check', function () {
  this.timeout(180_000);
  let t: ReturnType<typeof tempDir>;
  before(() => (t = tempDir('check-vmdk')));
  after(() => t.cleanup());

  /** A VMDK4 sparse extent's header fields: grain directory and grain size. */
  function sparseLayout(f: string): { gd: number; rgd: number; grainSectors: number; gtEntries: number } {
    const h = readBytes(f, 0, 512);
    return {
      grainSectors: Number(h.readBigUInt64LE(20)),
      gtEntries: h.readUInt32LE(44),
      rgd: Number(h.readBigUInt64LE(48)) * 512,
      gd: Number(h.readBigUInt64LE(56)) * 512,
    };
  }
  /** File offset of grain table entry `grain` (first table). */
  function gteOffset(f: string, grain: number): number {
    const { gd } = sparseLayout(f);
    return readBytes(f, gd, 4).readUInt32LE(0) * 512 + grain * 4;
  }

  for (const subformat of ['monolithicSparse', 'twoGbMaxExtentSparse', 'streamOptimized', 'monolithicFlat']) {
    it(`a clean ${subformat} image checks clean`, async () => {
      const f = path.join(t.dir, `clean-${subformat}.vmdk`);
      await createImage(f, 'vmdk', '64M', { subformat });
      await qemuIo(f, 'vmdk', ['write -P 0x11 0 128k', 'write -P 0x22 40M 64k']);
      await expectAgree(f, 0);
    });
  }

  it('grains past the end of the file: every one found (QEMU stops at the first, exit 1; tsimg says corrupt, exit 2)', async () => {
    const f = path.join(t.dir, 'eof.vmdk');
    await createImage(f, 'vmdk', '64M');
    await qemuIo(f, 'vmdk', ['write -P 0x11 0 128k']);
    patch(f, gteOffset(f, 1), u32le(0x100000));
    patch(f, gteOffset(f, 8), u32le(0x200000));
    const b = await checkBoth(f);
    expect(b.q.code).to.equal(1);
    expect(b.q.stderr).to.match(/ERROR: cluster offset for sector 128 points after EOF/);
    expect(b.r.code, b.r.stderr).to.equal(2);
    expect(b.rj?.corruptions).to.equal(2);
    expectSameLines(b);
    expect(b.r.stderr).to.match(/sector 1024 points after EOF/);
    // No repair, as in QEMU (which says the format does not support it): the image is left as it was.
    const md5 = await md5File(f);
    const r = await tsimg(['check', '-r', 'all', f]);
    expect(r.code).to.equal(1);
    expect(r.stderr.trim().split('\n').pop()).to.match(/does not support repairs/);
    expect(await md5File(f)).to.equal(md5);
  });

  it('a grain in the second extent of a split image: the sector QEMU names', async () => {
    const f = path.join(t.dir, 'split.vmdk');
    await createImage(f, 'vmdk', '3G', { subformat: 'twoGbMaxExtentSparse' });
    await qemuIo(f, 'vmdk', ['write -P 0x11 0 64k', 'write -P 0x22 2100M 64k']);
    const ext = path.join(t.dir, 'split-s002.vmdk');
    // 2100M is 52M into the second 2 GiB extent: grain table 1 (32 MiB each), grain 320.
    const { gd, gtEntries, grainSectors } = sparseLayout(ext);
    const gtIdx = Math.floor((52 * MiB) / (grainSectors * 512) / gtEntries);
    const inTable = ((52 * MiB) / (grainSectors * 512)) % gtEntries;
    const table = readBytes(ext, gd + gtIdx * 4, 4).readUInt32LE(0) * 512;
    patch(ext, table + inTable * 4, u32le(0x7fffff00));
    const b = await checkBoth(f);
    expect(b.q.code).to.equal(1);
    expect(b.r.code, b.r.stderr).to.equal(2);
    expect(b.rj?.corruptions).to.equal(1);
    expectSameLines(b);
  });

  for (const broken of [false, true]) {
    it(`a seSparse delta${broken ? ' with grains past the end' : ', clean'}`, async () => {
      const dir = path.join(t.dir, `se-${broken}`);
      fs.mkdirSync(dir);
      const grains = new Map<number, SeGrain>([
        [0, { kind: 'data', seed: 1 }],
        [3, { kind: 'zero' }],
        [4100, { kind: 'data', seed: 2 }],
      ]);
      if (broken) {
        grains.set(5, { kind: 'raw', entry: seAllocatedEntry(1n << 30n) });
        grains.set(4200, { kind: 'raw', entry: seAllocatedEntry(1n << 31n) });
      }
      const { child } = await makeSeSparseChain(dir, { size: 64 * MiB, grains, fillParent: (p) => qemuIo(p, 'vmdk', ['write -P 0x5a 0 1M']) });
      const b = await checkBoth(child);
      expect(b.q.code, b.q.stderr).to.equal(broken ? 1 : 0);
      expect(b.r.code, b.r.stderr).to.equal(broken ? 2 : 0);
      expect(b.rj?.corruptions ?? 0).to.equal(broken ? 2 : 0);
      expectSameLines(b);
    });
  }

  it('beyond QEMU: a grain on the grain directory and a grain table past the end are corruptions', async () => {
    const f = path.join(t.dir, 'meta.vmdk');
    await createImage(f, 'vmdk', '64M');
    await qemuIo(f, 'vmdk', ['write -P 0x11 0 128k', 'write -P 0x22 40M 64k']);
    const { gd } = sparseLayout(f);
    patch(f, gteOffset(f, 0), u32le(gd / 512)); // grain 0 onto the grain directory
    patch(f, gd + 4, u32le(0x100000)); // grain table 1 past the end
    const b = await checkBoth(f);
    // QEMU 7.2 reads zeros past the end and does not look for overlaps.
    expect(b.q.code).to.equal(0);
    expect(b.r.code, b.r.stderr).to.equal(2);
    expect(b.rj?.corruptions).to.equal(2);
    expect(b.r.stderr).to.match(/sector 0 \(0x[0-9a-f]+\) overlaps the VMDK (grain directory|header and grain tables)/);
    expect(b.r.stderr).to.match(/grain table for sector 65536 at 0x20000000 points after EOF/);
  });
});

describe('tsimg check: vhdx against qemu-img check', function () {
  this.timeout(180_000);
  let t: ReturnType<typeof tempDir>;
  before(() => (t = tempDir('check-vhdx')));
  after(() => t.cleanup());

  /** 64 MiB, 1 MiB blocks: guest blocks 0, 1, 8, 20 present. */
  async function base(name: string): Promise<{ f: string; bat: number; before: Buffer }> {
    const f = path.join(t.dir, name);
    await createImage(f, 'vhdx', '64M', { block_size: '1M' });
    await qemuIo(f, 'vhdx', ['write -P 0x11 0 2M', 'write -P 0x22 8M 1M', 'write -P 0x33 20M 1M']);
    // The region table at 192 KiB: the BAT's entry carries its GUID 2dc27766-f623-4200-9d64-115e9bfd4a08.
    const rt = readBytes(f, 0x30000, 64 * 1024);
    let bat = 0;
    for (let i = 0; i < rt.readUInt32LE(8); i++) {
      const at = 16 + i * 32;
      if (rt.subarray(at, at + 16).toString('hex') === '6677c22d23f600429d64115e9bfd4a08') bat = Number(rt.readBigUInt64LE(at + 16));
    }
    expect(bat).to.be.greaterThan(0);
    return { f, bat, before: await raw(f, 'vhdx') };
  }
  const present = (off: number): Buffer => u64le(BigInt(off) | 6n);
  it('a clean image checks clean', async () => {
    const { f } = await base('clean.vhdx');
    await expectAgree(f, 0);
  });

  it('BAT entries past the end of the file and on the log: found as QEMU finds them; -r all unmaps them (QEMU leaves them)', async () => {
    const { f, bat, before } = await base('bad.vhdx');
    const logStart = 1 * MiB;
    patch(f, bat + 1 * 8, present(256 * MiB)); // starts past the end
    patch(f, bat + 8 * 8, present(logStart)); // on the log
    const b = await expectAgree(f, 2, 2);
    expectSameLines(b);

    const copy = path.join(t.dir, 'bad-qemu.vhdx');
    fs.copyFileSync(f, copy);
    const q = await checkBoth(copy, ['-r', 'all']);
    expect(q.q.code).to.equal(2);

    const r = await tsimg(['check', '-r', 'all', '--output', 'json', f]);
    expect(r.code, r.stdout + r.stderr).to.equal(0);
    expect(json(r.stdout)?.['corruptions-fixed']).to.equal(2);
    await expectAgree(f, 0);
    const after = await raw(f, 'vhdx');
    for (const i of [0, 20]) expect(block(after, i).equals(block(before, i)), `block ${i}`).to.equal(true);
    for (const i of [1, 8]) expect(block(after, i).every((x) => x === 0), `block ${i}`).to.equal(true);
  });

  it('a truncated image: the last block ends past the end of the file', async () => {
    const { f } = await base('trunc.vhdx');
    const size = fs.statSync(f).size;
    fs.truncateSync(f, size - MiB / 2);
    const b = await expectAgree(f, 2, 1);
    expectSameLines(b);
    const r = await tsimg(['check', '-r', 'all', f]);
    expect(r.code, r.stdout + r.stderr).to.equal(0);
    await expectAgree(f, 0);
  });

  it('beyond QEMU: two BAT entries on one block', async () => {
    const { f, bat } = await base('dup.vhdx');
    const e0 = readBytes(f, bat, 8);
    patch(f, bat + 30 * 8, e0);
    const b = await checkBoth(f);
    expect(b.q.code).to.equal(0);
    expect(b.r.code, b.r.stderr).to.equal(2);
    expect(b.rj?.corruptions).to.equal(1);
    expect(b.r.stderr).to.match(/BAT entry 30 .* overlaps the block of BAT entry 0/);
  });

  it('a log that needs replaying: reported read-only, replayed by -r leaks and -r all as by qemu-img check -r', async () => {
    const { f } = await base('log.vhdx');
    const pristine = path.join(t.dir, 'log-pristine.vhdx');
    fs.copyFileSync(f, pristine);
    // Write with power lost after n changes, for growing n, until QEMU sees a log to replay.
    let pending = false;
    for (let budget = 1; budget < 40 && !pending; budget++) {
      fs.copyFileSync(pristine, f);
      const inner = await fileProtocol.open(f, { readOnly: false, cache: 'writeback' });
      try {
        const node = await vhdxDriver.open(new CrashingFile(inner, budget), { readOnly: false, cache: 'writeback', metadataCacheBytes: 1 << 20, openBacking: () => Promise.reject(new Error('no backing')) });
        // The new blocks' BAT entries go through the log at the flush.
        await node
          .write(40 * MiB, Buffer.alloc(2 * MiB, 0x77))
          .then(() => node.flush())
          .catch(() => undefined);
      } catch {
        /* power lost during the open's own header update */
      } finally {
        await inner.close();
      }
      const info = await run('qemu-img', ['info', f]);
      pending = info.code !== 0 && /log that needs to be replayed/.test(info.stderr);
    }
    expect(pending, 'no crash point left a log to replay').to.equal(true);

    const b = await checkBoth(f);
    // QEMU cannot open it read-only at all (exit 1); tsimg reads through the log and counts it as one corruption.
    expect(b.q.code).to.equal(1);
    expect(b.q.stderr).to.match(/log that needs to be replayed/);
    expect(b.r.code, b.r.stderr).to.equal(2);
    expect(b.rj?.corruptions).to.equal(1);
    expect(b.r.stderr).to.match(/opened read-only, but contains a log that needs to be replayed/);
    expect(b.r.stderr).to.match(/tsimg check -r all/);

    // -r leaks opens the image writable too, which replays the log: clean, exit 0, as QEMU.
    const leaksQ = path.join(t.dir, 'log-leaks-qemu.vhdx');
    const leaksR = path.join(t.dir, 'log-leaks.vhdx');
    fs.copyFileSync(f, leaksQ);
    fs.copyFileSync(f, leaksR);
    const lq = await run('qemu-img', ['check', '-r', 'leaks', '--output=json', leaksQ]);
    const lr = await tsimg(['check', '-r', 'leaks', '--output', 'json', leaksR]);
    expect(lq.code, lq.stdout + lq.stderr).to.equal(0);
    expect(lr.code, lr.stdout + lr.stderr).to.equal(0);
    for (const k of ['corruptions', 'leaks', 'check-errors', 'corruptions-fixed', 'leaks-fixed']) expect(json(lr.stdout)?.[k], k).to.equal(json(lq.stdout)?.[k]);
    // And the human report of the repair, line for line.
    fs.copyFileSync(f, leaksQ);
    fs.copyFileSync(f, leaksR);
    const hq = await run('qemu-img', ['check', '-r', 'leaks', leaksQ]);
    const hr = await tsimg(['check', '-r', 'leaks', leaksR]);
    expect(hr.code, hr.stderr).to.equal(hq.code);
    expect(hr.stdout).to.equal(hq.stdout);
    await expectAgree(leaksR, 0);
    expect((await raw(leaksR, 'vhdx')).equals(await raw(leaksQ, 'vhdx'))).to.equal(true);

    const copy = path.join(t.dir, 'log-qemu.vhdx');
    fs.copyFileSync(f, copy);
    const q = await run('qemu-img', ['check', '-r', 'all', '--output=json', copy]);
    const r = await tsimg(['check', '-r', 'all', '--output', 'json', f]);
    expect(r.code, r.stdout + r.stderr).to.equal(q.code);
    expect(r.code).to.equal(0);
    expect(json(r.stdout)?.['corruptions-fixed']).to.equal(json(q.stdout)?.['corruptions-fixed']);
    await expectAgree(f, 0);
    expect((await raw(f, 'vhdx')).equals(await raw(copy, 'vhdx'))).to.equal(true);
  });
});

describe('tsimg check: random bytes over the tables of vdi, vhdx and vmdk', function () {
  this.timeout(300_000);
  let t: ReturnType<typeof tempDir>;
  before(() => (t = tempDir('check-vv-random')));
  after(() => t.cleanup());

  const cases: { format: string; make: (f: string) => Promise<number>; len: number; repairs: boolean }[] = [
    {
      format: 'vdi',
      make: async (f) => {
        await createImage(f, 'vdi', '16M');
        await qemuIo(f, 'vdi', ['write -P 0x11 0 3M', 'write -P 0x22 9M 1M']);
        return readBytes(f, 0x154, 4).readUInt32LE(0);
      },
      len: 64,
      repairs: true,
    },
    {
      format: 'vhdx',
      make: async (f) => {
        await createImage(f, 'vhdx', '64M', { block_size: '1M' });
        await qemuIo(f, 'vhdx', ['write -P 0x11 0 3M', 'write -P 0x22 20M 1M']);
        return 2 * MiB; // qemu-img's BAT offset for this layout (1 MiB log at 1 MiB)
      },
      len: 256,
      repairs: true,
    },
    {
      format: 'vmdk',
      make: async (f) => {
        await createImage(f, 'vmdk', '64M');
        await qemuIo(f, 'vmdk', ['write -P 0x11 0 3M']);
        const gd = Number(readBytes(f, 0, 512).readBigUInt64LE(56)) * 512;
        return readBytes(f, gd, 4).readUInt32LE(0) * 512;
      },
      len: 256,
      repairs: false,
    },
  ];
  for (const c of cases) {
    it(`${c.format}: no crash, no hang, a one-line error at most; -r all leaves what qemu-img calls clean`, async () => {
      let corrupt = 0;
      for (let seed = 1; seed <= 4; seed++) {
        const f = path.join(t.dir, `r${seed}.${c.format}`);
        const at = await c.make(f);
        // Entries with small values are more interesting than huge ones: mask each byte's top bits at times.
        const n = pattern(c.len, seed * 7919);
        if (seed % 2 === 0) for (let i = 3; i < n.length; i += 4) n[i] = 0;
        patch(f, at, n);
        const r = await tsimg(['check', '--output', 'json', f]);
        expect([0, 1, 2, 3], r.stderr).to.include(r.code);
        expect(r.stderr, 'a stack trace').not.to.match(/\n\s+at /);
        if (r.code === 1) expect(r.stderr.trim().split('\n'), r.stderr).to.have.length(1);
        else expect(json(r.stdout)?.format).to.equal(c.format);
        if (r.code === 2) corrupt++;
        if (!c.repairs || r.code !== 2) continue;
        const fixed = await tsimg(['check', '-r', 'all', f]);
        expect(fixed.stderr, 'a stack trace').not.to.match(/\n\s+at /);
        const q = await run('qemu-img', ['check', f]);
        expect(q.code, `seed ${seed}: ${q.stdout}${q.stderr}`).to.equal(0);
      }
      expect(corrupt, 'no seed made a corruption').to.be.greaterThan(0);
    });
  }
});
