// Writes of zeros into qcow2 (fallocate ZERO_RANGE on a mount, tsimg commit and convert)
// and punched holes leave the image file qemu-io leaves with `write -z` and `discard`
// (its default discard=unmap: clusters a guest gives back are punched from the file too),
// byte for byte: on v3 a write of zeros marks every cluster of the range zero,
// unallocated ones too (QEMU's zero_in_l2_slice, L2 tables made where missing), a
// partial cluster whose other bytes read as zeros is marked zero whole, any other
// partial cluster is written; v2 gives allocated clusters back where no backing file
// reaches (QEMU's fallback to discard) and writes zeros where one does. A punched hole
// is QEMU's discard: allocated clusters become zero and their space goes back to the
// file, unallocated ones stay so (QEMU leaves the partial clusters of a discard as they
// were, which a punched hole cannot: tsmount writes their zeros, so only whole clusters
// are compared). With extended L2 the same holds subcluster by subcluster.
import { expect } from 'chai';
import fs from 'node:fs';
import path from 'node:path';
import { createImage, md5File, qemuIo, run, runOk, tempDir } from './helpers/qemu.js';
import { MountTracker, mountpointIn } from './helpers/mount.js';
import { openTestImage } from './helpers/images.js';
import { FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE, fallocate } from '../drivers/util/sys.js';

const KiB = 1024;
const MiB = 1 << 20;

/** Data first, then zeros: whole clusters, partial ones, over data, over nothing, in new L2 ranges. */
const DATA: [number, number][] = [
  [0, 3 * MiB],
  [600 * MiB + 32 * KiB, 200 * KiB],
  [800 * MiB, 64 * KiB],
];
const ZEROS: [number, number][] = [
  [900 * MiB, 64 * KiB], // unallocated, an L2 range with no table yet
  [700 * MiB + 4 * KiB, 10 * KiB], // part of an unallocated cluster
  [2 * MiB, 2 * MiB], // data and nothing, whole clusters
  [128 * KiB + 512, 100 * KiB], // parts of data clusters
  [600 * MiB, 64 * KiB + 512], // a cluster that is half data, then part of a data cluster
  [1023 * MiB + 60 * KiB, 68 * KiB], // up to the end of the disk
  [800 * MiB - 10 * KiB, 20 * KiB], // the ends of two clusters, nothing then data
  [800 * MiB + 62 * KiB, 4 * KiB], // the ends of two clusters, data then nothing
];

describe('qcow2 writes of zeros: the file qemu-io write -z makes', function () {
  this.timeout(120_000);
  const mounts = new MountTracker();
  let tmp: { dir: string; cleanup: () => void };
  before(() => (tmp = tempDir('qcow2-zero')));
  afterEach(() => mounts.cleanup());
  after(() => tmp.cleanup());

  /** Two equal images with DATA (then an internal snapshot, with `snapshot`); qemu-io writes ZEROS into the first. */
  async function pair(name: string, options: Record<string, string | number>, backing?: string, snapshot = false): Promise<[string, string]> {
    const files: string[] = [];
    for (const who of ['qemu', 'ours']) {
      const f = path.join(tmp.dir, `${name}-${who}.qcow2`);
      await createImage(f, 'qcow2', 1024 * MiB, options, backing ? { file: backing, format: 'qcow2' } : undefined);
      await qemuIo(f, 'qcow2', DATA.map(([o, l], i) => `write -P ${i + 1} ${o} ${l}`));
      files.push(f);
    }
    if (snapshot) {
      // One snapshot, copied: two would differ in its time stamps. Both are copies (the same holes).
      await runOk('qemu-img', ['snapshot', '-c', 's1', files[0]!]);
      const made = `${files[0]!}.made`;
      fs.renameSync(files[0]!, made);
      for (const f of files) await runOk('cp', ['--sparse=always', made, f]);
      fs.rmSync(made);
    }
    await zerosByQemu(files[0]!, ZEROS);
    return files as [string, string];
  }

  async function zerosByQemu(file: string, ranges: [number, number][], command = 'write -z'): Promise<void> {
    await runOk('qemu-io', ['-f', 'qcow2', ...ranges.flatMap(([o, l]) => ['-c', `${command} ${o} ${l}`]), file], { cwd: tmp.dir });
  }

  /** ZEROS through our qcow2 driver, as a write of zeros (no unmap). */
  async function zerosByUs(file: string): Promise<void> {
    const node = await openTestImage(file, { rw: true, format: 'qcow2' });
    try {
      for (const [o, l] of ZEROS) await node.zero!(o, l, false);
    } finally {
      await node.close();
    }
  }

  async function expectSameFile(qemu: string, ours: string): Promise<void> {
    const cmp = await run('qemu-img', ['compare', qemu, ours], { cwd: tmp.dir });
    expect(cmp.code, cmp.stdout + cmp.stderr).to.equal(0);
    const maps = await Promise.all([qemu, ours].map((f) => runOk('qemu-img', ['map', '--output=json', f], { cwd: tmp.dir })));
    expect(maps[1], 'qemu-img map').to.equal(maps[0]);
    expect(fs.statSync(ours).size).to.equal(fs.statSync(qemu).size);
    expect(await md5File(ours), 'the same bytes').to.equal(await md5File(qemu));
    // The space given back: the same blocks allocated in the host file (give or take a table).
    const blocks = [qemu, ours].map((f) => fs.statSync(f).blocks * 512);
    expect(Math.abs(blocks[1]! - blocks[0]!), `st_blocks ${blocks.join(' ')}`).to.be.at.most(64 * KiB);
  }

  for (const [what, options] of [
    ['v3, 64 KiB clusters', {}],
    ['v3, 4 KiB clusters', { cluster_size: 4096 }],
    ['v3, 2 MiB clusters', { cluster_size: 2 * MiB }],
    ['v2 (compat=0.10)', { compat: '0.10' }],
  ] as [string, Record<string, string | number>][]) {
    it(`${what}: the same file as qemu-io's`, async () => {
      const [qemu, ours] = await pair(what.replace(/\W+/g, '-'), options);
      await zerosByUs(ours);
      await expectSameFile(qemu, ours);
    });
  }

  for (const [what, options] of [
    ['v3', {}],
    ['v2', { compat: '0.10' }],
    ['extended L2', { extended_l2: 'on', cluster_size: 128 * KiB }],
  ] as [string, Record<string, string | number>][]) {
    it(`${what} over a backing file with data in places (the rest of a partial cluster read through the chain): the same file as qemu-io's`, async () => {
      const base = path.join(tmp.dir, `base-${what.replace(/\W+/g, '-')}.qcow2`);
      await createImage(base, 'qcow2', 1024 * MiB, {});
      await qemuIo(base, 'qcow2', ['write -P 9 0 4M', 'write -P 9 598M 4M', 'write -P 9 698M 4M', 'write -P 9 898M 4M', 'write -P 9 1020M 4M', 'write -z 799M 2M']);
      const [qemu, ours] = await pair(`backed-${what.replace(/\W+/g, '-')}`, options, path.basename(base));
      await zerosByUs(ours);
      await expectSameFile(qemu, ours);
    });
  }

  for (const cluster of [128 * KiB, 64 * KiB]) {
    it(`extended L2, ${cluster / KiB} KiB clusters (zero bits of whole subclusters, partial ones written or counted whole): the same file as qemu-io's`, async () => {
      const [qemu, ours] = await pair(`ext-${cluster}`, { extended_l2: 'on', cluster_size: cluster });
      await zerosByUs(ours);
      await expectSameFile(qemu, ours);
    });
  }

  for (const [what, options] of [
    ['v3', {}],
    ['extended L2', { extended_l2: 'on', cluster_size: 128 * KiB }],
  ] as [string, Record<string, string | number>][]) {
    it(`${what} with an internal snapshot (clusters shared, not COPIED): the host cluster kept under the zero flag, as qemu-io's; a write after copies it`, async () => {
      const name = `snap-${what.replace(/\W+/g, '-')}`;
      const [qemu, ours] = await pair(name, options, undefined, true);
      await zerosByUs(ours);
      await expectSameFile(qemu, ours);
      // A write into a zeroed shared cluster must not land in the snapshot's cluster.
      const after = ['write -P 7 0 4k', 'write -P 8 130k 1k', `write -P 9 ${600 * MiB + 40 * KiB} 4k`];
      await qemuIo(qemu, 'qcow2', after);
      const node = await openTestImage(ours, { rw: true, format: 'qcow2' });
      try {
        await node.write(0, Buffer.alloc(4 * KiB, 7));
        await node.write(130 * KiB, Buffer.alloc(KiB, 8));
        await node.write(600 * MiB + 40 * KiB, Buffer.alloc(4 * KiB, 9));
      } finally {
        await node.close();
      }
      await expectSameFile(qemu, ours);
      for (const f of [qemu, ours]) {
        const check = await run('qemu-img', ['check', f]);
        expect(check.code, check.stdout + check.stderr).to.equal(0);
      }
      // The snapshot still reads its data.
      for (const f of [qemu, ours]) await runOk('qemu-img', ['snapshot', '-a', 's1', f]);
      await expectSameFile(qemu, ours);
      await qemuIo(ours, 'qcow2', ['read -P 1 0 3M']);
    });
  }

  it('through a mount: fallocate PUNCH_HOLE is QEMU\'s discard, the clusters\' space given back to the file', async () => {
    const holes: [number, number][] = [[0, MiB], [2 * MiB, 3 * MiB], [600 * MiB, 256 * KiB], [900 * MiB, 64 * KiB]];
    const files: string[] = [];
    for (const who of ['qemu', 'ours']) {
      const f = path.join(tmp.dir, `punch-${who}.qcow2`);
      await createImage(f, 'qcow2', 1024 * MiB, {});
      await qemuIo(f, 'qcow2', ['write -P 1 0 8M', 'write -P 2 600M 1M', 'write -c -P 3 16M 1M']);
      files.push(f);
    }
    const all: [number, number][] = [...holes, [16 * MiB, MiB]];
    await zerosByQemu(files[0]!, all, 'discard');
    const before = fs.statSync(files[1]!).blocks;
    const dir = mountpointIn(tmp.dir, 'p');
    await mounts.mount(['--rw', files[1]!, dir]);
    const fd = fs.openSync(path.join(dir, 'punch-ours.raw'), 'r+');
    try {
      for (const [o, l] of all) fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, o, l);
      fs.fsyncSync(fd);
      // Given back at the flush (once the tables that dropped the clusters are on disk).
      expect(fs.statSync(files[1]!).blocks * 512).to.be.below(before * 512 - 4 * MiB);
    } finally {
      fs.closeSync(fd);
    }
    await mounts.unmount(dir);
    await expectSameFile(files[0]!, files[1]!);
  });

  it('through a mount: fallocate ZERO_RANGE is QEMU\'s write of zeros (as its FUSE export makes it)', async () => {
    const [qemu, ours] = await pair('mount', {});
    const dir = mountpointIn(tmp.dir, 'm');
    await mounts.mount(['--rw', ours, dir]);
    const fd = fs.openSync(path.join(dir, 'mount-ours.raw'), 'r+');
    try {
      for (const [o, l] of ZEROS) fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, o, l);
      fs.fsyncSync(fd);
    } finally {
      fs.closeSync(fd);
    }
    await mounts.unmount(dir);
    await expectSameFile(qemu, ours);
  });
});
