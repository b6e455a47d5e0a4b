// Compressed clusters (qcow2.txt, "Compressed Clusters Descriptor" and header byte
// 104, compression_type; QEMU's qcow2-threads.c). zlib clusters are raw deflate
// streams; zstd clusters are one zstd frame. Both are followed by whatever lies up
// to the end of the last 512-byte sector the descriptor counts; the shared decoder
// (drivers/util/decompress.ts) stops at the end of the stream.
import { UnsupportedError } from '../../errors.js';
import { decompress, type Codec } from '../../util/decompress.js';

export { INFLATE_SLACK, zstdFrameLength } from '../../util/decompress.js';

export const COMPRESSION = { zlib: 0, zstd: 1 } as const;

const CODECS: Record<number, Codec> = { [COMPRESSION.zlib]: 'deflate-raw', [COMPRESSION.zstd]: 'zstd' };

/** Decompress one cluster; the result is exactly clusterSize bytes. */
export async function decompressCluster(type: number, input: Uint8Array, clusterSize: number, what: string): Promise<Buffer> {
  const codec = CODECS[type];
  if (!codec) throw new UnsupportedError(`${what}: qcow2 compression type ${type} is not supported`);
  return decompress(codec, input, { size: clusterSize, exact: true, what: `${what}: compressed cluster` });
}
