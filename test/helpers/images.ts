// Opening images in-process the way the driver tests do, and the small byte tools
// they share: deterministic data, md5 of what a node reads, in-place file patches.
import { expect } from 'chai';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { openImage, type ImageOptions } from '../../drivers/open.js';
import type { BlockNode } from '../../drivers/types.js';
import { TsmountError } from '../../drivers/errors.js';
import { checkImage, imageInfo, md5File, run, type ImageInfo, type RunResult } from './qemu.js';

const KiB = 1024;

export const TSIMG = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../mount-helpers/tsimg.js');

/** The options a test opens images with: read-only, no locking, a 1 MiB metadata cache. */
export function testOptions(o: Partial<ImageOptions> = {}): ImageOptions {
  return { readOnly: true, cache: 'writeback', metadataCacheBytes: 1 << 20, locking: 'off', forceShare: false, shareRw: false, ...o };
}

/** Open an image through drivers/open.ts with the test options (probing the format unless given). */
export function openTestImage(file: string, opts: { rw?: boolean; format?: string; secret?: string } = {}): Promise<BlockNode> {
  return openImage(file, testOptions({ readOnly: !opts.rw, format: opts.format, secret: opts.secret }));
}

/** md5 of the whole disk as the node reads it, in requests of `chunk` bytes. */
export async function nodeMd5(node: BlockNode, chunk = 256 * KiB): Promise<string> {
  const h = crypto.createHash('md5');
  const buf = Buffer.alloc(chunk);
  for (let off = 0; off < node.size; off += chunk) {
    const n = Math.min(chunk, node.size - off);
    await node.read(off, buf.subarray(0, n));
    h.update(buf.subarray(0, n));
  }
  return h.digest('hex');
}

/** The whole disk as the node reads it, in 1 MiB requests. */
export async function nodeBytes(node: BlockNode): Promise<Buffer> {
  const b = Buffer.alloc(node.size);
  for (let off = 0; off < node.size; off += 1 << 20) await node.read(off, b.subarray(off, Math.min(node.size, off + (1 << 20))));
  return b;
}

/** Deterministic bytes that differ per offset (xorshift32), so a misplaced write shows. */
export function pattern(length: number, seed: number): Buffer {
  const b = Buffer.alloc(length);
  let x = (seed * 2654435761) >>> 0 || 1;
  for (let i = 0; i < length; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    b[i] = x & 0xff;
  }
  return b;
}

/** Writes at odd offsets and lengths: inside clusters and sectors, across them, and at the end of the disk. */
export function unalignedWrites(size: number): { offset: number; data: Buffer }[] {
  const MiB = 1 << 20;
  const spots: [number, number][] = [
    [1, 100],
    [4095, 2],
    [65536 - 7, 70000],
    [MiB - 300, 600],
    [3 * MiB + 12345, 200 * 1024 + 3],
    [size / 2 + 511, 513],
    [size - 1000, 1000],
  ];
  return spots.filter(([o, l]) => o >= 0 && o + l <= size).map(([offset, length], i) => ({ offset, data: pattern(length, i + 1) }));
}

/** Overwrite bytes of a file in place (to corrupt an image, or to write through a mount). */
export function patch(file: string, offset: number, data: Uint8Array): void {
  const fd = fs.openSync(file, 'r+');
  try {
    fs.writeSync(fd, data, 0, data.length, offset);
  } finally {
    fs.closeSync(fd);
  }
}

/** Write `data` at `offset` of `file` and fsync it (a flat file through a mount, say). */
export function writeSynced(file: string, offset: number, data: Uint8Array): void {
  const fd = fs.openSync(file, 'r+');
  try {
    fs.writeSync(fd, data, 0, data.length, offset);
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

export function readBytes(file: string, offset: number, length: number): Buffer {
  const b = Buffer.alloc(length);
  const fd = fs.openSync(file, 'r');
  try {
    fs.readSync(fd, b, 0, length, offset);
  } finally {
    fs.closeSync(fd);
  }
  return b;
}

export function u32be(v: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(v);
  return b;
}

export function u64be(v: bigint): Buffer {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(v);
  return b;
}

export function u32le(v: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32LE(v);
  return b;
}

export function u64le(v: number | bigint): Buffer {
  const b = Buffer.alloc(8);
  b.writeBigUInt64LE(BigInt(v));
  return b;
}

/** Host offset of the first L2 table of a qcow2 image (from L1 entry 0), read straight from the file. */
export function firstL2Offset(file: string): number {
  const l1 = Number(readBytes(file, 40, 8).readBigUInt64BE(0));
  return Number(readBytes(file, l1, 8).readBigUInt64BE(0) & 0x00fffffffffffe00n);
}

/** qemu-img check finds neither corruptions nor leaks. */
export async function expectClean(file: string, format = 'qcow2'): Promise<void> {
  const c = await checkImage(file, format);
  expect(c.code, c.output).to.equal(0);
  expect(c.corruptions, c.output).to.equal(0);
  expect(c.leaks, c.output).to.equal(0);
}

/**
 * A broken image is refused, read-only and read-write, with a one-line TsmountError
 * (at open or while reading it all, in 1 MiB requests), and the file is left unchanged.
 */
export async function expectRefusedUnchanged(file: string, what: string, format?: string): Promise<void> {
  const before = await md5File(file);
  for (const rw of [false, true]) {
    let err: unknown;
    try {
      const node = await openTestImage(file, { rw, format });
      await nodeMd5(node, 1 << 20);
      await node.close();
    } catch (e) {
      err = e;
    }
    expect(err, `${what} (rw=${rw})`).to.be.instanceOf(TsmountError);
    expect((err as Error).message.split('\n')).to.have.length(1);
  }
  expect(await md5File(file)).to.equal(before);
}

export function tsimg(args: string[], cwd?: string): Promise<RunResult> {
  return run(process.execPath, [TSIMG, ...args], { cwd });
}

/** An image tsimg made and one qemu-img made agree on virtual size, cluster size and file size; returns ours's info. */
export async function expectSameShape(ours: string, theirs: string, format: string): Promise<ImageInfo> {
  const a = await imageInfo(ours, format);
  const b = await imageInfo(theirs, format);
  expect(a['virtual-size']).to.equal(b['virtual-size']);
  expect(a['cluster-size']).to.equal(b['cluster-size']);
  expect(fs.statSync(ours).size).to.equal(fs.statSync(theirs).size);
  return a;
}

/** `tsimg create -f format` with each argument list fails with one line on stderr and leaves no `made` in dir. */
export async function expectCreateRefused(format: string, argLists: string[][], dir: string, made: string): Promise<void> {
  for (const args of argLists) {
    const r = await tsimg(['create', '-q', '-f', format, ...args], dir);
    expect(r.code).to.not.equal(0);
    expect(r.stderr.trim().split('\n')).to.have.length(1);
    expect(fs.existsSync(path.join(dir, made))).to.equal(false);
  }
}
