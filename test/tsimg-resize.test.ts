// tsimg resize against qemu-img resize, the oracle, case by case: the same image made
// twice, one copy resized by each tool with the same arguments; then both must exit
// alike and, where they succeeded, read alike (qemu-img compare), check alike (qemu-img
// check --output json), map alike (qemu-img map, offsets aside) and, where the layout is
// fully QEMU's, take the same file size. Growing an overlay whose backing file is
// longer must leave the new area reading zeros, not the backing file's bytes (QEMU's
// bdrv_co_truncate): through tsimg and through a --growable mount alike.
import { expect } from 'chai';
import fs from 'node:fs';
import path from 'node:path';
import { run, runOk, runTimingPbkdf, tempDir } from './helpers/qemu.js';
import { tsimg } from './helpers/images.js';
import { MountTracker, mountpointIn } from './helpers/mount.js';

const PASS = 'resize-pass';
const LUKS = ['--object', `secret,id=s,data=${PASS}`];
const luksOpts = (file: string): string[] => [...LUKS, '--image-opts', `driver=luks,key-secret=s,file.filename=${file}`];

interface Layout {
  name: string;
  format: string;
  /** qemu-img create options. */
  create?: string[];
  /** Data files and other files the image owns besides itself (compared too). */
  extra?: (copy: string) => string[];
  /** A raw backing file of this size, longer than the 64M disk. */
  backing?: boolean;
  luks?: boolean;
}

const LAYOUTS: Layout[] = [
  { name: 'raw', format: 'raw' },
  { name: 'qcow2', format: 'qcow2' },
  { name: 'qcow2 4k clusters', format: 'qcow2', create: ['-o', 'cluster_size=4096'] },
  { name: 'qcow2 extended L2', format: 'qcow2', create: ['-o', 'extended_l2=on'] },
  { name: 'qcow2 v2', format: 'qcow2', create: ['-o', 'compat=0.10'] },
  { name: 'qcow2 data file', format: 'qcow2', create: ['-o', 'data_file=DATA'], extra: (c) => [`${c}.data`] },
  { name: 'qcow2 raw data file', format: 'qcow2', create: ['-o', 'data_file=DATA,data_file_raw=on'], extra: (c) => [`${c}.data`] },
  { name: 'qed', format: 'qed' },
  { name: 'luks', format: 'luks', luks: true },
  { name: 'qcow2 over a longer backing file', format: 'qcow2', backing: true },
  { name: 'qcow2 extended L2 over a longer backing file', format: 'qcow2', create: ['-o', 'extended_l2=on'], backing: true },
  { name: 'qcow2 v2 over a longer backing file', format: 'qcow2', create: ['-o', 'compat=0.10'], backing: true },
  { name: 'qed over a longer backing file', format: 'qed', backing: true },
];

const OPS: string[][] = [
  ['+64M'],
  ['200M'],
  ['67109376'],
  ['67109000'],
  ['--shrink', '32M'],
  ['32M'],
  ['--preallocation=metadata', '128M'],
  ['--preallocation=falloc', '128M'],
  ['--preallocation=full', '128M'],
  ['--preallocation=bogus', '128M'],
];

/** qemu-img map --output json without host offsets, runs of equal kind merged (allocation may differ, never what reads where). */
async function shape(dir: string, args: string[]): Promise<string> {
  const out = await runOk('qemu-img', ['map', '--output', 'json', ...args], { cwd: dir });
  const runs = (JSON.parse(out) as { start: number; length: number; depth: number; present: boolean; zero: boolean; data: boolean }[]).map(({ start, length, depth, present, zero, data }) => ({ start, length, depth, present, zero, data }));
  const merged: typeof runs = [];
  for (const r of runs) {
    const last = merged[merged.length - 1];
    if (last && last.depth === r.depth && last.present === r.present && last.zero === r.zero && last.data === r.data) last.length += r.length;
    else merged.push(r);
  }
  return JSON.stringify(merged);
}

/**
 * qemu-img check --output json without the file's name; `layout` false also without
 * where the file ends and how fragmented it is (where the clusters may lie elsewhere).
 */
async function checked(dir: string, args: string[], layout = true): Promise<string> {
  const r = await run('qemu-img', ['check', '--output', 'json', ...args], { cwd: dir });
  const j = JSON.parse(r.stdout) as Record<string, unknown>;
  delete j.filename;
  if (!layout) {
    delete j['image-end-offset'];
    delete j['fragmented-clusters'];
  }
  return `${r.code} ${JSON.stringify(j)}`;
}

describe('tsimg resize against qemu-img resize', function () {
  this.timeout(600_000);
  let t: ReturnType<typeof tempDir>;
  const mounts = new MountTracker();
  before(() => (t = tempDir('tsimg-resize')));
  afterEach(() => mounts.cleanup());
  after(() => t.cleanup());

  /** Make the layout as `file` in `dir` (64M, data at its start and its end). */
  async function make(dir: string, l: Layout, file: string): Promise<void> {
    const create = (l.create ?? []).map((o) => o.replace('DATA', path.join(dir, `${file}.data`)));
    if (l.backing) {
      if (!fs.existsSync(path.join(dir, 'base.raw'))) {
        await runOk('qemu-img', ['create', '-q', '-f', 'raw', 'base.raw', '128M'], { cwd: dir });
        await runOk('qemu-io', ['-f', 'raw', '-c', 'write -P 9 0 128M', 'base.raw'], { cwd: dir });
      }
      create.push('-b', 'base.raw', '-F', 'raw');
    }
    if (l.luks) {
      // One image copied: two would have two master keys, and their unwritten sectors would decrypt differently.
      const first = path.join(dir, 'first.luks');
      if (!fs.existsSync(first)) {
        const r = await runTimingPbkdf('qemu-img', ['create', '-q', '-f', 'luks', ...LUKS, '-o', 'key-secret=s,iter-time=10', first, '64M'], 40, { cwd: dir });
        expect(r.code, r.stderr).to.equal(0);
        await runOk('qemu-io', [...luksOpts(first), '-c', 'write -P 5 0 1M', '-c', 'write -P 6 63M 1M'], { cwd: dir });
      }
      fs.copyFileSync(first, path.join(dir, file));
      return;
    }
    await runOk('qemu-img', ['create', '-q', '-f', l.format, ...create, file, '64M'], { cwd: dir });
    await runOk('qemu-io', ['-f', l.format, '-c', 'write -P 5 1M 1M', '-c', 'write -P 6 63M 512k', file], { cwd: dir });
  }

  const imageArgs = (l: Layout, file: string): string[] => (l.luks ? luksOpts(file) : ['-f', l.format, file]);

  for (const l of LAYOUTS) {
    it(`${l.name}: every size and preallocation as qemu-img resize`, async function () {
      const dir = fs.mkdtempSync(path.join(t.dir, 'l-'));
      for (const op of OPS) {
        const ours = `t.${l.format}`;
        const theirs = `q.${l.format}`;
        for (const f of [ours, theirs, `${ours}.data`, `${theirs}.data`]) fs.rmSync(path.join(dir, f), { force: true });
        await make(dir, l, ours);
        await make(dir, l, theirs);
        const what = `${l.name}, resize ${op.join(' ')}`;
        const args = (file: string): string[] => (l.luks ? ['resize', ...op.slice(0, -1), ...luksOpts(file), op[op.length - 1]!] : ['resize', '-f', l.format, ...op.slice(0, -1), file, op[op.length - 1]!]);
        const before = fs.readFileSync(path.join(dir, ours));
        const q = await run('qemu-img', args(theirs), { cwd: dir });
        const r = await tsimg(args(ours), dir);
        expect(r.code, `${what}: tsimg ${r.stderr} / qemu-img ${q.stderr}`).to.equal(q.code);
        expect(r.stdout, what).to.equal(q.stdout);
        if (r.code !== 0) {
          // Refused before anything changed (QEMU may leave work done before its refusal, e.g. a v2 preallocation).
          expect(r.stderr.trim().split('\n'), `${what}: one line`).to.have.length(1);
          expect(fs.readFileSync(path.join(dir, ours)).equals(before), `${what}: image unchanged`).to.equal(true);
          continue;
        }
        const cmp = await run('qemu-img', ['compare', ...(l.luks ? [...LUKS, '--image-opts', `driver=luks,key-secret=s,file.filename=${theirs}`, `driver=luks,key-secret=s,file.filename=${ours}`] : ['-f', l.format, '-F', l.format, theirs, ours])], { cwd: dir });
        expect(cmp.code, `${what}: ${cmp.stdout}${cmp.stderr}`).to.equal(0);
        // QEMU moves the refcount table to the end of the file before preallocated qcow2
        // clusters (qcow2_refcount_area), tsmount leaves it; and with 4 KiB clusters a new
        // refcount block (one per 8 MiB of file) lies at the start of the range it counts
        // in tsmount, elsewhere in QEMU. Everything else is laid out alike.
        const prealloc = l.format === 'qcow2' && op[0]!.startsWith('--preallocation') && !l.create?.some((o) => o.includes('data_file'));
        const laidOutAlike = !(prealloc && (/falloc|full/.test(op[0]!) || l.name.includes('4k')));
        if (l.format !== 'raw' && !l.luks) expect(await checked(dir, imageArgs(l, ours), laidOutAlike), what).to.equal(await checked(dir, imageArgs(l, theirs), laidOutAlike));
        if (!l.luks) expect(await shape(dir, imageArgs(l, ours)), what).to.equal(await shape(dir, imageArgs(l, theirs)));
        if (laidOutAlike) expect(fs.statSync(path.join(dir, ours)).size, `${what}: file size`).to.equal(fs.statSync(path.join(dir, theirs)).size);
        for (const f of l.extra?.(ours) ?? []) expect(fs.statSync(path.join(dir, f)).size, `${what}: ${f}`).to.equal(fs.statSync(path.join(dir, f.replace(/^t\./, 'q.'))).size);
      }
    });
  }

  it('a qcow2 with a data file grown from nothing with preallocation=metadata maps its first cluster too', async () => {
    const dir = fs.mkdtempSync(path.join(t.dir, 'zero-'));
    for (const x of ['q', 't']) await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', `data_file=${path.join(dir, `${x}.data`)}`, `${x}.qcow2`, '0'], { cwd: dir });
    await runOk('qemu-img', ['resize', '--preallocation=metadata', 'q.qcow2', '1M'], { cwd: dir });
    const r = await tsimg(['resize', '--preallocation=metadata', 't.qcow2', '1M'], dir);
    expect(r.code, r.stderr).to.equal(0);
    expect(await shape(dir, ['t.qcow2'])).to.equal(await shape(dir, ['q.qcow2']));
    expect(await checked(dir, ['t.qcow2'])).to.equal(await checked(dir, ['q.qcow2']));
  });

  it('formats QEMU cannot resize are refused alike, the image unchanged', async () => {
    const dir = fs.mkdtempSync(path.join(t.dir, 'no-'));
    for (const format of ['vdi', 'vmdk', 'vpc', 'vhdx', 'parallels', 'qcow']) {
      const file = `n.${format}`;
      await runOk('qemu-img', ['create', '-q', '-f', format, file, '64M'], { cwd: dir });
      const before = fs.readFileSync(path.join(dir, file));
      const q = await run('qemu-img', ['resize', '-f', format, file, '+64M'], { cwd: dir });
      const r = await tsimg(['resize', '-f', format, file, '+64M'], dir);
      expect(r.code, `${format}: ${r.stderr}`).to.equal(q.code).and.to.equal(1);
      expect(r.stderr.trim().split('\n')).to.have.length(1);
      expect(fs.readFileSync(path.join(dir, file)).equals(before), format).to.equal(true);
    }
  });

  it('commit grows a shorter base as qemu-img commit does: over its own longer backing file, the grown part reads zeros', async () => {
    const dir = fs.mkdtempSync(path.join(t.dir, 'commit-'));
    for (const x of ['q', 't']) {
      await runOk('qemu-img', ['create', '-q', '-f', 'raw', `bb${x}.raw`, '128M'], { cwd: dir });
      await runOk('qemu-io', ['-f', 'raw', '-c', 'write -P 9 0 128M', `bb${x}.raw`], { cwd: dir });
      await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', `bb${x}.raw`, '-F', 'raw', `b${x}.qcow2`, '64M'], { cwd: dir });
      await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', `b${x}.qcow2`, '-F', 'qcow2', `t${x}.qcow2`, '100M'], { cwd: dir });
      await runOk('qemu-io', ['-c', 'write -P 3 1M 1M', `t${x}.qcow2`], { cwd: dir });
    }
    await runOk('qemu-img', ['commit', 'tq.qcow2'], { cwd: dir });
    const r = await tsimg(['commit', 'tt.qcow2'], dir);
    expect(r.code, r.stderr).to.equal(0);
    expect((await run('qemu-img', ['compare', 'bq.qcow2', 'bt.qcow2'], { cwd: dir })).code).to.equal(0);
    await runOk('qemu-io', ['-c', 'read -P 0 64M 36M', 'bt.qcow2'], { cwd: dir });
    expect(await checked(dir, ['bt.qcow2'])).to.equal(await checked(dir, ['bq.qcow2']));
    expect(await shape(dir, ['bt.qcow2'])).to.equal(await shape(dir, ['bq.qcow2']));
  });

  it('a --growable mount grows qed and luks too; what is written past the old end reads back, and QEMU reads it', async function () {
    if (process.getuid?.() !== 0) this.skip();
    const dir = fs.mkdtempSync(path.join(t.dir, 'grow-'));
    const blob = Buffer.alloc(4 << 20);
    for (let i = 0; i < blob.length; i++) blob[i] = (i * 2654435761) >>> 24;
    fs.writeFileSync(path.join(dir, 'pw'), PASS);
    for (const l of [LAYOUTS.find((x) => x.name === 'qed')!, LAYOUTS.find((x) => x.name === 'luks')!]) {
      const file = `g.${l.format}`;
      await make(dir, l, file);
      const mp = mountpointIn(dir, `mp-${l.format}`);
      await mounts.mount(['--rw', '--growable', ...(l.luks ? ['--secret-file', path.join(dir, 'pw')] : []), path.join(dir, file), mp]);
      const flat = path.join(mp, 'g.raw');
      fs.truncateSync(flat, 128 << 20);
      expect(fs.statSync(flat).size, l.name).to.equal(128 << 20);
      const fd = fs.openSync(flat, 'r+');
      try {
        fs.writeSync(fd, blob, 0, blob.length, 120 << 20);
        const back = Buffer.alloc(blob.length);
        fs.readSync(fd, back, 0, back.length, 120 << 20);
        expect(back.equals(blob), l.name).to.equal(true);
      } finally {
        fs.closeSync(fd);
      }
      await mounts.unmount(mp);
      const args = l.luks ? luksOpts(file) : ['-f', l.format, file];
      await runOk('qemu-io', [...args, '-c', `read -v ${120 << 20} 16`], { cwd: dir }).then((out) => expect(out, l.name).to.contain(blob.subarray(0, 4).toString('hex').replace(/(..)/g, '$1 ').trim()));
      if (!l.luks) expect((await run('qemu-img', ['check', ...args], { cwd: dir })).code, l.name).to.equal(0);
    }
  });

  it('a --growable mount grows a qcow2 overlay of a longer backing file as qemu-img resize does: zeros, not the backing file', async function () {
    if (process.getuid?.() !== 0) this.skip();
    const dir = fs.mkdtempSync(path.join(t.dir, 'mount-'));
    const l = LAYOUTS.find((x) => x.name === 'qcow2 over a longer backing file')!;
    await make(dir, l, 't.qcow2');
    await make(dir, l, 'q.qcow2');
    await runOk('qemu-img', ['resize', 'q.qcow2', '100M'], { cwd: dir });
    const mp = mountpointIn(dir, 'mp');
    await mounts.mount(['--rw', '--growable', path.join(dir, 't.qcow2'), mp]);
    const flat = path.join(mp, 't.raw');
    fs.truncateSync(flat, 100 << 20);
    expect(fs.statSync(flat).size).to.equal(100 << 20);
    // Read through the mount: the grown part is zeros, the old disk as it was.
    const fd = fs.openSync(flat, 'r');
    try {
      const tail = Buffer.alloc(36 << 20);
      fs.readSync(fd, tail, 0, tail.length, 64 << 20);
      expect(tail.every((b) => b === 0)).to.equal(true);
      const head = Buffer.alloc(1 << 20);
      fs.readSync(fd, head, 0, head.length, 0);
      expect(head.every((b) => b === 9)).to.equal(true);
    } finally {
      fs.closeSync(fd);
    }
    await mounts.unmount(mp);
    expect((await run('qemu-img', ['compare', 'q.qcow2', 't.qcow2'], { cwd: dir })).code).to.equal(0);
    expect(await checked(dir, ['t.qcow2'])).to.equal(await checked(dir, ['q.qcow2']));
    expect(await shape(dir, ['t.qcow2'])).to.equal(await shape(dir, ['q.qcow2']));
  });
});
