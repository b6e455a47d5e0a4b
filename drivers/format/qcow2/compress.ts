// Compressed clusters (qcow2.txt, "Compressed Clusters Descriptor" and header byte
// 104, compression_type; QEMU's qcow2-threads.c). zlib clusters are raw deflate
// streams; zstd clusters are one zstd frame. Both are followed by whatever lies up
// to the end of the last 512-byte sector the descriptor counts, so the decoders must
// stop at the end of their stream.
import zlib from 'node:zlib';
import { decompress as zstdDecompress } from 'fzstd';
import { CorruptImageError, UnsupportedError } from '../../errors.js';

export const COMPRESSION = { zlib: 0, zstd: 1 } as const;

/** Output chunk room past the cluster size, so that zlib ends the stream inside the first chunk. */
export const INFLATE_SLACK = 1024;

/** Decompress one cluster; the result must be exactly clusterSize bytes. */
export async function decompressCluster(type: number, input: Uint8Array, clusterSize: number, what: string): Promise<Buffer> {
  let out: Buffer;
  try {
    if (type === COMPRESSION.zlib) {
      out = await new Promise<Buffer>((resolve, reject) =>
        // One output chunk larger than the cluster: the stream inflates in a single
        // thread-pool pass (the default 16 KiB chunks cost a round trip and a copy
        // each, and the zlib stream's bookkeeping per chunk). maxOutputLength still
        // rejects a stream that inflates to more than a cluster.
        zlib.inflateRaw(input, { finishFlush: zlib.constants.Z_SYNC_FLUSH, maxOutputLength: clusterSize, chunkSize: clusterSize + INFLATE_SLACK }, (err, res) => (err ? reject(err) : resolve(res))),
      );
    } else if (type === COMPRESSION.zstd) {
      const frame = input.subarray(0, zstdFrameLength(input, what));
      const dst = Buffer.alloc(clusterSize);
      const res = zstdDecompress(frame, dst);
      out = res === dst ? dst : Buffer.from(res.buffer, res.byteOffset, res.byteLength);
    } else {
      throw new UnsupportedError(`${what}: qcow2 compression type ${type} is not supported`);
    }
  } catch (err) {
    if (err instanceof UnsupportedError || err instanceof CorruptImageError) throw err;
    throw new CorruptImageError(`${what}: compressed cluster does not decompress (${(err as Error).message})`);
  }
  if (out.length < clusterSize) throw new CorruptImageError(`${what}: compressed cluster decompresses to ${out.length} bytes, not ${clusterSize}`);
  return out.length === clusterSize ? out : out.subarray(0, clusterSize);
}

/**
 * Length of the zstd frame at the start of `buf` (RFC 8878, "Frame Format"): frame
 * header, blocks up to the one marked last, optional checksum.
 */
export function zstdFrameLength(buf: Uint8Array, what: string): number {
  const bad = (): never => {
    throw new CorruptImageError(`${what}: compressed cluster is not a zstd frame`);
  };
  if (buf.length < 6) bad();
  const dv = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  if (dv.getUint32(0, true) !== 0xfd2fb528) bad();
  const fhd = buf[4]!;
  const fcsFlag = fhd >> 6;
  const single = (fhd >> 5) & 1;
  const checksum = (fhd >> 2) & 1;
  const dictFlag = fhd & 3;
  let pos = 5 + (single ? 0 : 1) + [0, 1, 2, 4][dictFlag]! + [single ? 1 : 0, 2, 4, 8][fcsFlag]!;
  for (;;) {
    if (pos + 3 > buf.length) bad();
    const h = buf[pos]! | (buf[pos + 1]! << 8) | (buf[pos + 2]! << 16);
    const last = h & 1;
    const type = (h >> 1) & 3;
    const size = h >>> 3;
    if (type === 3) bad();
    pos += 3 + (type === 1 ? 1 : size);
    if (last) break;
  }
  pos += checksum ? 4 : 0;
  if (pos > buf.length) bad();
  return pos;
}
