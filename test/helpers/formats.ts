// How qemu-img makes images of each registered format, keyed by driver name: the
// variants the conformance suite reads against `qemu-img convert`, the one it writes
// through a mount, whether qemu-img check judges the format, whether it has backing
// files, and how `tsimg create` makes one. A format that registers itself in
// drivers/format/index.ts and has no entry here fails test/conformance.test.ts.
// Also the runners that reach an image as QEMU does, passphrase included.
import fs from 'node:fs';
import path from 'node:path';
import { md5File, md5Sparse, run, runOk, runTimingPbkdf, type RunResult } from './qemu.js';
import { pattern, patch, readBytes } from './images.js';
import { everyChunkImage, writeUdif } from './udif.js';
import { bochsConvert, bochsCreate, bochsToV1, cloopCreate } from './ro-images.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const GiB = 1024 * MiB;

/** One image qemu-img makes. */
export interface ImageVariant {
  title: string;
  size: number | string;
  /** qemu-img create -o ... */
  options?: Record<string, string | number>;
  /** qemu-io commands that fill it. */
  io: string[];
  /** A backing file made first: raw ones hold a byte pattern, others are filled with `io`. */
  backing?: { format: string; size: number; io?: string[] };
  /** Passphrase, given to QEMU as the secret object s0 (the options name it). */
  secret?: string;
  /** Whether probing finds the format without -f (a fixed VHD has no header: it does not). */
  probes?: boolean;
  /** Edit the file after qemu-img create, before qemu-io fills it. */
  afterCreate?: (file: string) => void;
  /** GiB-sized and sparse: hash the converted file by its data runs. */
  large?: boolean;
  /**
   * Makes the image itself, for formats qemu-img reads but cannot create: their own
   * tool (bximage, create_compressed_fs) or the tests' generator (dmg); then `size`,
   * `options` and `io` are not used (unless `make` reads them from the variant it is given).
   */
  make?: (file: string, v: ImageVariant) => void | Promise<unknown>;
}

export interface FormatEntry {
  /** File name extension of its images. */
  ext: string;
  /** The option naming the secret object (encrypted images). */
  secretKey?: string;
  /** Read against qemu-img convert, one test each. */
  read: ImageVariant[];
  /** Written through a --rw mount; absent for a read-only format. */
  write?: ImageVariant;
  /** qemu-img check can judge images of this format. */
  checked: boolean;
  /** Overlays over a backing file (qemu-img create -b) exist in this format. */
  backing: boolean;
  /** Extra tsimg create arguments (a passphrase); absent when tsimg cannot create it. */
  create?: { args: string[]; options?: Record<string, string | number> };
  /** Read-only here as in QEMU (no `write`): a --rw mount is refused, a read-only one reads. */
  readOnly?: boolean;
  /** The image the corruption case damages, when there is no `write` variant. */
  damaged?: ImageVariant;
}

const SECRET = 'hunter2';

/** qemu-io commands that leave data, zero clusters and discarded ranges behind. */
export function fillCommands(size: number): string[] {
  return [
    'write -P 0x11 0 3k',
    `write -P 0x22 ${64 * KiB - 512} 5k`,
    `write -P 0x33 ${MiB} ${2 * MiB + 4 * KiB}`,
    `write -z ${2 * MiB} ${64 * KiB}`,
    `write -P 0x44 ${5 * MiB + 12345 - (12345 % 512)} 100k`,
    `discard ${5 * MiB} 64k`,
    `write -P 0x55 ${size - 8 * KiB} 8k`,
    `write -z -u ${MiB + 128 * KiB} 128k`,
  ];
}

export const compressedFill = (cs: number): string[] => [
  `write -c -P 0x11 0 ${cs}`,
  `write -c -P 0x22 ${2 * cs} ${2 * cs}`,
  `write -P 0x33 ${4 * cs} ${cs}`,
  `write -c -P 0x44 ${8 * cs} ${cs}`,
  `write -c -P 0x55 ${12 * cs} ${cs}`,
];

const Q2 = 24 * MiB;
const qcow2Core: ImageVariant[] = [
  { title: '512-byte clusters', size: Q2, options: { cluster_size: 512 }, io: fillCommands(Q2) },
  { title: '4 KiB clusters', size: Q2, options: { cluster_size: 4096 }, io: fillCommands(Q2) },
  { title: '64 KiB clusters (default)', size: Q2, io: fillCommands(Q2) },
  { title: '2 MiB clusters', size: Q2, options: { cluster_size: 2 * MiB }, io: fillCommands(Q2) },
  { title: 'compat 0.10 (version 2)', size: Q2, options: { compat: '0.10' }, io: fillCommands(Q2) },
  { title: 'compat 0.10 with 512-byte clusters', size: Q2, options: { compat: '0.10', cluster_size: 512 }, io: fillCommands(Q2) },
  { title: 'compat 1.1 (version 3)', size: Q2, options: { compat: '1.1' }, io: fillCommands(Q2) },
  { title: 'refcount_bits=1', size: Q2, options: { refcount_bits: 1 }, io: fillCommands(Q2) },
  { title: 'refcount_bits=2', size: Q2, options: { refcount_bits: 2 }, io: fillCommands(Q2) },
  { title: 'refcount_bits=16', size: Q2, options: { refcount_bits: 16 }, io: fillCommands(Q2) },
  { title: 'refcount_bits=64', size: Q2, options: { refcount_bits: 64, cluster_size: 4096 }, io: fillCommands(Q2) },
  { title: 'preallocation=metadata', size: Q2, options: { preallocation: 'metadata', cluster_size: 65536 }, io: fillCommands(Q2) },
];

/** qcow2 features beyond the core; test/qcow2-features.test.ts also writes each of them. */
export const qcow2FeatureVariants: (ImageVariant & { size: number })[] = [
  { title: 'zlib compressed clusters', size: 64 * MiB, io: compressedFill(64 * KiB) },
  { title: 'zstd compressed clusters', size: 64 * MiB, options: { compression_type: 'zstd' }, io: compressedFill(64 * KiB) },
  { title: 'zlib compressed 4 KiB clusters', size: 8 * MiB, options: { cluster_size: 4096 }, io: compressedFill(4 * KiB) },
  { title: 'zstd compressed 2 MiB clusters', size: 64 * MiB, options: { cluster_size: 2 * MiB, compression_type: 'zstd' }, io: compressedFill(2 * MiB) },
  { title: 'zlib compressed 2 MiB clusters', size: 64 * MiB, options: { cluster_size: 2 * MiB }, io: compressedFill(2 * MiB) },
  { title: 'compressed clusters in a compat=0.10 image', size: 16 * MiB, options: { compat: '0.10' }, io: compressedFill(64 * KiB) },
  {
    title: 'extended L2 entries',
    size: 64 * MiB,
    options: { extended_l2: 'on' },
    io: ['write -P 0x11 2k 1k', 'write -P 0x22 70k 3k', 'write -z 80k 4k', `write -P 0x33 ${MiB} 200k`, `write -z -u ${MiB + 64 * KiB} 4k`],
  },
  {
    title: 'extended L2 entries over a backing file',
    size: 32 * MiB,
    options: { extended_l2: 'on' },
    backing: { format: 'qcow2', size: 32 * MiB, io: ['write -P 0xb0 0 4M', `write -P 0xb1 ${31 * MiB} 1M`] },
    io: ['write -P 0x11 2k 1k', 'write -z 10k 2k', 'write -P 0x22 130k 3k', `write -P 0x33 ${MiB} 64k`],
  },
  { title: 'extended L2 entries with compressed clusters', size: 32 * MiB, options: { extended_l2: 'on', cluster_size: 128 * KiB }, io: compressedFill(128 * KiB) },
  { title: 'extended L2 entries with 2 MiB clusters', size: 64 * MiB, options: { extended_l2: 'on', cluster_size: 2 * MiB }, io: ['write -P 0x11 64k 64k', `write -P 0x22 ${3 * MiB} 100k`] },
  { title: 'an external data file', size: 32 * MiB, options: { data_file: 'data.bin' }, io: ['write -P 0x11 0 100k', `write -P 0x22 ${MiB} 64k`, `write -z ${MiB} 4k`] },
  { title: 'a raw external data file', size: 32 * MiB, options: { data_file: 'data.raw', data_file_raw: 'on' }, io: ['write -P 0x11 0 100k', `write -P 0x22 ${MiB} 64k`] },
  { title: 'lazy refcounts', size: 32 * MiB, options: { lazy_refcounts: 'on' }, io: ['write -P 0x11 0 100k', `write -P 0x22 ${5 * MiB} 1M`] },
  { title: 'refcount_bits=1 and compressed clusters', size: 16 * MiB, options: { refcount_bits: 1 }, io: ['write -P 0x11 0 64k', `write -P 0x22 ${MiB} 64k`] },
];

const vhdxIo = ['write -P 0x11 0 64k', 'write -P 0x22 1023k 2k', 'write -P 0x33 5M 9M', 'write -z 6M 512', 'write -P 0x44 20M 512'];
const vpcIo = ['write -P 0x11 0 64k', 'write -P 0x22 2047k 2k', 'write -P 0x33 5M 3M', 'write -z 6M 512'];
const vmdkIo = ['write -P 0x11 100k 200k', 'write -P 0x22 10M 1M', 'write -P 0x33 63M 1M'];
const FILL = ['write -P 0xab 100k 300k', 'write -P 0x11 5M 4k', 'write -P 0x22 15M 1M'];
/** A small image with data in a few places, for the mount test. */
const small = (title: string, extra: Partial<ImageVariant> = {}): ImageVariant => ({ title, size: 16 * MiB, io: ['write -P 0xab 100k 300k', 'write -P 0x11 5M 4k', 'write -P 0x22 15M 1M'], ...extra });

/** Clear qed's "backing format is raw, do not probe" feature, so that the backing format is probed. */
function qedProbeBacking(file: string): void {
  const features = readBytes(file, 16, 8);
  features[0]! &= ~4;
  patch(file, 16, features);
}

const made = (title: string, size: number, make: (file: string) => Promise<unknown>): ImageVariant => ({ title, size, io: [], make });
const bochsData = made('growing, converted from raw data (bximage -func=convert)', 8 * MiB, (f) => bochsConvert(f, 8 * MiB));
const cloopData = made('64 KiB blocks (create_compressed_fs -B 64K)', 6 * MiB, (f) => cloopCreate(f, 6 * MiB, 64 * KiB));

/**
 * Writable layouts beside each format's own write variant whose data lies in files
 * other than the image's, which the FUSE workers read and overwrite there (session
 * 30), and a qcow2 with persistent dirty bitmaps, whose every write must reach the
 * driver (stored at unmount, left in use by a kill): the soak and the crash storm run
 * them too, picked by name as formats are.
 */
export interface Layout {
  name: string;
  format: string;
  write: ImageVariant;
  checked: boolean;
}
export const writableLayouts: Layout[] = [
  { name: 'vmdk-flat', format: 'vmdk', write: small('a monolithicFlat vmdk', { options: { subformat: 'monolithicFlat' } }), checked: true },
  { name: 'vmdk-2gsparse', format: 'vmdk', write: small('a twoGbMaxExtentSparse vmdk', { options: { subformat: 'twoGbMaxExtentSparse' } }), checked: true },
  { name: 'vpc-fixed', format: 'vpc', write: small('a fixed VHD', { options: { subformat: 'fixed', force_size: 'on' }, probes: false }), checked: false },
  { name: 'qcow2-datafile', format: 'qcow2', write: small('a qcow2 with an external data file', { options: { data_file: 'layout.data' } }), checked: true },
  {
    name: 'qcow2-bitmaps',
    format: 'qcow2',
    // Made here, at the size and with the writes the caller gives (the soak's are 512M and none).
    write: {
      ...small('a qcow2 with persistent dirty bitmaps (64 KiB and 4 KiB granularity)'),
      make: async (f, v) => {
        await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', f, String(v.size)]);
        await runOk('qemu-img', ['bitmap', '--add', f, 'b0']);
        await runOk('qemu-img', ['bitmap', '--add', '-g', '4k', f, 'b1']);
        if (v.io.length > 0) await runOk('qemu-io', ['-f', 'qcow2', ...v.io.flatMap((c) => ['-c', c]), f]);
      },
    },
    checked: true,
  },
];

/** The formats' write variants and the layouts above, those named in `picked` (a list from the environment) or all. */
export function writableCases(picked: string[] | undefined): Layout[] {
  const formats = Object.keys(formatTable).filter((f) => formatTable[f]!.write && (!picked || picked.includes(f)));
  return [...formats.map((f) => ({ name: f, format: f, write: formatTable[f]!.write!, checked: formatTable[f]!.checked })), ...writableLayouts.filter((l) => !picked || picked.includes(l.name))];
}

export const formatTable: Record<string, FormatEntry> = {
  raw: {
    ext: 'raw',
    read: [{ title: 'a sparse file with data', size: 16 * MiB, io: FILL }],
    write: small('a raw file'),
    checked: false,
    backing: false,
    create: { args: [] },
  },
  qcow2: {
    ext: 'qcow2',
    read: [...qcow2Core, ...qcow2FeatureVariants],
    write: small('qcow2 with default options'),
    checked: true,
    backing: true,
    create: { args: [] },
  },
  vmdk: {
    ext: 'vmdk',
    read: [
      { title: 'monolithicSparse', size: 64 * MiB, io: vmdkIo },
      { title: 'monolithicFlat', size: 64 * MiB, options: { subformat: 'monolithicFlat' }, io: vmdkIo },
      { title: 'streamOptimized (written by qemu-io)', size: 64 * MiB, options: { subformat: 'streamOptimized' }, io: ['write -P 0x44 0 64k', 'write -P 0x55 1M 128k'] },
      { title: 'zeroed_grain with zero grains', size: 64 * MiB, options: { zeroed_grain: 'on' }, io: [...vmdkIo, 'write -z 10M 512k'] },
      { title: 'compat6', size: 64 * MiB, options: { compat6: 'on' }, io: vmdkIo },
      { title: 'twoGbMaxExtentSparse above 2 GiB (reads cross extents)', size: 2 * GiB + 64 * MiB, options: { subformat: 'twoGbMaxExtentSparse' }, io: ['write -P 0x66 2047M 2M', 'write -P 0x67 2100M 64k'], large: true },
      { title: 'twoGbMaxExtentFlat above 2 GiB (reads cross extents)', size: 2 * GiB + 64 * MiB, options: { subformat: 'twoGbMaxExtentFlat' }, io: ['write -P 0x68 2047M 2M', 'write -P 0x69 2100M 64k'], large: true },
    ],
    write: small('vmdk monolithicSparse'),
    checked: true,
    backing: true,
    create: { args: [] },
  },
  qed: {
    ext: 'qed',
    read: [
      { title: 'qed with default options', size: 32 * MiB, io: [...FILL, 'write -z 6M 128k'] },
      // QEMU 7.2 cannot open table_size=1 images it makes (qed_check_table_offset); 2 is the smallest it reads.
      { title: 'qed with 4 KiB clusters and table_size 2', size: 32 * MiB, options: { cluster_size: '4k', table_size: 2 }, io: [...FILL, 'write -z 6M 8k'] },
      { title: 'qed with 64 KiB clusters and table_size 16', size: 32 * MiB, options: { cluster_size: '64k', table_size: 16 }, io: FILL },
      { title: 'qed with 1 MiB clusters', size: 32 * MiB, options: { cluster_size: '1M', table_size: 2 }, io: FILL },
      { title: 'qed with a raw backing file (backing_fmt=raw)', size: 32 * MiB, backing: { size: 32 * MiB, format: 'raw' }, io: [...FILL, 'write -z 7M 64k'] },
      { title: 'qed with a probed backing file shorter than the image', size: 32 * MiB, backing: { size: 20 * MiB, format: 'raw' }, afterCreate: qedProbeBacking, io: FILL },
    ],
    write: small('qed with default options'),
    checked: true,
    backing: true,
    create: { args: [] },
  },
  qcow: {
    ext: 'qcow',
    secretKey: 'encrypt.key-secret',
    read: [
      { title: 'qcow with default options', size: 32 * MiB, io: [...FILL, 'write -c -P 0x33 8M 4k', 'write -c -P 0x44 9M 4k', 'write -c -P 0x45 9220k 4k'] },
      { title: 'qcow with a backing file (probed)', size: 32 * MiB, backing: { size: 32 * MiB, format: 'raw' }, io: FILL },
      { title: 'qcow encrypted with AES (encrypt.format=aes)', size: 32 * MiB, options: { 'encrypt.format': 'aes', 'encrypt.key-secret': 's0' }, secret: SECRET, io: FILL },
      { title: 'qcow encrypted with AES (encryption=on)', size: 8 * MiB, options: { encryption: 'on', 'encrypt.key-secret': 's0' }, secret: SECRET, io: ['write -P 0x5a 1000k 200k'] },
    ],
    write: small('qcow with default options'),
    checked: false,
    backing: true,
    create: { args: [] },
  },
  vdi: {
    ext: 'vdi',
    read: [
      { title: 'vdi dynamic', size: 32 * MiB + 512, io: FILL },
      { title: 'vdi static=on', size: 32 * MiB, options: { static: 'on' }, io: FILL },
    ],
    write: small('vdi dynamic'),
    checked: true,
    backing: false,
    create: { args: [] },
  },
  parallels: {
    ext: 'parallels',
    read: [
      { title: 'parallels with 1 MiB clusters', size: 32 * MiB, io: FILL },
      { title: 'parallels with 64 KiB clusters', size: 32 * MiB, options: { cluster_size: '64k' }, io: FILL },
    ],
    write: small('parallels with 1 MiB clusters'),
    checked: true,
    backing: false,
    create: { args: [] },
  },
  vpc: {
    ext: 'vhd',
    read: [
      { title: 'dynamic (default), empty', size: '10M', io: [] },
      { title: 'dynamic, data across block boundaries', size: '20M', io: vpcIo },
      { title: 'dynamic with force_size', size: 20 * MiB + 512, options: { force_size: 'on' }, io: vpcIo },
      { title: 'fixed', size: '20M', options: { subformat: 'fixed' }, io: vpcIo, probes: false },
      { title: 'fixed with force_size', size: '20M', options: { subformat: 'fixed', force_size: 'on' }, io: vpcIo, probes: false },
      { title: 'dynamic, sparse 1.1 GiB with data near the end', size: '1100M', io: ['write -P 0x44 1099M 1M', 'write -P 0x55 1M 4k'] },
    ],
    write: small('a dynamic VHD'),
    checked: false,
    backing: false,
    create: { args: [] },
  },
  vhdx: {
    ext: 'vhdx',
    read: [
      { title: 'dynamic (default, zero block states), empty', size: '24M', io: [] },
      { title: 'dynamic with data', size: '24M', io: vhdxIo },
      { title: 'dynamic, block_state_zero=off', size: '24M', options: { block_state_zero: 'off' }, io: vhdxIo },
      { title: 'fixed', size: '24M', options: { subformat: 'fixed' }, io: vhdxIo },
      { title: 'fixed, block_state_zero=off', size: '24M', options: { subformat: 'fixed', block_state_zero: 'off' }, io: vhdxIo },
      { title: 'block_size=1M', size: '24M', options: { block_size: '1M' }, io: vhdxIo },
      { title: 'block_size=2M, log_size=4M', size: '24M', options: { block_size: '2M', log_size: '4M' }, io: vhdxIo },
      { title: 'block_size=256M', size: '24M', options: { block_size: '256M' }, io: vhdxIo },
      { title: 'block_size=0 (auto: 16 MiB above 1 GiB)', size: '1100M', options: { block_size: '0' }, io: ['write -P 0x55 1099M 1M'] },
      { title: 'odd size (not a block multiple)', size: '23M', options: { block_size: '8M' }, io: ['write -P 0x66 22M 1M'] },
      { title: 'zero size', size: '0', io: [] },
    ],
    write: small('a dynamic VHDX'),
    checked: true,
    backing: false,
    create: { args: [] },
  },
  // Read-only, made by the test generator (qemu-img cannot create dmg): chunk types
  // QEMU decodes, so qemu-img convert is the oracle; test/dmg.test.ts covers the rest.
  dmg: {
    ext: 'dmg',
    read: [
      { title: 'raw, zlib, zero and ignore chunks in three partitions (XML property list)', size: 0, io: [], make: (f) => writeUdif(f, everyChunkImage({ kinds: ['raw', 'zlib', 'zero', 'ignore'] })) },
      { title: 'the same, tables in a binary resource fork', size: 0, io: [], make: (f) => writeUdif(f, everyChunkImage({ kinds: ['zlib', 'raw', 'ignore'], tables: 'rsrc' })) },
    ],
    checked: false,
    backing: false,
  },
  luks: {
    ext: 'luks',
    secretKey: 'key-secret',
    read: [{ title: 'luks with default options', size: 16 * MiB, options: { 'key-secret': 's0', 'iter-time': 10 }, secret: SECRET, io: FILL }],
    write: small('luks with default options', { options: { 'key-secret': 's0', 'iter-time': 10 }, secret: SECRET }),
    checked: false,
    backing: false,
    create: { args: ['--secret', SECRET], options: { 'iter-time': 10 } },
  },
  bochs: {
    ext: 'img',
    read: [
      made('growing, empty (bximage -func=create)', 10 * MiB, (f) => bochsCreate(f, 10)),
      bochsData,
      made('header version 1', 8 * MiB, async (f) => {
        await bochsConvert(f, 8 * MiB);
        bochsToV1(f);
      }),
      made('300 MiB: 64 KiB extents, data at the end', 300 * MiB, (f) => bochsConvert(f, 300 * MiB)),
    ],
    checked: false,
    backing: false,
    readOnly: true,
    damaged: bochsData,
  },
  cloop: {
    ext: 'cloop',
    read: [
      made('4 KiB blocks', 6 * MiB, (f) => cloopCreate(f, 6 * MiB, 4 * KiB)),
      cloopData,
      made('512-byte blocks', MiB, (f) => cloopCreate(f, MiB, 512)),
      made('1 MiB blocks', 6 * MiB, (f) => cloopCreate(f, 6 * MiB, MiB)),
      made('size not a block multiple (the last block padded)', 5 * MiB + 12345, (f) => cloopCreate(f, 5 * MiB + 12345, 256 * KiB)),
      made('all zeros', 3 * MiB, (f) => cloopCreate(f, 3 * MiB, 128 * KiB, [])),
    ],
    checked: false,
    backing: false,
    readOnly: true,
    damaged: cloopData,
  },
};

/** An image as QEMU's tools name it: plain, or through --image-opts with its passphrase. */
export interface ImageRef {
  file: string;
  format: string;
  secret?: string;
  secretKey?: string;
}

/** Arguments naming the image for qemu-img/qemu-io: options first, the image last. */
function qemuName(ref: ImageRef): { opts: string[]; image: string } {
  if (!ref.secret) return { opts: ['-f', ref.format], image: ref.file };
  return {
    opts: ['--object', `secret,id=s0,data=${ref.secret}`, '--image-opts'],
    image: `driver=${ref.format},file.filename=${ref.file},${ref.secretKey ?? 'key-secret'}=s0`,
  };
}

/** qemu-io -c CMD... on the image; qemu-io reports failed commands on stdout and still exits 0. */
export async function qemuIoRef(ref: ImageRef, commands: string[]): Promise<void> {
  if (commands.length === 0) return;
  const { opts, image } = qemuName(ref);
  const args = [...opts];
  for (const c of commands) args.push('-c', c);
  args.push(image);
  const out = await runOk('qemu-io', args, { cwd: path.dirname(ref.file) });
  const bad = out.split('\n').find((l) => /failed|error/i.test(l) && !/^wrote|^read/.test(l));
  if (bad) throw new Error(`qemu-io ${commands.join('; ')}: ${bad}`);
}

/** What qemu-img convert -O raw makes of the image, written to `out`. */
export async function convertRef(ref: ImageRef, out: string): Promise<void> {
  const { opts, image } = qemuName(ref);
  await runOk('qemu-img', ['convert', '-U', ...opts, image, '-O', 'raw', out], { cwd: path.dirname(ref.file), timeoutMs: 600_000 });
}

/** md5 of the disk as qemu-img convert reads it (holes skipped for GiB-sized images). */
export async function oracleMd5(ref: ImageRef, large = false): Promise<string> {
  const out = `${ref.file}.oracle-${process.hrtime.bigint()}.raw`;
  try {
    await convertRef(ref, out);
    return large ? await md5Sparse(out) : await md5File(out);
  } finally {
    fs.rmSync(out, { force: true });
  }
}

/** qemu-img check (exit 0: clean). */
export function checkRef(ref: ImageRef): Promise<RunResult> {
  const { opts, image } = qemuName(ref);
  return run('qemu-img', ['check', '-U', ...opts, image], { cwd: path.dirname(ref.file) });
}

/** qemu-img compare of the image with a raw file (exit 0: identical contents). */
export function compareRef(ref: ImageRef, raw: string): Promise<RunResult> {
  if (!ref.secret) return run('qemu-img', ['compare', '-U', '-f', ref.format, '-F', 'raw', ref.file, raw], { cwd: path.dirname(ref.file) });
  const { opts, image } = qemuName(ref);
  return run('qemu-img', ['compare', '-U', ...opts, image, `driver=raw,file.filename=${raw}`], { cwd: path.dirname(ref.file) });
}

/** Make a variant's image (its backing file first) in `dir` as `<name>.<ext>`; returns how to reach it. */
export async function makeVariant(dir: string, format: string, v: ImageVariant, name: string): Promise<ImageRef> {
  const entry = formatTable[format];
  const file = path.join(dir, `${name}.${entry?.ext ?? format}`);
  const ref: ImageRef = { file, format, secret: v.secret, secretKey: entry?.secretKey };
  if (v.make) {
    await v.make(file, v);
    return ref;
  }
  const args = ['create', '-q', '-f', format];
  if (v.secret) args.push('--object', `secret,id=s0,data=${v.secret}`);
  if (v.backing) {
    const b = path.join(dir, `${name}-base.${formatTable[v.backing.format]?.ext ?? v.backing.format}`);
    if (v.backing.format === 'raw') {
      fs.writeFileSync(b, Buffer.concat([pattern(v.backing.size / 2, 99), pattern(v.backing.size / 2, 98)]));
    } else {
      await runOk('qemu-img', ['create', '-q', '-f', v.backing.format, b, String(v.backing.size)], { cwd: dir });
      await qemuIoRef({ file: b, format: v.backing.format }, v.backing.io ?? []);
    }
    args.push('-b', path.basename(b), '-F', v.backing.format);
  }
  const o = Object.entries(v.options ?? {}).map(([k, x]) => `${k}=${x}`);
  if (o.length) args.push('-o', o.join(','));
  args.push(file, String(v.size));
  // LUKS creation times its PBKDF, which fails now and then on a fast machine.
  const made = await runTimingPbkdf('qemu-img', args, 40, { cwd: dir });
  if (made.code !== 0) throw new Error(`qemu-img ${args.join(' ')} failed: ${made.stderr.trim()}`);
  v.afterCreate?.(file);
  await qemuIoRef(ref, v.io);
  return ref;
}
