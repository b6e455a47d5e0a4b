// Compression for compressed cluster writes (tsimg convert -c into qcow2 and qcow),
// always off the event loop: deflate in decode-pool.ts's worker threads, zstd in the
// system's libzstd on libuv's thread pool.
import { encodeOffThread } from './decode-pool.js';
import { encodeZstd } from './native-codecs.js';

export type CompressCodec = 'deflate-raw' | 'zstd';

/** `input` compressed, or undefined when the result would be longer than `limit` bytes. */
export function compressBlock(codec: CompressCodec, input: Uint8Array, limit: number): Promise<Buffer | undefined> {
  return codec === 'zstd' ? encodeZstd(input, limit) : encodeOffThread('deflate-raw', input, limit);
}
