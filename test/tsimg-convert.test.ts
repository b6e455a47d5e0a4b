// tsimg convert -c (compressed clusters in qcow2, zlib and zstd, and qcow), several
// sources concatenated, and the progress output, against qemu-img: qemu-img check must
// call the image clean, qemu-img compare equal, and qemu-img map must show the
// compressed clusters (QEMU 7.2 gives no host offset for them).
import { expect } from 'chai';
import crypto from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { run, runOk, tempDir } from './helpers/qemu.js';
import { expectClean, openTestImage, patch, readBytes, TSIMG, tsimg } from './helpers/images.js';
import { IoError } from '../drivers/errors.js';
import { fileOpenOptions } from '../drivers/protocol/file.js';
import { chainStatus, StatusAhead } from '../fs/extents.js';
import { copyImage } from '../mount-helpers/tsimg/convert.js';
import { MemoryNode } from './helpers/memory-node.js';
import { dirtyRuns } from './helpers/bitmaps.js';
import type { Extent } from '../drivers/types.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const TSMOUNT = path.resolve(path.dirname(TSIMG), 'tsmount.js');

interface MapEntry {
  start: number;
  length: number;
  data: boolean;
  offset?: number;
}

async function qemuMap(dir: string, file: string): Promise<MapEntry[]> {
  return JSON.parse(await runOk('qemu-img', ['map', '--output=json', file], { cwd: dir })) as MapEntry[];
}

async function expectSame(dir: string, a: string, b: string): Promise<void> {
  const r = await run('qemu-img', ['compare', a, b], { cwd: dir });
  expect(r.code, `${a} vs ${b}: ${r.stdout}${r.stderr}`).to.equal(0);
}

async function ok(args: string[], dir: string): Promise<string> {
  const r = await tsimg(args, dir);
  expect(r.code, `tsimg ${args.join(' ')}: ${r.stderr}`).to.equal(0);
  return r.stdout;
}

/**
 * A raw source of `size` bytes: compressible data at 0 (1 MiB) and at 6 MiB (text),
 * zeros written at 2 MiB (must stay unallocated), a short compressible run at 3 MiB,
 * and random bytes at 5 MiB (clusters that do not shrink, written uncompressed).
 */
function makeSource(file: string, size: number): void {
  fs.writeFileSync(file, '');
  fs.truncateSync(file, size);
  patch(file, 0, Buffer.alloc(MiB, 0x41));
  patch(file, 3 * MiB, Buffer.alloc(100 * KiB, 0x33));
  patch(file, 5 * MiB, crypto.randomBytes(200 * KiB));
  if (size > 6 * MiB) patch(file, 6 * MiB, Buffer.from('hello world, '.repeat(5000)).subarray(0, Math.min(65000, size - 6 * MiB)));
}

/**
 * DIR/src.qcow2, 64 MiB of 0x31, whose cluster at 40 MiB has an L2 entry with an
 * unaligned host offset, which every read of that cluster refuses (qemu-img's too).
 */
async function damagedQcow2(dir: string): Promise<string> {
  const src = path.join(dir, 'src.qcow2');
  await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', src, '64M'], { cwd: dir });
  await runOk('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x31 0 64M', src], { cwd: dir });
  const l1 = Number(readBytes(src, 40, 8).readBigUInt64BE(0));
  const l2 = Number(readBytes(src, l1, 8).readBigUInt64BE(0) & 0x00fffffffffffe00n);
  const e = l2 + ((40 * MiB) / (64 * KiB)) * 8;
  const bad = Buffer.alloc(8);
  bad.writeBigUInt64BE(readBytes(src, e, 8).readBigUInt64BE(0) | 0x200n);
  patch(src, e, bad);
  return src;
}

describe('tsimg convert -c, several sources, progress', function () {
  this.timeout(300_000);
  let t: ReturnType<typeof tempDir>;
  before(() => (t = tempDir('tsimg-convert')));
  after(() => t.cleanup());

  for (const c of [
    { what: 'qcow2 (zlib)', fmt: 'qcow2', opts: [] as string[] },
    { what: 'qcow2 (zstd)', fmt: 'qcow2', opts: ['-o', 'compression_type=zstd'] },
    { what: 'qcow2 (512-byte clusters)', fmt: 'qcow2', opts: ['-o', 'cluster_size=512'] },
    { what: 'qcow2 (extended L2)', fmt: 'qcow2', opts: ['-o', 'extended_l2=on'] },
    { what: 'qcow2 (refcount_bits=1: no cluster shared)', fmt: 'qcow2', opts: ['-o', 'refcount_bits=1'] },
    { what: 'qcow', fmt: 'qcow', opts: [] as string[] },
  ]) {
    it(`convert -c into ${c.what}: clean, equal, compressed`, async () => {
      const dir = fs.mkdtempSync(path.join(t.dir, 'c-'));
      // An unaligned size: the last cluster is short (QEMU pads it with zeros).
      makeSource(path.join(dir, 'src.raw'), 7 * MiB - 3 * 512);
      await ok(['convert', '-c', '-O', c.fmt, ...c.opts, 'src.raw', `out.${c.fmt}`], dir);
      await ok(['convert', '-O', c.fmt, ...c.opts, 'src.raw', `plain.${c.fmt}`], dir);
      if (c.fmt === 'qcow2') {
        await expectClean(path.join(dir, 'out.qcow2'));
        const check = JSON.parse(await runOk('qemu-img', ['check', '--output=json', 'out.qcow2'], { cwd: dir })) as { 'compressed-clusters': number };
        expect(check['compressed-clusters']).to.be.greaterThan(0);
        if (c.opts.includes('compression_type=zstd')) expect(await runOk('qemu-img', ['info', 'out.qcow2'], { cwd: dir })).to.match(/compression type: zstd/);
      }
      await expectSame(dir, 'src.raw', `out.${c.fmt}`);
      // Ours reads it back too.
      expect((await tsimg(['compare', 'src.raw', `out.${c.fmt}`], dir)).code).to.equal(0);
      const map = await qemuMap(dir, `out.${c.fmt}`);
      const at = (g: number): MapEntry => map.find((e) => e.start <= g && e.start + e.length > g)!;
      // Compressed: data with no host offset; the random bytes stay plain (with one); zeros are not written.
      expect(at(0).data).to.equal(true);
      expect(at(0).offset).to.equal(undefined);
      expect(at(3 * MiB).offset).to.equal(undefined);
      expect(at(6 * MiB).offset).to.equal(undefined);
      expect(at(5 * MiB + 64 * KiB).offset).to.be.a('number');
      expect(at(2 * MiB).data).to.equal(false);
      expect(fs.statSync(path.join(dir, `out.${c.fmt}`)).size).to.be.lessThan(fs.statSync(path.join(dir, `plain.${c.fmt}`)).size);
    });
  }

  for (const fmt of ['qcow2', 'qcow']) {
    it(`${fmt} writeCompressed through the node: packed, then overwritten in part; onto allocated clusters refused (qcow2) or written plain (qcow)`, async () => {
      const dir = fs.mkdtempSync(path.join(t.dir, 'node-'));
      const img = path.join(dir, `n.${fmt}`);
      await runOk('qemu-img', ['create', '-q', '-f', fmt, ...(fmt === 'qcow2' ? ['-o', 'cluster_size=4k'] : []), img, '1M'], { cwd: dir });
      const expected = Buffer.alloc(MiB);
      const node = await openTestImage(img, { rw: true });
      try {
        const cs = node.compressedClusterSize!;
        expect(cs).to.equal(4096);
        const cluster = (seed: number): Buffer => Buffer.from(`cluster ${seed} `.repeat(cs)).subarray(0, cs);
        // Many small streams: several share a host cluster (qcow2) or follow each other (qcow).
        const writes = [];
        for (let i = 0; i < 64; i++) {
          expected.set(cluster(i), i * cs);
          writes.push(node.writeCompressed!(i * cs, cluster(i)));
        }
        await Promise.all(writes);
        // A cluster that does not shrink is written plain.
        const noise = crypto.randomBytes(cs);
        expected.set(noise, 100 * cs);
        await node.writeCompressed!(100 * cs, noise);
        // A partial write into a compressed cluster; a compressed write onto allocated clusters.
        const part = Buffer.alloc(1000, 0x5a);
        expected.set(part, 3 * cs + 100);
        await node.write(3 * cs + 100, part);
        if (fmt === 'qcow2') {
          // qcow2 refuses it, as QEMU 7.2 does (EIO), allocated plain or compressed, changing nothing.
          for (const [i, seed] of [[3, 200], [5, 201]] as const) {
            let refused: unknown;
            await node.writeCompressed!(i * cs, cluster(seed)).catch((e: unknown) => (refused = e));
            expect(refused).to.be.instanceOf(IoError);
            expect(String(refused)).to.match(/error while writing at byte \d+: Input\/output error/);
          }
        } else {
          expected.set(cluster(200), 3 * cs);
          await node.writeCompressed!(3 * cs, cluster(200));
          expected.set(cluster(201), 5 * cs);
          await node.writeCompressed!(5 * cs, cluster(201));
        }
        await node.flush();
        // After clusters were freed (qcow2 at flush), new streams still land somewhere safe.
        expected.set(cluster(300), 150 * cs);
        await node.writeCompressed!(150 * cs, cluster(300));
        await node.flush();
        // Not a whole cluster: refused.
        let err: unknown;
        await node.writeCompressed!(7 * cs + 1, cluster(1)).catch((e: unknown) => (err = e));
        expect(String(err)).to.match(/whole cluster/);
      } finally {
        await node.close();
      }
      if (fmt === 'qcow2') await expectClean(img);
      fs.writeFileSync(path.join(dir, 'expected.raw'), expected);
      await expectSame(dir, 'expected.raw', img);
      const map = await qemuMap(dir, img);
      const at = (g: number): MapEntry => map.find((e) => e.start <= g && e.start + e.length > g)!;
      expect(at(10 * 4096).offset).to.equal(undefined);
      expect(at(100 * 4096).offset).to.be.a('number');
    });
  }

  it('convert -n -c onto allocated clusters fails as qemu-img convert does: exit 1, one line, the image still clean', async () => {
    const dir = fs.mkdtempSync(path.join(t.dir, 'nc-'));
    await runOk('qemu-img', ['create', '-q', '-f', 'raw', 'src.raw', '4M'], { cwd: dir });
    await runOk('qemu-io', ['-f', 'raw', '-c', 'write -P 0x22 0 4M', 'src.raw'], { cwd: dir });
    await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', 'base.qcow2', '4M'], { cwd: dir });
    await runOk('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x11 1M 64k', 'base.qcow2'], { cwd: dir });
    fs.copyFileSync(path.join(dir, 'base.qcow2'), path.join(dir, 'theirs.qcow2'));
    fs.copyFileSync(path.join(dir, 'base.qcow2'), path.join(dir, 'ours.qcow2'));
    const q = await run('qemu-img', ['convert', '-n', '-c', '-f', 'raw', '-O', 'qcow2', 'src.raw', 'theirs.qcow2'], { cwd: dir });
    const r = await tsimg(['convert', '-n', '-c', '-f', 'raw', '-O', 'qcow2', 'src.raw', 'ours.qcow2'], dir);
    expect(q.code, q.stderr).to.equal(1);
    expect(r.code, r.stderr).to.equal(1);
    const at = /error while writing at byte (\d+): Input\/output error/;
    expect(q.stderr).to.match(at);
    expect(r.stderr).to.match(at);
    expect(r.stderr.match(at)![1]).to.equal(q.stderr.match(at)![1]);
    expect(r.stderr).to.contain('ours.qcow2');
    expect(r.stderr.trim().split('\n')).to.have.length(1);
    // Not corrupted: the refused cluster keeps its data, and nothing leaked.
    for (const f of ['theirs.qcow2', 'ours.qcow2']) await expectClean(path.join(dir, f));
    const cluster = async (f: string): Promise<Buffer> => {
      await runOk('qemu-img', ['convert', '-O', 'raw', f, `${f}.raw`], { cwd: dir });
      return readBytes(path.join(dir, `${f}.raw`), MiB, 64 * KiB);
    };
    expect((await cluster('ours.qcow2')).equals(Buffer.alloc(64 * KiB, 0x11))).to.equal(true);
    expect((await cluster('theirs.qcow2')).equals(Buffer.alloc(64 * KiB, 0x11))).to.equal(true);
    // Onto an allocated cluster that already holds the same bytes too: -n compares nothing, as qemu-img's.
    await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', 'same.qcow2', '4M'], { cwd: dir });
    await runOk('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x22 1M 64k', 'same.qcow2'], { cwd: dir });
    fs.copyFileSync(path.join(dir, 'same.qcow2'), path.join(dir, 'same-q.qcow2'));
    const qs = await run('qemu-img', ['convert', '-n', '-c', '-f', 'raw', '-O', 'qcow2', 'src.raw', 'same-q.qcow2'], { cwd: dir });
    const rs = await tsimg(['convert', '-n', '-c', '-f', 'raw', '-O', 'qcow2', 'src.raw', 'same.qcow2'], dir);
    expect(qs.code, qs.stderr).to.equal(1);
    expect(rs.code, rs.stderr).to.equal(1);
    expect(rs.stderr.match(at)?.[1]).to.equal(qs.stderr.match(at)![1]);
    await expectClean(path.join(dir, 'same.qcow2'));
    // Onto an image with nothing allocated it works, as qemu-img's.
    await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', 'empty.qcow2', '4M'], { cwd: dir });
    await ok(['convert', '-n', '-c', '-f', 'raw', '-O', 'qcow2', 'src.raw', 'empty.qcow2'], dir);
    await expectClean(path.join(dir, 'empty.qcow2'));
    await expectSame(dir, 'src.raw', 'empty.qcow2');
  });

  it('convert -m N: N chunks read at once, written in order (host clusters in guest order); -m outside 1..16 refused as qemu-img', async () => {
    const dir = fs.mkdtempSync(path.join(t.dir, 'm-'));
    // 24 MiB, data in every other MiB, with a different byte in each.
    const src = path.join(dir, 'src.raw');
    fs.writeFileSync(src, '');
    fs.truncateSync(src, 24 * MiB);
    for (let i = 0; i < 24; i += 2) patch(src, i * MiB + 4096, crypto.randomBytes(MiB - 8192));
    for (const m of ['1', '3', '16']) {
      await ok(['convert', '-m', m, '-O', 'qcow2', 'src.raw', `m${m}.qcow2`], dir);
      await expectClean(path.join(dir, `m${m}.qcow2`));
      await expectSame(dir, 'src.raw', `m${m}.qcow2`);
      // In order: every data run lies after the one before it in the file, as qemu-img's do.
      const offsets = (await qemuMap(dir, `m${m}.qcow2`)).filter((e) => e.data).map((e) => e.offset!);
      expect(offsets.length).to.be.greaterThan(1);
      expect(offsets, `-m ${m}`).to.deep.equal([...offsets].sort((a, b) => a - b));
    }
    await ok(['convert', '-m', '16', '-W', '-O', 'qcow2', 'src.raw', 'w.qcow2'], dir);
    await expectClean(path.join(dir, 'w.qcow2'));
    await expectSame(dir, 'src.raw', 'w.qcow2');
    for (const m of ['0', '17', 'x']) {
      const q = await run('qemu-img', ['convert', '-m', m, '-O', 'qcow2', 'src.raw', 'bad.qcow2'], { cwd: dir });
      const r = await tsimg(['convert', '-m', m, '-O', 'qcow2', 'src.raw', 'bad.qcow2'], dir);
      expect(r.code).to.equal(q.code).and.to.equal(1);
      expect(r.stderr.replace(/^tsimg: /, '')).to.equal(q.stderr.replace(/^qemu-img: /, ''));
      expect(fs.existsSync(path.join(dir, 'bad.qcow2'))).to.equal(false);
    }
  });

  it('convert -t: every cache mode writes the same image (unsafe, the default, leaves the sync to the host); another value refused as qemu-img, before anything is made', async () => {
    const dir = fs.mkdtempSync(path.join(t.dir, 't-'));
    const src = path.join(dir, 'src.raw');
    fs.writeFileSync(src, '');
    fs.truncateSync(src, 8 * MiB);
    patch(src, MiB, crypto.randomBytes(3 * MiB));
    for (const mode of ['unsafe', 'writeback', 'writethrough', 'none', 'directsync']) {
      await ok(['convert', '-t', mode, '-O', 'qcow2', 'src.raw', `${mode}.qcow2`], dir);
      await expectClean(path.join(dir, `${mode}.qcow2`));
      await expectSame(dir, 'src.raw', `${mode}.qcow2`);
    }
    const q = await run('qemu-img', ['convert', '-t', 'bogus', '-O', 'qcow2', 'src.raw', 'q.qcow2'], { cwd: dir });
    const r = await tsimg(['convert', '-t', 'bogus', '-O', 'qcow2', 'src.raw', 'bad.qcow2'], dir);
    expect(r.code).to.equal(q.code).and.to.equal(1);
    expect(r.stderr.replace(/^tsimg: /, '')).to.equal(q.stderr.replace(/^qemu-img: /, ''));
    // qemu-img 7.2 has made its image by then; tsimg refuses first.
    expect(fs.existsSync(path.join(dir, 'bad.qcow2'))).to.equal(false);
  });

  it('fileOpenOptions: only cache=unsafe may leave the sync at close out; every other mode syncs whatever the caller asks', () => {
    expect(fileOpenOptions({ readOnly: false, cache: 'unsafe' })).to.include({ ignoreFlush: true, syncOnClose: true });
    expect(fileOpenOptions({ readOnly: false, cache: 'unsafe', syncOnClose: false })).to.include({ ignoreFlush: true, syncOnClose: false });
    for (const cache of ['writeback', 'writethrough', 'none', 'directsync'] as const) {
      expect(fileOpenOptions({ readOnly: false, cache, syncOnClose: false }), cache).to.include({ ignoreFlush: false, syncOnClose: true });
    }
  });

  it('a source that fails to read mid-way: one line, exit 1, no target left, nothing pending (with and without -W)', async () => {
    const dir = fs.mkdtempSync(path.join(t.dir, 'fail-'));
    await damagedQcow2(dir);
    for (const extra of [[], ['-W'], ['-m', '1']]) {
      const r = await tsimg(['convert', ...extra, '-O', 'qcow2', 'src.qcow2', 'out.qcow2'], dir);
      expect(r.code, r.stderr).to.equal(1);
      expect(r.stderr.trim().split('\n'), r.stderr).to.have.length(1);
      expect(r.stderr).to.contain('src.qcow2');
      expect(fs.existsSync(path.join(dir, 'out.qcow2'))).to.equal(false);
    }
  });

  it('convert -c of a compressed qcow2 into another, with -W', async () => {
    const dir = fs.mkdtempSync(path.join(t.dir, 'cc-'));
    makeSource(path.join(dir, 'src.raw'), 8 * MiB);
    await runOk('qemu-img', ['convert', '-c', '-O', 'qcow2', 'src.raw', 'q.qcow2'], { cwd: dir });
    await ok(['convert', '-c', '-W', '-O', 'qcow2', '-o', 'cluster_size=16k', 'q.qcow2', 'out.qcow2'], dir);
    await expectClean(path.join(dir, 'out.qcow2'));
    await expectSame(dir, 'src.raw', 'out.qcow2');
  });

  it('convert -c into vmdk streamOptimized (compressed always) is accepted; into raw refused as qemu-img', async () => {
    const dir = fs.mkdtempSync(path.join(t.dir, 'refuse-'));
    makeSource(path.join(dir, 'src.raw'), 8 * MiB);
    await ok(['convert', '-c', '-O', 'vmdk', '-o', 'subformat=streamOptimized', 'src.raw', 'out.vmdk'], dir);
    await expectSame(dir, 'src.raw', 'out.vmdk');
    for (const fmt of ['raw', 'vdi', 'vpc']) {
      const r = await tsimg(['convert', '-c', '-O', fmt, 'src.raw', `out.${fmt}`], dir);
      expect(r.code, fmt).to.equal(1);
      expect(r.stderr.trim().split('\n'), fmt).to.have.length(1);
      expect(r.stderr).to.contain(`out.${fmt}: Compression not supported for this file format`);
      // Nothing half made is left behind.
      expect(fs.existsSync(path.join(dir, `out.${fmt}`)), fmt).to.equal(false);
    }
  });

  it('several sources are concatenated, as qemu-img convert SRC1 SRC2 DST', async () => {
    const dir = fs.mkdtempSync(path.join(t.dir, 'cat-'));
    makeSource(path.join(dir, 'a.raw'), 7 * MiB - 512);
    await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', 'b.qcow2', '5M'], { cwd: dir });
    await runOk('qemu-io', ['-f', 'qcow2', '-c', 'write -P 7 64k 1M', '-c', 'write -z 2M 1M', '-c', 'write -P 9 4M 512k', 'b.qcow2'], { cwd: dir });
    await runOk('qemu-img', ['convert', '-O', 'raw', 'a.raw', 'b.qcow2', 'a.raw', 'theirs.raw'], { cwd: dir });
    await ok(['convert', '-O', 'qcow2', 'a.raw', 'b.qcow2', 'a.raw', 'ours.qcow2'], dir);
    await ok(['convert', '-c', '-O', 'qcow2', 'a.raw', 'b.qcow2', 'a.raw', 'ours-c.qcow2'], dir);
    for (const f of ['ours.qcow2', 'ours-c.qcow2']) {
      await expectClean(path.join(dir, f));
      await expectSame(dir, 'theirs.raw', f);
      const info = JSON.parse(await runOk('qemu-img', ['info', '--output=json', f], { cwd: dir })) as { 'virtual-size': number };
      expect(info['virtual-size']).to.equal(fs.statSync(path.join(dir, 'theirs.raw')).size);
    }
    const one = await tsimg(['convert', 'a.raw'], dir);
    expect(one.code).to.equal(1);
    expect(one.stderr).to.match(/source and a target/);
  });

  it('progress: a bar redrawn on a terminal, qemu-img lines with -p into a pipe, nothing otherwise', async () => {
    const dir = fs.mkdtempSync(path.join(t.dir, 'progress-'));
    makeSource(path.join(dir, 'src.raw'), 32 * MiB);
    // script(1) gives the command a pseudo-terminal; what it printed comes out on our stdout.
    const pty = await run('script', ['-qec', `${process.execPath} ${TSIMG} convert -c -O qcow2 src.raw pty.qcow2`, '/dev/null'], { cwd: dir });
    expect(pty.code, pty.stderr).to.equal(0);
    const draws = pty.stdout.match(/\((\d+\.\d\d)\/100%\)/g) ?? [];
    expect(draws.length, pty.stdout).to.be.greaterThan(1);
    expect(draws[0]).to.equal('(0.00/100%)');
    expect(draws[draws.length - 1]).to.equal('(100.00/100%)');
    // Redrawn in place: back to the start of the line, never a new line until the end.
    expect(pty.stdout).to.contain('\x1b[1G');
    expect(pty.stdout.trimEnd().split('\n')).to.have.length(1);
    await expectSame(dir, 'src.raw', 'pty.qcow2');

    const piped = await ok(['convert', '-p', '-O', 'qcow2', 'src.raw', 'p.qcow2'], dir);
    expect(piped.startsWith('    (0.00/100%)\r'), JSON.stringify(piped)).to.equal(true);
    expect(piped.endsWith('    (100.00/100%)\r\n'), JSON.stringify(piped)).to.equal(true);
    // Whole percents only (qemu-img's steps), so -p into a log stays short.
    for (const d of piped.trim().split('\r')) expect(d.trim()).to.match(/^\(\d+\.00\/100%\)$/);
    expect(await ok(['convert', '-O', 'qcow2', 'src.raw', 'q.qcow2'], dir)).to.equal('');
  });

  it('tsmount says on a terminal what a slow open waits for, after a second; nothing into a pipe', async () => {
    const dir = fs.mkdtempSync(path.join(t.dir, 'slow-'));
    const mnt = path.join(dir, 'mnt');
    fs.mkdirSync(mnt);
    // An NBD "server" that answers nothing for two seconds, then hangs up: the mount fails, slowly.
    const sockets = new Set<net.Socket>();
    const server = net.createServer((s) => {
      sockets.add(s);
      setTimeout(() => s.destroy(), 2000);
    });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    const port = (server.address() as net.AddressInfo).port;
    const uri = `nbd://127.0.0.1:${port}/x`;
    try {
      const pty = await run('script', ['-qec', `${process.execPath} ${TSMOUNT} ${uri} ${mnt}`, '/dev/null'], { cwd: dir });
      expect(pty.stdout).to.contain(`tsmount: waiting for ${uri} to open (the remote server)...`);
      expect(pty.stdout).to.match(/hung up|closed|handshake/);
      const piped = await run(process.execPath, [TSMOUNT, uri, mnt], { cwd: dir });
      expect(piped.code).to.equal(1);
      expect(piped.stderr).to.not.contain('waiting for');
      expect(piped.stderr.trim().split('\n')).to.have.length(1);
    } finally {
      for (const s of sockets) s.destroy();
      server.close();
    }
    expect(fs.readFileSync('/proc/mounts', 'utf8')).to.not.contain(mnt);
  });
});

describe('tsimg convert and compare: large sparse images (block status asked a span ahead), zeros inside data', function () {
  this.timeout(300_000);
  const GiB = 1024 * MiB;
  const TiB = 1024 * GiB;
  let t: ReturnType<typeof tempDir>;
  before(() => (t = tempDir('tsimg-sparse')));
  after(() => t.cleanup());

  it('StatusAhead answers each chunk of an in-order walk as chainStatus does, and a hole it reports ahead is a hole', async () => {
    const dir = fs.mkdtempSync(path.join(t.dir, 'ahead-'));
    const raw = path.join(dir, 'runs.raw');
    // 4 KiB of data every 8 KiB over the first 16 MiB (thousands of runs: the span
    // halves), then a long hole, 1 MiB of data at 40 MiB, and a hole to the end.
    fs.writeFileSync(raw, '');
    fs.truncateSync(raw, 48 * MiB);
    const fd = fs.openSync(raw, 'r+');
    try {
      for (let o = 0; o < 16 * MiB; o += 8 * KiB) fs.writeSync(fd, crypto.randomBytes(4 * KiB), 0, 4 * KiB, o);
      fs.writeSync(fd, crypto.randomBytes(MiB), 0, MiB, 40 * MiB);
    } finally {
      fs.closeSync(fd);
    }
    const node = await openTestImage(raw, { format: 'raw' });
    try {
      let holesAhead = 0;
      for (const chunk of [2 * MiB, 3 * MiB + 4 * KiB, 64 * KiB]) {
        const ahead = new StatusAhead(node);
        for (let pos = 0; pos < node.size; pos += chunk) {
          const n = Math.min(chunk, node.size - pos);
          const holeEnd = ahead.holeEnd(pos);
          expect(await ahead.status(pos, n), `${chunk} at ${pos}`).to.deep.equal(await chainStatus(node, pos, n));
          if (holeEnd > pos) {
            holesAhead++;
            expect(await chainStatus(node, pos, holeEnd - pos), `hole ${pos}..${holeEnd}`).to.deep.equal([{ offset: pos, length: holeEnd - pos, data: false }]);
          }
        }
      }
      expect(holesAhead).to.be.greaterThan(0);
    } finally {
      await node.close();
    }
  });

  it('a 1 TiB sparse qcow2 converts to qcow2 and raw equal and as sparse as qemu-img makes it; -n writes zeros where the target has data under a hole', async () => {
    const dir = fs.mkdtempSync(path.join(t.dir, 'big-'));
    await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', 'big.qcow2', '1T'], { cwd: dir });
    await runOk('qemu-io', ['-c', 'write -P 0x11 0 64k', '-c', `write -P 0x22 ${300 * GiB + 4 * KiB} 4k`, '-c', `write -P 0x33 ${TiB - 64 * KiB} 64k`, 'big.qcow2'], { cwd: dir });
    await ok(['convert', '-O', 'qcow2', 'big.qcow2', 'ours.qcow2'], dir);
    await runOk('qemu-img', ['convert', '-O', 'qcow2', 'big.qcow2', 'theirs.qcow2'], { cwd: dir });
    await expectSame(dir, 'big.qcow2', 'ours.qcow2');
    await expectClean(path.join(dir, 'ours.qcow2'));
    const dataOf = async (f: string): Promise<number[][]> => (await qemuMap(dir, f)).filter((e) => e.data).map((e) => [e.start, e.length]);
    expect(await dataOf('ours.qcow2')).to.deep.equal(await dataOf('theirs.qcow2'));
    expect(await dataOf('ours.qcow2')).to.have.length(3);

    await ok(['convert', '-O', 'raw', 'big.qcow2', 'ours.raw'], dir);
    await expectSame(dir, 'big.qcow2', 'ours.raw');
    expect(fs.statSync(path.join(dir, 'ours.raw')).blocks * 512).to.be.at.most(MiB);

    // -n into an image that holds data where the source has holes (and where it has data).
    await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', 'n.qcow2', '1T'], { cwd: dir });
    await runOk('qemu-io', ['-c', 'write -P 0x55 0 1M', '-c', `write -P 0x66 ${500 * GiB} 1M`, '-c', `write -P 0x77 ${TiB - 3 * MiB} 3M`, 'n.qcow2'], { cwd: dir });
    await ok(['convert', '-n', '-O', 'qcow2', 'big.qcow2', 'n.qcow2'], dir);
    await expectSame(dir, 'big.qcow2', 'n.qcow2');
    await expectClean(path.join(dir, 'n.qcow2'));
  });

  it('zeros inside data: every 4 KiB block of zeros is left unwritten, one with a single byte set anywhere is written, as qemu-img convert -S 4k', async () => {
    const dir = fs.mkdtempSync(path.join(t.dir, 'zeros-'));
    // 8 MiB, all of it written: per 4 KiB block, in turn, random bytes, zeros, zeros but
    // for a middle byte, zeros but for the last byte, zeros but for the first byte.
    const src = Buffer.alloc(8 * MiB);
    for (let b = 0; b < src.length / (4 * KiB); b++) {
      const at = b * 4 * KiB;
      const kind = b % 5;
      if (kind === 0) crypto.randomFillSync(src, at, 4 * KiB);
      else if (kind === 2) src[at + 2048] = 1;
      else if (kind === 3) src[at + 4 * KiB - 1] = 1;
      else if (kind === 4) src[at] = 1;
    }
    fs.writeFileSync(path.join(dir, 'src.raw'), src);
    const dataOf = async (f: string): Promise<number[][]> => (await qemuMap(dir, f)).filter((e) => e.data).map((e) => [e.start, e.length]);
    for (const [fmt, opts] of [['qcow2', ['-o', 'cluster_size=4096']], ['raw', []]] as const) {
      await ok(['convert', '-f', 'raw', '-O', fmt, ...opts, 'src.raw', `ours.${fmt}`], dir);
      await runOk('qemu-img', ['convert', '-f', 'raw', '-O', fmt, ...opts, 'src.raw', `theirs.${fmt}`], { cwd: dir });
      await expectSame(dir, 'src.raw', `ours.${fmt}`);
      const ours = await dataOf(`ours.${fmt}`);
      expect(ours, fmt).to.deep.equal(await dataOf(`theirs.${fmt}`));
      // Every block that holds a byte is written; the blocks of zeros are left out.
      let written = 0;
      for (let b = 0; b < src.length / (4 * KiB); b++) if (b % 5 !== 1) written += 4 * KiB;
      expect(ours.reduce((n, [, len]) => n + len!, 0), fmt).to.equal(written);
    }
  });

  it('compare of two 1 TiB sparse images names the sector of a byte changed near the end, as qemu-img compare does', async () => {
    const dir = fs.mkdtempSync(path.join(t.dir, 'cmp-'));
    await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', 'a.qcow2', '1T'], { cwd: dir });
    await runOk('qemu-io', ['-c', 'write -P 0x11 0 64k', '-c', `write -P 0x22 ${700 * GiB} 64k`, 'a.qcow2'], { cwd: dir });
    await runOk('qemu-img', ['convert', '-O', 'qcow2', 'a.qcow2', 'b.qcow2'], { cwd: dir });
    const same = await tsimg(['compare', 'a.qcow2', 'b.qcow2'], dir);
    expect(same.code, same.stderr).to.equal(0);
    await runOk('qemu-io', ['-c', `write -P 0x99 ${900 * GiB + 12 * KiB} 512`, 'b.qcow2'], { cwd: dir });
    const ours = await tsimg(['compare', 'a.qcow2', 'b.qcow2'], dir);
    const theirs = await run('qemu-img', ['compare', 'a.qcow2', 'b.qcow2'], { cwd: dir });
    expect(theirs.code).to.equal(1);
    expect([ours.code, ours.stdout]).to.deep.equal([theirs.code, theirs.stdout]);
    expect(ours.stdout).to.contain(`Content mismatch at offset ${900 * GiB + 12 * KiB}!`);
  });
  /** Zero runs of many lengths between runs of data (a fixed seed): what -S decides about. */
  function sparseSource(file: string): void {
    let seed = 5;
    const next = (n: number): number => ((seed = (seed * 1103515245 + 12345) % 2 ** 31) % n);
    const b = Buffer.alloc(8 * MiB);
    const dataLens = [512, 1024, 3072, 4096, 8192, 20480, 65536, 131072, 300000];
    const zeroLens = [512, 1024, 2048, 4096, 6144, 8192, 16384, 65536, MiB];
    for (let pos = 0; pos < b.length; ) {
      const d = dataLens[next(dataLens.length)]!;
      const z = zeroLens[next(zeroLens.length)]!;
      for (let i = pos; i < Math.min(b.length, pos + d); i++) b[i] = 1 + next(255);
      pos += d + z;
    }
    fs.writeFileSync(file, b);
  }

  /**
   * DIR/sp.raw (sparseSource) and DIR/sp.qcow2, a 12 MiB qcow2 holding the same bytes,
   * then changed by the qemu-io arguments `io` (zero clusters, data past the raw's end).
   */
  async function sparseSources(dir: string, io: string[]): Promise<void> {
    sparseSource(path.join(dir, 'sp.raw'));
    await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', 'sp.qcow2', '12M'], { cwd: dir });
    await runOk('qemu-img', ['convert', '-n', '-f', 'raw', '-O', 'qcow2', 'sp.raw', 'sp.qcow2'], { cwd: dir });
    await runOk('qemu-io', ['-f', 'qcow2', ...io, 'sp.qcow2'], { cwd: dir });
  }

  /**
   * qemu-img map --output=json without host offsets, neighbours of the same kind merged
   * (the layouts may differ, -W writes out of order; what is data may not).
   */
  async function mapShape(dir: string, file: string): Promise<string> {
    const out: { start: number; length: number; kind: string }[] = [];
    for (const { offset: _offset, start, length, ...rest } of await qemuMap(dir, file)) {
      const kind = JSON.stringify(rest);
      const last = out[out.length - 1];
      if (last && last.kind === kind && last.start + last.length === start) last.length += length;
      else out.push({ start, length, kind });
    }
    return JSON.stringify(out);
  }

  it('convert -S SIZE leaves zero runs out as qemu-img convert -S does (0: every byte written); a bad size refused alike', async () => {
    const dir = fs.mkdtempSync(path.join(t.dir, 'sparse-'));
    await sparseSources(dir, ['-c', 'write -z 9M 1M', '-c', 'write -P 7 11M 4k']);
    for (const S of ['0', '512', '6k', '8k', '64k', '16M']) {
      for (const fmt of ['raw', 'qcow2']) {
        for (const src of ['sp.raw', 'sp.qcow2']) {
          const what = `-S ${S} ${src} -> ${fmt}`;
          for (const f of [`q.${fmt}`, `t.${fmt}`]) fs.rmSync(path.join(dir, f), { force: true });
          await runOk('qemu-img', ['convert', '-S', S, '-O', fmt, src, `q.${fmt}`], { cwd: dir });
          await ok(['convert', '-S', S, '-O', fmt, src, `t.${fmt}`], dir);
          await expectSame(dir, `q.${fmt}`, `t.${fmt}`);
          expect(await mapShape(dir, `t.${fmt}`), what).to.equal(await mapShape(dir, `q.${fmt}`));
          if (fmt === 'raw') expect(fs.statSync(path.join(dir, 't.raw')).blocks, what).to.equal(fs.statSync(path.join(dir, 'q.raw')).blocks);
        }
      }
    }
    for (const S of ['100', '17M']) {
      const theirs = await run('qemu-img', ['convert', '-S', S, '-O', 'raw', 'sp.raw', 'x.raw'], { cwd: dir });
      const ours = await tsimg(['convert', '-S', S, '-O', 'raw', 'sp.raw', 'y.raw'], dir);
      expect([ours.code, ours.stderr.replace('tsimg: ', '')]).to.deep.equal([theirs.code, theirs.stderr.replace('qemu-img: ', '')]);
      expect(fs.existsSync(path.join(dir, 'y.raw'))).to.equal(false);
    }
  });

  it('convert -C copies data runs whole, zeros and all, holes left out, as qemu-img convert -C; its refusals (-c, -S, --salvage) alike', async () => {
    const dir = fs.mkdtempSync(path.join(t.dir, 'copy-range-'));
    await sparseSources(dir, ['-c', 'write -z 9M 1M', '-c', 'write -P 0 10M 64k']);
    for (const fmt of ['raw', 'qcow2']) {
      for (const src of ['sp.raw', 'sp.qcow2']) {
        const what = `-C ${src} -> ${fmt}`;
        for (const f of [`q.${fmt}`, `t.${fmt}`]) fs.rmSync(path.join(dir, f), { force: true });
        await runOk('qemu-img', ['convert', '-C', '-O', fmt, src, `q.${fmt}`], { cwd: dir });
        await ok(['convert', '-C', '-O', fmt, src, `t.${fmt}`], dir);
        await expectSame(dir, `q.${fmt}`, `t.${fmt}`);
        expect(await mapShape(dir, `t.${fmt}`), what).to.equal(await mapShape(dir, `q.${fmt}`));
      }
    }
    for (const extra of [['-c'], ['-S', '4k'], ['--salvage']]) {
      const theirs = await run('qemu-img', ['convert', '-C', ...extra, '-O', 'qcow2', 'sp.raw', 'x.qcow2'], { cwd: dir });
      const ours = await tsimg(['convert', '-C', ...extra, '-O', 'qcow2', 'sp.raw', 'y.qcow2'], dir);
      expect([ours.code, ours.stderr.replace('tsimg: ', '')], extra.join(' ')).to.deep.equal([theirs.code, theirs.stderr.replace('qemu-img: ', '')]);
      expect(fs.existsSync(path.join(dir, 'y.qcow2'))).to.equal(false);
    }
  });

  it('convert -l converts an internal snapshot by ID, name or snapshot.id=/snapshot.name=, as qemu-img convert -l; a missing one, a raw source and several sources refused alike', async () => {
    const dir = fs.mkdtempSync(path.join(t.dir, 'snap-'));
    await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', 's.qcow2', '16M'], { cwd: dir });
    await runOk('qemu-io', ['-f', 'qcow2', '-c', 'write -P 1 0 1M', 's.qcow2'], { cwd: dir });
    await runOk('qemu-img', ['snapshot', '-c', 'snap1', 's.qcow2'], { cwd: dir });
    await runOk('qemu-io', ['-f', 'qcow2', '-c', 'write -P 2 0 2M', 's.qcow2'], { cwd: dir });
    // A snapshot named as the other's ID: -l tries IDs first.
    await runOk('qemu-img', ['snapshot', '-c', '1', 's.qcow2'], { cwd: dir });
    await runOk('qemu-io', ['-f', 'qcow2', '-c', 'write -P 3 1M 3M', 's.qcow2'], { cwd: dir });
    await runOk('qemu-img', ['create', '-q', '-f', 'raw', 'r.raw', '1M'], { cwd: dir });
    const cases: [string, string[]][] = [
      ['snap1', ['s.qcow2']],
      ['1', ['s.qcow2']],
      ['2', ['s.qcow2']],
      ['snapshot.id=1', ['s.qcow2']],
      ['snapshot.name=1', ['s.qcow2']],
      ['snapshot.id=2,snapshot.name=1', ['s.qcow2']],
      ['snapshot.id=1,snapshot.name=1', ['s.qcow2']],
      ['nosuch', ['s.qcow2']],
      ['snapshot.foo=1', ['s.qcow2']],
      ['x', ['r.raw']],
      ['1', ['s.qcow2', 's.qcow2']],
    ];
    for (const [l, srcs] of cases) {
      for (const f of ['q.qcow2', 't.qcow2']) fs.rmSync(path.join(dir, f), { force: true });
      const theirs = await run('qemu-img', ['convert', '-O', 'qcow2', '-l', l, ...srcs, 'q.qcow2'], { cwd: dir });
      const ours = await tsimg(['convert', '-O', 'qcow2', '-l', l, ...srcs, 't.qcow2'], dir);
      expect(ours.code, `-l ${l}: ${ours.stderr}`).to.equal(theirs.code);
      if (theirs.code === 0) {
        await expectSame(dir, 'q.qcow2', 't.qcow2');
        expect(await mapShape(dir, 't.qcow2'), l).to.equal(await mapShape(dir, 'q.qcow2'));
      } else {
        expect(ours.stderr.trim().split('\n'), l).to.have.length(1);
        expect(fs.existsSync(path.join(dir, 't.qcow2')), l).to.equal(false);
        // qemu-img's own words (its parse error says in two lines what ours says in one).
        const last = theirs.stderr.trim().split('\n').pop()!.replace('qemu-img: ', '');
        expect(ours.stderr, l).to.contain(last.replace(/ used by device '[^']*'/, ''));
      }
    }
  });

  it('convert --salvage: an unreadable cluster becomes zeros with a warning per sector, the rest is copied; the same image as qemu-img convert --salvage; -q says nothing', async () => {
    const dir = fs.mkdtempSync(path.join(t.dir, 'salvage-'));
    const src = await damagedQcow2(dir);
    const before = fs.readFileSync(src);
    await runOk('qemu-img', ['convert', '--salvage', '-O', 'qcow2', 'src.qcow2', 'q.qcow2'], { cwd: dir });
    for (const extra of [[], ['-W'], ['-m', '1']]) {
      fs.rmSync(path.join(dir, 't.qcow2'), { force: true });
      const r = await tsimg(['convert', '--salvage', ...extra, '-O', 'qcow2', 'src.qcow2', 't.qcow2'], dir);
      expect(r.code, r.stderr).to.equal(0);
      const warnings = r.stderr.trim().split('\n');
      expect(warnings, extra.join(' ')).to.have.length(128);
      expect(warnings[0]).to.match(new RegExp(`^tsimg: warning: error while reading offset ${40 * MiB}: `));
      await expectSame(dir, 'q.qcow2', 't.qcow2');
      expect(await mapShape(dir, 't.qcow2')).to.equal(await mapShape(dir, 'q.qcow2'));
      await expectClean(path.join(dir, 't.qcow2'), 'qcow2');
    }
    fs.rmSync(path.join(dir, 't.qcow2'));
    const quiet = await tsimg(['convert', '--salvage', '-q', '-O', 'qcow2', 'src.qcow2', 't.qcow2'], dir);
    expect([quiet.code, quiet.stdout, quiet.stderr]).to.deep.equal([0, '', '']);
    expect(fs.readFileSync(src).equals(before), 'the source is never written').to.equal(true);
  });

  it('--salvage in copyImage: a block status that fails counts as data, unreadable sectors are zeros, a warning for each; without it the copy fails', async () => {
    const size = 4 * MiB;
    const bytes = crypto.randomBytes(size);
    const badFrom = 3 * MiB + 4096;
    const badTo = badFrom + 1024; // two sectors
    const hits = (offset: number, length: number): boolean => offset < badTo && offset + length > badFrom;
    class Damaged extends MemoryNode {
      override async read(offset: number, dst: Uint8Array): Promise<void> {
        if (hits(offset, dst.length)) throw new IoError(`damaged at ${offset}`, 5);
        return super.read(offset, dst);
      }
      override async blockStatus(offset: number, length: number): Promise<Extent[]> {
        if (hits(offset, length)) throw new IoError(`no status at ${offset}`, 5);
        return super.blockStatus(offset, length);
      }
    }
    const src = new Damaged(bytes, { readOnly: true });
    const dst = new MemoryNode(size);
    const warnings: string[] = [];
    await copyImage(src, dst, { salvage: { warn: (w) => warnings.push(w) }, zeroInit: true });
    const want = Buffer.from(bytes);
    want.fill(0, badFrom, badTo);
    expect(dst.data.equals(want)).to.equal(true);
    expect(warnings).to.deep.equal([
      `error while reading offset ${badFrom}: damaged at ${badFrom}`,
      `error while reading offset ${badFrom + 512}: damaged at ${badFrom + 512}`,
    ]);
    // Without --salvage the first failure ends the copy.
    const err = await copyImage(src, new MemoryNode(size)).then(() => undefined, (e: Error) => e);
    expect(err?.message).to.match(/damaged at/);
  });

  it('convert -n writes the source\'s zeros as qemu-img does (write zeroes that may unmap): the same map, bitmap bits and check as qemu-img convert -n leaves', async () => {
    const dir = fs.mkdtempSync(path.join(t.dir, 'nz-'));
    // Data, a hole, zeros written as data, a 4 KiB block of zeros inside data, data at the end.
    await runOk('qemu-img', ['create', '-q', '-f', 'raw', 'src.raw', '64M'], { cwd: dir });
    await runOk('qemu-io', ['-f', 'raw', '-c', 'write -P 1 0 1M', '-c', 'write -z 4096 4096', '-c', 'write -P 2 10M 64k', '-c', 'write -P 0 30M 1M', '-c', 'write -P 3 40M 32k', '-c', 'write -P 4 63M 1M', 'src.raw'], { cwd: dir });
    const mapOf = async (f: string, fmt: string): Promise<string> => (await runOk('qemu-img', ['map', '--output=json', '-f', fmt, f], { cwd: dir })).replace(/"offset": [0-9]+/g, '"offset": N');
    for (const [fmt, opts] of [
      ['qcow2', []],
      ['qcow2', ['-o', 'compat=0.10']],
      ['qcow2', ['-o', 'extended_l2=on']],
      ['qcow2', ['-o', 'cluster_size=4096']],
      ['raw', []],
    ] as [string, string[]][]) {
      const what = `${fmt} ${opts.join(' ')}`;
      for (const who of ['q', 't']) {
        await runOk('qemu-img', ['create', '-q', '-f', fmt, ...opts, `${who}.${fmt}`, '64M'], { cwd: dir });
        // The target holds data under the source's hole, under its zeros and under its data.
        await runOk('qemu-io', ['-f', fmt, '-c', 'write -P 9 20M 1M', '-c', 'write -P 9 30M 64k', '-c', 'write -P 9 40M 64k', '-c', 'write -P 8 1M 100k', `${who}.${fmt}`], { cwd: dir });
        if (fmt === 'qcow2' && !opts.includes('compat=0.10')) await runOk('qemu-img', ['bitmap', '--add', `${who}.${fmt}`, 'b0'], { cwd: dir });
      }
      await runOk('qemu-img', ['convert', '-n', '-f', 'raw', '-O', fmt, 'src.raw', `q.${fmt}`], { cwd: dir });
      await ok(['convert', '-n', '-f', 'raw', '-O', fmt, 'src.raw', `t.${fmt}`], dir);
      await expectSame(dir, 'src.raw', `t.${fmt}`);
      // Where qcow2's allocations land differs (tsmount reuses a freed cluster only after the flush that frees it): offsets by presence only.
      expect(await mapOf(`t.${fmt}`, fmt), what).to.equal(await mapOf(`q.${fmt}`, fmt));
      if (fmt === 'qcow2') {
        await expectClean(path.join(dir, `t.${fmt}`));
        if (!opts.includes('compat=0.10')) expect(await dirtyRuns(dir, path.join(dir, 't.qcow2'), 'b0'), `${what}: bits of b0`).to.deep.equal(await dirtyRuns(dir, path.join(dir, 'q.qcow2'), 'b0'));
      } else {
        expect(fs.statSync(path.join(dir, 't.raw')).blocks, 'raw: the same blocks allocated').to.equal(fs.statSync(path.join(dir, 'q.raw')).blocks);
      }
    }
  });

  it('convert -n --target-is-zero leaves the holes of the source unwritten, as qemu-img does (what the target held there stays); its refusals as qemu-img', async () => {
    const dir = fs.mkdtempSync(path.join(t.dir, 'tiz-'));
    sparseSource(path.join(dir, 'sp.raw'));
    for (const who of ['q', 't']) {
      await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', `${who}.qcow2`, '8M'], { cwd: dir });
      // Data where the source has holes: a target that is not zero after all keeps it, in both tools.
      await runOk('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x55 0 8M', `${who}.qcow2`], { cwd: dir });
    }
    await runOk('qemu-img', ['convert', '-n', '--target-is-zero', '-O', 'qcow2', 'sp.raw', 'q.qcow2'], { cwd: dir });
    await ok(['convert', '-n', '--target-is-zero', '-O', 'qcow2', 'sp.raw', 't.qcow2'], dir);
    await expectSame(dir, 'q.qcow2', 't.qcow2');
    expect((await run('qemu-img', ['compare', 'sp.raw', 't.qcow2'], { cwd: dir })).code, 'the holes kept the 0x55').to.equal(1);
    for (const args of [
      ['--target-is-zero', '-O', 'raw', 'sp.raw', 'x.raw'],
      ['-n', '--target-is-zero', '-B', 'sp.raw', '-O', 'qcow2', 'sp.raw', 't.qcow2'],
      ['-n', '-o', 'cluster_size=4k', '-O', 'qcow2', 'sp.raw', 't.qcow2'],
      ['-T', 'bogus', '-O', 'raw', 'sp.raw', 'x.raw'],
    ]) {
      const theirs = await run('qemu-img', ['convert', ...args], { cwd: dir });
      const ours = await tsimg(['convert', ...args], dir);
      expect(ours.stderr.replace('tsimg: ', ''), args.join(' ')).to.equal(theirs.stderr.replace('qemu-img: ', ''));
      // qemu-img 7.2 exits 0 after its -B refusal (img_convert's ret is still 0 there): ours is an error.
      expect(ours.code, args.join(' ')).to.equal(1);
    }
    expect(fs.existsSync(path.join(dir, 'x.raw'))).to.equal(false);
    // -T takes qemu-img's cache modes for the sources.
    await ok(['convert', '-T', 'none', '-O', 'raw', 'sp.raw', 'y.raw'], dir);
    await expectSame(dir, 'sp.raw', 'y.raw');
  });
});
