// libzstd (Debian's libzstd1) through koffi, synchronously, for the threads that answer
// READs from a read map (fs/read-map-runs.ts: the FUSE workers and the io_uring queues,
// which hold koffi already): a qcow2 zstd cluster's first frame decoded whole into the
// reply. A fast path only, as libdeflate.ts is for deflate: what it does not decode to
// exactly the cluster goes to the main thread, whose decoder (drivers/util/decompress.ts:
// libzstd on libuv's pool, fzstd for what that refuses) decides and gives the error.
import type { WholeInflater } from './libdeflate.js';
import { loadKoffi } from './koffi-load.js';

/**
 * A decoder of the zstd frame at the start of its input (what follows the frame, the
 * rest of a qcow2 cluster's last sector, is left) on this thread's own decompression
 * context, kept for the thread's life; or undefined: no libzstd here,
 * TSMOUNT_LIBZSTD=0, or it failed its self-test. -1: libzstd refused the frame or it
 * does not fit the destination.
 */
export function libzstd(): WholeInflater | undefined {
  if (process.env.TSMOUNT_LIBZSTD === '0') return undefined;
  try {
    const koffi = loadKoffi();
    const lib = koffi.load('libzstd.so.1');
    const createDCtx = lib.func('void *ZSTD_createDCtx()');
    const frameSize = lib.func('size_t ZSTD_findFrameCompressedSize(const void *src, size_t srcSize)');
    const decode = lib.func('size_t ZSTD_decompressDCtx(void *dctx, void *dst, size_t dstCapacity, const void *src, size_t srcSize)');
    const isError = lib.func('unsigned int ZSTD_isError(size_t code)');
    const compress = lib.func('size_t ZSTD_compress(void *dst, size_t dstCapacity, const void *src, size_t srcSize, int level)');
    const dctx: unknown = createDCtx();
    if (!dctx) return undefined;
    const run: WholeInflater = (input, dst) => {
      const n: number | bigint = frameSize(input, input.length);
      if (isError(n) || Number(n) > input.length) return -1;
      const got: number | bigint = decode(dctx, dst, dst.length, input, Number(n));
      return isError(got) ? -1 : Number(got);
    };
    // Self-test: a frame libzstd makes comes back whole, also with bytes after it; a
    // damaged frame and one with no room are refused.
    const plain = Buffer.from(Array.from({ length: 65536 }, (_, i) => ((i * 2654435761) >>> 24) & (i & 0x100 ? 0x0f : 0xff)));
    const packed = Buffer.alloc(plain.length + 1024);
    const n = Number(compress(packed, packed.length, plain, plain.length, 3));
    if (isError(n) || n <= 0 || n > packed.length - 64) return undefined;
    packed.fill(0xa5, n, n + 64);
    const out = Buffer.alloc(plain.length);
    if (run(packed.subarray(0, n + 64), out) !== plain.length || !out.equals(plain)) return undefined;
    if (run(new Uint8Array(64).fill(0xff), out) !== -1) return undefined;
    if (run(packed.subarray(0, n), out.subarray(0, plain.length - 1)) !== -1) return undefined;
    return run;
  } catch {
    return undefined;
  }
}
