// QEMU's preallocate filter (qemu-block-drivers(7), "Filter drivers"), judged by QEMU:
// the same writes through qemu-io over `file.driver=preallocate` and through a tsmount
// mount with the filter grow the image file to the same sizes step by step, and both
// cut it back to the same file at close; a kill leaves zeros past the data that
// qemu-img check and compare accept; the lock bytes are qemu-storage-daemon's; bad
// options are refused in one line.
import { expect } from 'chai';
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { checkImage, lockEntries, md5File, qemuIo, run, runOk, startStorageDaemon, tempDir } from './helpers/qemu.js';
import { MountTracker, mountedPid, mountpointIn, tsmount, waitFor } from './helpers/mount.js';
import { tsimg } from './helpers/images.js';

const KiB = 1024;
const MiB = 1 << 20;

/** One step: `length` bytes of `pattern` at `offset`. */
interface Step {
  offset: number;
  length: number;
  pattern: number;
}

// Past the end of the file again and again with a 2 MiB preallocation: an allocating
// write inside the zeros ahead, one past them, a new L2 table far out, one that ends
// exactly on the preallocated end, and an overwrite (no growth).
const STEPS: Step[] = [
  { offset: 0, length: 3 * MiB, pattern: 0x11 },
  { offset: 500 * MiB, length: MiB, pattern: 0x22 },
  { offset: 200 * MiB, length: 64 * KiB, pattern: 0x33 },
  { offset: 900 * MiB, length: 2 * MiB, pattern: 0x44 },
  { offset: 3 * MiB, length: 1536 * KiB, pattern: 0x55 },
  { offset: MiB, length: 64 * KiB, pattern: 0x66 },
  { offset: 100 * MiB, length: 5 * MiB, pattern: 0x77 },
];

/** qemu-io reading commands from a pipe: each step is one request, then a flush. */
class QemuIoSession {
  private out = '';
  private readonly child: ChildProcess;

  constructor(args: string[], cwd: string) {
    this.child = spawn('qemu-io', args, { cwd, stdio: ['pipe', 'pipe', 'pipe'] });
    this.child.stdout!.on('data', (d: Buffer) => (this.out += String(d)));
    this.child.stderr!.on('data', (d: Buffer) => (this.out += String(d)));
    this.child.stdin!.on('error', () => undefined);
  }

  /**
   * Run `command`, then flush, each once qemu-io has answered the one before (it takes
   * one line per wake-up of its input: lines sent together wait for more input).
   */
  async step(command: string): Promise<void> {
    await waitFor(() => this.prompts() > 0 || this.child.exitCode !== null, 30_000, 'qemu-io to start');
    for (const c of [command, 'flush']) {
      const prompts = this.prompts();
      this.child.stdin!.write(`${c}\n`);
      await waitFor(() => this.prompts() > prompts || this.child.exitCode !== null, 30_000, `qemu-io: ${c}`).catch((e: Error) => Promise.reject(new Error(`${e.message}: ${this.out}`)));
      if (this.child.exitCode !== null || /error|failed/i.test(this.out)) throw new Error(`qemu-io: ${this.out}`);
    }
  }

  private prompts(): number {
    return this.out.split('qemu-io> ').length - 1;
  }

  async quit(): Promise<void> {
    const done = new Promise((r) => this.child.once('exit', r));
    this.child.stdin!.end('quit\n');
    await done;
  }
}

describe('preallocate filter: QEMU\'s prealloc-size and prealloc-align, as qemu-io and qemu-storage-daemon do them', function () {
  this.timeout(300_000);
  const mounts = new MountTracker();
  let tmp: { dir: string; cleanup: () => void };

  before(() => (tmp = tempDir('prealloc')));
  afterEach(() => mounts.cleanup());
  after(() => tmp.cleanup());

  const mp = (name: string): string => mountpointIn(tmp.dir, name);
  const newQcow2 = async (name: string, size = '1G'): Promise<string> => {
    const file = path.join(tmp.dir, name);
    await runOk('qemu-img', ['create', '-f', 'qcow2', file, size]);
    return file;
  };

  /** The image file's size after each step through qemu-io over QEMU's filter, and its bytes at the end. */
  async function throughQemu(name: string, filter: string): Promise<{ sizes: number[]; file: string }> {
    const file = await newQcow2(name);
    const io = new QemuIoSession(['--image-opts', `driver=qcow2,file.driver=preallocate,${filter}file.file.driver=file,file.file.filename=${name}`], tmp.dir);
    const sizes: number[] = [];
    try {
      for (const s of STEPS) {
        await io.step(`write -P ${s.pattern} ${s.offset} ${s.length}`);
        sizes.push(fs.statSync(file).size);
      }
    } finally {
      await io.quit();
    }
    return { sizes, file };
  }

  /** The same through a tsmount mount with `args` (the last one the image). */
  async function throughTsmount(file: string, args: string[], dir: string): Promise<number[]> {
    await mounts.mount([...args, dir]);
    const flat = path.join(dir, fs.readdirSync(dir)[0]!);
    const sizes: number[] = [];
    const fd = fs.openSync(flat, 'r+');
    try {
      for (const s of STEPS) {
        fs.writeSync(fd, Buffer.alloc(s.length, s.pattern), 0, s.length, s.offset);
        fs.fsyncSync(fd);
        sizes.push(fs.statSync(file).size);
      }
    } finally {
      fs.closeSync(fd);
    }
    await mounts.unmount(dir);
    return sizes;
  }

  it('grows the image file step by step as QEMU\'s filter does and cuts it back to the same file at unmount (-o and --image-opts spellings)', async function () {
    const qemu = await throughQemu('q.qcow2', 'file.prealloc-size=2M,');
    // Each step past the file's end allocates 2 MiB more, to a 1 MiB boundary.
    expect(new Set(qemu.sizes).size, `sizes ${qemu.sizes.join(' ')}`).to.be.greaterThanOrEqual(3);
    for (const sz of qemu.sizes) expect(sz % MiB, `a preallocated end is on 1 MiB: ${qemu.sizes.join(' ')}`).to.equal(0);

    const ours = await newQcow2('t.qcow2');
    const sizes = await throughTsmount(ours, ['--rw', '-o', 'prealloc-size=2M', ours], mp('t'));
    expect(sizes, 'file sizes after each step').to.deep.equal(qemu.sizes);

    const viaOpts = await newQcow2('o.qcow2');
    const optsSizes = await throughTsmount(viaOpts, ['--rw', '--image-opts', `driver=qcow2,file.driver=preallocate,file.prealloc-size=2M,file.file.driver=file,file.file.filename=${viaOpts}`], mp('o'));
    expect(optsSizes).to.deep.equal(qemu.sizes);

    // At close the zeros ahead of the data are given back: the file QEMU's filter leaves.
    const final = fs.statSync(qemu.file).size;
    expect(final).to.be.lessThan(qemu.sizes[qemu.sizes.length - 1]!);
    for (const f of [ours, viaOpts]) {
      expect(fs.statSync(f).size, f).to.equal(final);
      expect((await checkImage(f, 'qcow2')).code, `qemu-img check ${f}`).to.equal(0);
      const cmp = await run('qemu-img', ['compare', '-f', 'qcow2', '-F', 'qcow2', qemu.file, f]);
      expect(cmp.code, cmp.stdout + cmp.stderr).to.equal(0);
    }
    expect(await md5File(ours), 'the same file, byte for byte').to.equal(await md5File(qemu.file));

    // Without the filter the file only ever grows by what is written.
    const plain = await newQcow2('p.qcow2');
    const plainSizes = await throughTsmount(plain, ['--rw', plain], mp('p'));
    expect(plainSizes[0]).to.be.lessThan(qemu.sizes[0]!);
    expect(fs.statSync(plain).size).to.equal(final);
  });

  it('the default is 128 MiB ahead on a 1 MiB boundary (--preallocate)', async function () {
    const file = await newQcow2('d.qcow2');
    const dir = mp('d');
    await mounts.mount(['--rw', '--preallocate', file, dir]);
    const fd = fs.openSync(path.join(dir, 'd.raw'), 'r+');
    fs.writeSync(fd, Buffer.alloc(64 * KiB, 1), 0, 64 * KiB, 0);
    fs.fsyncSync(fd);
    fs.closeSync(fd);
    const st = fs.statSync(file);
    expect(st.size).to.be.greaterThanOrEqual(128 * MiB);
    expect(st.size).to.be.lessThanOrEqual(130 * MiB);
    expect(st.size % MiB).to.equal(0);
    // Allocated, not a hole (fallocate ZERO_RANGE, QEMU's write_zeroes without fallback).
    expect(st.blocks * 512).to.be.greaterThanOrEqual(128 * MiB);
    await mounts.unmount(dir);
    expect(fs.statSync(file).size).to.be.lessThan(MiB);
    expect((await checkImage(file, 'qcow2')).code).to.equal(0);
  });

  it('a kill leaves zeros past the data that QEMU reads past; the next mount keeps them, as QEMU\'s filter does', async function () {
    const file = await newQcow2('k.qcow2');
    const twin = await newQcow2('k-twin.qcow2');
    const dir = mp('k');
    await mounts.mount(['--rw', '-o', 'preallocate,prealloc-size=16M', file, dir]);
    const fd = fs.openSync(path.join(dir, 'k.raw'), 'r+');
    for (const s of STEPS.slice(0, 4)) {
      fs.writeSync(fd, Buffer.alloc(s.length, s.pattern), 0, s.length, s.offset);
      await qemuIo(twin, 'qcow2', [`write -P ${s.pattern} ${s.offset} ${s.length}`]);
    }
    fs.fsyncSync(fd);
    fs.closeSync(fd);
    const pid = mountedPid(dir)!;
    process.kill(pid, 'SIGKILL');
    await waitFor(() => {
      try {
        process.kill(pid, 0);
        return false;
      } catch {
        return true;
      }
    }, 10_000, 'the server to die');
    await run('umount', ['-l', dir]);
    const left = fs.statSync(file).size;
    expect(left).to.be.greaterThan(fs.statSync(twin).size + 8 * MiB);
    const check = await checkImage(file, 'qcow2');
    expect(check.code, check.output).to.equal(0);
    const cmp = await run('qemu-img', ['compare', '-f', 'qcow2', '-F', 'qcow2', twin, file]);
    expect(cmp.code, cmp.stdout + cmp.stderr).to.equal(0);
    // QEMU's filter takes the file's length at open for the end of the data: so does ours.
    await mounts.mount(['--rw', '--preallocate', file, dir]);
    await mounts.unmount(dir);
    expect(fs.statSync(file).size).to.equal(left);
  });

  it('locks the bytes qemu-storage-daemon locks with the filter: write and resize no longer shared (--share-rw over raw)', async function () {
    const raw = path.join(tmp.dir, 'l.raw');
    fs.writeFileSync(raw, Buffer.alloc(4 * MiB));
    const bytes = (): string[] => lockEntries(raw).map((e) => `${e.byte}`);
    const qsdLocks = async (blockdevs: string[], node: string): Promise<string[]> => {
      const exp = path.join(tmp.dir, 'qsd-export');
      fs.writeFileSync(exp, '');
      const qsd = await startStorageDaemon(blockdevs, node, exp, { writable: true, growable: true });
      try {
        return bytes();
      } finally {
        await qsd.stop();
      }
    };
    const file = `driver=file,node-name=f,filename=${raw}`;
    const qemuWith = await qsdLocks([file, 'driver=preallocate,node-name=p,file=f'], 'p');
    const qemuWithout = await qsdLocks([file], 'f');
    expect(qemuWith).to.include.members(['201', '203']);
    expect(qemuWithout).to.not.include('201');

    const dir = mp('l');
    await mounts.mount(['--rw', '--share-rw', '--preallocate', raw, dir]);
    expect(bytes()).to.deep.equal(qemuWith);
    await mounts.unmount(dir);
    await mounts.mount(['--rw', '--share-rw', raw, dir]);
    expect(bytes()).to.deep.equal(qemuWithout);
    await mounts.unmount(dir);
    expect(fs.statSync(raw).size, 'a raw disk never grows through the filter').to.equal(4 * MiB);
  });

  it('refuses bad options in one line and changes nothing; a read-only mount ignores the filter', async function () {
    const file = await newQcow2('r.qcow2', '64M');
    const before = await md5File(file);
    const dir = mp('r');
    const refused = async (args: string[], words: RegExp): Promise<void> => {
      mounts.track(dir);
      const r = await tsmount([...args, dir]);
      expect(r.code, `${args.join(' ')}: ${r.stderr}`).to.not.equal(0);
      expect(r.stderr.trim().split('\n'), r.stderr).to.have.length(1);
      expect(r.stderr).to.match(words);
      expect(mountedPid(dir)).to.equal(undefined);
    };
    await refused(['--preallocate', file], /--preallocate needs --rw/);
    await refused(['--rw', '-o', 'prealloc-align=1000', file], /prealloc-align parameter of preallocate filter is not aligned to 512/);
    await refused(['--rw', '--prealloc-size', 'lots', file], /prealloc-size: 'lots' is not a size/);
    const opts = `driver=qcow2,file.driver=preallocate,file.file.filename=${file}`;
    await refused(['--rw', '--preallocate', '--image-opts', opts], /by --image-opts .* or by --preallocate, not both/);
    await refused(['--rw', '--image-opts', `${opts},file.prealloc-colour=red`], /unsupported option 'file.prealloc-colour'/);
    // QEMU's own words for the same alignment.
    const q = await run('qemu-io', ['--image-opts', `${opts},file.prealloc-align=1000`, '-c', 'read 0 512']);
    expect(q.stderr).to.match(/prealloc-align parameter of preallocate filter is not aligned to 512/);
    expect(await md5File(file)).to.equal(before);

    // Read-only, the filter (like QEMU's, which lacks the write permission) does nothing.
    await mounts.mount(['--image-opts', `${opts},file.prealloc-size=4M`, dir]);
    expect(fs.readFileSync(path.join(dir, 'r.raw')).length).to.equal(64 * MiB);
    await mounts.unmount(dir);
    expect(await md5File(file)).to.equal(before);
  });

  it('tsimg takes it in an --image-opts list: convert -n --target-image-opts makes the file qemu-img makes', async function () {
    const src = path.join(tmp.dir, 'src.raw');
    const b = Buffer.alloc(8 * MiB);
    for (let i = 0; i < 8; i += 2) b.fill(i + 1, i * MiB, (i + 1) * MiB);
    fs.writeFileSync(src, b);
    const made: string[] = [];
    for (const [tool, name] of [['qemu-img', 'cq.qcow2'], [null, 'ct.qcow2']] as const) {
      const dst = await newQcow2(name, '8M');
      const args = ['convert', '-n', '-f', 'raw', '--target-image-opts', src, `driver=qcow2,file.driver=preallocate,file.prealloc-size=4M,file.file.filename=${dst}`];
      const r = tool ? await run(tool, args, { cwd: tmp.dir }) : await tsimg(args, tmp.dir);
      expect(r.code, r.stderr).to.equal(0);
      made.push(dst);
    }
    expect(fs.statSync(made[1]!).size).to.equal(fs.statSync(made[0]!).size);
    const cmp = await run('qemu-img', ['compare', made[0]!, made[1]!]);
    expect(cmp.code, cmp.stdout).to.equal(0);
    expect((await checkImage(made[1]!, 'qcow2')).code).to.equal(0);
  });
});
