// qcow2 persistent dirty bitmaps kept as QEMU keeps them (drivers/format/qcow2/bitmap.ts):
// the same changes made by qemu-io to one copy of an image and by tsmount to another
// leave the same bits in every bitmap, read back by QEMU itself (qemu-nbd exports a
// bitmap, and qemu-img map over NBD's x-dirty-bitmap shows its set bits as "data":
// false), the same flags in qemu-img info, and a clean qemu-img check.
import { expect } from 'chai';
import fs from 'node:fs';
import path from 'node:path';
import { checkImage, createImage, qemuImg, qemuIo, run, runOk, tempDir } from './helpers/qemu.js';
import { bitmapInfo, dirtyRuns as bitmapRuns } from './helpers/bitmaps.js';
import { MountTracker, mountCounters } from './helpers/mount.js';
import { openTestImage, pattern, tsimg } from './helpers/images.js';

const KiB = 1024;
const MiB = 1024 * KiB;

/** A change of the disk, as qemu-io says it and as the node (or the mount) does it. */
type Op = { kind: 'write'; offset: number; length: number } | { kind: 'zero'; offset: number; length: number; unmap: boolean };

function qemuIoCommand(op: Op, i: number): string {
  if (op.kind === 'write') return `write -P ${(i % 200) + 1} ${op.offset} ${op.length}`;
  return `write -z${op.unmap ? ' -u' : ''} ${op.offset} ${op.length}`;
}

describe('qcow2 persistent dirty bitmaps', function () {
  this.timeout(180_000);
  let tmp: ReturnType<typeof tempDir>;
  before(() => (tmp = tempDir('qcow2-bitmaps')));
  after(() => tmp.cleanup());
  const mounts = new MountTracker();
  afterEach(() => mounts.cleanup());

  /** The set bits of `bitmap` as [offset, length] runs, as QEMU reads them. */
  const dirtyRuns = (file: string, bitmap: string): Promise<[number, number][]> => bitmapRuns(tmp.dir, file, bitmap);

  /**
   * A 64 MiB qcow2 (cluster_size `cs`) with bitmaps of several granularities, one of them
   * disabled, each with bits set already (data clusters in the file), copied twice: the
   * copy for QEMU and the one for tsmount.
   */
  async function twins(name: string, bitmaps: { name: string; granularity?: number; disabled?: boolean }[], cs = 64 * KiB): Promise<{ q: string; t: string }> {
    const base = path.join(tmp.dir, `${name}.qcow2`);
    await createImage(base, 'qcow2', 64 * MiB, { cluster_size: String(cs) });
    for (const b of bitmaps) await qemuImg('bitmap', '--add', ...(b.granularity ? ['-g', String(b.granularity)] : []), base, b.name);
    await qemuIo(base, 'qcow2', ['write -P 9 3M 100k', 'write -P 8 40M 5k']);
    for (const b of bitmaps) if (b.disabled) await qemuImg('bitmap', '--disable', base, b.name);
    const q = path.join(tmp.dir, `${name}-q.qcow2`);
    const t = path.join(tmp.dir, `${name}-t.qcow2`);
    fs.copyFileSync(base, q);
    fs.copyFileSync(base, t);
    return { q, t };
  }

  /** Both copies: the same bits in every bitmap, the same flags, the same disk; tsmount's copy check-clean. */
  async function expectSame(q: string, t: string, names: string[]): Promise<void> {
    expect(await bitmapInfo(t)).to.deep.equal(await bitmapInfo(q));
    for (const n of names) expect(await dirtyRuns(t, n), `bitmap ${n}`).to.deep.equal(await dirtyRuns(q, n));
    const c = await checkImage(t, 'qcow2');
    expect(c.code, c.output).to.equal(0);
    await runOk('qemu-img', ['compare', '-f', 'qcow2', '-F', 'qcow2', q, t]);
  }

  const ops: Op[] = [
    { kind: 'write', offset: 0, length: 512 },
    { kind: 'write', offset: 5000, length: 100 },
    { kind: 'write', offset: 3 * MiB + 70 * KiB, length: 200 * KiB },
    { kind: 'write', offset: 10 * MiB - 1, length: 2 },
    { kind: 'write', offset: 17 * MiB + 3 * KiB, length: 1 * MiB + 4097 },
    { kind: 'zero', offset: 24 * MiB, length: 64 * KiB, unmap: false },
    { kind: 'zero', offset: 30 * MiB + 512, length: 3 * KiB, unmap: true },
    { kind: 'zero', offset: 40 * MiB, length: 2 * MiB, unmap: true },
    { kind: 'write', offset: 64 * MiB - 700, length: 700 },
  ];
  const granular = [
    { name: 'g512', granularity: 512 },
    { name: 'g64k' },
    { name: 'g4k', granularity: 4096 },
    { name: 'g2m', granularity: 2 * MiB },
    { name: 'off', disabled: true },
  ];

  it('writes and zeroes through the driver set the bits qemu-io sets, granularities 512 B to 2 MiB; a disabled bitmap keeps its own', async () => {
    const { q, t } = await twins('node', granular);
    await qemuIo(q, 'qcow2', ops.map(qemuIoCommand));
    const node = await openTestImage(t, { rw: true });
    try {
      for (const [i, op] of ops.entries()) {
        if (op.kind === 'write') await node.write(op.offset, Buffer.alloc(op.length, (i % 200) + 1));
        else await node.zero!(op.offset, op.length, op.unmap);
      }
    } finally {
      await node.close();
    }
    await expectSame(q, t, granular.map((b) => b.name));
    // Bits were set where none were before: new bitmap data clusters, counted.
    expect((await dirtyRuns(t, 'g64k')).length).to.be.greaterThan(3);
  });

  it('while the image is open its bitmaps are in use in the file, what a killed server leaves (QEMU: inconsistent); close clears it', async () => {
    const { t } = await twins('killed', [{ name: 'b0' }, { name: 'off', disabled: true }]);
    const node = await openTestImage(t, { rw: true });
    try {
      await node.write(MiB, pattern(4096, 1));
      await node.flush();
      // Another process's view of the file now: what a crash would leave.
      const flags = (await bitmapInfo(t)).map((b) => [b.name, b.flags]);
      expect(flags).to.deep.equal([
        ['b0', ['in-use', 'auto']],
        ['off', ['in-use']],
      ]);
      const nbd = await run('qemu-nbd', ['-k', path.join(tmp.dir, 'refused.sock'), '-r', '-f', 'qcow2', '-B', 'b0', t], { timeoutMs: 10_000 });
      expect(nbd.code).to.not.equal(0);
      expect(nbd.stderr).to.match(/inconsistent/);
    } finally {
      await node.close();
    }
    expect((await bitmapInfo(t)).map((b) => [b.name, b.flags])).to.deep.equal([
      ['b0', ['auto']],
      ['off', []],
    ]);
  });

  it('an image only read keeps its bitmaps byte for byte', async () => {
    const { q, t } = await twins('read', [{ name: 'b0' }]);
    const node = await openTestImage(t, { rw: true });
    const buf = Buffer.alloc(MiB);
    await node.read(3 * MiB, buf);
    await node.close();
    expect(fs.readFileSync(t).equals(fs.readFileSync(q))).to.equal(true);
  });

  it('a bitmap with a damaged table is only marked in use; the others are kept; nothing throws', async () => {
    const { q, t } = await twins('damaged', [{ name: 'bad' }, { name: 'good', granularity: 4096 }]);
    // The first bitmap's first table entry: set a reserved bit (1..8), as a hostile image might.
    const fd = fs.openSync(t, 'r+');
    try {
      const hdr = Buffer.alloc(4096);
      fs.readSync(fd, hdr, 0, hdr.length, 0);
      let at = hdr.readUInt32BE(100);
      let dirOffset = 0;
      for (;;) {
        const type = hdr.readUInt32BE(at);
        const len = hdr.readUInt32BE(at + 4);
        if (type === 0) throw new Error('no bitmaps extension');
        if (type === 0x23852875) {
          dirOffset = Number(hdr.readBigUInt64BE(at + 8 + 16));
          break;
        }
        at += 8 + Math.ceil(len / 8) * 8;
      }
      const entry = Buffer.alloc(8);
      fs.readSync(fd, entry, 0, 8, dirOffset);
      const table = Number(entry.readBigUInt64BE(0));
      const first = Buffer.alloc(8);
      fs.readSync(fd, first, 0, 8, table);
      first[7]! |= 0x02;
      fs.writeSync(fd, first, 0, 8, table);
    } finally {
      fs.closeSync(fd);
    }
    await qemuIo(q, 'qcow2', ops.map(qemuIoCommand));
    const node = await openTestImage(t, { rw: true });
    try {
      for (const [i, op] of ops.entries()) if (op.kind === 'write') await node.write(op.offset, Buffer.alloc(op.length, (i % 200) + 1));
      for (const op of ops) if (op.kind === 'zero') await node.zero!(op.offset, op.length, op.unmap);
    } finally {
      await node.close();
    }
    expect((await bitmapInfo(t)).map((b) => [b.name, b.flags])).to.deep.equal([
      ['bad', ['in-use', 'auto']],
      ['good', ['auto']],
    ]);
    expect(await dirtyRuns(t, 'good')).to.deep.equal(await dirtyRuns(q, 'good'));
    // tsimg check counts the bad entry as QEMU's qcow2_check_bitmaps_refcounts counts it
    // (a corruption, its cluster then a leak); qemu-img stops there instead ("Check failed").
    const r = await tsimg(['check', '--output', 'json', t]);
    expect(r.code, r.stderr).to.equal(2);
    const j = JSON.parse(r.stdout) as { corruptions?: number; leaks?: number };
    expect([j.corruptions, j.leaks]).to.deep.equal([1, 1]);
    const q2 = await run('qemu-img', ['check', t]);
    expect(q2.code).to.equal(1);
    expect(q2.stderr).to.match(/Check failed: Invalid argument/);
  });

  it('tsimg snapshot: -a refused while the image has bitmaps, as qemu-img refuses it (nothing changed); -c and -d keep them', async () => {
    const { q, t } = await twins('snap', [{ name: 'b0' }, { name: 'off', disabled: true }]);
    await qemuImg('snapshot', '-c', 'one', q);
    expect((await tsimg(['snapshot', '-c', 'one', t])).code).to.equal(0);
    const before = fs.readFileSync(t);
    const qa = await run('qemu-img', ['snapshot', '-a', 'one', q]);
    const ta = await tsimg(['snapshot', '-a', 'one', t]);
    expect(qa.stderr).to.match(/Device has active dirty bitmaps/);
    expect(ta.code).to.equal(1);
    expect(ta.stderr.trim().split('\n')).to.have.length(1);
    expect(ta.stderr).to.match(/Could not apply snapshot 'one': .*Device has active dirty bitmaps/);
    expect(fs.readFileSync(t).equals(before), 'unchanged').to.equal(true);
    await qemuImg('snapshot', '-d', 'one', q);
    expect((await tsimg(['snapshot', '-d', 'one', t])).code).to.equal(0);
    expect(await bitmapInfo(t)).to.deep.equal(await bitmapInfo(q));
    expect(await dirtyRuns(t, 'b0')).to.deep.equal(await dirtyRuns(q, 'b0'));
    const c = await checkImage(t, 'qcow2');
    expect(c.code, c.output).to.equal(0);
  });

  it('tsimg commit into a base with bitmaps sets the bits qemu-img commit sets', async () => {
    const names = [{ name: 'g4k', granularity: 4096 }, { name: 'g64k' }];
    // commit: the base is written where the overlay has data.
    const { q: qb, t: tb } = await twins('commit-base', names);
    for (const [b, top] of [
      [qb, 'commit-q-top.qcow2'],
      [tb, 'commit-t-top.qcow2'],
    ] as const) {
      const f = path.join(tmp.dir, top);
      await createImage(f, 'qcow2', 64 * MiB, {}, { file: path.basename(b), format: 'qcow2' });
      await qemuIo(f, 'qcow2', ['write -P 3 1M 64k', 'write -P 4 7M 3k', 'write -z 20M 1M']);
    }
    await runOk('qemu-img', ['commit', '-q', path.join(tmp.dir, 'commit-q-top.qcow2')], { cwd: tmp.dir });
    expect((await tsimg(['commit', path.join(tmp.dir, 'commit-t-top.qcow2')], tmp.dir)).code).to.equal(0);
    await expectSame(qb, tb, names.map((b) => b.name));
  });

  it('tsimg convert -n into a target with bitmaps: the bits of every byte it changed, within those qemu-img sets', async () => {
    // qemu-img zeroes every zero area of the source in the target (its whole disk here);
    // tsimg zeroes only where the target does not read zeros already, so its bitmaps
    // say less: what changed, and nothing that did not.
    const names = [{ name: 'g4k', granularity: 4096 }, { name: 'g64k' }];
    const { q, t } = await twins('convert-target', names);
    const src = path.join(tmp.dir, 'convert-src.qcow2');
    await createImage(src, 'qcow2', 64 * MiB);
    const data: [number, number][] = [
      [2 * MiB, MiB],
      [33 * MiB, 4 * KiB],
    ];
    await qemuIo(src, 'qcow2', data.map(([o, l], i) => `write -P ${i + 6} ${o} ${l}`));
    await runOk('qemu-img', ['convert', '-n', '-f', 'qcow2', '-O', 'qcow2', src, q]);
    expect((await tsimg(['convert', '-n', '-f', 'qcow2', '-O', 'qcow2', src, t])).code).to.equal(0);
    await runOk('qemu-img', ['compare', '-f', 'qcow2', '-F', 'qcow2', q, t]);
    const within = (runs: [number, number][], at: number, len: number): boolean => runs.some(([s, l]) => s <= at && at + len <= s + l);
    // What the target held before the convert and reads differently now: its old data (twins) and the source's.
    const changed: [number, number][] = [...data, [3 * MiB, 100 * KiB], [40 * MiB, 5 * KiB]];
    for (const n of names.map((b) => b.name)) {
      const ours = await dirtyRuns(t, n);
      const theirs = await dirtyRuns(q, n);
      for (const [o, l] of changed) expect(within(ours, o, l), `${n}: ${o}+${l} marked`).to.equal(true);
      for (const [o, l] of ours) expect(within(theirs, o, l), `${n}: ${o}+${l} within qemu-img's`).to.equal(true);
    }
    expect(await bitmapInfo(t)).to.deep.equal(await bitmapInfo(q));
    const c = await checkImage(t, 'qcow2');
    expect(c.code, c.output).to.equal(0);
  });

  for (const [what, newSize] of [
    ['grown', 96 * MiB],
    ['shrunk', 40 * MiB - 512],
  ] as const) {
    it(`a disk ${what} with bitmaps: they follow it as QEMU's do (new bits clean), writes after it included`, async () => {
      const { q, t } = await twins(`resize-${what}`, granular);
      const before = ops.slice(0, 5);
      const after: Op[] = [
        { kind: 'write', offset: newSize - 4096, length: 4096 },
        { kind: 'write', offset: 20 * MiB, length: 8 * KiB },
      ];
      await qemuIo(q, 'qcow2', before.map(qemuIoCommand));
      await qemuImg('resize', ...(newSize < 64 * MiB ? ['--shrink'] : []), q, String(newSize));
      await qemuIo(q, 'qcow2', after.map(qemuIoCommand));
      const node = await openTestImage(t, { rw: true });
      try {
        for (const [i, op] of before.entries()) if (op.kind === 'write') await node.write(op.offset, Buffer.alloc(op.length, (i % 200) + 1));
        await node.truncate!(newSize);
        for (const [i, op] of after.entries()) if (op.kind === 'write') await node.write(op.offset, Buffer.alloc(op.length, (i % 200) + 1));
      } finally {
        await node.close();
      }
      await expectSame(q, t, granular.map((b) => b.name));
    });
  }

  it('through a --rw mount: writes of every size, fallocate zero and punch, the bits qemu-io sets (the writes the FUSE workers make around the driver logged)', async () => {
    const names = [{ name: 'g4k', granularity: 4096 }, { name: 'g64k' }, { name: 'g1m', granularity: MiB }];
    const { q, t } = await twins('mount', names);
    // Allocated first, so that the FUSE workers write these in place; the bitmaps then
    // cleared, so that only what the mount writes is in them.
    for (const f of [q, t]) {
      await qemuIo(f, 'qcow2', ['write -P 5 0 16M']);
      for (const b of names) await qemuImg('bitmap', '--clear', f, b.name);
    }
    // Three passes of writes with a pause between them: time for the map to publish the
    // allocated clusters, which the workers would then write in place but for the bitmaps.
    const random = (pass: number): Op[] => Array.from({ length: 64 }, (_, i): Op => ({ kind: 'write', offset: 8 * MiB + ((i * 7919 + pass * 104729) % 2048) * 4096, length: 4096 }));
    const passes: Op[][] = [Array.from({ length: 8 }, (_, i): Op => ({ kind: 'write', offset: i * MiB, length: MiB })), random(1), random(2)];
    const mountOps: Op[] = [
      ...passes.flat(),
      { kind: 'write', offset: 9 * MiB + 4096, length: 12 * KiB },
      { kind: 'zero', offset: 12 * MiB, length: 128 * KiB, unmap: false },
      { kind: 'zero', offset: 50 * MiB, length: 1 * MiB, unmap: true },
    ];
    await qemuIo(q, 'qcow2', mountOps.map(qemuIoCommand));
    const mp = path.join(tmp.dir, 'mnt');
    fs.mkdirSync(mp, { recursive: true });
    await mounts.mount(['--rw', t, mp]);
    const flat = path.join(mp, path.basename(t).replace(/\.qcow2$/, '.raw'));
    const fd = await fs.promises.open(flat, fs.constants.O_RDWR | fs.constants.O_DIRECT);
    try {
      for (const [i, op] of mountOps.entries()) {
        if (i === passes[0]!.length || i === passes[0]!.length + passes[1]!.length) await new Promise((r) => setTimeout(r, 400));
        if (op.kind === 'write') {
          const buf = Buffer.alloc(op.length, (i % 200) + 1);
          await fd.write(buf, 0, buf.length, op.offset);
        }
      }
    } finally {
      await fd.close();
    }
    for (const op of mountOps) {
      if (op.kind !== 'zero') continue;
      await runOk('fallocate', [...(op.unmap ? ['-p'] : ['-z']), '-o', String(op.offset), '-l', String(op.length), flat]);
    }
    const counters = await mountCounters(mp);
    await mounts.unmount(mp);
    // The workers write overwrites in place and log them; the close folds the log in.
    expect(counters.workerWrites ?? 0, 'writes the workers made around the driver').to.be.greaterThan(0);
    await expectSame(q, t, names.map((b) => b.name));
  });

  describe('tsimg bitmap, against qemu-img bitmap', function () {
    /** Both tools' commands, step by step, on twin images; after each step the same bitmaps, bits and a clean check. */
    async function sameSteps(name: string, steps: ({ qemu: string[] } | { io: string[] })[], opts: Record<string, string> = {}): Promise<{ q: string; t: string }> {
      const q = path.join(tmp.dir, `${name}-q.qcow2`);
      const t = path.join(tmp.dir, `${name}-t.qcow2`);
      for (const f of [q, t]) await createImage(f, 'qcow2', 64 * MiB, opts);
      for (const [i, step] of steps.entries()) {
        if ('io' in step) {
          await qemuIo(q, 'qcow2', step.io);
          await qemuIo(t, 'qcow2', step.io);
          continue;
        }
        const args = (f: string, a: string[]) => a.map((x) => (x === 'IMG' ? f : x));
        await runOk('qemu-img', ['bitmap', ...args(q, step.qemu)]);
        const r = await tsimg(['bitmap', ...args(t, step.qemu)]);
        expect(r.code, `step ${i}: ${r.stderr}`).to.equal(0);
        const info = await bitmapInfo(t);
        expect(info, `step ${i}`).to.deep.equal(await bitmapInfo(q));
        for (const b of info) if (!b.flags.includes('in-use')) expect(await dirtyRuns(t, b.name), `step ${i}: ${b.name}`).to.deep.equal(await dirtyRuns(q, b.name));
        const c = await checkImage(t, 'qcow2');
        expect(c.code, `step ${i}: ${c.output}`).to.equal(0);
      }
      await runOk('qemu-img', ['compare', '-f', 'qcow2', '-F', 'qcow2', q, t]);
      return { q, t };
    }

    it('--add (default and given granularities), writes, --disable, --add --merge, --clear, --enable, --remove down to none', async () => {
      await sameSteps('cli', [
        { qemu: ['--add', 'IMG', 'b0'] },
        { qemu: ['--add', '-g', '4k', 'IMG', 'small'] },
        { qemu: ['--add', '--granularity', '1M', 'IMG', 'big'] },
        { io: ['write -P 1 1M 4k', 'write -P 2 5M 1k', 'write -z 9M 300k'] },
        { qemu: ['--disable', 'IMG', 'b0'] },
        { io: ['write -P 3 20M 64k'] },
        { qemu: ['--add', '--merge', 'small', 'IMG', 'merged'] },
        { qemu: ['--merge', 'big', '--merge', 'b0', 'IMG', 'small'] },
        { qemu: ['--clear', 'IMG', 'big'] },
        { qemu: ['--enable', 'IMG', 'b0'] },
        { io: ['write -P 4 30M 8k'] },
        { qemu: ['--remove', 'IMG', 'small'] },
        { qemu: ['--add', '--remove', 'IMG', 'transient'] },
        { qemu: ['--remove', 'IMG', 'b0'] },
        { qemu: ['--remove', 'IMG', 'merged'] },
        { qemu: ['--remove', 'IMG', 'big'] },
        { qemu: ['--add', 'IMG', 'again'] },
      ]);
    });

    it('the default granularity follows the cluster size within 4 KiB..64 KiB, as qemu-img', async () => {
      for (const cs of ['512', '2M']) await sameSteps(`gran-${cs}`, [{ qemu: ['--add', 'IMG', 'b'] }, { io: ['write -P 1 1M 4k'] }], { cluster_size: cs });
    });

    it('--merge -b: a bitmap of another image of the same size; a different size refused in qemu-img words', async () => {
      const other = path.join(tmp.dir, 'merge-src.qcow2');
      await createImage(other, 'qcow2', 64 * MiB);
      await qemuImg('bitmap', '--add', '-g', '8k', other, 'src');
      await qemuIo(other, 'qcow2', ['write -P 1 3M 20k', 'write -P 2 60M 4k']);
      await sameSteps('merge-b', [{ qemu: ['--add', 'IMG', 'dst'] }, { qemu: ['--merge', 'src', '-b', other, '-F', 'qcow2', 'IMG', 'dst'] }]);
      const small = path.join(tmp.dir, 'merge-small.qcow2');
      await createImage(small, 'qcow2', 32 * MiB);
      await qemuImg('bitmap', '--add', small, 'src');
      const t = path.join(tmp.dir, 'merge-b-t.qcow2');
      const before = fs.readFileSync(t);
      const r = await tsimg(['bitmap', '--merge', 'src', '-b', small, t, 'dst']);
      expect(r.code).to.equal(1);
      expect(r.stderr.trim()).to.equal(`tsimg: Operation merge on bitmap dst failed: Bitmaps are of different sizes (destination size is ${64 * MiB}, source size is ${32 * MiB}) and can't be merged`);
      expect(fs.readFileSync(t).equals(before), 'unchanged bitmaps').to.equal(true);
    });

    it('refusals: qemu-img words, exit 1, one line; an inconsistent bitmap can only be removed', async () => {
      const f = path.join(tmp.dir, 'refuse.qcow2');
      await createImage(f, 'qcow2', 64 * MiB);
      await qemuImg('bitmap', '--add', f, 'b0');
      const v2 = path.join(tmp.dir, 'refuse-v2.qcow2');
      await createImage(v2, 'qcow2', 64 * MiB, { compat: '0.10' });
      const cases: [string[], RegExp][] = [
        [['--add', f, 'b0'], /^tsimg: Operation add on bitmap b0 failed: Bitmap already exists: b0$/],
        [['--add', '-g', '1000', f, 'g'], /^tsimg: Operation add on bitmap g failed: Granularity must be power of 2 and at least 512$/],
        [['--add', '-g', '256', f, 'g'], /^tsimg: Operation add on bitmap g failed: Granularity must be power of 2 and at least 512$/],
        [['--remove', f, 'nope'], /^tsimg: Operation remove on bitmap nope failed: Dirty bitmap 'nope' not found$/],
        [['--merge', 'nope', f, 'b0'], /^tsimg: Operation merge on bitmap b0 failed: Dirty bitmap 'nope' not found$/],
        [['--add', v2, 'b'], /^tsimg: Operation add on bitmap b failed: Can't make bitmap 'b' persistent in '.*refuse-v2.qcow2': Cannot store dirty bitmaps in qcow2 v2 files$/],
        [['-g', '4096', '--remove', f, 'b0'], /^tsimg: granularity only supported with --add$/],
        [['-F', 'qcow2', '--add', f, 'x'], /^tsimg: -F only supported with -b$/],
        [['-b', f, '--add', f, 'x'], /^tsimg: Merge bitmap source file only supported with --merge$/],
        [[f, 'b0'], /^tsimg: Need at least one of --add, --remove, --clear, --enable, --disable, or --merge$/],
      ];
      for (const [args, says] of cases) {
        const before = [fs.readFileSync(f), fs.readFileSync(v2)];
        const r = await tsimg(['bitmap', ...args]);
        expect(r.code, args.join(' ')).to.equal(1);
        expect(r.stderr.trim(), args.join(' ')).to.match(says);
        expect(fs.readFileSync(f).equals(before[0]!) && fs.readFileSync(v2).equals(before[1]!), `${args.join(' ')}: unchanged`).to.equal(true);
      }
      // An inconsistent bitmap (in use, as a killed QEMU leaves it).
      await run('qemu-io', ['-f', 'qcow2', '-c', 'write 0 4k', '-c', 'abort', f]);
      expect((await bitmapInfo(f))[0]!.flags).to.include('in-use');
      for (const op of ['--enable', '--disable', '--clear']) {
        const r = await tsimg(['bitmap', op, f, 'b0']);
        expect(r.code, op).to.equal(1);
        expect(r.stderr.trim().split('\n'), op).to.have.length(1);
        expect(r.stderr, op).to.match(/Bitmap 'b0' is inconsistent and cannot be used/);
      }
      expect((await tsimg(['bitmap', '--remove', f, 'b0'])).code).to.equal(0);
      expect(await bitmapInfo(f)).to.deep.equal([]);
      const c = await checkImage(f, 'qcow2');
      expect(c.code, c.output).to.equal(0);
    });
  });

  describe('tsimg convert --bitmaps, against qemu-img convert --bitmaps', function () {
    async function source(name: string): Promise<string> {
      const f = path.join(tmp.dir, `${name}.qcow2`);
      await createImage(f, 'qcow2', 64 * MiB);
      await qemuImg('bitmap', '--add', f, 'a');
      await qemuImg('bitmap', '--add', '-g', '4k', f, 'b');
      await qemuIo(f, 'qcow2', ['write -P 1 1M 64k', 'write -P 2 7M 5k', 'write -z 30M 1M']);
      await qemuImg('bitmap', '--disable', f, 'b');
      await qemuIo(f, 'qcow2', ['write -P 3 50M 4k']);
      return f;
    }

    it('copies every bitmap (granularity, enabled or not, bits) after the data; -n into an image that has none', async () => {
      const src = await source('conv-src');
      const q = path.join(tmp.dir, 'conv-q.qcow2');
      const t = path.join(tmp.dir, 'conv-t.qcow2');
      await runOk('qemu-img', ['convert', '--bitmaps', '-O', 'qcow2', src, q]);
      expect((await tsimg(['convert', '--bitmaps', '-O', 'qcow2', src, t])).code).to.equal(0);
      await expectSame(q, t, ['a', 'b']);
      for (const f of [q, t]) fs.rmSync(f);
      for (const f of [q, t]) await createImage(f, 'qcow2', 64 * MiB);
      await runOk('qemu-img', ['convert', '-n', '--bitmaps', '-O', 'qcow2', src, q]);
      expect((await tsimg(['convert', '-n', '--bitmaps', '-O', 'qcow2', src, t])).code).to.equal(0);
      await expectSame(q, t, ['a', 'b']);
    });

    it('an inconsistent bitmap: refused, or left out with a warning (--skip-broken-bitmaps)', async () => {
      const src = await source('conv-broken');
      await run('qemu-io', ['-f', 'qcow2', '-c', 'write 0 4k', '-c', 'abort', src]);
      await qemuImg('bitmap', '--add', src, 'fresh');
      const t = path.join(tmp.dir, 'conv-broken-t.qcow2');
      const r = await tsimg(['convert', '--bitmaps', '-O', 'qcow2', src, t]);
      expect(r.code).to.equal(1);
      expect(r.stderr.trim()).to.match(/^tsimg: Cannot copy inconsistent bitmap 'b' \(try --skip-broken-bitmaps/);
      expect(fs.existsSync(t)).to.equal(false);
      const q = path.join(tmp.dir, 'conv-broken-q.qcow2');
      await runOk('qemu-img', ['convert', '--bitmaps', '--skip-broken-bitmaps', '-O', 'qcow2', src, q]);
      const ok = await tsimg(['convert', '--bitmaps', '--skip-broken-bitmaps', '-O', 'qcow2', src, t]);
      expect(ok.code).to.equal(0);
      expect(ok.stderr.trim().split('\n')).to.deep.equal(["tsimg: warning: Skipping inconsistent bitmap 'b'", "tsimg: warning: Skipping inconsistent bitmap 'a'"]);
      await expectSame(q, t, ['fresh']);
    });

    it("refusals in qemu-img's words, before any target is made", async () => {
      const src = await source('conv-refuse');
      const raw = path.join(tmp.dir, 'conv-refuse.raw');
      await createImage(raw, 'raw', 64 * MiB);
      const v2 = path.join(tmp.dir, 'conv-refuse-v2.qcow2');
      await createImage(v2, 'qcow2', 64 * MiB, { compat: '0.10' });
      const out = path.join(tmp.dir, 'conv-refuse-out');
      const cases: [string[], string][] = [
        [['--bitmaps', '-O', 'raw', src, out], "Format driver 'raw' does not support bitmaps"],
        [['--bitmaps', '-O', 'qcow2', '-o', 'compat=0.10', src, out], "Format driver 'qcow2' does not support bitmaps"],
        [['--bitmaps', '-O', 'qcow2', raw, out], 'Source lacks bitmap support'],
        [['--bitmaps', '-O', 'qcow2', v2, out], 'Source lacks bitmap support'],
        [['--bitmaps', '-O', 'qcow2', src, src, out], 'Copying bitmaps only possible with single source'],
        [['--skip-broken-bitmaps', '-O', 'qcow2', src, out], 'Use of --skip-broken-bitmaps requires --bitmaps'],
      ];
      for (const [args, says] of cases) {
        const r = await tsimg(['convert', ...args]);
        expect(r.code, args.join(' ')).to.equal(1);
        expect(r.stderr.trim(), args.join(' ')).to.equal(`tsimg: ${says}`);
        expect(fs.existsSync(out), `${args.join(' ')}: no target left`).to.equal(false);
      }
    });
  });
});
