// vmdk seSparse deltas (ESXi 6.5+ snapshots), read-only over their parent. qemu-img
// cannot make them, so test/helpers/deltas.ts lays them out as QEMU 7.2 reads them,
// and QEMU 7.2 (qemu-img convert, from the image's folder) is the oracle.
import { expect } from 'chai';
import fs from 'node:fs';
import path from 'node:path';
import { openImage, formatOf } from '../drivers/open.js';
import { TsmountError, UnsupportedError } from '../drivers/errors.js';
import { convertToRaw, md5File, qemuIo, run, tempDir } from './helpers/qemu.js';
import { MountTracker, tsmount } from './helpers/mount.js';
import { nodeBytes, nodeMd5, testOptions } from './helpers/images.js';
import { expectMountedReadOnly, makeSeSparseChain, seAllocatedEntry, seSparseDescriptor, vmdkCid, writeSeSparse, type SeGrain } from './helpers/deltas.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const SIZE = 40 * MiB;
const G = 4 * KiB;

/** Grains of every kind in the first and third grain tables; the second table is absent. */
function grains(): Map<number, SeGrain> {
  const m = new Map<number, SeGrain>();
  for (let g = 0; g < 8; g++) m.set(g, { kind: 'data', seed: g + 1 });
  m.set(10, { kind: 'zero' });
  m.set(11, { kind: 'unmapped' });
  m.set(257, { kind: 'data', seed: 99 }); // inside the parent's 1 MiB of 0x5a
  m.set(258, { kind: 'zero' }); // zeros over parent data, not the parent
  m.set(4095, { kind: 'data', seed: 7 }); // last entry of table 0
  m.set(4096 + 5, { kind: 'data', seed: 8 }); // table 1, left absent below
  m.set(2 * 4096 + 17, { kind: 'data', seed: 9 });
  m.set(SIZE / G - 1, { kind: 'data', seed: 10 }); // last grain of the disk
  return m;
}

const fillParent = (parent: string): Promise<void> =>
  qemuIo(parent, 'vmdk', ['write -P 0x5a 1M 1M', 'write -P 0x11 0 64k', `write -P 0x22 ${17 * MiB} 64k`, `write -P 0x33 ${SIZE - MiB} 1M`]);

async function qemuRaw(child: string, dir: string): Promise<Buffer> {
  const out = path.join(dir, 'qemu.raw');
  await convertToRaw(child, out);
  try {
    return fs.readFileSync(out);
  } finally {
    fs.rmSync(out, { force: true });
  }
}


async function expectRefused(file: string, re: RegExp, rw = false): Promise<TsmountError> {
  let err: unknown;
  try {
    const node = await openImage(file, testOptions({ readOnly: !rw }));
    await nodeMd5(node, MiB);
    await node.close();
  } catch (e) {
    err = e;
  }
  expect(err).to.be.instanceOf(TsmountError);
  const msg = (err as Error).message;
  expect(msg.split('\n')).to.have.length(1);
  expect(msg).to.match(re);
  return err as TsmountError;
}

describe('vmdk seSparse deltas', function () {
  this.timeout(120_000);
  let t: ReturnType<typeof tempDir>;
  beforeEach(() => (t = tempDir('sesparse')));
  afterEach(() => t.cleanup());

  for (const subformat of ['monolithicSparse', 'monolithicFlat']) {
    it(`reads over a ${subformat} parent as QEMU 7.2 does, probed without -f`, async () => {
      const { child, parent } = await makeSeSparseChain(t.dir, { size: SIZE, subformat, grains: grains(), absentTables: [1], fillParent });
      const want = await qemuRaw(child, t.dir);
      expect(want.length).to.equal(SIZE);
      // The delta shows: its data, zero grains over parent data, and the parent elsewhere.
      expect(want.subarray(257 * G, 258 * G).every((b) => b === 0x5a)).to.equal(false);
      expect(want.subarray(258 * G, 259 * G).every((b) => b === 0)).to.equal(true);
      expect(want[259 * G]).to.equal(0x5a);
      const node = await openImage(child, testOptions());
      try {
        expect(formatOf(node)).to.equal('vmdk');
        expect(node.size).to.equal(SIZE);
        expect(node.readOnly).to.equal(true);
        expect(node.backing?.name).to.match(/parent\.vmdk$/);
        const got = await nodeBytes(node);
        expect(got.equals(want)).to.equal(true);
        // Odd reads across grains and tables agree too.
        for (const [off, len] of [[4095 * G - 100, 3 * G], [16 * MiB - 7 * 512, 4096], [SIZE - 513, 513]] as const) {
          const b = Buffer.alloc(len);
          await node.read(off, b);
          expect(b.equals(want.subarray(off, off + len)), `read ${off}+${len}`).to.equal(true);
        }
        const status = await node.blockStatus(0, SIZE);
        expect(status[0]).to.deep.include({ offset: 0, kind: 'data' });
        expect(status.find((e) => e.offset === 10 * G)).to.deep.include({ kind: 'zero', length: 2 * G });
        expect(status.find((e) => e.offset === 12 * G)?.kind).to.equal('unallocated');
      } finally {
        await node.close();
      }
      expect(fs.existsSync(parent)).to.equal(true);
    });
  }

  it('reads a chain of two seSparse deltas as QEMU does', async () => {
    const { child } = await makeSeSparseChain(t.dir, { size: SIZE, grains: grains(), fillParent });
    const g = new Map<number, SeGrain>([
      [0, { kind: 'zero' }],
      [3, { kind: 'data', seed: 50 }],
      [257, { kind: 'unmapped' }],
      [4096 * 2 + 17, { kind: 'data', seed: 51 }],
    ]);
    writeSeSparse(path.join(t.dir, 'grand-sesparse.vmdk'), { size: SIZE, grains: g });
    const grand = path.join(t.dir, 'grand.vmdk');
    fs.writeFileSync(grand, seSparseDescriptor({ size: SIZE, extent: 'grand-sesparse.vmdk', parent: 'child.vmdk', parentCid: vmdkCid(child) }));
    const want = await qemuRaw(grand, t.dir);
    const node = await openImage(grand, testOptions());
    try {
      expect(node.backing?.backing?.name).to.match(/parent\.vmdk$/);
      expect((await nodeBytes(node)).equals(want)).to.equal(true);
    } finally {
      await node.close();
    }
  });

  it('refuses --rw with one line, as QEMU has no write support', async () => {
    const { child, extent } = await makeSeSparseChain(t.dir, { size: SIZE, grains: grains(), fillParent });
    const before = await md5File(extent);
    const err = await expectRefused(child, /seSparse.*read-only/, true);
    expect(err).to.be.instanceOf(UnsupportedError);
    expect(await md5File(extent)).to.equal(before);
  });

  it('a missing parent is one line naming it', async () => {
    const { child, parent } = await makeSeSparseChain(t.dir, { size: SIZE, grains: grains(), fillParent });
    fs.renameSync(parent, `${parent}.gone`);
    await expectRefused(child, /child\.vmdk: cannot open backing file 'parent\.vmdk'/);
    fs.mkdirSync(path.join(t.dir, 'mnt'));
    const cli = await tsmount([child, path.join(t.dir, 'mnt')]);
    expect(cli.code).to.not.equal(0);
    expect(cli.stderr.trim().split('\n')).to.have.length(1);
    expect(cli.stderr).to.match(/cannot open backing file 'parent\.vmdk'.*(No such file|not found|ENOENT)/i);
  });

  it('bad headers are refused with one line, as QEMU refuses them', async () => {
    const cases: [string, (b: Buffer) => void, RegExp][] = [
      ['magic', (b) => b.writeBigUInt64LE(0xcafebabfn, 0), /bad seSparse const header magic/],
      ['version', (b) => b.writeBigUInt64LE(0x0000000200000002n, 8), /unsupported seSparse version/],
      ['grain size', (b) => b.writeBigUInt64LE(16n, 24), /grain size/],
      ['grain table size', (b) => b.writeBigUInt64LE(128n, 32), /grain table size/],
      ['flags', (b) => b.writeBigUInt64LE(1n, 40), /flags/],
      ['reserved', (b) => b.writeBigUInt64LE(1n, 56), /reserved/],
      ['padding', (b) => (b[400] = 1), /padding/],
      ['volatile magic', (b) => b.writeBigUInt64LE(0xcafebaben, 512), /volatile header magic/],
      ['dirty journal', (b) => b.writeBigUInt64LE(1n, 512 + 24), /journal/],
      ['huge directory', (b) => b.writeBigUInt64LE(1n << 40n, 136), /grain directory too big/],
      ['directory past the end', (b) => b.writeBigUInt64LE(1n << 30n, 128), /grain directory .* outside the file/],
    ];
    for (const [what, edit, re] of cases) {
      const dir = fs.mkdtempSync(path.join(t.dir, 'h-'));
      const { child } = await makeSeSparseChain(dir, { size: SIZE, grains: grains(), fillParent: () => Promise.resolve(), mutate: (b) => edit(b) });
      const q = await run('qemu-img', ['convert', '-U', '-O', 'raw', child, path.join(dir, 'q.raw')], { cwd: dir });
      // QEMU only bounds the directory by its size, not by the file; it refuses all the others.
      if (what !== 'directory past the end') expect(q.code, `${what}: qemu-img`).to.not.equal(0);
      await expectRefused(child, re);
    }
  });

  it('corrupt grain directory and grain table entries fail the reads they touch (EIO), the rest still read', async () => {
    const g = grains();
    g.set(20, { kind: 'raw', entry: 4n << 60n }); // unknown type
    g.set(21, { kind: 'raw', entry: 5n }); // type 0 but not zero
    g.set(22, { kind: 'raw', entry: seAllocatedEntry(1n << 40n) }); // far past the end of the file
    const { child } = await makeSeSparseChain(t.dir, {
      size: SIZE,
      grains: g,
      fillParent,
      // Table 2's directory entry with another tag than 0x10000000.
      mutate: (b, l) => b.writeBigUInt64LE((0x20000000n << 32n) | BigInt(l.tableSlot.get(2)!), l.gdSector * 512 + 2 * 8),
    });
    const node = await openImage(child, testOptions());
    try {
      for (const off of [20 * G, 21 * G, 22 * G, 32 * MiB]) {
        let err: unknown;
        try {
          await node.read(off, Buffer.alloc(G));
        } catch (e) {
          err = e;
        }
        expect(err, `read at ${off}`).to.be.instanceOf(TsmountError);
        expect((err as TsmountError).errno).to.equal(5);
        expect((err as Error).message.split('\n')).to.have.length(1);
      }
      const ok = Buffer.alloc(G);
      await node.read(19 * G, ok);
      await node.read(23 * G, ok);
    } finally {
      await node.close();
    }
  });
});

describe('vmdk seSparse: through a real FUSE mount', function () {
  this.timeout(120_000);
  const mounts = new MountTracker();
  let t: ReturnType<typeof tempDir>;
  before(() => (t = tempDir('sesparse-mount')));
  afterEach(() => mounts.cleanup());
  after(() => t.cleanup());

  it('serves the delta over its parent read-only; --rw is refused with one line', async () => {
    const { child } = await makeSeSparseChain(t.dir, { size: SIZE, grains: grains(), absentTables: [1], fillParent });
    await expectMountedReadOnly(mounts, child, path.join(t.dir, 'mnt'), 'child.raw', await qemuRaw(child, t.dir), /seSparse/);
  });
});
