// Opening never costs more than the metadata cache plus a fixed bound, nor more than
// a few seconds, whatever a header claims (issue 12, "Bounded open" and "Key
// derivation limits that are real bounds"). Each image is made by qemu-img or
// cryptsetup and then patched to claim something huge; the open runs in a child
// process (test/helpers/open-probe.ts) so its peak RSS (VmHWM) can be measured.
import { expect } from 'chai';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { crc32cExcluding } from '../drivers/util/crc32c.js';
import { GUIDS } from '../drivers/format/vhdx/layout.js';
import { batEntries } from '../drivers/format/vhdx/index.js';
import { createImage, qemuIo, run, runOk, runTimingPbkdf, tempDir } from './helpers/qemu.js';
import { patch, readBytes, u32le, u64le } from './helpers/images.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const GiB = 1024 * MiB;
const TiB = 1024 * 1024 * MiB;
const PROBE = path.resolve(path.dirname(fileURLToPath(import.meta.url)), 'helpers/open-probe.js');
/** Peak RSS allowed for any of these opens (node itself is about 50 MB). */
const MAX_PEAK_KIB = 300 * 1024;

interface Probe {
  ok: boolean;
  openMs: number;
  peakKiB: number;
  size?: number;
  reads?: string[];
  error?: string;
}

async function probe(file: string, args: string[] = []): Promise<Probe> {
  const r = await run(process.execPath, [PROBE, file, ...args], { timeoutMs: 60_000 });
  const line = r.stdout.trim().split('\n').pop() ?? '';
  expect(line, `probe: ${r.stderr}`).to.match(/^\{/);
  return JSON.parse(line) as Probe;
}

function md5(b: Buffer): string {
  return crypto.createHash('md5').update(b).digest('hex');
}

function roundUp(v: number, to: number): number {
  return Math.ceil(v / to) * to;
}


describe('bounded open: huge tables', function () {
  this.timeout(300_000);
  let t: ReturnType<typeof tempDir>;
  before(() => (t = tempDir('bounded-open')));
  after(() => t.cleanup());

  it('opens a 64 TiB vhdx with 1 MiB blocks (a 512 MiB BAT) in under 3 s and 300 MB, and reads it as QEMU does', async () => {
    // A small image qemu-img made, its BAT moved to the end of the file and grown to
    // what 64 TiB needs, and the disk size raised: the same layout as qemu-img create
    // -o block_size=1M 64T (which takes a minute to write its BAT).
    const f = path.join(t.dir, 'big.vhdx');
    await createImage(f, 'vhdx', '8M', { block_size: '1M' });
    await qemuIo(f, 'vhdx', ['write -P 0x5a 0 1M']);
    const size = 64 * TiB;
    const chunkRatio = (2 ** 23 * 512) / MiB;
    const entries = batEntries(size, MiB, chunkRatio);
    const batLength = roundUp(entries * 8, MiB);
    const newBat = roundUp(fs.statSync(f).size, MiB);
    let metaOffset = 0;
    for (const rt of [192 * KiB, 256 * KiB]) {
      const b = readBytes(f, rt, 64 * KiB);
      const count = b.readUInt32LE(8);
      for (let i = 0; i < count; i++) {
        const at = 16 + i * 32;
        if (b.subarray(at, at + 16).equals(GUIDS.bat)) {
          const oldBat = Number(b.readBigUInt64LE(at + 16));
          if (rt === 192 * KiB) patch(f, newBat, readBytes(f, oldBat, 64));
          b.writeBigUInt64LE(BigInt(newBat), at + 16);
          b.writeUInt32LE(batLength, at + 24);
        } else if (b.subarray(at, at + 16).equals(GUIDS.metadata)) {
          metaOffset = Number(b.readBigUInt64LE(at + 16));
        }
      }
      b.writeUInt32LE(crc32cExcluding(b, 4), 4);
      patch(f, rt, b);
    }
    const meta = readBytes(f, metaOffset, 64 * KiB);
    for (let i = 0; i < meta.readUInt16LE(10); i++) {
      const at = 32 + i * 32;
      if (meta.subarray(at, at + 16).equals(GUIDS.virtualDiskSize)) patch(f, metaOffset + meta.readUInt32LE(at + 16), u64le(size));
    }
    // Blocks at 32 TiB and at the very end map to the block qemu-io wrote.
    const block0 = readBytes(f, newBat, 8);
    for (const block of [(32 * TiB) / MiB, size / MiB - 1]) patch(f, newBat + (block + Math.floor(block / chunkRatio)) * 8, block0);
    fs.truncateSync(f, newBat + batLength);
    // QEMU agrees on the crafted image (it reads the whole BAT: 7 s, 530 MB).
    await runOk('qemu-io', ['-r', '-f', 'vhdx', '-c', 'read -P 0x5a 0 64k', '-c', 'read -P 0x5a 32T 64k', '-c', `read -P 0x5a ${size - MiB} 1M`, '-c', 'read -P 0 1T 64k', f]);

    const p = await probe(f, ['0:65536', `${32 * TiB}:65536`, `${size - MiB}:${MiB}`, `${TiB}:65536`]);
    expect(p.ok, p.error).to.equal(true);
    expect(p.size).to.equal(size);
    expect(p.reads).to.deep.equal([md5(Buffer.alloc(64 * KiB, 0x5a)), md5(Buffer.alloc(64 * KiB, 0x5a)), md5(Buffer.alloc(MiB, 0x5a)), md5(Buffer.alloc(64 * KiB))]);
    expect(p.openMs, 'open time (ms)').to.be.below(3000);
    expect(p.peakKiB, 'peak RSS (KiB)').to.be.below(MAX_PEAK_KIB);
  });

  /** A vdi qemu-img made, patched to claim `blocks` blocks of 1 MiB; every map entry but the first points at one 0x5a block. */
  function craftVdi(f: string, blocks: number, diskSize: number): void {
    const mapEnd = 0x200 + blocks * 4;
    const offsetData = roundUp(mapEnd, MiB);
    patch(f, 0x158, u32le(offsetData >>> 0));
    patch(f, 0x170, u64le(diskSize));
    patch(f, 0x180, u32le(blocks));
    patch(f, 0x184, u32le(1));
    // The map reads as zeros (block 0) where the sparse file has nothing.
    patch(f, 0x200, Buffer.alloc(4, 0xff));
    if (offsetData <= 0xffffffff) patch(f, offsetData, Buffer.alloc(MiB, 0x5a));
    else fs.truncateSync(f, mapEnd);
  }

  it('opens --rw a qcow2 whose 32 MiB L1 names 4 million L2 tables within 300 MB (was 1.4 GB), and reads it', async () => {
    // The largest L1 QEMU accepts (QCOW_MAX_L1_SIZE), every entry a distinct L2 table
    // past the data: a writable open records each one for the overlap checks.
    const f = path.join(t.dir, 'l1-32m.qcow2');
    await createImage(f, 'qcow2', '2P');
    const head = readBytes(f, 0, 48);
    const entries = head.readUInt32BE(36);
    const l1Offset = Number(head.readBigUInt64BE(40));
    expect(entries).to.equal(4 * MiB);
    const base = 4 * GiB;
    const l1 = Buffer.alloc(entries * 8);
    for (let i = 0; i < entries; i++) l1.writeBigUInt64BE(BigInt(base + i * 64 * KiB), i * 8);
    patch(f, l1Offset, l1);
    fs.truncateSync(f, base + entries * 64 * KiB);
    const p = await probe(f, ['--rw', '0:65536']);
    expect(p.ok, p.error).to.equal(true);
    expect(p.reads).to.deep.equal([md5(Buffer.alloc(64 * KiB))]);
    expect(p.peakKiB, 'peak RSS (KiB)').to.be.below(MAX_PEAK_KIB);
  });

  it('opens a vdi with a 1 GiB block map (256 TiB) in under 3 s and 300 MB, and reads it', async () => {
    const f = path.join(t.dir, 'map1g.vdi');
    await createImage(f, 'vdi', '1M');
    craftVdi(f, 2 ** 28, 2 ** 48);
    const p = await probe(f, ['0:65536', `${100 * TiB}:65536`, `${2 ** 48 - MiB}:${MiB}`]);
    expect(p.ok, p.error).to.equal(true);
    expect(p.size).to.equal(2 ** 48);
    expect(p.reads).to.deep.equal([md5(Buffer.alloc(64 * KiB)), md5(Buffer.alloc(64 * KiB, 0x5a)), md5(Buffer.alloc(MiB, 0x5a))]);
    expect(p.openMs, 'open time (ms)').to.be.below(3000);
    expect(p.peakKiB, 'peak RSS (KiB)').to.be.below(MAX_PEAK_KIB);
  });

  it('refuses a vdi whose block map is over 2 GiB as QEMU does ("Unsupported VDI image size"), naming the image and the limit', async () => {
    const f = path.join(t.dir, 'map3g.vdi');
    await createImage(f, 'vdi', '1M');
    craftVdi(f, 0x30000000, 0x30000000 * MiB);
    const q = await run('qemu-img', ['info', f]);
    expect(q.stderr).to.match(/Unsupported VDI image size \(size is 0x3000000000000, max supported is 0x1fffff8000000\)/);
    const p = await probe(f);
    expect(p.ok).to.equal(false);
    expect(p.error).to.equal(`${f}: Unsupported VDI image size (size is 0x3000000000000, max supported is 0x1fffff8000000)`);
    expect(p.openMs).to.be.below(1000);
    // The block count is capped as well, with QEMU's message.
    patch(f, 0x170, u64le(MiB));
    const p2 = await probe(f);
    expect(p2.error).to.equal(`${f}: unsupported VDI image (too many blocks ${0x30000000}, max is ${0x1fffff80})`);
  });

  it('refuses at once a parallels image whose 2 GiB BAT does not fit in its 1 MiB file, naming the limit', async () => {
    const f = path.join(t.dir, 'bat2g.parallels');
    await createImage(f, 'parallels', '1G');
    fs.truncateSync(f, MiB);
    patch(f, 32, u32le(0x1fffffff));
    patch(f, 36, u64le(0x1fffffff * 2048));
    const q = await run('qemu-img', ['info', '-f', 'parallels', f]);
    expect(q.code).to.not.equal(0);
    const p = await probe(f);
    expect(p.ok).to.equal(false);
    expect(p.error).to.match(new RegExp(`^${f}: parallels BAT of 536870911 entries \\(2147483708 bytes with the header\\) does not fit in the file \\(1048576 bytes\\)$`));
    expect(p.openMs).to.be.below(1000);
    expect(p.peakKiB).to.be.below(MAX_PEAK_KIB);
  });
});

describe('bounded open: key derivation', function () {
  this.timeout(300_000);
  let t: ReturnType<typeof tempDir>;
  const PASS = 'bounded-open-pass';
  before(() => (t = tempDir('bounded-kdf')));
  after(() => t.cleanup());

  async function luks1(f: string): Promise<void> {
    // QEMU 7.2's PBKDF benchmark can fail on a fast machine: retried (scripts/lib/qemu.ts).
    const r = await runTimingPbkdf('qemu-img', ['create', '-q', '-f', 'luks', '--object', `secret,id=s0,data=${PASS}`, '-o', 'key-secret=s0,iter-time=10', f, '1M']);
    if (r.code !== 0) throw new Error(`qemu-img create -f luks ${f} failed: ${r.stderr.trim()}`);
  }

  /** LUKS1 key slot i (48 bytes at 208 + 48 i): active u32, iterations u32, salt[32], key material offset u32, stripes u32; big-endian. */
  const SLOT = (i: number): number => 208 + 48 * i;

  it('refuses a LUKS1 key slot asking for 2^26 PBKDF2 iterations at once, naming the limit and the image', async () => {
    const f = path.join(t.dir, 'iter.luks');
    await luks1(f);
    const b = Buffer.alloc(4);
    b.writeUInt32BE(2 ** 26);
    patch(f, SLOT(0) + 4, b);
    const p = await probe(f, ['--secret', PASS]);
    expect(p.ok).to.equal(false);
    expect(p.error).to.equal(`${f}: LUKS key slot 0 asks for 67108864 PBKDF2 iterations; tsmount allows at most 33554432 (cryptsetup's 2 s default, with a wide margin)`);
    expect(p.openMs).to.be.below(1000);
  });

  it('refuses at once a LUKS1 image whose 8 key slots together ask for too much, though each is within the bound', async () => {
    const f = path.join(t.dir, 'slots.luks');
    await luks1(f);
    const slot0 = readBytes(f, SLOT(0), 48);
    slot0.writeUInt32BE(2 ** 24, 4);
    for (let i = 0; i < 8; i++) patch(f, SLOT(i), slot0);
    const p = await probe(f, ['--secret', PASS]);
    expect(p.ok).to.equal(false);
    expect(p.error).to.match(new RegExp(`^${f}: LUKS key slots together ask for 4\\.0 times the key derivation work tsmount allows for one slot; the limit for one open is 4 `));
    expect(p.openMs).to.be.below(1000);
  });

  async function luks2(f: string): Promise<void> {
    fs.writeFileSync(f, '');
    fs.truncateSync(f, 20 * MiB);
    const key = `${f}.key`;
    fs.writeFileSync(key, PASS);
    await runOk('cryptsetup', ['luksFormat', '-q', '--batch-mode', '--key-file', key, '--type', 'luks2', '--pbkdf', 'argon2id', '--pbkdf-memory', '1024', '--pbkdf-force-iterations', '4', f]);
    fs.rmSync(key);
  }

  /** Rewrite keyslot 0's argon2 parameters in both LUKS2 header copies and seal their sha256 checksums again. */
  function patchArgon(f: string, time: number, memory: number): void {
    const hdrSize = Number(readBytes(f, 8, 8).readBigUInt64BE(0));
    for (const at of [0, hdrSize]) {
      const h = readBytes(f, at, hdrSize);
      const json = h.subarray(4096).toString('latin1').replace(/\0+$/, '');
      const next = json.replace(/"time":\d+,"memory":\d+/, `"time":${time},"memory":${memory}`);
      expect(next).to.not.equal(json);
      h.fill(0, 4096);
      h.write(next, 4096, 'latin1');
      h.fill(0, 448, 448 + 64);
      crypto.createHash('sha256').update(h).digest().copy(h, 448);
      patch(f, at, h);
    }
  }

  it('patches LUKS2 headers that cryptsetup and tsmount still accept (the oracle for the patching)', async () => {
    const f = path.join(t.dir, 'ok.luks2');
    await luks2(f);
    patchArgon(f, 5, 2048);
    const dump = await runOk('cryptsetup', ['luksDump', f]);
    expect(dump).to.match(/Memory:\s+2048/);
    expect(dump).to.match(/Time cost:\s+5/);
    // The header is taken (no checksum error); the key derived with other parameters no longer opens the slot.
    const p = await probe(f, ['--secret', PASS]);
    expect(p.error).to.equal(`${f}: invalid passphrase`);
  });

  it('refuses LUKS2 argon2 with 4 GiB of memory at once, naming the limit and the image (was: Invalid typed array length)', async () => {
    const f = path.join(t.dir, 'mem.luks2');
    await luks2(f);
    patchArgon(f, 4, 4 * 1024 * 1024);
    const p = await probe(f, ['--secret', PASS]);
    expect(p.ok).to.equal(false);
    expect(p.error).to.equal(`${f}: LUKS2 keyslot 0 asks for 4194304 KiB of argon2 memory; tsmount allows at most 1048576 KiB (1 GiB, cryptsetup's default maximum)`);
    expect(p.openMs).to.be.below(1000);
    expect(p.peakKiB).to.be.below(MAX_PEAK_KIB);
  });

  it('refuses LUKS2 argon2 with 1000 passes over 1 GiB at once, naming the limit', async () => {
    const f = path.join(t.dir, 'time.luks2');
    await luks2(f);
    patchArgon(f, 1000, 1024 * 1024);
    const p = await probe(f, ['--secret', PASS]);
    expect(p.ok).to.equal(false);
    expect(p.error).to.equal(`${f}: LUKS2 keyslot 0 asks for 1000 argon2 passes over 1048576 KiB; tsmount allows at most 16777216 KiB x passes (1 GiB x 16; cryptsetup's default takes 2 s)`);
    expect(p.openMs).to.be.below(1000);
  });
});
