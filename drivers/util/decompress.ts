// Decompression for every format that stores compressed data (qcow2 and qcow v1
// clusters, streamOptimized VMDK grains, and the read-only compressed formats: dmg's
// zlib, bzip2, ADC and LZFSE chunks):
// one place that runs the decoder off the event loop, bounds its output, and turns
// every decoder failure into a CorruptImageError naming what was being read.
// qcow2's worker pool (drivers/format/qcow2/inflate-pool.ts) batches clusters for
// speed and falls back to this for any cluster it cannot do.
import zlib from 'node:zlib';
import { CorruptImageError, TsmountError } from '../errors.js';
import { isJsCodec } from './js-codecs.js';
import { decodeOffThread } from './decode-pool.js';
import { lz4BlockDecode } from './lz4.js';
import { decodeNative, isNativeCodec, zstdNative } from './native-codecs.js';
import { INFLATE_SLACK } from './raw-inflater.js';

/**
 * raw deflate (qcow, qcow2), zlib-wrapped deflate (VMDK, cloop, dmg UDZO), one zstd
 * frame (qcow2), an LZ4 block, an xz stream and an LZO1X block (cloop V4), one bzip2
 * stream (dmg UDBZ), Apple's ADC (dmg UDCO) and LZFSE (dmg ULFO).
 */
export type Codec = 'deflate-raw' | 'zlib' | 'zstd' | 'lz4-block' | 'xz' | 'lzo1x' | 'bzip2' | 'adc' | 'lzfse';

/** Output chunk room past the expected size, so that zlib ends the stream inside the first chunk (raw-inflater.ts). */
export { INFLATE_SLACK };

export interface DecompressOptions {
  /** The most bytes that may come out (a cluster, a grain). */
  size: number;
  /** Fewer than `size` bytes is corruption (a cluster); otherwise a short result is returned as it is. */
  exact: boolean;
  /** What is being read, for messages: "disk.qcow2: compressed cluster at 0x1000". */
  what: string;
}

/**
 * Decompress `input`, which may carry trailing bytes after its stream (formats pad to
 * sectors): the decoders stop at the end of their stream.
 */
export async function decompress(codec: Codec, input: Uint8Array, o: DecompressOptions): Promise<Buffer> {
  let out: Buffer;
  try {
    if (isJsCodec(codec)) {
      // Decoders written in JavaScript (bzip2, ADC, LZFSE) run in a worker thread.
      out = await decodeOffThread(codec, input, o.size);
    } else if (isNativeCodec(codec)) {
      // The system's liblzma and liblzo2, on libuv's thread pool.
      out = await decodeNative(codec, input, o.size);
    } else if (codec === 'lz4-block') {
      // Blocks are small and the decoder is a tight loop: no thread-pool round trip.
      const dst = Buffer.alloc(o.size);
      out = dst.subarray(0, lz4BlockDecode(input, dst));
    } else if (codec === 'zstd') {
      const frame = input.subarray(0, zstdFrameLength(input, o.what));
      const dst = Buffer.alloc(o.size);
      // libzstd when it is there (native-codecs.ts); a frame it does not decode to
      // exactly `size` bytes goes to fzstd, whose answer is the reference.
      const native = await zstdNative();
      if (native && (await native(frame, dst)) === o.size) out = dst;
      else {
        dst.fill(0);
        // fzstd is imported only here, when libzstd did not decode the frame.
        const res = (await import('fzstd')).decompress(frame, dst);
        out = res === dst ? dst : Buffer.from(res.buffer, res.byteOffset, res.byteLength);
      }
    } else {
      // One output chunk larger than the result: the stream inflates in a single
      // thread-pool pass (the default 16 KiB chunks cost a round trip and a copy
      // each). maxOutputLength still rejects a stream that inflates to more.
      // Raw deflate clusters (qcow, qcow2) may end without a final block, as QEMU
      // reads them; a zlib stream (VMDK) must end properly.
      const finishFlush = codec === 'deflate-raw' ? zlib.constants.Z_SYNC_FLUSH : zlib.constants.Z_FINISH;
      const opts = { finishFlush, maxOutputLength: o.size, chunkSize: o.size + INFLATE_SLACK };
      out = await new Promise<Buffer>((resolve, reject) => {
        const done = (err: Error | null, res: Buffer): void => (err ? reject(err) : resolve(res));
        if (codec === 'deflate-raw') zlib.inflateRaw(input, opts, done);
        else zlib.inflate(input, opts, done);
      });
    }
  } catch (err) {
    if (err instanceof CorruptImageError) throw err;
    // A decoder that is not there (a system library that cannot load): this read's EIO, named.
    if (err instanceof TsmountError) throw err.withMessage(`${o.what}: ${err.message}`);
    throw new CorruptImageError(`${o.what} does not decompress (${(err as Error).message})`);
  }
  if (o.exact && out.length < o.size) throw new CorruptImageError(`${o.what} decompresses to ${out.length} bytes, not ${o.size}`);
  return out.length > o.size ? out.subarray(0, o.size) : out;
}

/**
 * Length of the zstd frame at the start of `buf` (RFC 8878, "Frame Format"): frame
 * header, blocks up to the one marked last, optional checksum.
 */
export function zstdFrameLength(buf: Uint8Array, what: string): number {
  const bad = (): never => {
    throw new CorruptImageError(`${what} is not a zstd frame`);
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
