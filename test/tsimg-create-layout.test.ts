// tsimg create makes the file qemu-img create makes: the same bytes where the format
// has no random parts (qcow2, qcow, qed, parallels, raw), and elsewhere (LUKS salts and
// keys, UUIDs, time stamps) the same size, the same map of data and holes and the same
// blocks allocated. Judged against qemu-img create of the same options.
import { expect } from 'chai';
import fs from 'node:fs';
import path from 'node:path';
import { run, runTimingPbkdf, tempDir } from './helpers/qemu.js';
import { readBytes, TSIMG, tsimg } from './helpers/images.js';

const PASS = 'correct horse';
const OBJ = ['--object', `secret,id=s0,data=${PASS}`];

/** The file's data runs (SEEK_DATA/SEEK_HOLE), as [start, end) pairs, read by python3 as the oracle has no such tool. */
async function dataRuns(file: string): Promise<string> {
  const py = [
    'import os,sys',
    'fd=os.open(sys.argv[1],os.O_RDONLY); n=os.fstat(fd).st_size; o=0; r=[]',
    'while o<n:',
    '  try: d=os.lseek(fd,o,os.SEEK_DATA)',
    '  except OSError: break',
    '  h=os.lseek(fd,d,os.SEEK_HOLE); r.append((d,h)); o=h',
    'print(r)',
  ].join('\n');
  const r = await run('python3', ['-c', py, file]);
  expect(r.code, r.stderr).to.equal(0);
  return r.stdout.trim();
}

interface Made {
  size: number;
  runs: string;
  blocks: number;
}

async function made(file: string): Promise<Made> {
  const st = fs.statSync(file);
  return { size: st.size, runs: await dataRuns(file), blocks: st.blocks };
}

/** Whether the two files hold the same bytes in their data runs (equal runs: checked before), read a MiB at a time. */
function sameData(a: string, b: string, runs: string): boolean {
  const fa = fs.openSync(a, 'r');
  const fb = fs.openSync(b, 'r');
  try {
    const ba = Buffer.alloc(1 << 20);
    const bb = Buffer.alloc(1 << 20);
    for (const [, s, e] of runs.matchAll(/\((\d+), (\d+)\)/g)) {
      for (let off = Number(s); off < Number(e); off += ba.length) {
        const n = Math.min(ba.length, Number(e) - off);
        fs.readSync(fa, ba, 0, n, off);
        fs.readSync(fb, bb, 0, n, off);
        if (!ba.subarray(0, n).equals(bb.subarray(0, n))) return false;
      }
    }
    return true;
  } finally {
    fs.closeSync(fa);
    fs.closeSync(fb);
  }
}

describe('tsimg create: the same file as qemu-img create', function () {
  this.timeout(300_000);
  let tmp: ReturnType<typeof tempDir>;
  before(() => (tmp = tempDir('create-layout')));
  after(() => tmp.cleanup());

  /** qemu-img create and tsimg create with the same arguments, each in a folder of its own (names inside the image match). */
  async function both(format: string, args: string[], size: string, tag: string): Promise<[string, string]> {
    const out: string[] = [];
    for (const who of ['qemu', 'ours']) {
      const dir = path.join(tmp.dir, `${tag}-${who}`);
      fs.mkdirSync(dir);
      const file = path.join(dir, `img.${format}`);
      const cmd = who === 'qemu' ? 'qemu-img' : process.execPath;
      const pre = who === 'qemu' ? [] : [TSIMG];
      const r = await runTimingPbkdf(cmd, [...pre, 'create', '-q', '-f', format, ...args, file, size], 40, { cwd: dir });
      expect(r.code, `${who} ${args.join(' ')} ${size}: ${r.stderr}`).to.equal(0);
      out.push(file);
    }
    return out as [string, string];
  }

  const qcow2Rows: { options: string; sizes: string[] }[] = [
    { options: '', sizes: ['0', '1M', '1000001', '1G', '100G'] },
    { options: 'cluster_size=512', sizes: ['0', '1M', '32M'] },
    { options: 'cluster_size=4k', sizes: ['1M', '100G'] },
    { options: 'cluster_size=8k', sizes: ['1M'] },
    { options: 'cluster_size=2M', sizes: ['0', '1M', '100G'] },
    { options: 'extended_l2=on', sizes: ['0', '1G', '100G'] },
    { options: 'compat=0.10', sizes: ['1M', '1G'] },
    { options: 'refcount_bits=64,lazy_refcounts=on', sizes: ['1M', '100G'] },
    { options: 'data_file=img.data', sizes: ['0', '1G'] },
    // One L2 table, then the data clusters it maps, then the next (QEMU's preallocate_co).
    { options: 'preallocation=metadata', sizes: ['0', '1M', '1G'] },
    { options: 'preallocation=metadata,extended_l2=on', sizes: ['1G'] },
    { options: 'preallocation=metadata,data_file=img.data', sizes: ['3000M'] },
    // Not here: preallocation=falloc/full (QEMU then builds its refcount structures with
    // qcow2_refcount_area, elsewhere), and images whose L1 table or preallocated clusters
    // need a second refcount block (QEMU places it where its allocator first needs it; with
    // 512-byte clusters from 64 MiB on): other offsets, the same checks (README, tsimg create).
  ];
  for (const row of qcow2Rows) {
    it(`qcow2 ${row.options || 'with the defaults'}: the same bytes, file size, data runs and blocks for sizes ${row.sizes.join(', ')}`, async () => {
      for (const size of row.sizes) {
        const tag = `qcow2-${row.options.replace(/\W+/g, '_')}-${size}`;
        const [theirs, ours] = await both('qcow2', row.options ? ['-o', row.options] : [], size, tag);
        const [a, b] = [await made(theirs), await made(ours)];
        expect(b.size, `${tag}: file size`).to.equal(a.size);
        expect(b.runs, `${tag}: data runs`).to.equal(a.runs);
        expect(sameData(theirs, ours, a.runs), `${tag}: bytes`).to.equal(true);
        expect(b.blocks, `${tag}: blocks`).to.equal(a.blocks);
        const check = await run('qemu-img', ['check', '-f', 'qcow2', ours], { cwd: path.dirname(ours) });
        expect(check.code, check.stdout + check.stderr).to.equal(0);
      }
    });
  }

  it('qcow2 with LUKS encryption: tables first, then the LUKS header, its unused key slots zeroed as QEMU zeroes them', async () => {
    for (const pre of ['', ',preallocation=metadata']) {
      for (const size of ['0', '1M', '1G']) {
        const tag = `luks${pre.replace(/\W+/g, '_')}-${size}`;
        const opts = `encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10${pre}`;
        const [theirs, ours] = await both('qcow2', [...OBJ, '-o', opts], size, tag);
        const [a, b] = [await made(theirs), await made(ours)];
        expect(b.size, `${tag}: file size`).to.equal(a.size);
        expect(b.runs, `${tag}: data runs`).to.equal(a.runs);
        expect(b.blocks, `${tag}: blocks`).to.equal(a.blocks);
        // The same header up to the crypto extension's offset: the layout, not the keys.
        expect(readBytes(ours, 0, 104).equals(readBytes(theirs, 0, 104)), `${tag}: header`).to.equal(true);
        const check = await run('qemu-img', ['check', ...OBJ, '--image-opts', `driver=qcow2,encrypt.key-secret=s0,file.filename=${ours}`]);
        expect(check.code, check.stdout + check.stderr).to.equal(0);
      }
    }
  });

  // Every other format: the same file size, data runs and blocks (and files, for vmdk's
  // extents); the same bytes where the format holds no UUID or time stamp.
  const others: { format: string; options: string; sizes: string[]; identical?: boolean }[] = [
    { format: 'qed', options: '', sizes: ['1M', '3G'], identical: true },
    { format: 'qed', options: 'cluster_size=4k,table_size=16', sizes: ['1M'], identical: true },
    { format: 'parallels', options: '', sizes: ['1M', '3G'], identical: true },
    { format: 'parallels', options: 'cluster_size=64k', sizes: ['3G'], identical: true },
    { format: 'raw', options: 'preallocation=falloc', sizes: ['1M', '3G'], identical: true },
    { format: 'raw', options: 'preallocation=full', sizes: ['1M'], identical: true },
    { format: 'vdi', options: '', sizes: ['1M', '3G'] },
    { format: 'vdi', options: 'static=on', sizes: ['1M'] },
    { format: 'vmdk', options: '', sizes: ['1M', '3G'] },
    { format: 'vmdk', options: 'subformat=monolithicFlat', sizes: ['1M'] },
    { format: 'vmdk', options: 'subformat=twoGbMaxExtentSparse', sizes: ['3G'] },
    { format: 'vmdk', options: 'subformat=twoGbMaxExtentFlat', sizes: ['1M'] },
    { format: 'vmdk', options: 'subformat=streamOptimized', sizes: ['3G'] },
    { format: 'vmdk', options: 'zeroed_grain=on,adapter_type=lsilogic', sizes: ['3G'] },
    { format: 'vpc', options: '', sizes: ['1M', '3G'] },
    { format: 'vpc', options: 'subformat=fixed', sizes: ['1M'] },
    { format: 'vpc', options: 'force_size=on', sizes: ['3G'] },
    { format: 'vhdx', options: '', sizes: ['1M', '3G'] },
    { format: 'vhdx', options: 'subformat=fixed', sizes: ['1M'] },
    { format: 'vhdx', options: 'block_size=1M,log_size=1M,block_state_zero=off', sizes: ['3G'] },
  ];
  for (const row of others) {
    it(`${row.format} ${row.options || 'with the defaults'}: the same file size, data runs and blocks${row.identical ? ' and bytes' : ''} for sizes ${row.sizes.join(', ')}`, async () => {
      for (const size of row.sizes) {
        const tag = `${row.format}-${row.options.replace(/\W+/g, '_')}-${size}`;
        const [theirs, ours] = await both(row.format, row.options ? ['-o', row.options] : [], size, tag);
        expect(fs.readdirSync(path.dirname(ours)), `${tag}: files`).to.deep.equal(fs.readdirSync(path.dirname(theirs)));
        for (const name of fs.readdirSync(path.dirname(ours))) {
          const [t, o] = [path.join(path.dirname(theirs), name), path.join(path.dirname(ours), name)];
          if (readBytes(t, 0, 21).toString('latin1') === '# Disk DescriptorFile') {
            // A vmdk descriptor: the same text but for its random CID.
            const text = (f: string): string => fs.readFileSync(f, 'latin1').replace(/^CID=[0-9a-f]+$/m, 'CID=');
            expect(text(o), `${tag} ${name}`).to.equal(text(t));
            continue;
          }
          const [a, b] = [await made(t), await made(o)];
          expect(b.size, `${tag} ${name}: file size`).to.equal(a.size);
          expect(b.runs, `${tag} ${name}: data runs`).to.equal(a.runs);
          expect(b.blocks, `${tag} ${name}: blocks`).to.equal(a.blocks);
          if (row.identical) expect(sameData(t, o, a.runs), `${tag} ${name}: bytes`).to.equal(true);
        }
      }
    });
  }

  it('qcow: the size rounded up to a sector as qemu-img does, the same bytes; no size at all refused', async () => {
    for (const size of ['100', '513', '1000000', '1G']) {
      const [theirs, ours] = await both('qcow', [], size, `qcow-${size}`);
      expect(fs.readFileSync(ours).equals(fs.readFileSync(theirs)), `qcow ${size}`).to.equal(true);
    }
    const dir = path.join(tmp.dir, 'qcow-zero');
    fs.mkdirSync(dir);
    const r = await tsimg(['create', '-f', 'qcow', 'z.qcow', '0'], dir);
    expect(r.code).to.equal(1);
    expect(r.stderr.trim().split('\n')).to.have.length(1);
    expect(r.stderr).to.match(/Image size is too small, cannot be zero length/);
    expect(fs.readdirSync(dir)).to.deep.equal([]);
  });
});
