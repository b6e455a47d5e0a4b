// The images and commands of the tsimg rows (issue 18): tsimg against qemu-img on the
// same image, in the same run. Nothing here mounts; each command is timed whole
// (process start included: that is what a user waits for).
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { runOk } from '../lib/qemu.js';
import { MiB, timed } from './tools.js';

/** dist/mount-helpers/tsimg.js, beside this file's dist/scripts/bench/. */
export const TSIMG = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../mount-helpers/tsimg.js');

/** Runs of this size alternate data and holes in the convert source. */
const RUN = 64 * MiB;

/**
 * A raw image of `size` bytes, half data and half holes: 64 MiB of random data, then a
 * 64 MiB hole, and so on (a sparse file, so both tools skip the holes by block status).
 */
export async function halfDataRaw(dir: string, size: number): Promise<string> {
  const file = path.join(dir, 'half-data.raw');
  const stamp = `${file}.done`;
  const recipe = `half-data v1 ${size}`;
  if (fs.existsSync(file) && fs.existsSync(stamp) && fs.readFileSync(stamp, 'utf8') === recipe) return file;
  fs.rmSync(stamp, { force: true });
  process.stderr.write('  making half-data.raw\n');
  const fd = fs.openSync(file, 'w');
  try {
    fs.ftruncateSync(fd, size);
    for (let run = 0; run < size; run += 2 * RUN) {
      for (let pos = run; pos < Math.min(run + RUN, size); pos += MiB) fs.writeSync(fd, crypto.randomBytes(MiB), 0, Math.min(MiB, size - pos), pos);
    }
  } finally {
    fs.closeSync(fd);
  }
  fs.writeFileSync(stamp, recipe);
  return file;
}

/**
 * A 1 TiB qcow2 with data scattered over it: 64 KiB written at 200 places spread
 * over the disk (so the map has some 400 runs, and most L2 tables are absent).
 */
export async function scattered1T(dir: string): Promise<string> {
  const file = path.join(dir, 'scattered-1t.qcow2');
  const stamp = `${file}.done`;
  const recipe = 'scattered 1T v1';
  if (fs.existsSync(file) && fs.existsSync(stamp) && fs.readFileSync(stamp, 'utf8') === recipe) return file;
  fs.rmSync(stamp, { force: true });
  fs.rmSync(file, { force: true });
  process.stderr.write('  making scattered-1t.qcow2\n');
  await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', file, '1T']);
  const cmds: string[] = [];
  const step = Math.floor(2 ** 40 / 200 / MiB) * MiB;
  for (let i = 0; i < 200; i++) cmds.push('-c', `write -P ${(i % 250) + 1} ${i * step + (i % 7) * MiB} 64k`);
  await runOk('qemu-io', ['-f', 'qcow2', ...cmds, file], { timeoutMs: 600_000 });
  fs.writeFileSync(stamp, recipe);
  return file;
}

/** Seconds one `tsimg ARGS` takes. */
export async function tsimgSeconds(args: string[]): Promise<number> {
  return (await timed(process.execPath, [TSIMG, ...args])).seconds;
}

/** Seconds one `qemu-img ARGS` takes. */
export async function qemuImgSeconds(args: string[]): Promise<number> {
  return (await timed('qemu-img', args)).seconds;
}

/** Convert `src` to a new qcow2 `dst` with either tool; the target is removed afterwards. */
export async function convertSeconds(tool: 'tsimg' | 'qemu-img', src: string, dst: string, extra: string[] = []): Promise<number> {
  fs.rmSync(dst, { force: true });
  try {
    const args = ['convert', '-f', 'raw', '-O', 'qcow2', ...extra, src, dst];
    return tool === 'tsimg' ? await tsimgSeconds(args) : await qemuImgSeconds(args);
  } finally {
    fs.rmSync(dst, { force: true });
  }
}
