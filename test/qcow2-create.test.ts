// `tsimg create -f qcow2` with every option qemu-img 7.2 takes: each created image
// passes qemu-img check, qemu-img info reports the options, a qemu-io write into it
// reads back through tsmount, and a tsmount write reads back through qemu-img.
import { expect } from 'chai';
import fs from 'node:fs';
import path from 'node:path';
import { createImage, md5File, run, runOk, tempDir } from './helpers/qemu.js';
import { nodeMd5, openTestImage, tsimg } from './helpers/images.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const PASS = 'correct horse';

/** qemu-img/qemu-io arguments that name the image, with its secret when encrypted. */
function qemuImage(file: string, encrypted: boolean): string[] {
  if (!encrypted) return ['-f', 'qcow2', file];
  return ['--object', `secret,id=s0,data=${PASS}`, '--image-opts', `driver=qcow2,file.filename=${file},encrypt.key-secret=s0`];
}

interface Row {
  title: string;
  options: string[];
  size?: string;
  args?: string[];
  encrypted?: boolean;
  /** Fields of `qemu-img info --output=json` (format-specific data merged in). */
  expect: Record<string, unknown>;
  /** Make a backing file base.qcow2 of this size first. */
  backingSize?: number;
}

const rows: Row[] = [
  { title: 'defaults', options: [], expect: { compat: '1.1', 'cluster-size': 65536, 'refcount-bits': 16, 'lazy-refcounts': false, 'extended-l2': false, 'compression-type': 'zlib' } },
  { title: 'compat=0.10', options: ['compat=0.10'], expect: { compat: '0.10', 'refcount-bits': 16 } },
  { title: 'cluster_size=512 and refcount_bits=1', options: ['cluster_size=512,refcount_bits=1'], expect: { 'cluster-size': 512, 'refcount-bits': 1 } },
  { title: 'cluster_size=4k and refcount_bits=64', options: ['cluster_size=4k,refcount_bits=64'], expect: { 'cluster-size': 4096, 'refcount-bits': 64 } },
  { title: 'cluster_size=2M', options: ['cluster_size=2M'], expect: { 'cluster-size': 2 * MiB } },
  { title: 'preallocation=metadata', options: ['preallocation=metadata'], expect: {} },
  { title: 'preallocation=falloc', options: ['preallocation=falloc'], size: '8M', expect: {} },
  { title: 'preallocation=full', options: ['preallocation=full'], size: '8M', expect: {} },
  { title: 'lazy_refcounts=on and nocow=on', options: ['lazy_refcounts=on,nocow=on'], expect: { 'lazy-refcounts': true } },
  { title: 'extended_l2=on', options: ['extended_l2=on,cluster_size=32k'], expect: { 'extended-l2': true, 'cluster-size': 32768 } },
  { title: 'compression_type=zstd', options: ['compression_type=zstd'], expect: { 'compression-type': 'zstd' } },
  { title: 'a data file', options: ['data_file=img.data'], expect: { 'data-file': 'img.data', 'data-file-raw': false } },
  { title: 'a raw data file and extended L2', options: ['data_file=img.data,data_file_raw=on,extended_l2=on'], expect: { 'data-file': 'img.data', 'data-file-raw': true, 'extended-l2': true } },
  {
    title: 'a backing file given with -b/-F and no size',
    options: [],
    size: '',
    args: ['-b', 'base.qcow2', '-F', 'qcow2'],
    backingSize: 24 * MiB,
    expect: { 'backing-filename': 'base.qcow2', 'backing-filename-format': 'qcow2', 'virtual-size': 24 * MiB },
  },
  {
    title: 'a backing file with extended L2 and preallocation=metadata',
    options: ['extended_l2=on,preallocation=metadata'],
    args: ['-b', 'base.qcow2', '-F', 'qcow2'],
    backingSize: 16 * MiB,
    expect: { 'extended-l2': true, 'backing-filename': 'base.qcow2' },
  },
  { title: 'a backing file given as options', options: ['backing_file=base.qcow2,backing_fmt=qcow2'], backingSize: 8 * MiB, expect: { 'backing-filename': 'base.qcow2' } },
  { title: 'encryption=on (legacy AES)', options: ['encryption=on'], args: ['--secret', PASS], encrypted: true, expect: { encrypted: true } },
  { title: 'encrypt.format=aes', options: ['encrypt.format=aes'], args: ['--secret', PASS], encrypted: true, expect: { encrypted: true } },
  {
    title: 'encrypt.format=luks with its defaults',
    options: ['encrypt.format=luks,encrypt.iter-time=10'],
    args: ['--secret', PASS],
    encrypted: true,
    expect: { encrypted: true },
  },
  {
    title: 'encrypt.format=luks with serpent-256, xts, plain64 and sha512',
    options: ['encrypt.format=luks,encrypt.cipher-alg=serpent-256,encrypt.cipher-mode=xts,encrypt.ivgen-alg=plain64,encrypt.hash-alg=sha512,encrypt.iter-time=10'],
    args: ['--secret', PASS],
    encrypted: true,
    expect: { encrypted: true },
  },
  {
    title: 'encrypt.format=luks with twofish-128 and xts',
    options: ['encrypt.format=luks,encrypt.cipher-alg=twofish-128,encrypt.iter-time=10'],
    args: ['--secret', PASS],
    encrypted: true,
    expect: { encrypted: true },
  },
];

/** Flatten qemu-img info's JSON: top level plus format-specific data. */
function infoFields(info: Record<string, unknown>): Record<string, unknown> {
  const fs = (info['format-specific'] as { data?: Record<string, unknown> } | undefined)?.data ?? {};
  return { ...info, ...fs };
}

describe('tsimg create -f qcow2', function () {
  this.timeout(120_000);
  let tmp: ReturnType<typeof tempDir>;
  before(() => (tmp = tempDir('qcow2-create')));
  after(() => tmp.cleanup());

  rows.forEach((row, i) => {
    it(`creates an image with ${row.title} that qemu-img checks clean and reports`, async function () {
      const dir = path.join(tmp.dir, `c${i}`);
      fs.mkdirSync(dir);
      if (row.backingSize) {
        await createImage(path.join(dir, 'base.qcow2'), 'qcow2', row.backingSize);
        await runOk('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x3c 0 2M', path.join(dir, 'base.qcow2')]);
      }
      const file = path.join(dir, 'img.qcow2');
      const args = ['create', '-q', '-f', 'qcow2', ...row.options.flatMap((o) => ['-o', o]), ...(row.args ?? []), 'img.qcow2'];
      if (row.size !== '') args.push(row.size ?? '16M');
      const r = await tsimg(args, dir);
      expect(r.code, r.stderr).to.equal(0);

      const check = await run('qemu-img', ['check', ...(row.encrypted ? qemuImage(file, true) : ['-f', 'qcow2', file])], { cwd: dir });
      expect(check.code, check.stdout + check.stderr).to.equal(0);
      const info = infoFields(JSON.parse(await runOk('qemu-img', ['info', '--output=json', ...qemuImage(file, !!row.encrypted)], { cwd: dir })) as Record<string, unknown>);
      for (const [k, v] of Object.entries(row.expect)) expect(info[k], k).to.deep.equal(v);
      if (row.encrypted) {
        const fmt = (info.encrypt as { format?: string } | undefined)?.format;
        expect(fmt).to.equal(row.options[0]!.includes('luks') ? 'luks' : 'aes');
      }

      // qemu-io writes, tsmount reads; tsmount writes, qemu-img reads.
      await runOk('qemu-io', [...qemuImage(file, !!row.encrypted).flatMap((a) => [a]), '-c', 'write -P 0x5a 4k 100k', '-c', `write -P 0x5b ${3 * MiB} 64k`], { cwd: dir });
      const node = await openTestImage(file, { rw: true, secret: row.encrypted ? PASS : undefined });
      try {
        await node.write(5 * MiB + 512, Buffer.alloc(70 * KiB, 0x6c));
        await node.write(10, Buffer.alloc(1000, 0x6d));
        const ours = await nodeMd5(node);
        await node.flush();
        const raw = path.join(dir, 'img.raw');
        await runOk('qemu-img', ['convert', '-O', 'raw', ...qemuImage(file, !!row.encrypted), raw], { cwd: dir });
        expect(await md5File(raw)).to.equal(ours);
      } finally {
        await node.close();
      }
      const check2 = await run('qemu-img', ['check', ...(row.encrypted ? qemuImage(file, true) : ['-f', 'qcow2', file])], { cwd: dir });
      expect(check2.code, check2.stdout + check2.stderr).to.equal(0);
    });
  });

  const bad: { title: string; args: string[]; match: RegExp }[] = [
    { title: 'an unknown option', args: ['-o', 'bogus=1', 'x.qcow2', '1M'], match: /bogus/ },
    { title: 'a bad compat value', args: ['-o', 'compat=2.0', 'x.qcow2', '1M'], match: /compat/ },
    { title: 'a cluster size that is not a power of two', args: ['-o', 'cluster_size=1000', 'x.qcow2', '1M'], match: /Cluster size/ },
    { title: 'a cluster size over 2 MiB', args: ['-o', 'cluster_size=4M', 'x.qcow2', '1M'], match: /Cluster size/ },
    { title: 'lazy_refcounts with compat=0.10', args: ['-o', 'compat=0.10,lazy_refcounts=on', 'x.qcow2', '1M'], match: /Lazy refcounts/ },
    { title: 'extended_l2 with 4 KiB clusters', args: ['-o', 'extended_l2=on,cluster_size=4k', 'x.qcow2', '1M'], match: /Extended L2/ },
    { title: 'refcount_bits=3', args: ['-o', 'refcount_bits=3', 'x.qcow2', '1M'], match: /Refcount width/ },
    { title: 'no size and no backing file', args: ['x.qcow2'], match: /size/ },
    { title: 'data_file_raw without data_file', args: ['-o', 'data_file_raw=on', 'x.qcow2', '1M'], match: /data-file/ },
    { title: 'encryption without a passphrase', args: ['-o', 'encryption=on', 'x.qcow2', '1M'], match: /passphrase/ },
    { title: 'a LUKS option with AES encryption', args: ['-o', 'encryption=on,encrypt.cipher-alg=aes-256', '--secret', 'x', 'x.qcow2', '1M'], match: /encrypt.cipher-alg/ },
    { title: 'a backing file without -F', args: ['-b', 'base.qcow2', 'x.qcow2'], match: /backing format/ },
    { title: 'a backing file with preallocation and no extended L2', args: ['-b', 'base.qcow2', '-F', 'qcow2', '-o', 'preallocation=metadata', 'x.qcow2'], match: /preallocation/ },
  ];
  for (const b of bad) {
    it(`refuses ${b.title} with a one-line error and leaves no file`, async function () {
      const dir = path.join(tmp.dir, `bad-${b.title.replace(/\W+/g, '-')}`);
      fs.mkdirSync(dir);
      await createImage(path.join(dir, 'base.qcow2'), 'qcow2', MiB);
      const r = await tsimg(['create', '-f', 'qcow2', ...b.args], dir);
      expect(r.code).to.not.equal(0);
      expect(r.stderr.trim().split('\n')).to.have.length(1);
      expect(r.stderr).to.match(b.match);
      expect(fs.readdirSync(dir)).to.deep.equal(['base.qcow2']);
    });
  }
});
