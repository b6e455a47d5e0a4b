// The benchmark's images, made with qemu-img/qemu-io and reused between runs when
// their recipe has not changed (a `.done` stamp beside each holds the recipe).
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { runOk, runTimingPbkdf } from '../lib/qemu.js';
import { MiB } from './tools.js';

/** The benchmark's LUKS image's passphrase. */
export const LUKS_SECRET = 'tsmount-bench';

const CLUSTER = 64 * 1024;

export interface Sizes {
  /** Rows 1-5: the "1 GiB" images. */
  main: number;
  /** Rows 7-8: the "4 GiB" image. */
  big: number;
  /** Row 8: the "64 MiB" image. */
  small: number;
}

export class Images {
  constructor(readonly dir: string, readonly sizes: Sizes) {
    fs.mkdirSync(dir, { recursive: true });
  }

  private async once(name: string, recipe: string, make: (file: string) => Promise<void>): Promise<string> {
    const file = path.join(this.dir, name);
    const stamp = `${file}.done`;
    if (fs.existsSync(file) && fs.existsSync(stamp) && fs.readFileSync(stamp, 'utf8') === recipe) return file;
    fs.rmSync(stamp, { force: true });
    fs.rmSync(file, { force: true });
    process.stderr.write(`  making ${name}\n`);
    await make(file);
    fs.writeFileSync(stamp, recipe);
    return file;
  }

  /**
   * Guest data, half incompressible and half text-like: per MiB, 512 KiB random bytes
   * and 512 KiB of hex digits (about 50% compressible), so that compressed formats
   * do real work.
   */
  dataRaw(): Promise<string> {
    const size = this.sizes.main;
    return this.once('data.raw', `mixed-v1 ${size}`, async (file) => {
      const fd = fs.openSync(file, 'w');
      try {
        for (let pos = 0; pos < size; pos += MiB) {
          const block = Buffer.concat([crypto.randomBytes(MiB / 2), Buffer.from(crypto.randomBytes(MiB / 4).toString('hex'))]);
          fs.writeSync(fd, block, 0, Math.min(MiB, size - pos), pos);
        }
      } finally {
        fs.closeSync(fd);
      }
    });
  }

  private async fromData(name: string, args: string[]): Promise<string> {
    const src = await this.dataRaw();
    return this.once(name, `convert ${args.join(' ')} ${this.sizes.main}`, (file) => runOk('qemu-img', ['convert', '-f', 'raw', ...args, src, file], { timeoutMs: 900_000 }).then(() => undefined));
  }

  /** Every cluster allocated, 64 KiB clusters. */
  fullQcow2(): Promise<string> {
    return this.fromData('full.qcow2', ['-O', 'qcow2', '-o', 'cluster_size=65536']);
  }
  vmdk(): Promise<string> {
    return this.fromData('full.vmdk', ['-O', 'vmdk', '-o', 'subformat=monolithicSparse']);
  }
  vhdx(): Promise<string> {
    return this.fromData('full.vhdx', ['-O', 'vhdx']);
  }
  /** The data converted to `format`, every block allocated (qemu-img's defaults; vpc exactly the main size). */
  fullImage(format: string): Promise<string> {
    if (format === 'qcow2') return this.fullQcow2();
    if (format === 'vmdk') return this.vmdk();
    if (format === 'vhdx') return this.vhdx();
    return this.fromData(`full.${format}`, ['-O', format, ...(format === 'vpc' ? ['-o', 'force_size=on'] : [])]);
  }
  /** The data as a LUKS1 image (QEMU's defaults: aes-256-xts-plain64), passphrase LUKS_SECRET. */
  luks(): Promise<string> {
    return this.dataRaw().then((src) =>
      this.once('full.luks', `luks ${this.sizes.main}`, async (file) => {
        const r = await runTimingPbkdf('qemu-img', ['convert', '-f', 'raw', '--object', `secret,id=s0,data=${LUKS_SECRET}`, '-O', 'luks', '-o', 'key-secret=s0,iter-time=10', src, file]);
        if (r.code !== 0) throw new Error(`qemu-img convert -O luks: ${r.stderr.trim()}`);
      }),
    );
  }

  /** A private copy of the LUKS image (overwrites). */
  async luksCopy(name: string): Promise<string> {
    return this.copyOf(await this.luks(), name);
  }

  compressedQcow2(): Promise<string> {
    return this.fromData('compressed.qcow2', ['-O', 'qcow2', '-c', '-o', 'cluster_size=65536']);
  }

  /**
   * As compressedQcow2 with 1 MiB clusters: larger than the read map's granule, so its
   * clusters are the JS thread's and its inflate pool's, not the FUSE workers'.
   */
  compressedQcow2Big(): Promise<string> {
    return this.fromData('compressed-1m.qcow2', ['-O', 'qcow2', '-c', '-o', 'cluster_size=1048576']);
  }

  /** As compressedQcow2, each cluster a zstd frame (QEMU 5.1+). */
  zstdQcow2(): Promise<string> {
    return this.fromData('compressed-zstd.qcow2', ['-O', 'qcow2', '-c', '-o', 'cluster_size=65536,compression_type=zstd']);
  }

  /** A descriptor and one flat extent file of exactly the disk (the kernel reads it: FUSE passthrough). */
  flatVmdk(): Promise<string> {
    return this.fromData('flat.vmdk', ['-O', 'vmdk', '-o', 'subformat=monolithicFlat']);
  }

  /** A fixed VHD: the disk's bytes, then the footer (probed as raw, as QEMU does: open it as vpc). */
  fixedVpc(): Promise<string> {
    return this.fromData('fixed.vpc', ['-O', 'vpc', '-o', 'subformat=fixed,force_size=on']);
  }

  /** Every grain deflated behind its marker (the random half too: vmdk stores no grain plain). */
  streamVmdk(): Promise<string> {
    return this.fromData('stream.vmdk', ['-O', 'vmdk', '-o', 'subformat=streamOptimized']);
  }

  /** Every other 64 KiB cluster allocated (random bytes), the rest never written. */
  halfQcow2(): Promise<string> {
    const size = this.sizes.main;
    return this.once('half.qcow2', `half v1 ${size}`, async (file) => {
      const raw = `${file}.raw`;
      const fd = fs.openSync(raw, 'w');
      try {
        for (let pos = 0; pos < size; pos += 2 * CLUSTER) fs.writeSync(fd, crypto.randomBytes(Math.min(CLUSTER, size - pos)), 0, Math.min(CLUSTER, size - pos), pos);
        fs.ftruncateSync(fd, size);
      } finally {
        fs.closeSync(fd);
      }
      await runOk('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', '-o', 'cluster_size=65536', raw, file], { timeoutMs: 900_000 });
      fs.rmSync(raw);
    });
  }

  /** A private copy of `src` (made anew for every write measurement that allocates). */
  async copyOf(src: string, name: string): Promise<string> {
    const file = path.join(this.dir, name);
    fs.rmSync(file, { force: true });
    await runOk('cp', ['--sparse=always', src, file], { timeoutMs: 600_000 });
    return file;
  }

  /** A fresh empty qcow2 of the main size (made anew for every write measurement). */
  emptyQcow2(name: string): Promise<string> {
    return this.emptyImage('qcow2', name);
  }

  /**
   * A fresh empty image of the main size in `format`, qemu-img create's defaults (made
   * anew for every write measurement); a vpc exactly that size (force_size), not the
   * CHS geometry's rounding of it.
   */
  async emptyImage(format: string, name: string): Promise<string> {
    const file = path.join(this.dir, name);
    fs.rmSync(file, { force: true });
    const options = format === 'qcow2' ? ['-o', 'cluster_size=65536'] : format === 'vpc' ? ['-o', 'force_size=on'] : [];
    await runOk('qemu-img', ['create', '-q', '-f', format, ...options, file, String(this.sizes.main)]);
    return file;
  }

  /** A private, fully allocated copy for random writes. */
  async writableCopy(name: string): Promise<string> {
    const src = await this.fullQcow2();
    const file = path.join(this.dir, name);
    fs.rmSync(file, { force: true });
    await runOk('cp', ['--sparse=always', src, file], { timeoutMs: 600_000 });
    return file;
  }

  /** A fresh sparse raw file of the main size (allocating writes into raw, and their dd anchor). */
  sparseRaw(name: string): string {
    const file = path.join(this.dir, name);
    fs.rmSync(file, { force: true });
    fs.writeFileSync(file, '');
    fs.truncateSync(file, this.sizes.main);
    return file;
  }

  /** A private, fully allocated copy of the guest data as a raw file (overwrites into raw, and their dd anchor). */
  async rawCopy(name: string): Promise<string> {
    const src = await this.dataRaw();
    const file = path.join(this.dir, name);
    fs.rmSync(file, { force: true });
    await runOk('cp', ['--sparse=never', src, file], { timeoutMs: 600_000 });
    return file;
  }

  sparse1T(): Promise<string> {
    return this.once('sparse-1t.qcow2', 'sparse 1T v1', (file) => runOk('qemu-img', ['create', '-q', '-f', 'qcow2', file, '1T']).then(() => undefined));
  }

  /** top.qcow2 over 4 backing files (chain-0 is the base); each layer writes its own 8 MiB. */
  async chain(): Promise<string[]> {
    const size = this.sizes.main;
    const files: string[] = [];
    for (let i = 0; i <= 4; i++) {
      const name = i === 4 ? 'chain-top.qcow2' : `chain-${i}.qcow2`;
      const below = files[files.length - 1];
      const f = await this.once(name, `chain v1 ${i} ${size}`, async (file) => {
        const args = ['create', '-q', '-f', 'qcow2'];
        if (below) args.push('-b', path.basename(below), '-F', 'qcow2');
        await runOk('qemu-img', [...args, file, String(size)], { cwd: this.dir });
        const at = Math.floor((size / 5) * i / MiB) * MiB;
        await runOk('qemu-io', ['-f', 'qcow2', '-c', `write -P 0x${(0x11 * (i + 1)).toString(16)} ${at} 8M`, file], { cwd: this.dir });
      });
      files.push(f);
    }
    return files;
  }

  /** A fully allocated qcow2 of `size` bytes, written with qemu-io in 256 MiB patterns. */
  allocated(name: string, size: number): Promise<string> {
    return this.once(name, `allocated v1 ${size}`, async (file) => {
      await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=65536', file, String(size)]);
      const chunk = Math.min(size, 256 * MiB);
      const cmds: string[] = [];
      for (let pos = 0, i = 0; pos < size; pos += chunk, i++) cmds.push('-c', `write -P 0x${(0x21 + i).toString(16)} ${pos} ${Math.min(chunk, size - pos)}`);
      await runOk('qemu-io', ['-f', 'qcow2', ...cmds, file], { timeoutMs: 900_000 });
    });
  }
}
