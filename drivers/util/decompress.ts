// Decompression for every format that stores compressed data (qcow2 and qcow v1
// clusters, streamOptimized VMDK grains, and the read-only compressed formats: dmg's
// zlib, bzip2, ADC and LZFSE chunks):
// one place that runs the decoder off the event loop, bounds its output, and turns
// every decoder failure into a CorruptImageError naming what was being read.
// qcow2's worker pool (drivers/format/qcow2/inflate-pool.ts) batches clusters for
// speed and falls back to this for any cluster it cannot do.
import zlib from 'node:zlib';
import { decompress as zstdDecompress } from 'fzstd';
import Bunzip from 'seek-bzip';
import { CorruptImageError } from '../errors.js';
import { adcDecode } from './adc.js';
import { lzfseDecode } from './lzfse.js';

/**
 * raw deflate (qcow, qcow2), zlib-wrapped deflate (VMDK, dmg UDZO), one zstd frame
 * (qcow2), one bzip2 stream (dmg UDBZ), Apple's ADC (dmg UDCO) and LZFSE (dmg ULFO).
 */
export type Codec = 'deflate-raw' | 'zlib' | 'zstd' | 'bzip2' | 'adc' | 'lzfse';

/** Output chunk room past the expected size, so that zlib ends the stream inside the first chunk. */
export const INFLATE_SLACK = 1024;

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
    if (codec === 'bzip2') {
      out = bunzip(input, o.size);
    } else if (codec === 'adc') {
      const dst = Buffer.alloc(o.size);
      out = dst.subarray(0, adcDecode(input, dst));
    } else if (codec === 'lzfse') {
      // An LZFSE stream carries no total size: it must fill the room given exactly.
      out = Buffer.alloc(o.size);
      lzfseDecode(input, out);
    } else if (codec === 'zstd') {
      const frame = input.subarray(0, zstdFrameLength(input, o.what));
      const dst = Buffer.alloc(o.size);
      const res = zstdDecompress(frame, dst);
      out = res === dst ? dst : Buffer.from(res.buffer, res.byteOffset, res.byteLength);
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
    throw new CorruptImageError(`${o.what} does not decompress (${(err as Error).message})`);
  }
  if (o.exact && out.length < o.size) throw new CorruptImageError(`${o.what} decompresses to ${out.length} bytes, not ${o.size}`);
  return out.length > o.size ? out.subarray(0, o.size) : out;
}

/**
 * One bzip2 stream through seek-bzip, with byte streams of our own: reading past
 * the input or writing more than `size` bytes throws (the library's own buffers
 * would read undefined bytes or grow without bound).
 */
function bunzip(input: Uint8Array, size: number): Buffer {
  const out = Buffer.alloc(size);
  let written = 0;
  let pos = 0;
  const inStream = {
    readByte(): number {
      if (pos >= input.length) throw new Error('bzip2 stream cut off');
      return input[pos++]!;
    },
    read(buf: Uint8Array, at: number, length: number): number {
      let n = 0;
      while (n < length && pos < input.length) buf[at + n++] = input[pos++]!;
      return n === 0 ? -1 : n;
    },
    seek(p: number): void {
      pos = p;
    },
    eof(): boolean {
      return pos >= input.length;
    },
  };
  const outStream = {
    writeByte(b: number): void {
      if (written >= size) throw new Error(`bzip2 stream decodes to more than ${size} bytes`);
      out[written++] = b;
    },
  };
  Bunzip.decode(inStream, outStream, false);
  return out.subarray(0, written);
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
