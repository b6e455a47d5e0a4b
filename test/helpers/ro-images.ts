// Images of the formats QEMU only reads, made by their own tools as users make them:
// bochs "growing" images by bximage, cloop images by create_compressed_fs; and the
// raw sources they are made from, so a test can compare with the original data.
import fs from 'node:fs';
import { runOk } from './qemu.js';
import { patch, pattern, readBytes, u32le, u64le } from './images.js';

const KiB = 1024;
const MiB = 1024 * KiB;

/** Bytes at `offset`: a xorshift pattern (incompressible), or text (compressible) when `text`. */
export interface Piece {
  offset: number;
  length: number;
  seed: number;
  text?: boolean;
}

function pieceBytes(p: Piece): Buffer {
  if (!p.text) return pattern(p.length, p.seed);
  const line = Buffer.from(`line ${p.seed} of a compressible piece of text, the same words again and again\n`);
  const b = Buffer.alloc(p.length);
  for (let at = 0; at < p.length; at += line.length) line.copy(b, at, 0, Math.min(line.length, p.length - at));
  return b;
}

/** A sparse raw file of `size` bytes holding the pieces, zeros elsewhere. */
export function writeSource(file: string, size: number, pieces: Piece[]): void {
  fs.writeFileSync(file, '');
  fs.truncateSync(file, size);
  for (const p of pieces) patch(file, p.offset, pieceBytes(p));
}

/** Data everywhere a driver can get it wrong: sector and block edges, partial sectors, holes, the last bytes. */
export function sourcePieces(size: number): Piece[] {
  return [
    { offset: 0, length: 3 * KiB, seed: 1 },
    { offset: 64 * KiB - 700, length: 5 * KiB, seed: 2, text: true },
    { offset: 100 * KiB + 77, length: 3000, seed: 3 },
    { offset: MiB, length: MiB + 4 * KiB, seed: 4, text: true },
    { offset: 3 * MiB + 12345, length: 200 * KiB, seed: 5 },
    { offset: size - 8 * KiB, length: 8 * KiB, seed: 6 },
  ].filter((p) => p.offset + p.length <= size);
}

/** bximage's progress meter fills megabytes of output; only the result matters. */
async function bximage(args: string[]): Promise<void> {
  await runOk('bximage', args, { timeoutMs: 300_000 });
}

/** An empty growing image of `mib` MiB (bximage rounds to a CHS geometry). */
export async function bochsCreate(file: string, mib: number): Promise<void> {
  // bximage 2.7 takes -imgmode only after -hd.
  await bximage(['-func=create', `-hd=${mib}M`, '-imgmode=growing', '-q', file]);
}

/** A growing image converted from a raw source of `size` bytes with the given data (a multiple of 512). */
export async function bochsConvert(file: string, size: number, pieces = sourcePieces(size)): Promise<string> {
  const src = `${file}.src`;
  writeSource(src, size, pieces);
  await bximage(['-func=convert', '-imgmode=growing', '-q', src, file]);
  return src;
}

/** Rewrite a version 2 header as version 1 (QEMU reads both): no timestamp, the disk size 4 bytes earlier. */
export function bochsToV1(file: string): void {
  const disk = readBytes(file, 88, 8).readBigUInt64LE(0);
  patch(file, 64, u32le(0x00010000));
  patch(file, 84, u64le(disk));
  patch(file, 92, Buffer.alloc(4));
}

/** Set the header's subtype field ("Undoable", "Volatile", or one tsmount refuses). */
export function bochsSubtype(file: string, subtype: string): void {
  const f = Buffer.alloc(16);
  f.write(subtype, 'latin1');
  patch(file, 48, f);
}

/** A cloop V2.0 image of a raw source of `size` bytes with the given data, in blocks of `blockSize`. */
export async function cloopCreate(file: string, size: number, blockSize: number, pieces = sourcePieces(size)): Promise<string> {
  const src = `${file}.src`;
  writeSource(src, size, pieces);
  await runOk('create_compressed_fs', ['-q', '-B', String(blockSize), src, file], { timeoutMs: 300_000 });
  return src;
}
