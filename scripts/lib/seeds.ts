// The images the corruption test and the fuzzer start from, made at run time by
// qemu-img and qemu-io (and, for the formats qemu-img cannot make, by their own tools
// or the tests' generator, as the conformance table does). Small: a few MiB of disk,
// tables of every kind the format has (L1/L2, snapshots, BAT, grain directories,
// descriptors with extent lists, backing files).
import fs from 'node:fs';
import path from 'node:path';
import { createImage, qemuIo, runOk, runTimingPbkdf } from './qemu.js';
import { bochsConvert, cloopCreate } from '../../test/helpers/ro-images.js';
import { everyChunkImage, writeUdif } from '../../test/helpers/udif.js';

const KiB = 1024;
const MiB = 1024 * KiB;

export interface Seed {
  /** Short name: format and variant ("vmdk-stream"). */
  name: string;
  format: string;
  /** The file the mutations damage; files it names (extents, backing) stay beside it. */
  file: string;
}

const IO = ['write -P 0x11 0 3k', `write -P 0x22 ${64 * KiB - 512} 5k`, `write -P 0x33 ${MiB} 1M`, `write -P 0x44 ${3 * MiB + 512} 100k`, `write -P 0x55 ${4 * MiB - 8 * KiB} 8k`];

/** For formats with 1 MiB blocks or more: one block written, so inputs stay small. */
const SMALL_IO = [...IO.slice(0, 2), `write -P 0x66 ${3 * MiB + 512} 4k`];

interface Recipe {
  name: string;
  format: string;
  make: (file: string) => Promise<unknown>;
}

async function qemuMade(file: string, format: string, options: Record<string, string | number> = {}, io = IO, backing?: { file: string; format: string }): Promise<void> {
  await createImage(file, format, '4M', options, backing);
  if (io.length) await qemuIo(file, format, io);
}

async function rawBacking(dir: string): Promise<string> {
  const b = path.join(dir, 'backing.raw');
  if (!fs.existsSync(b)) fs.writeFileSync(b, Buffer.alloc(4 * MiB, 0x5a));
  return b;
}

/** Every recipe, by format (raw has no metadata to damage). */
export const RECIPES: Recipe[] = [
  { name: 'qcow2', format: 'qcow2', make: (f) => qemuMade(f, 'qcow2') },
  { name: 'qcow2-4k', format: 'qcow2', make: (f) => qemuMade(f, 'qcow2', { cluster_size: '4k' }) },
  {
    name: 'qcow2-snapshots',
    format: 'qcow2',
    make: async (f) => {
      await qemuMade(f, 'qcow2', { cluster_size: '4k' });
      await runOk('qemu-img', ['snapshot', '-c', 'one', f]);
      await qemuIo(f, 'qcow2', ['write -P 0x66 0 64k']);
      await runOk('qemu-img', ['snapshot', '-c', 'two', f]);
    },
  },
  { name: 'qcow2-backing', format: 'qcow2', make: async (f) => qemuMade(f, 'qcow2', {}, IO.slice(0, 2), { file: path.basename(await rawBacking(path.dirname(f))), format: 'raw' }) },
  {
    name: 'qcow2-compressed',
    format: 'qcow2',
    make: async (f) => {
      const src = `${f}.src`;
      fs.writeFileSync(src, Buffer.from(Array.from({ length: 2 * MiB }, (_, i) => ((i * 2654435761) >>> 26) & 0xff)));
      await runOk('qemu-img', ['convert', '-q', '-c', '-f', 'raw', '-O', 'qcow2', '-o', 'cluster_size=4k', src, f]);
    },
  },
  // Data clusters in an external data file (absolute name: a mutated copy beside the seed finds it).
  { name: 'qcow2-datafile', format: 'qcow2', make: (f) => qemuMade(f, 'qcow2', { data_file: `${f}.data` }) },
  { name: 'qed', format: 'qed', make: (f) => qemuMade(f, 'qed', { cluster_size: '4k', table_size: 2 }) },
  { name: 'qed-backing', format: 'qed', make: async (f) => qemuMade(f, 'qed', {}, IO.slice(0, 2), { file: path.basename(await rawBacking(path.dirname(f))), format: 'raw' }) },
  { name: 'qcow', format: 'qcow', make: (f) => qemuMade(f, 'qcow') },
  { name: 'vdi', format: 'vdi', make: (f) => qemuMade(f, 'vdi', {}, SMALL_IO) },
  { name: 'vmdk', format: 'vmdk', make: (f) => qemuMade(f, 'vmdk') },
  { name: 'vmdk-stream', format: 'vmdk', make: (f) => qemuMade(f, 'vmdk', { subformat: 'streamOptimized' }, ['write -P 0x44 0 64k', 'write -P 0x55 1M 128k']) },
  // A descriptor file naming sparse and flat extents: the mutations edit its text.
  { name: 'vmdk-extents', format: 'vmdk', make: (f) => qemuMade(f, 'vmdk', { subformat: 'twoGbMaxExtentSparse' }) },
  { name: 'vmdk-flat', format: 'vmdk', make: (f) => qemuMade(f, 'vmdk', { subformat: 'monolithicFlat' }) },
  { name: 'vmdk-backing', format: 'vmdk', make: async (f) => {
    const parent = path.join(path.dirname(f), 'parent.vmdk');
    if (!fs.existsSync(parent)) await qemuMade(parent, 'vmdk');
    await qemuMade(f, 'vmdk', {}, IO.slice(0, 2), { file: 'parent.vmdk', format: 'vmdk' });
  } },
  { name: 'vpc', format: 'vpc', make: (f) => qemuMade(f, 'vpc', {}, SMALL_IO) },
  { name: 'vpc-fixed', format: 'vpc', make: (f) => qemuMade(f, 'vpc', { subformat: 'fixed' }, SMALL_IO) },
  { name: 'vhdx', format: 'vhdx', make: (f) => qemuMade(f, 'vhdx', { block_size: '1M' }, SMALL_IO) },
  {
    name: 'luks',
    format: 'luks',
    make: (f) => runTimingPbkdf('qemu-img', ['create', '-q', '--object', 'secret,id=sec0,data=x', '-f', 'luks', '-o', 'key-secret=sec0,iter-time=10', f, '1M']),
  },
  { name: 'parallels', format: 'parallels', make: (f) => qemuMade(f, 'parallels', {}, SMALL_IO) },
  { name: 'bochs', format: 'bochs', make: (f) => bochsConvert(f, 4 * MiB) },
  { name: 'cloop', format: 'cloop', make: (f) => cloopCreate(f, 2 * MiB, 64 * KiB) },
  { name: 'dmg', format: 'dmg', make: async (f) => writeUdif(f, everyChunkImage()) },
];

/** The formats the recipes cover. */
export const SEED_FORMATS = [...new Set(RECIPES.map((r) => r.format))];

/** Make each recipe of `format` (or all) in its own folder under `dir`; a recipe that fails (a missing tool) is left out. */
export async function makeSeeds(dir: string, format?: string, log: (m: string) => void = () => undefined): Promise<Seed[]> {
  const out: Seed[] = [];
  for (const r of RECIPES) {
    if (format && r.format !== format) continue;
    const sub = path.join(dir, r.name);
    fs.mkdirSync(sub, { recursive: true });
    const file = path.join(sub, `seed.${r.format === 'bochs' ? 'img' : r.format}`);
    try {
      await r.make(file);
      out.push({ name: r.name, format: r.format, file });
    } catch (err) {
      log(`seed ${r.name} not made: ${String(err).split('\n')[0]}`);
    }
  }
  return out;
}
