// Random operations against a model (issue 20's "Load" asks for fuzzing; this is its
// differential half): every variant of every writable format that test/helpers/formats.ts
// makes with qemu-img (its read variants: cluster sizes, refcount widths, extended L2,
// compressed clusters, backing chains, data files, encryption; its write variant and the
// writable layouts), mounted --rw, gets a seeded random sequence of unaligned writes,
// punched holes (fallocate -p) and writes of zeros (fallocate -z), ranges near the disk's
// end among them, bursts of four writes at once through four descriptors, with reads through O_DIRECT (the server, not the page cache) checked
// against a plain copy of the disk kept in memory. At the end the whole disk must read as
// the model, and after the unmount `qemu-img compare` must find the image equal to it and
// `qemu-img check` clean. The model starts as `qemu-img convert` reads the image, so a
// backing chain or a LUKS image's unwritten sectors are QEMU's bytes. qcow2 images with an
// internal snapshot (clusters shared, not COPIED) also keep the snapshot's bytes.
//
// CI: 60 operations per variant, seed 20261207. TSMOUNT_SOAK=1: 1500 per variant;
// TSMOUNT_DIFF_OPS=N and TSMOUNT_DIFF_SEED=S set either (a failure names its seed, and the
// last operations, so it can be run again); TSMOUNT_DIFF_FORMATS=qcow2,vdi picks formats.
import { expect } from 'chai';
import fs from 'node:fs';
import path from 'node:path';
import { createImage, qemuIo, run, runOk, tempDir } from './helpers/qemu.js';
import { checkRef, compareRef, convertRef, formatTable, makeVariant, writableLayouts, type ImageVariant } from './helpers/formats.js';
import { MountTracker } from './helpers/mount.js';
import { prng } from './helpers/random.js';

const OPS = Number(process.env.TSMOUNT_DIFF_OPS ?? (process.env.TSMOUNT_SOAK ? 1500 : 60));
const SEED = Number(process.env.TSMOUNT_DIFF_SEED ?? 20261207);
const PICKED = process.env.TSMOUNT_DIFF_FORMATS?.split(',');
/** Variants larger than this (GiB-sized sparse ones) are left to the read tests: the model is kept in memory. */
const MAX_SIZE = 128 * 1024 * 1024;
const KiB = 1024;
const MiB = 1024 * KiB;

interface Case {
  title: string;
  format: string;
  variant: ImageVariant;
  checked: boolean;
}

function cases(): Case[] {
  const out: Case[] = [];
  for (const [format, entry] of Object.entries(formatTable)) {
    if (!entry.write || (PICKED && !PICKED.includes(format))) continue;
    for (const v of [...entry.read, entry.write]) {
      // Variants made by other tools (the read-only formats') are left out.
      if (typeof v.size !== 'number' || v.size > MAX_SIZE || v.large || v.make) continue;
      out.push({ title: `${format}: ${v.title}`, format, variant: v, checked: entry.checked });
    }
  }
  for (const l of writableLayouts) {
    if (PICKED && !PICKED.includes(l.name)) continue;
    out.push({ title: `${l.name}: ${l.write.title}`, format: l.format, variant: l.write, checked: l.checked });
  }
  if (!PICKED || PICKED.includes('qcow2')) for (const v of snapshotVariants) out.push({ title: `qcow2: ${v.title}`, format: 'qcow2', variant: v, checked: true });
  return out;
}

/**
 * qcow2 with an internal snapshot taken between two rounds of data: the clusters it
 * shares are not COPIED, so every write, hole and zero over them must copy or keep them
 * as QEMU does, never change what the snapshot holds (the model is the active layer).
 */
const snapshotVariants: ImageVariant[] = ([
  { title: 'an internal snapshot over data (64 KiB clusters)', options: {} },
  { title: 'an internal snapshot over data (extended L2, 128 KiB clusters)', options: { extended_l2: 'on', cluster_size: 128 * KiB } },
  { title: 'an internal snapshot over data (compat=0.10, 4 KiB clusters)', options: { compat: '0.10', cluster_size: 4096 } },
] as { title: string; options: Record<string, string | number> }[]).map(({ title, options }) => ({
  title,
  size: 24 * MiB,
  io: [],
  make: async (file: string) => {
    await createImage(file, 'qcow2', 24 * MiB, options);
    await qemuIo(file, 'qcow2', ['write -P 0x11 0 3M', 'write -P 0x22 7M 1M', 'write -c -P 0x33 12M 256k', 'write -z 13M 64k']);
    await runOk('qemu-img', ['snapshot', '-c', 's1', file]);
    await qemuIo(file, 'qcow2', ['write -P 0x44 1M 100k', 'write -P 0x55 20M 2M']);
  },
}));

/** A seed per case, from the run's seed and the case's title (a case reruns alone with the same bytes). */
function caseSeed(title: string): number {
  let h = SEED >>> 0;
  for (let i = 0; i < title.length; i++) h = Math.imul(h ^ title.charCodeAt(i), 16777619) >>> 0;
  return h;
}

type Op = { kind: 'write' | 'burst' | 'punch' | 'zero' | 'read' | 'fsync'; offset: number; length: number };

/** A burst: four writes at once through four descriptors, one in each quarter of the disk (never overlapping). */
const BURST = 4;

function nextOp(rand: () => number, size: number): Op {
  const pick = <T>(xs: T[]): T => xs[Math.floor(rand() * xs.length)]!;
  const r = rand();
  const kind: Op['kind'] = r < 0.44 ? 'write' : r < 0.5 ? 'burst' : r < 0.63 ? 'punch' : r < 0.76 ? 'zero' : r < 0.98 ? 'read' : 'fsync';
  if (kind === 'burst') return { kind, offset: 0, length: 1 + Math.floor(rand() * Math.min(256 * KiB, size / BURST)) };
  // Where: anywhere, the last 300 KiB, the first 4 MiB, or next to a 64 KiB boundary.
  const where = pick([
    () => Math.floor(rand() * size),
    () => size - 1 - Math.floor(rand() * Math.min(size, 300 * KiB)),
    () => Math.floor(rand() * Math.min(size, 4 * MiB)),
    () => Math.max(0, Math.min(size - 1, Math.floor(rand() * (size / (64 * KiB))) * 64 * KiB + Math.floor(rand() * 1024) - 512)),
  ])();
  const length = pick([1, 511, 512, 4096, 4097, 64 * KiB, 64 * KiB + 1, 200 * KiB, 1 + Math.floor(rand() * 3 * MiB)]);
  return { kind, offset: where, length: Math.max(1, Math.min(length, size - where)) };
}

/** A buffer of `length` bytes: random, one repeated byte, or zeros (data that happens to be zero). */
function dataFor(rand: () => number, length: number): Buffer {
  const r = rand();
  if (r < 0.1) return Buffer.alloc(length);
  if (r < 0.4) return Buffer.alloc(length, 1 + Math.floor(rand() * 255));
  const b = Buffer.allocUnsafe(length);
  let x = Math.floor(rand() * 0xffffffff) >>> 0;
  for (let i = 0; i < length; i++) {
    x ^= x << 13; x >>>= 0; x ^= x >>> 17; x ^= x << 5; x >>>= 0;
    b[i] = x & 0xff;
  }
  return b;
}

/** The first offset where two buffers differ, or -1. */
function firstDifference(a: Buffer, b: Buffer): number {
  if (a.equals(b)) return -1;
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i++) if (a[i] !== b[i]) return i;
  return n;
}

/** The mounted file's bytes [offset, offset+length), read with O_DIRECT (aligned to 4 KiB around the range). */
async function readDirect(flat: string, dir: string, offset: number, length: number, size: number): Promise<Buffer> {
  const start = Math.floor(offset / 4096);
  const end = Math.ceil(Math.min(size, offset + length) / 4096);
  const out = path.join(dir, 'direct-read.bin');
  const r = await run('dd', [`if=${flat}`, `of=${out}`, 'bs=4096', `skip=${start}`, `count=${end - start}`, 'iflag=direct', 'status=none'], { timeoutMs: 60_000 });
  if (r.code !== 0) throw new Error(`dd iflag=direct of ${flat}: ${r.stderr.trim()}`);
  const got = fs.readFileSync(out);
  fs.rmSync(out);
  return got.subarray(offset - start * 4096, offset - start * 4096 + length);
}

describe(`differential: ${OPS} random writes, holes and zeros per variant against a model, judged by qemu-img (seed ${SEED})`, function () {
  this.timeout(600_000);
  const mounts = new MountTracker();
  let tmp: { dir: string; cleanup: () => void };
  let seq = 0;
  before(() => (tmp = tempDir('differential')));
  afterEach(() => mounts.cleanup());
  after(() => tmp.cleanup());

  for (const c of cases()) {
    it(c.title, async () => {
      const dir = path.join(tmp.dir, String(seq++));
      fs.mkdirSync(dir);
      const ref = await makeVariant(dir, c.format, c.variant, 'img');
      const modelFile = path.join(dir, 'model.raw');
      await convertRef(ref, modelFile);
      const model = fs.readFileSync(modelFile);
      const size = model.length;
      const mp = path.join(dir, 'mp');
      fs.mkdirSync(mp);
      await mounts.mount(['--rw', '-f', c.format, ...(ref.secret ? ['--secret', ref.secret] : []), ref.file, mp]);
      const flat = path.join(mp, fs.readdirSync(mp).find((n) => n.endsWith('.raw'))!);
      expect(fs.statSync(flat).size, 'the flat file is the disk').to.equal(size);

      const seed = caseSeed(c.title);
      const rand = prng(seed);
      const done: string[] = [];
      const where = (): string => `seed ${SEED} (case ${seed}); last operations:\n  ${done.slice(-8).join('\n  ')}`;
      const fh = await fs.promises.open(flat, 'r+');
      const others = await Promise.all(Array.from({ length: BURST - 1 }, () => fs.promises.open(flat, 'r+')));
      try {
        for (let i = 0; i < OPS; i++) {
          const op = nextOp(rand, size);
          done.push(`${i}: ${op.kind} ${op.offset} +${op.length}`);
          if (op.kind === 'write') {
            const data = dataFor(rand, op.length);
            const { bytesWritten } = await fh.write(data, 0, data.length, op.offset);
            expect(bytesWritten, where()).to.equal(data.length);
            data.copy(model, op.offset);
          } else if (op.kind === 'burst') {
            const quarter = Math.floor(size / BURST);
            const parts = [fh, ...others].map((h, q) => {
              const offset = q * quarter + Math.floor(rand() * (quarter - op.length));
              return { h, offset, data: dataFor(rand, op.length) };
            });
            done[done.length - 1] += ` at ${parts.map((p) => p.offset).join(', ')}`;
            const written = await Promise.all(parts.map((p) => p.h.write(p.data, 0, p.data.length, p.offset)));
            for (const w of written) expect(w.bytesWritten, where()).to.equal(op.length);
            for (const p of parts) p.data.copy(model, p.offset);
          } else if (op.kind === 'punch' || op.kind === 'zero') {
            const r = await run('fallocate', [op.kind === 'punch' ? '-p' : '-z', '-o', String(op.offset), '-l', String(op.length), flat], { timeoutMs: 60_000 });
            expect(r.code, `fallocate: ${r.stderr.trim()}; ${where()}`).to.equal(0);
            model.fill(0, op.offset, op.offset + op.length);
          } else if (op.kind === 'read') {
            const got = await readDirect(flat, dir, op.offset, op.length, size);
            const at = firstDifference(got, model.subarray(op.offset, op.offset + op.length));
            expect(at, `read differs from the model at ${op.offset + at}; ${where()}`).to.equal(-1);
          } else {
            await fh.sync();
          }
        }
      } finally {
        await Promise.all([fh, ...others].map((h) => h.close()));
      }
      const whole = await readDirect(flat, dir, 0, size, size);
      const at = firstDifference(whole, model);
      expect(at, `the disk differs from the model at ${at}; ${where()}`).to.equal(-1);
      await mounts.unmount(mp);
      fs.writeFileSync(modelFile, model);
      const same = await compareRef(ref, modelFile);
      expect(same.code, `qemu-img compare: ${same.stdout}${same.stderr}; ${where()}`).to.equal(0);
      if (c.variant.title.includes('internal snapshot')) {
        // The snapshot's data is untouched by everything done to the active layer.
        const snap = path.join(dir, 'snapshot.raw');
        await runOk('qemu-img', ['convert', '-U', '-l', 'snapshot.name=s1', '-f', 'qcow2', '-O', 'raw', ref.file, snap]);
        const held = fs.readFileSync(snap);
        for (const [o, l, b] of [[0, 3 * MiB, 0x11], [7 * MiB, MiB, 0x22], [12 * MiB, 256 * KiB, 0x33]] as const) {
          expect(held.subarray(o, o + l).every((x) => x === b), `snapshot s1 at ${o}; ${where()}`).to.equal(true);
        }
        expect(held.subarray(20 * MiB, 22 * MiB).every((x) => x === 0), `snapshot s1 at 20M; ${where()}`).to.equal(true);
      }
      if (c.checked) {
        const check = await checkRef(ref);
        // qed: qemu-img check counts a leaked cluster after some writes that QEMU's own
        // qemu-io leaves the same way (the same write on the same image: the same map, file
        // size and count; seed 7, 600 operations, "4 KiB clusters and table_size 2", found
        // 2026-12-07), so leaks alone (exit 3) pass there; corruption never does.
        const allowed = c.format === 'qed' ? [0, 3] : [0];
        expect(allowed, `qemu-img check (exit ${check.code}): ${check.stdout}${check.stderr}; ${where()}`).to.include(check.code);
      }
      fs.rmSync(dir, { recursive: true, force: true });
    });
  }
});
