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

/** How a cloop V4 block is stored: the compressor numbers of cloop.h. */
export type CloopV4Compressor = 'zlib' | 'none' | 'xz' | 'lz4' | 'lzo' | 'unknown';
const COMPRESSOR_FLAG: Record<CloopV4Compressor, bigint> = { zlib: 0n, none: 1n, xz: 2n, lz4: 3n, lzo: 4n, unknown: 9n };

/** One xz stream of `data`, as the xz tool writes it (CRC32 check, as the kernel's xz decoder reads). */
async function xzStream(data: Buffer, tmp: string): Promise<Buffer> {
  fs.writeFileSync(tmp, data);
  await runOk('xz', ['-q', '-f', '-k', '--format=xz', '--check=crc32', tmp]);
  return fs.readFileSync(`${tmp}.xz`);
}

/**
 * One LZO1X block of `data`, taken out of the file lzop writes (its header, then per
 * block: uncompressed and compressed length, checksums as its flags say, the bytes).
 * lzop's default blocks are 256 KiB, so a cloop block is one lzop block.
 */
async function lzoBlock(data: Buffer, tmp: string): Promise<{ bytes: Buffer; stored: boolean }> {
  fs.writeFileSync(tmp, data);
  await runOk('lzop', ['-q', '-f', '-o', `${tmp}.lzo`, tmp]);
  const f = fs.readFileSync(`${tmp}.lzo`);
  let at = 9 + 2 + 2 + 2 + 1 + 1; // magic, version, library version, version needed, method, level
  const flags = f.readUInt32BE(at);
  at += 4 + (flags & 0x800 ? 4 : 0) + 4 + 4 + 4; // flags, filter, mode, mtime low and high
  at += 1 + f[at]! + 4; // name, header checksum
  if (flags & 0x40) at += 4 + f.readUInt32BE(at) + 4; // extra field
  const dstLen = f.readUInt32BE(at);
  const srcLen = f.readUInt32BE(at + 4);
  at += 8 + (flags & 0x101 ? 4 : 0); // lengths, checksum of the uncompressed bytes
  if (srcLen < dstLen && flags & 0x202) at += 4; // checksum of the compressed bytes
  return { bytes: f.subarray(at, at + srcLen), stored: srcLen === dstLen };
}

/** One LZ4 block of `data`, taken out of the frame the lz4 tool writes (lz4_Frame_format.md). */
async function lz4Block(data: Buffer, tmp: string): Promise<{ bytes: Buffer; stored: boolean }> {
  fs.writeFileSync(tmp, data);
  // -B7: 4 MiB frame blocks, so one cloop block is one frame block.
  await runOk('lz4', ['-q', '-f', '-B7', '--no-frame-crc', tmp, `${tmp}.lz4`]);
  const frame = fs.readFileSync(`${tmp}.lz4`);
  const flg = frame[4]!;
  const at = 4 + 2 + (flg & 0x08 ? 8 : 0) + (flg & 0x01 ? 4 : 0) + 1;
  const word = frame.readUInt32LE(at);
  const size = word & 0x7fffffff;
  return { bytes: frame.subarray(at + 4, at + 4 + size), stored: (word & 0x80000000) !== 0 };
}

/**
 * A cloop V4.0 image, built from cloop.h's layout (no tool here makes one): the
 * header and index first, or the data first and the index and header last; block i
 * stored as `how(i)` says (an LZ4 or LZO block the tool stores uncompressed becomes
 * 'none'; 'unknown' is a compressor number cloop.h does not define).
 * The last block holds only the bytes the source has (V4 allows a short last block).
 */
export async function cloopV4(file: string, data: Buffer, blockSize: number, how: (block: number) => CloopV4Compressor, headerLast: boolean): Promise<void> {
  const zlib = await import('node:zlib');
  const blocks = Math.ceil(data.length / blockSize);
  const header = Buffer.alloc(136);
  header.write('#!/bin/sh\n#V4.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\nexit $?\n', 'latin1');
  header.writeUInt32BE(blockSize, 128);
  header.writeUInt32BE(blocks, 132);
  const stored: { bytes: Buffer; flag: bigint }[] = [];
  for (let i = 0; i < blocks; i++) {
    const block = data.subarray(i * blockSize, Math.min(data.length, (i + 1) * blockSize));
    const kind = how(i);
    if (kind === 'zlib') stored.push({ bytes: zlib.deflateSync(block), flag: 0n });
    else if (kind === 'xz') stored.push({ bytes: await xzStream(block, `${file}.blk`), flag: COMPRESSOR_FLAG.xz });
    else if (kind === 'unknown') stored.push({ bytes: zlib.deflateSync(block), flag: COMPRESSOR_FLAG.unknown });
    else if (kind === 'lz4' || kind === 'lzo') {
      const b = kind === 'lz4' ? await lz4Block(block, `${file}.blk`) : await lzoBlock(block, `${file}.blk`);
      stored.push({ bytes: b.bytes, flag: b.stored ? COMPRESSOR_FLAG.none : COMPRESSOR_FLAG[kind] });
    } else stored.push({ bytes: Buffer.from(block), flag: COMPRESSOR_FLAG.none });
  }
  const indexBytes = (blocks + 1) * 8;
  let at = headerLast ? 0 : 136 + indexBytes;
  const index = Buffer.alloc(indexBytes);
  for (let i = 0; i <= blocks; i++) {
    index.writeBigUInt64BE((stored[i]?.flag ?? 0n) << 60n | BigInt(at), i * 8);
    at += stored[i]?.bytes.length ?? 0;
  }
  const body = Buffer.concat(stored.map((s) => s.bytes));
  fs.writeFileSync(file, headerLast ? Buffer.concat([body, index, header]) : Buffer.concat([header, index, body]));
}
