// tsimg check [-r leaks|all] for qed and parallels against qemu-img check (QEMU 7.2),
// on images qemu-img and qemu-io make at test time with corruptions seeded into their
// tables by hand. For every seeded image: the same exit code and the same counts as
// qemu-img check --output json, the same report of a repair, an image qemu-img check
// finds no worse after our repair than after its own (for parallels: clean), and the
// data that was valid still reads the same.
import { expect } from 'chai';
import fs from 'node:fs';
import path from 'node:path';
import { run, runOk, tempDir } from './helpers/qemu.js';
import { patch, readBytes, tsimg } from './helpers/images.js';
import { rng } from './helpers/corrupt.js';

const KiB = 1024;
const MiB = 1024 * KiB;

type Json = Record<string, unknown>;

/** The fields of qemu-img check --output json that describe the image (not its name). */
const FIELDS = ['corruptions', 'leaks', 'check-errors', 'corruptions-fixed', 'leaks-fixed', 'total-clusters', 'allocated-clusters', 'fragmented-clusters', 'compressed-clusters', 'image-end-offset'];

function pick(j: Json): Json {
  const out: Json = {};
  for (const k of FIELDS) if (j[k] !== undefined) out[k] = j[k];
  return out;
}

async function qemuCheck(f: string, format: string, extra: string[] = []): Promise<{ code: number; json: Json }> {
  const r = await run('qemu-img', ['check', '-f', format, '--output=json', ...extra, f]);
  return { code: r.code, json: pick(JSON.parse(r.stdout) as Json) };
}

async function ourCheck(f: string, extra: string[] = []): Promise<{ code: number; json: Json; stderr: string }> {
  const r = await tsimg(['check', '--output', 'json', ...extra, f]);
  expect(r.stdout, r.stderr).to.match(/^\{/);
  return { code: r.code, json: pick(JSON.parse(r.stdout) as Json), stderr: r.stderr };
}

const u64 = (v: number | bigint): Buffer => {
  const b = Buffer.alloc(8);
  b.writeBigUInt64LE(BigInt(v));
  return b;
};
const u32 = (v: number): Buffer => {
  const b = Buffer.alloc(4);
  b.writeUInt32LE(v >>> 0);
  return b;
};

/** A range of guest data the base image holds (qemu-io read -P checks it). */
interface Written {
  offset: number;
  length: number;
  pattern: number;
}

interface Seed {
  title: string;
  seed: (f: string) => void;
  /** Guest ranges the seed damages: not compared after the repair. */
  damages?: number[];
  /** tsimg also names clusters two entries share (QEMU 7.2 counts nothing). */
  warns?: RegExp;
}

/** Every range still valid reads its pattern (through qemu-io, read-only). */
async function expectData(f: string, format: string, written: Written[], damaged: number[] = []): Promise<void> {
  const cmds: string[] = [];
  for (const w of written) if (!damaged.includes(w.offset)) cmds.push('-c', `read -q -P 0x${w.pattern.toString(16)} ${w.offset} ${w.length}`);
  if (!cmds.length) return;
  const r = await run('qemu-io', ['-r', '-f', format, ...cmds, f]);
  expect(r.stdout + r.stderr, `${path.basename(f)}: valid data after the repair`).to.not.match(/Pattern verification failed|error|failed/i);
}

/**
 * One seeded image, three ways: the read-only check, then -r leaks and -r all on
 * copies (qemu-img's own repair on a third copy each time for the reference).
 */
async function compareAll(dir: string, base: string, format: string, s: Seed, written: Written[], after: 'clean' | 'as-qemu'): Promise<void> {
  const name = s.title.replace(/\W+/g, '-');
  const f = path.join(dir, `${name}.${format}`);
  fs.copyFileSync(base, f);
  s.seed(f);
  const q = await qemuCheck(f, format);
  const ours = await ourCheck(f);
  expect(ours.code, `exit code (${ours.stderr})`).to.equal(q.code);
  expect(ours.json).to.deep.equal(q.json);
  if (s.warns) expect(ours.stderr).to.match(s.warns);
  for (const mode of ['leaks', 'all'] as const) {
    const theirs = path.join(dir, `${name}-q-${mode}.${format}`);
    const mine = path.join(dir, `${name}-t-${mode}.${format}`);
    fs.copyFileSync(f, theirs);
    fs.copyFileSync(f, mine);
    const qr = await qemuCheck(theirs, format, ['-r', mode]);
    const tr = await ourCheck(mine, ['-r', mode]);
    expect(tr.code, `-r ${mode}: exit code (${tr.stderr})`).to.equal(qr.code);
    expect(tr.json, `-r ${mode}: report`).to.deep.equal(qr.json);
    const qAfter = await qemuCheck(theirs, format);
    const tAfter = await qemuCheck(mine, format);
    if (mode === 'all' && after === 'clean') {
      expect(tAfter.code, `qemu-img check after tsimg check -r all: ${JSON.stringify(tAfter.json)}`).to.equal(0);
    } else if (mode === 'all' || after === 'as-qemu') {
      // QED: leaks stay and clusters referenced twice stay, as after QEMU's own repair.
      expect(tAfter, `qemu-img check after -r ${mode}`).to.deep.equal(qAfter);
    }
    await expectData(mine, format, written, s.damages);
  }
}

describe('tsimg check against qemu-img check (qed)', function () {
  this.timeout(300_000);
  let t: ReturnType<typeof tempDir>;
  before(() => (t = tempDir('tsimg-check-qed')));
  after(() => t.cleanup());

  // A 64 MiB qed, 64 KiB clusters, table_size 4 (L2 tables of 4 clusters, 8192 entries).
  const written: Written[] = [
    { offset: 0, length: 64 * KiB, pattern: 0x11 },
    { offset: MiB, length: 128 * KiB, pattern: 0x22 },
  ];
  let base: string;
  let l1 = 0;
  let l2 = 0;
  before(async () => {
    base = path.join(t.dir, 'base.qed');
    await runOk('qemu-img', ['create', '-q', '-f', 'qed', base, '64M']);
    await runOk('qemu-io', ['-f', 'qed', ...written.flatMap((w) => ['-c', `write -q -P 0x${w.pattern.toString(16)} ${w.offset} ${w.length}`]), '-c', 'write -q -z 2M 64k', base]);
    l1 = Number(readBytes(base, 40, 8).readBigUInt64LE());
    l2 = Number(readBytes(base, l1, 8).readBigUInt64LE());
    expect(l2).to.be.greaterThan(0);
  });
  /** Entry i of the L2 table (guest cluster i, 64 KiB each), and of the L1 table. */
  const l2e = (i: number): number => l2 + i * 8;
  const l1e = (i: number): number => l1 + i * 8;
  const dataOf = (f: string, i: number): number => Number(readBytes(f, l2e(i), 8).readBigUInt64LE());

  const seeds: Seed[] = [
    { title: 'clean, with a zero cluster', seed: () => undefined },
    { title: 'the need-check flag set on a clean image', seed: (f) => patch(f, 16, u64(2)) },
    { title: 'an L2 entry past the end of the file', seed: (f) => patch(f, l2e(16), u64(0x10000000)), damages: [MiB] },
    { title: 'a misaligned L2 entry', seed: (f) => patch(f, l2e(16), u64(dataOf(f, 16) + 0x200)), damages: [MiB] },
    { title: 'an L2 entry beyond 2^53', seed: (f) => patch(f, l2e(17), u64(0xfff0000000000000n)), damages: [MiB] },
    { title: 'an L1 entry past the end of the file', seed: (f) => patch(f, l1e(1), u64(0x10000000)) },
    { title: 'a misaligned L1 entry', seed: (f) => patch(f, l1e(1), u64(l2 + 0x100)) },
    { title: 'a data cluster referenced twice', seed: (f) => patch(f, l2e(17), u64(dataOf(f, 0))), damages: [MiB] },
    { title: 'an L2 table shared by two L1 entries', seed: (f) => patch(f, l1e(1), u64(l2)) },
    { title: 'an L2 table over data clusters', seed: (f) => patch(f, l1e(1), u64(dataOf(f, 0))) },
    { title: 'a leaked cluster (an L2 entry dropped)', seed: (f) => patch(f, l2e(16), u64(0)), damages: [MiB] },
    { title: 'leaked clusters at the end of the file', seed: (f) => fs.appendFileSync(f, Buffer.alloc(128 * KiB, 7)) },
    {
      title: 'a bad entry, a leak and the need-check flag',
      seed: (f) => {
        patch(f, l2e(16), u64(0x10000000));
        patch(f, l2e(17), u64(0));
        patch(f, 16, u64(2));
      },
      damages: [MiB],
    },
    {
      title: 'an L2 table of random bytes',
      seed: (f) => {
        const next = rng(18);
        const junk = Buffer.alloc(4 * 64 * KiB);
        for (let i = 0; i < junk.length; i++) junk[i] = Math.floor(next() * 256);
        // Some entries small enough to look like offsets in the file.
        for (let i = 0; i < 64; i++) junk.writeBigUInt64LE(BigInt(Math.floor(next() * 16) * 64 * KiB), i * 8 * 37);
        patch(f, l2, junk);
      },
      damages: [0, MiB],
    },
  ];
  for (const s of seeds) it(s.title, () => compareAll(t.dir, base, 'qed', s, written, 'as-qemu'));

  it('-r all clears the need-check flag, as qemu-img check -r all does', async () => {
    const f = path.join(t.dir, 'flag.qed');
    fs.copyFileSync(base, f);
    patch(f, 16, u64(2));
    const r = await ourCheck(f, ['-r', 'all']);
    expect(r.code).to.equal(0);
    expect(readBytes(f, 16, 8).readBigUInt64LE()).to.equal(0n);
  });

  it('fragmentation is counted per L2 table, as QEMU counts it', async () => {
    const f = path.join(t.dir, 'small.qed');
    await runOk('qemu-img', ['create', '-q', '-f', 'qed', '-o', 'cluster_size=4k', f, '32M']);
    await runOk('qemu-io', ['-f', 'qed', '-c', 'write -q 0 4k', '-c', 'write -q 8M 4k', '-c', 'write -q 8k 4k', '-c', 'write -q 8196k 4k', f]);
    const q = await qemuCheck(f, 'qed');
    const ours = await ourCheck(f);
    expect(ours).to.deep.include({ code: q.code, json: q.json });
    expect(q.json['fragmented-clusters']).to.equal(2);
  });

  it('a human report as qemu-img prints it', async () => {
    const f = path.join(t.dir, 'human.qed');
    fs.copyFileSync(base, f);
    patch(f, l2e(16), u64(0x10000000));
    const q = await run('qemu-img', ['check', f]);
    const ours = await tsimg(['check', f]);
    expect(ours.code).to.equal(q.code);
    expect(ours.stdout).to.equal(q.stdout);
  });
});

describe('tsimg check against qemu-img check (parallels)', function () {
  this.timeout(300_000);
  let t: ReturnType<typeof tempDir>;
  before(() => (t = tempDir('tsimg-check-parallels')));
  after(() => t.cleanup());

  // A 4 MiB parallels, 64 KiB clusters: header and BAT in cluster 0, then data.
  // qemu-io places guest clusters 0, 16, 17 and 48 at BAT values 1..4, in that order.
  const written: Written[] = [
    { offset: 0, length: 64 * KiB, pattern: 0x11 },
    { offset: MiB, length: 128 * KiB, pattern: 0x22 },
    { offset: 3 * MiB, length: 64 * KiB, pattern: 0x33 },
  ];
  let base: string;
  before(async () => {
    base = path.join(t.dir, 'base.parallels');
    await runOk('qemu-img', ['create', '-q', '-f', 'parallels', '-o', 'cluster_size=64k', base, '4M']);
    await runOk('qemu-io', ['-f', 'parallels', ...written.flatMap((w) => ['-c', `write -q -P 0x${w.pattern.toString(16)} ${w.offset} ${w.length}`]), base]);
    expect([0, 16, 17, 48].map((i) => readBytes(base, 64 + 4 * i, 4).readUInt32LE())).to.deep.equal([1, 2, 3, 4]);
  });
  const bat = (i: number): number => 64 + 4 * i;
  const INUSE = 0x746f6e59;

  const seeds: Seed[] = [
    { title: 'clean', seed: () => undefined },
    { title: 'the last cluster past the end of the file', seed: (f) => patch(f, bat(48), u32(1000)), damages: [3 * MiB] },
    { title: 'a middle cluster past the end of the file', seed: (f) => patch(f, bat(16), u32(1000)), damages: [MiB] },
    { title: 'a BAT entry of 0xffffffff', seed: (f) => patch(f, bat(5), u32(0xffffffff)) },
    { title: 'a cluster starting right at the end of the file (QEMU 7.2 passes it)', seed: (f) => patch(f, bat(20), u32(5)) },
    { title: 'two BAT entries sharing a cluster (QEMU 7.2 counts nothing)', seed: (f) => patch(f, bat(17), u32(2)), damages: [MiB], warns: /Warning: 1 BAT entries/ },
    { title: 'the in-use mark (not closed correctly)', seed: (f) => patch(f, 44, u32(INUSE)) },
    { title: 'two clusters of space leaked at the end', seed: (f) => fs.appendFileSync(f, Buffer.alloc(128 * KiB, 7)) },
    { title: 'part of a cluster leaked at the end', seed: (f) => fs.appendFileSync(f, Buffer.alloc(0x1200, 7)) },
    { title: 'the last cluster leaked (its BAT entry dropped)', seed: (f) => patch(f, bat(48), u32(0)), damages: [3 * MiB] },
    { title: 'a header claiming 2^40 sectors', seed: (f) => patch(f, 36, u64(2 ** 40)) },
    { title: 'a header claiming 8 sectors', seed: (f) => patch(f, 36, u64(8)), damages: [0, MiB, 3 * MiB] },
    {
      title: 'a cluster past the end, the in-use mark and a leak',
      seed: (f) => {
        patch(f, bat(48), u32(1000));
        patch(f, 44, u32(INUSE));
        fs.appendFileSync(f, Buffer.alloc(128 * KiB, 7));
      },
      damages: [3 * MiB],
    },
    {
      title: 'the old header (WithoutFreeSpace, BAT in sectors) with a leak',
      seed: (f) => {
        patch(f, 0, Buffer.from('WithoutFreeSpace', 'latin1'));
        for (const i of [0, 16, 17, 48]) patch(f, bat(i), u32(readBytes(f, bat(i), 4).readUInt32LE() * 128));
        fs.appendFileSync(f, Buffer.alloc(64 * KiB, 5));
      },
    },
    {
      title: 'a BAT of random bytes',
      seed: (f) => {
        const next = rng(7);
        const junk = Buffer.alloc(64 * 4);
        for (let i = 0; i < 64; i++) junk.writeUInt32LE(next() < 0.5 ? Math.floor(next() * 8) : Math.floor(next() * 2 ** 32), i * 4);
        patch(f, 64, junk);
      },
      damages: [0, MiB, 3 * MiB],
    },
  ];
  for (const s of seeds) it(s.title, () => compareAll(t.dir, base, 'parallels', s, written, 'clean'));

  it('-r leaks leaves the in-use mark; -r all clears it', async () => {
    const f = path.join(t.dir, 'inuse.parallels');
    fs.copyFileSync(base, f);
    patch(f, 44, u32(INUSE));
    fs.appendFileSync(f, Buffer.alloc(64 * KiB));
    const leaks = await ourCheck(f, ['-r', 'leaks']);
    expect(leaks).to.deep.include({ code: 2 });
    expect(leaks.json).to.include({ corruptions: 1, 'leaks-fixed': 1 });
    expect(readBytes(f, 44, 4).readUInt32LE()).to.equal(INUSE);
    expect((await ourCheck(f, ['-r', 'all'])).code).to.equal(0);
    expect(readBytes(f, 44, 4).readUInt32LE()).to.equal(0);
  });

  it('an empty image whose BAT fills more than a cluster is clean, and -r all keeps its BAT', async () => {
    // QEMU 7.2 measures the end of the data from its first cluster when no cluster is
    // in use, so it calls the BAT leaked space (and its -r cuts the BAT off); later
    // QEMU ends the data at data_off, as tsimg does.
    const f = path.join(t.dir, 'empty.parallels');
    await runOk('qemu-img', ['create', '-q', '-f', 'parallels', '-o', 'cluster_size=4k', f, '1G']);
    const size = fs.statSync(f).size;
    const r = await ourCheck(f);
    expect(r.code).to.equal(0);
    expect(r.json['image-end-offset']).to.equal(size);
    expect((await ourCheck(f, ['-r', 'all'])).code).to.equal(0);
    expect(fs.statSync(f).size).to.equal(size);
    await runOk('qemu-io', ['-f', 'parallels', '-c', 'write -q -P 9 512M 4k', f]);
    expect((await qemuCheck(f, 'parallels')).code).to.equal(0);
  });
});
