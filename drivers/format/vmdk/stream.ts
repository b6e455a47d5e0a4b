// streamOptimized grains: deflate (zlib) data behind a grain marker (lba u64, size
// u32), as QEMU 7.2's vmdk_read_extent / vmdk_write_extent read and write them.
import zlib from 'node:zlib';
import type { BlockNode } from '../../types.js';
import { CorruptImageError } from '../../errors.js';
import { decompress } from '../../util/decompress.js';

export const MARKER_HEADER = 12;

/**
 * The uncompressed bytes of the grain whose marker (or, without markers, whose
 * compressed data) starts at `host`. At most `grainBytes` come out.
 */
export async function readCompressedGrain(file: BlockNode, host: number, grainBytes: number, hasMarker: boolean, name: string): Promise<Buffer> {
  const where = `compressed grain at 0x${host.toString(16)}`;
  let data: Buffer;
  if (hasMarker) {
    if (host + MARKER_HEADER > file.size) throw new CorruptImageError(`${name}: ${where} points outside the file`);
    const hdr = Buffer.alloc(MARKER_HEADER);
    await file.read(host, hdr);
    const size = hdr.readUInt32LE(8);
    if (size === 0 || size > grainBytes * 2) throw new CorruptImageError(`${name}: ${where} has an invalid size ${size}`);
    if (host + MARKER_HEADER + size > file.size) throw new CorruptImageError(`${name}: ${where} runs past the end of the file`);
    data = Buffer.alloc(size);
    await file.read(host + MARKER_HEADER, data);
  } else {
    const n = Math.min(grainBytes, file.size - host);
    if (n <= 0) throw new CorruptImageError(`${name}: ${where} points outside the file`);
    data = Buffer.alloc(n);
    await file.read(host, data);
  }
  return decompress('zlib', data, { size: grainBytes, exact: false, what: `${name}: ${where}` });
}

/** Marker + deflated grain, padded to whole sectors so the file stays sector-aligned. */
export function encodeCompressedGrain(guestOffset: number, grain: Uint8Array): Buffer {
  const z = zlib.deflateSync(grain);
  const total = Math.ceil((MARKER_HEADER + z.length) / 512) * 512;
  const out = Buffer.alloc(total);
  out.writeBigUInt64LE(BigInt(Math.floor(guestOffset / 512)), 0);
  out.writeUInt32LE(z.length, 8);
  z.copy(out, MARKER_HEADER);
  return out;
}
