// tsimg info, map, compare, convert and check against qemu-img, the oracle, on images
// the tests make with qemu-img and qemu-io.
import { expect } from 'chai';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { md5File, run, runOk, runTimingPbkdf, tempDir } from './helpers/qemu.js';
import { formatTable, makeVariant, qemuIoRef, type ImageVariant } from './helpers/formats.js';
import { patch, TSIMG, tsimg } from './helpers/images.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const SECRET = 'hunter2';

/** Formats tsimg create can make (the writable ones). */
const writable = Object.entries(formatTable).filter(([, e]) => e.create !== undefined);

type Json = Record<string, unknown>;

/**
 * Layouts of every writable format whose map and info tsimg must print exactly as
 * qemu-img does: data in other files (vmdk extents, a qcow2 data file), data whose file
 * beneath holds holes (flat vmdk extents, a fixed VHD, a static VDI, preallocated qcow2:
 * QEMU's BDRV_BLOCK_RECURSE). vhdx is left out of map: QEMU 7.2's vhdx has no block
 * status, so qemu-img map calls every byte data and gives no offsets; tsimg map gives its
 * blocks' (tested offsets aside). A data file is named absolutely in the test: QEMU 7.2
 * looks for a relative one in its current folder.
 */
const layouts: [string, string[]][] = [
  ['raw', []],
  ['qcow2', []],
  ['qcow2', ['-o', 'preallocation=metadata']],
  ['qcow2', ['-o', 'preallocation=falloc']],
  ['qcow2', ['-o', 'data_file=img.data']],
  ['qcow2', ['-o', 'data_file=img.data,data_file_raw=on']],
  ['qed', []],
  ['qcow', []],
  ['vdi', []],
  ['vdi', ['-o', 'static=on']],
  ['vpc', []],
  ['vpc', ['-o', 'subformat=fixed']],
  ['parallels', []],
  ['vmdk', ['-o', 'subformat=monolithicSparse']],
  ['vmdk', ['-o', 'subformat=monolithicFlat']],
  ['vmdk', ['-o', 'subformat=twoGbMaxExtentSparse']],
  ['vmdk', ['-o', 'subformat=twoGbMaxExtentFlat']],
  ['vmdk', ['-o', 'subformat=streamOptimized']],
];

/** A folder holding `img`, an 8 MiB image of one of `layouts` that qemu-io wrote data, zeros and holes into. */
async function makeLayout(parent: string, format: string, opts: string[]): Promise<string> {
  const dir = fs.mkdtempSync(path.join(parent, `exact-${format}-`));
  await runOk('qemu-img', ['create', '-q', '-f', format, ...opts.map((o) => o.replace('img.data', path.join(dir, 'img.data'))), 'img', '8M'], { cwd: dir });
  // A streamOptimized file takes whole grains, in order, and no zero writes.
  const stream = opts.includes('subformat=streamOptimized');
  await qemuIoRef({ file: path.join(dir, 'img'), format }, stream ? ['write -P 1 64k 64k', 'write -P 2 1M 512k', 'write -P 3 7M 64k'] : ['write -P 1 64k 64k', 'write -P 2 1M 512k', 'write -z 3M 64k', 'write -P 3 7M 4k']);
  return dir;
}

/**
 * `tsimg SUBCOMMAND... --output O img` prints what `qemu-img` prints, byte for byte, for
 * each output form, the image named from its folder and through it (the names of its
 * other files follow the folder). Where qemu-img refuses (nowhere to print compressed
 * grains), tsimg refuses too, in one line.
 */
async function sameOutput(dir: string, subcommand: string[], outputs: string[]): Promise<void> {
  for (const [cwd, name] of [[dir, 'img'], [path.dirname(dir), path.join(path.basename(dir), 'img')]] as const) {
    for (const output of outputs) {
      const theirs = await run('qemu-img', [...subcommand, '--output', output, name], { cwd });
      const ours = await tsimg([...subcommand, '--output', output, name], cwd);
      if (theirs.code !== 0) {
        expect(ours.code, `${output}: ${theirs.stderr}`).to.equal(theirs.code);
        expect(ours.stderr.trim().split('\n'), ours.stderr).to.have.length(1);
        continue;
      }
      expect(ours.code, ours.stderr).to.equal(0);
      expect(ours.stdout.trim(), `${subcommand.join(' ')} --output ${output} ${name}`).to.equal(theirs.stdout.trim());
    }
  }
}

async function qemuInfo(args: string[], cwd: string): Promise<unknown> {
  return JSON.parse(await runOk('qemu-img', ['info', '-U', '--output=json', ...args], { cwd })) as unknown;
}

async function ourInfo(args: string[], cwd: string): Promise<unknown> {
  const r = await tsimg(['info', '--output', 'json', ...args], cwd);
  expect(r.code, r.stderr).to.equal(0);
  return JSON.parse(r.stdout) as unknown;
}

/**
 * Field by field: every key qemu-img gives must be ours and equal, except the parts of
 * format-specific a driver does not give (qcow2's, luks's and vmdk's are whole); within
 * format-specific, every key we give must equal qemu-img's.
 */
function expectSameInfo(ours: Json, theirs: Json, what: string): void {
  for (const [k, v] of Object.entries(theirs)) {
    if (k === 'format-specific') continue;
    expect(ours[k], `${what}: ${k}`).to.deep.equal(v);
  }
  for (const k of Object.keys(ours)) if (k !== 'format-specific') expect(theirs, `${what}: key ${k} only in ours`).to.have.property(k);
  const fsOurs = ours['format-specific'] as { type: string; data: Json } | undefined;
  const fsTheirs = theirs['format-specific'] as { type: string; data: Json } | undefined;
  if (fsOurs) {
    expect(fsTheirs, `${what}: format-specific`).to.not.equal(undefined);
    expect(fsOurs.type).to.equal(fsTheirs!.type);
    for (const [k, v] of Object.entries(fsOurs.data)) {
      expect(v, `${what}: format-specific ${k}`).to.deep.equal(fsTheirs!.data[k]);
    }
  }
  if (fsTheirs?.type === 'qcow2' || fsTheirs?.type === 'luks' || fsTheirs?.type === 'vmdk') {
    // qcow2's, luks's and vmdk's are given whole.
    expect(Object.keys(fsOurs!.data).sort(), `${what}: qcow2 format-specific keys`).to.deep.equal(Object.keys(fsTheirs.data).sort());
  }
}

describe('tsimg info against qemu-img info', function () {
  this.timeout(300_000);
  let t: ReturnType<typeof tempDir>;
  before(() => (t = tempDir('tsimg-info')));
  after(() => t.cleanup());

  for (const [format, entry] of writable) {
    const variant = entry.write!;
    it(`${format}: ${variant.title}`, async () => {
      const dir = path.join(t.dir, format);
      fs.mkdirSync(dir);
      const ref = await makeVariant(dir, format, variant, 'img');
      const name = path.basename(ref.file);
      // Encrypted images: no passphrase for either tool (metadata only).
      const theirs = (await qemuInfo([name], dir)) as Json;
      const ours = (await ourInfo([name], dir)) as Json;
      expectSameInfo(ours, theirs, format);
      // The human form names the image, its format and size as qemu-img's does.
      const human = await tsimg(['info', name], dir);
      const qh = await runOk('qemu-img', ['info', '-U', name], { cwd: dir });
      expect(human.stdout.split('\n').slice(0, 4)).to.deep.equal(qh.split('\n').slice(0, 4));
    });
  }

  for (const [format, opts] of layouts) {
    it(`${format} ${opts.join(' ')}: json and human output exactly as qemu-img info's`, async () => {
      const dir = await makeLayout(t.dir, format, opts);
      await sameOutput(dir, ['info', '-f', format], ['json', 'human']);
    });
  }

  for (const [format, opts] of layouts) {
    it(`${format} ${opts.join(' ')}: check prints exactly what qemu-img check prints, and exits alike`, async () => {
      const dir = await makeLayout(t.dir, format, opts);
      await sameOutput(dir, ['check', '-f', format], ['json', 'human']);
    });
  }

  const overlays: { title: string; format: string; variant: ImageVariant }[] = [
    { title: 'qcow2 over qcow2', format: 'qcow2', variant: { title: '', size: 8 * MiB, backing: { format: 'qcow2', size: 8 * MiB, io: ['write -P 1 0 64k'] }, io: ['write -P 2 1M 64k'] } },
    { title: 'qcow2 over raw', format: 'qcow2', variant: { title: '', size: 8 * MiB, backing: { format: 'raw', size: 8 * MiB }, io: ['write -P 2 1M 64k'] } },
    { title: 'qed over raw', format: 'qed', variant: { title: '', size: 8 * MiB, backing: { format: 'raw', size: 8 * MiB }, io: ['write -P 2 1M 64k'] } },
    { title: 'qcow over raw', format: 'qcow', variant: { title: '', size: 8 * MiB, backing: { format: 'raw', size: 8 * MiB }, io: ['write -P 2 1M 64k'] } },
    { title: 'vmdk over vmdk', format: 'vmdk', variant: { title: '', size: 8 * MiB, backing: { format: 'vmdk', size: 8 * MiB, io: ['write -P 1 0 64k'] }, io: ['write -P 2 1M 64k'] } },
    { title: 'qcow2 v2 with 512-byte clusters', format: 'qcow2', variant: { title: '', size: 8 * MiB, options: { compat: '0.10', cluster_size: 512 }, io: ['write -P 2 1M 64k'] } },
    { title: 'qcow2 with zstd, lazy refcounts and extended L2', format: 'qcow2', variant: { title: '', size: 8 * MiB, options: { compression_type: 'zstd', lazy_refcounts: 'on', extended_l2: 'on' }, io: ['write -P 2 1M 64k'] } },
    { title: 'qcow2 with an external raw data file', format: 'qcow2', variant: { title: '', size: 8 * MiB, options: { data_file: 'x.data', data_file_raw: 'on' }, io: ['write -P 2 1M 64k'] } },
    { title: 'qed with 4 KiB clusters', format: 'qed', variant: { title: '', size: 8 * MiB, options: { cluster_size: '4k', table_size: 2 }, io: [] } },
    { title: 'vmdk monolithicFlat', format: 'vmdk', variant: { title: '', size: 8 * MiB, options: { subformat: 'monolithicFlat' }, io: [] } },
    { title: 'vmdk streamOptimized', format: 'vmdk', variant: { title: '', size: 8 * MiB, options: { subformat: 'streamOptimized' }, io: ['write -P 2 1M 64k'] } },
    { title: 'vpc fixed (-f vpc)', format: 'vpc', variant: { title: '', size: 8 * MiB, options: { subformat: 'fixed' }, io: [] } },
    { title: 'vhdx with 1 MiB blocks', format: 'vhdx', variant: { title: '', size: 8 * MiB, options: { block_size: '1M' }, io: [] } },
  ];
  for (const o of overlays) {
    it(`${o.title}, alone and with --backing-chain`, async () => {
      const dir = fs.mkdtempSync(path.join(t.dir, 'ov-'));
      const ref = await makeVariant(dir, o.format, o.variant, 'top');
      const name = path.basename(ref.file);
      const f = ['-f', o.format];
      expectSameInfo((await ourInfo([...f, name], dir)) as Json, (await qemuInfo([...f, name], dir)) as Json, o.title);
      const chainOurs = (await ourInfo([...f, '--backing-chain', name], dir)) as Json[];
      const chainTheirs = (await qemuInfo([...f, '--backing-chain', name], dir)) as Json[];
      expect(chainOurs.length).to.equal(chainTheirs.length);
      chainOurs.forEach((l, i) => expectSameInfo(l, chainTheirs[i]!, `${o.title} layer ${i}`));
    });
  }

  it('qcow2 with internal snapshots lists them as qemu-img does', async () => {
    const dir = fs.mkdtempSync(path.join(t.dir, 'snap-'));
    await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', 's.qcow2', '4M'], { cwd: dir });
    await qemuIoRef({ file: path.join(dir, 's.qcow2'), format: 'qcow2' }, ['write -P 1 0 64k']);
    await runOk('qemu-img', ['snapshot', '-c', 'first', 's.qcow2'], { cwd: dir });
    await runOk('qemu-img', ['snapshot', '-c', 'second one', 's.qcow2'], { cwd: dir });
    const ours = (await ourInfo(['s.qcow2'], dir)) as Json;
    expectSameInfo(ours, (await qemuInfo(['s.qcow2'], dir)) as Json, 'snapshots');
    expect(ours.snapshots).to.have.length(2);
    const human = await tsimg(['info', 's.qcow2'], dir);
    expect(human.stdout).to.match(/Snapshot list:\nID +TAG +VM SIZE +DATE +VM CLOCK +ICOUNT\n1 +first +0 B /);
  });

  it('shows an image whose backing file is missing, with the missing name', async () => {
    const dir = fs.mkdtempSync(path.join(t.dir, 'miss-'));
    await runOk('qemu-img', ['create', '-q', '-u', '-f', 'qcow2', '-b', 'gone.qcow2', '-F', 'qcow2', 'm.qcow2', '16M'], { cwd: dir });
    const ours = (await ourInfo(['m.qcow2'], dir)) as Json;
    expectSameInfo(ours, (await qemuInfo(['m.qcow2'], dir)) as Json, 'missing backing');
    expect(ours['backing-filename']).to.equal('gone.qcow2');
    const human = await tsimg(['info', 'm.qcow2'], dir);
    expect(human.code).to.equal(0);
    expect(human.stdout).to.contain('backing file: gone.qcow2\n');
    // The whole chain cannot be shown: one line naming the missing file, exit 1, as qemu-img.
    const chain = await tsimg(['info', '--backing-chain', 'm.qcow2'], dir);
    expect(chain.code).to.equal(1);
    expect(chain.stderr.trim().split('\n')).to.have.length(1);
    expect(chain.stderr).to.contain('gone.qcow2');
  });

  it('refuses an image another process writes, and shows it with -U, as qemu-img info', async () => {
    const dir = fs.mkdtempSync(path.join(t.dir, 'lock-'));
    await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', 'l.qcow2', '1M'], { cwd: dir });
    const writer = spawn('qemu-io', ['-f', 'qcow2', '-c', 'sleep 20000', 'l.qcow2'], { cwd: dir, stdio: 'ignore' });
    try {
      // Wait until the writer holds its lock (qemu-img info fails then).
      for (let i = 0; i < 100 && (await run('qemu-img', ['info', 'l.qcow2'], { cwd: dir })).code === 0; i++) await new Promise((r) => setTimeout(r, 50));
      const locked = await tsimg(['info', 'l.qcow2'], dir);
      expect(locked.code).to.equal(1);
      expect(locked.stderr).to.match(/^tsimg: l\.qcow2: Failed to get shared "write" lock/);
      const shared = await tsimg(['info', '-U', 'l.qcow2'], dir);
      expect(shared.code, shared.stderr).to.equal(0);
      expect(shared.stdout).to.contain('file format: qcow2');
    } finally {
      writer.kill();
    }
  });

  for (const [title, format, opts] of [
    ['qcow2 with LUKS encryption', 'qcow2', 'encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10'],
    ['qcow2 with AES encryption', 'qcow2', 'encrypt.format=aes,encrypt.key-secret=s0'],
    ['qcow with AES encryption', 'qcow', 'encrypt.format=aes,encrypt.key-secret=s0'],
    ['luks', 'luks', 'key-secret=s0,iter-time=10'],
  ] as const) {
    it(`shows ${title} without its passphrase, and refuses its data`, async () => {
      const dir = fs.mkdtempSync(path.join(t.dir, 'enc-'));
      const file = `e.${format}`;
      const made = await runTimingPbkdf('qemu-img', ['create', '-q', '-f', format, '--object', `secret,id=s0,data=${SECRET}`, '-o', opts, file, '8M'], 40, { cwd: dir });
      expect(made.code, made.stderr).to.equal(0);
      const ours = (await ourInfo([file], dir)) as Json;
      expectSameInfo(ours, (await qemuInfo([file], dir)) as Json, title);
      expect(ours.encrypted).to.equal(true);
      // map reads block status only, but without the passphrase nothing decrypts: it must not pretend.
      const conv = await tsimg(['convert', '-O', 'raw', file, 'out.raw'], dir);
      expect(conv.code).to.not.equal(0);
      expect(conv.stderr.trim().split('\n')).to.have.length(1);
      expect(fs.existsSync(path.join(dir, 'out.raw'))).to.equal(false);
    });
  }
});

/** Merge adjacent entries that agree on everything but their offset (qemu splits runs where host offsets jump). */
function mergedRuns(entries: Json[], withOffsets: boolean): Json[] {
  const out: Json[] = [];
  for (const e of entries) {
    // qemu also asks the protocol under a data cluster, and calls its part past the end of
    // the file "zero" too; tsimg's layers answer for themselves only: data is data.
    const cur: Json = { start: e.start, length: e.length, depth: e.depth, present: e.present, zero: e.data ? false : e.zero, data: e.data };
    if (withOffsets && e.offset !== undefined) cur.offset = e.offset;
    const last = out[out.length - 1];
    const same = last && last.depth === cur.depth && last.present === cur.present && last.zero === cur.zero && last.data === cur.data;
    const offsetsFollow = !withOffsets || (last?.offset === undefined && cur.offset === undefined) || (typeof last?.offset === 'number' && last.offset + (last.length as number) === cur.offset);
    if (same && offsetsFollow && (last.start as number) + (last.length as number) === cur.start) last.length = (last.length as number) + (cur.length as number);
    else out.push(cur);
  }
  return out;
}

describe('tsimg map against qemu-img map', function () {
  this.timeout(120_000);
  let t: ReturnType<typeof tempDir>;
  before(() => (t = tempDir('tsimg-map')));
  after(() => t.cleanup());

  async function both(file: string, dir: string, withOffsets: boolean): Promise<void> {
    const theirs = JSON.parse(await runOk('qemu-img', ['map', '-U', '--output=json', file], { cwd: dir })) as Json[];
    const r = await tsimg(['map', '--output', 'json', file], dir);
    expect(r.code, r.stderr).to.equal(0);
    const ours = JSON.parse(r.stdout) as Json[];
    expect(mergedRuns(ours, withOffsets)).to.deep.equal(mergedRuns(theirs, withOffsets));
  }

  it('a qcow2 over a shorter qcow2 over raw: data, zeros, discards, holes, compressed, past the backing end', async () => {
    const dir = t.dir;
    fs.writeFileSync(path.join(dir, 'base.raw'), Buffer.alloc(0));
    fs.truncateSync(path.join(dir, 'base.raw'), 4 * MiB);
    const fd = fs.openSync(path.join(dir, 'base.raw'), 'r+');
    fs.writeSync(fd, Buffer.alloc(128 * KiB, 7), 0, 128 * KiB, 3 * MiB);
    fs.closeSync(fd);
    await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'base.raw', '-F', 'raw', 'mid.qcow2', '8M'], { cwd: dir });
    await qemuIoRef({ file: path.join(dir, 'mid.qcow2'), format: 'qcow2' }, ['write -P 1 0 128k', 'write -z 1M 64k', 'write -P 2 2M 64k', 'write -P 3 5M 64k']);
    await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'mid.qcow2', '-F', 'qcow2', 'top.qcow2', '16M'], { cwd: dir });
    await qemuIoRef({ file: path.join(dir, 'top.qcow2'), format: 'qcow2' }, [
      'write -P 4 64k 128k',
      'write -z 2M 64k',
      'write -z -u 4M 64k',
      'write -c -P 5 6M 64k',
      'write -P 6 9M 200k',
      'discard 9M 64k',
      'write -z 12M 128k',
    ]);
    await both('top.qcow2', dir, true);
    await both('mid.qcow2', dir, true);
  });

  it('raw: data and holes, with offsets', async () => {
    const f = path.join(t.dir, 'sparse.raw');
    fs.writeFileSync(f, Buffer.alloc(0));
    fs.truncateSync(f, 8 * MiB);
    const fd = fs.openSync(f, 'r+');
    fs.writeSync(fd, Buffer.alloc(64 * KiB, 1), 0, 64 * KiB, MiB);
    fs.writeSync(fd, Buffer.alloc(4 * KiB, 1), 0, 4 * KiB, 8 * MiB - 4 * KiB);
    fs.closeSync(fd);
    await both('sparse.raw', t.dir, true);
  });

  for (const [format, opts] of layouts) {
    it(`${format} ${opts.join(' ')}: json and human output exactly as qemu-img map's`, async () => {
      const dir = await makeLayout(t.dir, format, opts);
      await sameOutput(dir, ['map', '-f', format], ['json', 'human']);
    });
  }

  for (const [format, entry] of writable) {
    if (format === 'luks') continue; // qemu-img map needs the passphrase to open it
    it(`${format}: runs as qemu-img map gives them`, async () => {
      const dir = fs.mkdtempSync(path.join(t.dir, `${format}-`));
      const ref = await makeVariant(dir, format, entry.write!, 'img');
      await both(path.basename(ref.file), dir, false);
    });
  }
});

describe('tsimg compare against qemu-img compare', function () {
  this.timeout(120_000);
  let t: ReturnType<typeof tempDir>;
  before(() => (t = tempDir('tsimg-compare')));
  after(() => t.cleanup());

  async function same(args: string[]): Promise<void> {
    const q = await run('qemu-img', ['compare', '-U', ...args], { cwd: t.dir });
    const r = await tsimg(['compare', ...args], t.dir);
    expect(r.code, r.stderr).to.equal(q.code);
    if (q.code !== 2) expect(r.stdout).to.equal(q.stdout);
    else expect(r.stderr.trim().split('\n')).to.have.length(1);
  }

  it('identical, different (first sector named), different sizes, strict, errors', async () => {
    const d = t.dir;
    const mk = (name: string, size: number, writes: [number, number][]): void => {
      const f = path.join(d, name);
      fs.writeFileSync(f, Buffer.alloc(0));
      fs.truncateSync(f, size);
      const fd = fs.openSync(f, 'r+');
      for (const [at, v] of writes) fs.writeSync(fd, Buffer.from([v]), 0, 1, at);
      fs.closeSync(fd);
    };
    mk('a.raw', 4 * MiB, [[100, 1]]);
    mk('b.raw', 4 * MiB, [[100, 1]]);
    mk('c.raw', 4 * MiB, [[100, 1], [3 * MiB + 1000, 9]]);
    mk('d.raw', 6 * MiB, [[100, 1]]);
    mk('e.raw', 6 * MiB, [[100, 1], [5 * MiB + 777, 3]]);
    await runOk('qemu-img', ['convert', '-O', 'qcow2', 'c.raw', 'c.qcow2'], { cwd: d });
    await same(['a.raw', 'b.raw']);
    await same(['a.raw', 'c.raw']);
    await same(['-f', 'raw', '-F', 'qcow2', 'a.raw', 'c.qcow2']);
    await same(['c.raw', 'c.qcow2']);
    await same(['a.raw', 'd.raw']);
    await same(['a.raw', 'e.raw']);
    await same(['e.raw', 'a.raw']);
    await same(['-s', 'a.raw', 'd.raw']);
    await same(['a.raw', 'missing.raw']);
    // The first of several differences in one chunk (compare halves a chunk with native
    // compares), one at a chunk's last byte, the first non-zero byte of a longer tail.
    mk('a8.raw', 8 * MiB, [[100, 1]]);
    mk('f.raw', 8 * MiB, [[100, 1], [3 * MiB + 9, 3], [MiB + 5, 2], [4 * MiB - 1, 4]]);
    mk('g.raw', 8 * MiB, [[100, 1], [4 * MiB - 1, 7]]);
    mk('h.raw', 12 * MiB, [[100, 1], [11 * MiB, 6], [9 * MiB + 3, 5]]);
    await same(['a8.raw', 'f.raw']);
    await same(['f.raw', 'a8.raw']);
    await same(['a8.raw', 'g.raw']);
    await same(['a8.raw', 'h.raw']);
    // Sizes differ and the common part differs too: qemu-img says only the mismatch (its
    // size warning comes once the common part matched).
    await same(['c.raw', 'e.raw']);
    await same(['e.raw', 'c.raw']);
    expect((await tsimg(['compare', 'c.raw', 'e.raw'], d)).stdout).to.not.contain('Warning');
    expect((await tsimg(['compare', 'a8.raw', 'f.raw'], d)).stdout).to.contain(`Content mismatch at offset ${MiB}!`);
  });
});

describe('tsimg convert, checked by qemu-img compare and check', function () {
  this.timeout(600_000);
  let t: ReturnType<typeof tempDir>;
  before(() => (t = tempDir('tsimg-convert')));
  after(() => t.cleanup());

  /** Sources: a qcow2 overlay chain (zeros, holes, compressed), a vmdk, a vdi and a raw file. */
  const sources: { name: string; format: string; make: (dir: string) => Promise<void> }[] = [
    {
      name: 'chain.qcow2',
      format: 'qcow2',
      make: async (dir) => {
        await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', 'base.qcow2', '12M'], { cwd: dir });
        await qemuIoRef({ file: path.join(dir, 'base.qcow2'), format: 'qcow2' }, ['write -P 1 0 1M', 'write -P 2 5M 100k', 'write -z 8M 1M']);
        await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'chain.qcow2', '12M'], { cwd: dir });
        await qemuIoRef({ file: path.join(dir, 'chain.qcow2'), format: 'qcow2' }, ['write -P 3 512k 64k', 'write -z 5M 64k', 'write -c -P 4 10M 64k', 'write -P 0 11M 256k']);
      },
    },
    {
      name: 'src.vmdk',
      format: 'vmdk',
      make: async (dir) => {
        await runOk('qemu-img', ['create', '-q', '-f', 'vmdk', 'src.vmdk', '10M'], { cwd: dir });
        await qemuIoRef({ file: path.join(dir, 'src.vmdk'), format: 'vmdk' }, ['write -P 5 100k 200k', 'write -P 6 9M 1M']);
      },
    },
    {
      name: 'src.raw',
      format: 'raw',
      make: async (dir) => {
        const f = path.join(dir, 'src.raw');
        fs.writeFileSync(f, Buffer.alloc(0));
        fs.truncateSync(f, 10 * MiB);
        const fd = fs.openSync(f, 'r+');
        fs.writeSync(fd, Buffer.alloc(300 * KiB, 8), 0, 300 * KiB, 3 * MiB + 512);
        fs.closeSync(fd);
      },
    },
  ];

  for (const src of sources) {
    for (const [format, entry] of writable) {
      it(`${src.name} -> ${format}`, async () => {
        const dir = fs.mkdtempSync(path.join(t.dir, `${format}-`));
        await src.make(dir);
        const out = `out.${entry.ext}`;
        const secretArgs = format === 'luks' ? ['--target-secret', SECRET, '-o', 'iter-time=10'] : [];
        let r = await tsimg(['convert', '-O', format, ...secretArgs, src.name, out], dir);
        // LUKS creation times its PBKDF (see runTimingPbkdf); that one failure is retried.
        for (let i = 0; i < 20 && r.code !== 0 && /accurate CPU usage/.test(r.stderr); i++) r = await tsimg(['convert', '-O', format, ...secretArgs, src.name, out], dir);
        expect(r.code, r.stderr).to.equal(0);
        expect(r.stdout).to.equal('');
        if (format !== 'luks') {
          const cmp = await run('qemu-img', ['compare', '-U', '-f', src.format, '-F', format, src.name, out], { cwd: dir });
          expect(cmp.code, `${cmp.stdout}${cmp.stderr}`).to.equal(0);
        } else {
          // qemu-img compare takes --image-opts for both images or neither: read both to raw instead.
          const opts = ['--object', `secret,id=s0,data=${SECRET}`, '--image-opts', `driver=luks,file.filename=${out},key-secret=s0`];
          await runOk('qemu-img', ['convert', ...opts, '-O', 'raw', 'back.raw'], { cwd: dir });
          await runOk('qemu-img', ['convert', '-f', src.format, src.name, '-O', 'raw', 'want.raw'], { cwd: dir });
          expect(await md5File(path.join(dir, 'back.raw'))).to.equal(await md5File(path.join(dir, 'want.raw')));
        }
        if (entry.checked) {
          const c = await run('qemu-img', ['check', '-f', format, out], { cwd: dir });
          expect(c.code, c.stdout + c.stderr).to.equal(0);
        }
        // Sparse: no more data in the target than in what qemu-img convert makes of the same source.
        if (format !== 'luks') {
          await runOk('qemu-img', ['convert', '-f', src.format, src.name, '-O', format, `qemu.${entry.ext}`], { cwd: dir });
          const dataOf = async (file: string): Promise<number> => {
            const map = JSON.parse(await runOk('qemu-img', ['map', '--output=json', '-f', format, file], { cwd: dir })) as Json[];
            return map.filter((e) => e.data).reduce((n, e) => n + (e.length as number), 0);
          };
          expect(await dataOf(out), 'data in the target').to.be.at.most(await dataOf(`qemu.${entry.ext}`));
        }
      });
    }
  }

  it('-p prints progress; a failed convert leaves no target', async () => {
    const dir = fs.mkdtempSync(path.join(t.dir, 'p-'));
    await sources[2]!.make(dir);
    const r = await tsimg(['convert', '-p', '-O', 'qcow2', 'src.raw', 'p.qcow2'], dir);
    expect(r.code, r.stderr).to.equal(0);
    expect(r.stdout).to.contain('(100.00/100%)');
    // Without -p: nothing when standard output is not a terminal, progress when it is (through script(1)'s pseudo-terminal).
    const quiet = await tsimg(['convert', '-O', 'qcow2', 'src.raw', 'q.qcow2'], dir);
    expect(quiet.stdout).to.equal('');
    const pty = await run('script', ['-qec', `${process.execPath} ${TSIMG} convert -O qcow2 src.raw t.qcow2`, '/dev/null'], { cwd: dir });
    expect(pty.code, pty.stderr).to.equal(0);
    expect(pty.stdout).to.contain('(100.00/100%)');
    const bad = await tsimg(['convert', '-O', 'qcow2', '-o', 'cluster_size=3', 'src.raw', 'bad.qcow2'], dir);
    expect(bad.code).to.not.equal(0);
    expect(bad.stderr.trim().split('\n')).to.have.length(1);
    expect(fs.existsSync(path.join(dir, 'bad.qcow2'))).to.equal(false);
  });
});

describe('tsimg check against qemu-img check (qcow2)', function () {
  this.timeout(120_000);
  let t: ReturnType<typeof tempDir>;
  before(() => (t = tempDir('tsimg-check')));
  after(() => t.cleanup());

  /** A 16 MiB qcow2, 64 KiB clusters: header 0, reftable 1, refcount block 2, L1 3, L2 4, data from 5. */
  async function base(name: string, io: string[] = ['write -P 1 0 128k']): Promise<string> {
    const f = path.join(t.dir, name);
    await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', f, '16M']);
    await qemuIoRef({ file: f, format: 'qcow2' }, io);
    return f;
  }
  const u16 = (v: number): Buffer => Buffer.from([v >> 8, v & 0xff]);
  const REFBLOCK = 0x20000;
  const L2 = 0x40000;

  const seeds: { title: string; seed: (f: string) => void; io?: string[] }[] = [
    { title: 'clean', seed: () => undefined },
    { title: 'clean, with compressed and zero clusters and a snapshot', seed: () => undefined, io: ['write -P 1 0 128k', 'write -c -P 2 1M 64k', 'write -z 2M 64k', 'write -P 3 3M 64k'] },
    { title: 'a leaked cluster (an L2 entry dropped)', seed: (f) => patch(f, L2 + 8, Buffer.alloc(8)) },
    { title: 'refcount too low (a data cluster at 0)', seed: (f) => patch(f, REFBLOCK + 5 * 2, u16(0)) },
    { title: 'refcount too high on the L2 table (leak and COPIED)', seed: (f) => patch(f, REFBLOCK + 4 * 2, u16(2)) },
    { title: 'refcount too high on a data cluster', seed: (f) => patch(f, REFBLOCK + 6 * 2, u16(3)) },
  ];
  for (const s of seeds) {
    it(s.title, async () => {
      const f = await base(`${s.title.replace(/\W+/g, '-')}.qcow2`, s.io);
      if (s.io) await runOk('qemu-img', ['snapshot', '-c', 'snap', f]);
      s.seed(f);
      const q = await run('qemu-img', ['check', '--output=json', f]);
      const r = await tsimg(['check', '--output', 'json', f]);
      expect(r.code, r.stderr).to.equal(q.code);
      const qj = JSON.parse(q.stdout) as Json;
      const rj = JSON.parse(r.stdout) as Json;
      for (const k of ['corruptions', 'leaks', 'check-errors', 'total-clusters', 'image-end-offset', 'allocated-clusters', 'compressed-clusters', 'fragmented-clusters']) {
        expect(rj[k], k).to.equal(qj[k]);
      }
      // And byte for byte: QEMU prints the keys in its QDict's hash order.
      expect(r.stdout).to.equal(q.stdout);
      const human = await tsimg(['check', f]);
      const qh = await run('qemu-img', ['check', f]);
      expect(human.stdout).to.equal(qh.stdout);
    });
  }

  it('a format with no check: exit 63 (as qemu-img) and one line', async () => {
    const f = path.join(t.dir, 'x.raw');
    fs.writeFileSync(f, Buffer.alloc(MiB));
    const r = await tsimg(['check', f]);
    expect(r.code).to.equal(63);
    expect((await run('qemu-img', ['check', f])).code).to.equal(63);
    expect(r.stderr.trim().split('\n')).to.have.length(1);
  });
});

describe('tsimg convert: round trips between every pair of writable formats', function () {
  this.timeout(900_000);
  let t: ReturnType<typeof tempDir>;
  before(() => (t = tempDir('tsimg-matrix')));
  after(() => t.cleanup());

  /** qemu-img's view of `file` (a LUKS image through its secret), as arguments for convert and compare. */
  const qemuArgs = (format: string, file: string): string[] =>
    format === 'luks' ? ['--object', `secret,id=s0,data=${SECRET}`, '--image-opts', `driver=luks,file.filename=${file},key-secret=s0`] : ['-f', format, file];

  // One source per format, written by qemu-img (not by us) from the same raw disk: data,
  // a run of zeros inside data, holes, and data up to the last byte.
  const sourceOf = new Map<string, string>();
  before(async function () {
    this.timeout(300_000);
    const base = path.join(t.dir, 'base.raw');
    fs.writeFileSync(base, Buffer.alloc(0));
    fs.truncateSync(base, 6 * MiB);
    const fd = fs.openSync(base, 'r+');
    const put = (offset: number, length: number, seed: number): void => {
      const b = Buffer.alloc(length, seed);
      for (let i = 0; i < length; i += 512) b.writeUInt32LE(offset + i, i);
      fs.writeSync(fd, b, 0, length, offset);
    };
    put(0, 64 * KiB, 1);
    put(MiB + 512, 300 * KiB, 2);
    fs.writeSync(fd, Buffer.alloc(128 * KiB), 0, 128 * KiB, 2 * MiB);
    put(5 * MiB, MiB, 3);
    fs.closeSync(fd);
    for (const [format, entry] of writable) {
      const file = path.join(t.dir, `src.${entry.ext}`);
      if (format === 'luks') {
        await runTimingPbkdf('qemu-img', ['convert', '-f', 'raw', base, '--object', `secret,id=s0,data=${SECRET}`, '-O', 'luks', '-o', 'key-secret=s0,iter-time=10', file]);
      } else await runOk('qemu-img', ['convert', '-f', 'raw', base, '-O', format, file]);
      sourceOf.set(format, file);
    }
  });

  for (const [from] of writable) {
    it(`from ${from} to every writable format`, async () => {
      const src = sourceOf.get(from)!;
      const dir = fs.mkdtempSync(path.join(t.dir, `${from}-`));
      for (const [to, entry] of writable) {
        const out = path.join(dir, `out.${entry.ext}`);
        const args = ['convert', '-f', from, '-O', to, ...(from === 'luks' ? ['--secret', SECRET] : []), ...(to === 'luks' ? ['--target-secret', SECRET, '-o', 'iter-time=10'] : []), src, out];
        let r = await tsimg(args, dir);
        for (let i = 0; i < 20 && r.code !== 0 && /accurate CPU usage/.test(r.stderr); i++) r = await tsimg(args, dir);
        expect(r.code, `${from} -> ${to}: ${r.stderr}`).to.equal(0);
        // What the target reads is what the base disk reads (sizes may round up: vpc's geometry).
        const back = path.join(dir, `back-${to}.raw`);
        await runOk('qemu-img', ['convert', ...qemuArgs(to, out), '-O', 'raw', back]);
        const cmp = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', back, path.join(t.dir, 'base.raw')]);
        expect(cmp.code, `${from} -> ${to}: ${cmp.stdout}${cmp.stderr}`).to.equal(0);
        if (entry.checked) {
          const c = await run('qemu-img', ['check', '-f', to, out]);
          expect(c.code, `${from} -> ${to}: ${c.stdout}${c.stderr}`).to.equal(0);
        }
        fs.rmSync(out, { force: true });
        fs.rmSync(back, { force: true });
      }
    });
  }
});
