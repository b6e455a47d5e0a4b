// The read path asks the image file for as little as it can: a large read of clusters
// (grains, blocks) that lie one after the other in the file is one file read, a
// fragmented one is one file read per contiguous run, and compressed qcow2 clusters
// packed back to back are one file read. Counted with the counting filter between
// the driver and its file; the bytes are checked against qemu-img convert's.
import { expect } from 'chai';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import type { BlockNode, FormatDriver } from '../drivers/types.js';
import { fileProtocol } from '../drivers/protocol/index.js';
import { CountingFilter, newCounters, type IoCounters } from '../drivers/filters/counting.js';
import { qcow2Driver } from '../drivers/format/qcow2/index.js';
import { vmdkDriver } from '../drivers/format/vmdk/index.js';
import { vhdxDriver } from '../drivers/format/vhdx/index.js';
import { convertToRaw, createImage, qemuIo, runOk, tempDir } from './helpers/qemu.js';

const KiB = 1024;
const MiB = 1024 * KiB;

interface Counted {
  node: BlockNode;
  counters: IoCounters;
  close(): Promise<void>;
}

async function openCounted(file: string, driver: FormatDriver): Promise<Counted> {
  const inner = await fileProtocol.open(file, { readOnly: true, cache: 'writeback' });
  const counters = newCounters();
  const node = await driver.open(new CountingFilter(inner, counters), {
    readOnly: true,
    cache: 'writeback',
    metadataCacheBytes: 1 << 20,
    openBacking: () => Promise.reject(new Error('no backing')),
  });
  return { node, counters, close: () => node.close() };
}

/**
 * Read [offset, offset + length) twice: the first read loads the tables it needs;
 * the second is counted. Returns the file reads of the second, and checks its bytes.
 */
async function fileReads(file: string, driver: FormatDriver, raw: Buffer, offset: number, length: number, warm = [offset, length]): Promise<number> {
  const c = await openCounted(file, driver);
  try {
    await c.node.read(warm[0]!, Buffer.alloc(warm[1]!));
    c.counters.reads = 0;
    const got = Buffer.alloc(length);
    await c.node.read(offset, got);
    expect(got.equals(raw.subarray(offset, offset + length)), `${path.basename(file)}: bytes at ${offset}+${length}`).to.equal(true);
    return c.counters.reads;
  } finally {
    await c.close();
  }
}

describe('read coalescing: file reads per request', function () {
  let t: ReturnType<typeof tempDir>;
  let src: string;
  const raws = new Map<string, Buffer>();

  /** The image's bytes as qemu-img convert reads them. */
  async function oracle(file: string, format: string): Promise<Buffer> {
    let b = raws.get(file);
    if (!b) {
      const out = `${file}.raw`;
      await convertToRaw(file, out, format);
      b = fs.readFileSync(out);
      raws.set(file, b);
    }
    return b;
  }

  before(async () => {
    t = tempDir('coalesce');
    src = path.join(t.dir, 'src.raw');
    fs.writeFileSync(src, crypto.randomBytes(4 * MiB));
  });
  after(() => t.cleanup());

  const contiguous: { name: string; driver: FormatDriver; format: string; opts: string[] }[] = [
    { name: 'qcow2', driver: qcow2Driver, format: 'qcow2', opts: ['-o', 'cluster_size=65536'] },
    { name: 'vmdk monolithicSparse', driver: vmdkDriver, format: 'vmdk', opts: ['-o', 'subformat=monolithicSparse'] },
    { name: 'vhdx (1 MiB blocks)', driver: vhdxDriver, format: 'vhdx', opts: ['-o', 'block_size=1M'] },
  ];

  for (const c of contiguous) {
    it(`${c.name}: 1 MiB (and 2 MiB across blocks) of contiguously allocated data is one file read`, async function () {
      const file = path.join(t.dir, `contig.${c.format}`);
      await runOk('qemu-img', ['convert', '-f', 'raw', '-O', c.format, ...c.opts, src, file]);
      const raw = await oracle(file, c.format);
      expect(await fileReads(file, c.driver, raw, MiB, MiB)).to.equal(1);
      expect(await fileReads(file, c.driver, raw, MiB, 2 * MiB)).to.equal(1);
      // Unaligned at both ends: still one.
      expect(await fileReads(file, c.driver, raw, MiB + 512, MiB - 1024)).to.equal(1);
    });
  }

  for (const c of contiguous.slice(0, 2)) {
    it(`${c.name}: a fragmented 1 MiB read is one file read per contiguous run`, async function () {
      const file = path.join(t.dir, `frag.${c.format}`);
      await createImage(file, c.format, 4 * MiB, c.format === 'qcow2' ? { cluster_size: 65536 } : {});
      // Pairs of 64 KiB clusters (grains) written last first: each pair is contiguous
      // in the file, and lies before the pair that precedes it in the guest.
      const cmds: string[] = [];
      for (let k = 7; k >= 0; k--) cmds.push(`write -P 0x${(0x40 + k).toString(16)} ${k * 128 * KiB} ${128 * KiB}`);
      await qemuIo(file, c.format, cmds);
      const raw = await oracle(file, c.format);
      expect(await fileReads(file, c.driver, raw, 0, MiB)).to.equal(8);
      // The unallocated MiB after it costs no file read at all.
      expect(await fileReads(file, c.driver, raw, 0, 2 * MiB)).to.equal(8);
    });
  }

  it('vhdx: blocks allocated last first are one file read each', async function () {
    const file = path.join(t.dir, 'frag.vhdx');
    await createImage(file, 'vhdx', 4 * MiB, { block_size: '1M' });
    await qemuIo(file, 'vhdx', [`write -P 0x51 ${MiB} ${MiB}`, `write -P 0x50 0 ${MiB}`]);
    const raw = await oracle(file, 'vhdx');
    expect(await fileReads(file, vhdxDriver, raw, 0, 2 * MiB)).to.equal(2);
  });

  it('compressed qcow2: the clusters of a 1 MiB read are one file read', async function () {
    const text = path.join(t.dir, 'text.raw');
    // Compressible, and different in every cluster.
    const lines: string[] = [];
    for (let i = 0, n = 0; n < 4 * MiB; i++) n += lines[lines.push(`line ${i} of the test text, ${((i * 2654435761) >>> 0).toString(16)}\n`) - 1]!.length;
    fs.writeFileSync(text, Buffer.from(lines.join('')).subarray(0, 4 * MiB));
    const file = path.join(t.dir, 'compressed.qcow2');
    await runOk('qemu-img', ['convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', 'cluster_size=65536', text, file]);
    const raw = await oracle(file, 'qcow2');
    expect(raw.equals(fs.readFileSync(text))).to.equal(true);
    // Warmed on another MiB: the L2 table is loaded, nothing of this MiB decompressed.
    expect(await fileReads(file, qcow2Driver, raw, MiB, MiB, [0, MiB])).to.equal(1);
    // Read twice in a row, whole clusters are read again (they are not kept), partial ones are not.
    expect(await fileReads(file, qcow2Driver, raw, 2 * MiB, MiB)).to.equal(1);
  });
});
