// Decoders from the system's own C libraries, through koffi: xz streams (liblzma,
// which every Debian system has: dpkg depends on it), LZO1X blocks (liblzo2, the
// library the cloop tools compress with) and zstd frames (libzstd, see zstdNative). The calls run on libuv's thread pool
// (koffi's async calls), never on the event loop. A library that cannot be loaded
// makes its codec's reads fail with EIO naming the library; nothing else depends on it.
// koffi itself is loaded on first use only, under the process's lock (koffi-load.ts):
// decompress.ts is imported by qcow2's inflate worker threads too, and loading the
// addon in a worker while the main thread loads it crashed the process (seen in CI).
import { constants } from 'node:os';
import { UnsupportedError } from '../errors.js';
import { loadKoffi } from './koffi-load.js';

export type NativeCodec = 'xz' | 'lzo1x';

export function isNativeCodec(codec: string): codec is NativeCodec {
  return codec === 'xz' || codec === 'lzo1x';
}

type Callback = (err: unknown, res: number) => void;
interface AsyncFn {
  async: (...args: unknown[]) => void;
}

/** liblzma's return codes (lzma/base.h) worth naming. */
const LZMA_OK = 0;
const LZMA_MESSAGES: Record<number, string> = {
  5: 'runs out of memory',
  6: 'needs more memory than allowed',
  7: 'is not an xz stream',
  8: 'uses options liblzma does not support',
  9: 'is corrupt',
  10: 'is cut off or decodes to more bytes than a block',
};
/** LZO's (lzo/lzoconf.h): trailing bytes after the stream are padding, as the other decoders treat them. */
const LZO_E_OK = 0;
const LZO_E_INPUT_NOT_CONSUMED = -8;
const LZO_MESSAGES: Record<number, string> = {
  [-4]: 'is cut off',
  [-5]: 'decodes to more bytes than a block',
  [-6]: 'refers back before its start',
};

/** A whole xz stream decoded by one call needs at most a few dictionary sizes: 256 MiB covers `xz -9e`. */
const XZ_MEMLIMIT = 256 * 1024 * 1024;

const libs = new Map<NativeCodec, AsyncFn | Error>();

async function load(codec: NativeCodec): Promise<AsyncFn> {
  let fn = libs.get(codec);
  if (fn === undefined) {
    try {
      const koffi = loadKoffi();
      fn =
        codec === 'xz'
          ? koffi
              .load('liblzma.so.5')
              .func(
                'int lzma_stream_buffer_decode(_Inout_ uint64_t *memlimit, uint32_t flags, void *allocator, const void *in, _Inout_ size_t *in_pos, size_t in_size, void *out, _Inout_ size_t *out_pos, size_t out_size)',
              )
          : koffi.load('liblzo2.so.2').func('int lzo1x_decompress_safe(const void *src, size_t src_len, void *dst, _Inout_ size_t *dst_len, void *wrkmem)');
    } catch (err) {
      fn = new Error(`${codec === 'xz' ? 'liblzma' : 'liblzo2'} cannot be loaded (${(err as Error).message})`);
    }
    libs.set(codec, fn);
  }
  if (fn instanceof Error) throw new UnsupportedError(fn.message, constants.errno.EIO);
  return fn;
}

function call(fn: AsyncFn, args: unknown[]): Promise<number> {
  return new Promise((resolve, reject) => fn.async(...args, ((err, res) => (err ? reject(err as Error) : resolve(res))) as Callback));
}

/** Decode `input` into at most `size` bytes; throws (plain Error) on a damaged stream. */
export async function decodeNative(codec: NativeCodec, input: Uint8Array, size: number): Promise<Buffer> {
  const fn = await load(codec);
  const out = Buffer.alloc(size);
  if (codec === 'xz') {
    const outPos = [0];
    const rc = await call(fn, [[XZ_MEMLIMIT], 0, null, input, [0], input.length, out, outPos, size]);
    if (rc !== LZMA_OK) throw new Error(`the xz stream ${LZMA_MESSAGES[rc] ?? `fails (liblzma error ${rc})`}`);
    return out.subarray(0, outPos[0]);
  }
  const outLen = [size];
  const rc = await call(fn, [input, input.length, out, outLen, null]);
  if (rc !== LZO_E_OK && rc !== LZO_E_INPUT_NOT_CONSUMED) throw new Error(`the LZO1X block ${LZO_MESSAGES[rc] ?? `fails (liblzo2 error ${rc})`}`);
  return out.subarray(0, outLen[0]);
}

let zstdCompress: AsyncFn | Error | undefined;
let zstdLib: Promise<import('koffi').LibraryHandle> | undefined;

/** libzstd, loaded once for the encoder and the decoder alike (a rejection: it cannot be loaded). */
function libzstd(): Promise<import('koffi').LibraryHandle> {
  zstdLib ??= Promise.resolve().then(() => loadKoffi().load('libzstd.so.1'));
  return zstdLib;
}

/** ZSTD_CLEVEL_DEFAULT: what QEMU's qcow2_zstd_compress gets by setting no level. */
const ZSTD_LEVEL = 3;

/**
 * One zstd frame of `input` through the system's libzstd (qcow2 compression_type=zstd,
 * tsimg convert -c), on libuv's thread pool; undefined when it would be longer than
 * `limit` bytes. fzstd, the decoder, has no encoder.
 */
export async function encodeZstd(input: Uint8Array, limit: number): Promise<Buffer | undefined> {
  if (zstdCompress === undefined) {
    try {
      zstdCompress = (await libzstd()).func('size_t ZSTD_compress(void *dst, size_t dstCapacity, const void *src, size_t srcSize, int compressionLevel)');
    } catch (err) {
      zstdCompress = new Error(`libzstd cannot be loaded (${(err as Error).message})`);
    }
  }
  if (zstdCompress instanceof Error) throw new UnsupportedError(zstdCompress.message, constants.errno.EIO);
  const out = Buffer.alloc(limit);
  // An error (dstSize_tooSmall among them) is a size_t near 2^64: more than limit.
  const n: unknown = await call(zstdCompress, [out, limit, input, input.length, ZSTD_LEVEL]);
  return typeof n === 'number' && n > 0 && n <= limit ? out.subarray(0, n) : undefined;
}

/**
 * zstd frames through the system's libzstd (Debian's libzstd1, which apt and dpkg
 * depend on), on libuv's thread pool. fzstd, the pure JavaScript decoder, inflated
 * zstd-compressed qcow2 clusters at about 20 MB/s per core here, a tenth of zlib's
 * speed; libzstd is many times faster. Used only when the library loads and decodes a
 * frame it made itself as fzstd decodes it (the self-test); else undefined, and
 * callers keep fzstd. Resolves to the bytes written into `dst`, or -1 when libzstd
 * refuses the frame (the caller then asks fzstd, whose result or error is the reference).
 */
export type ZstdNative = (frame: Uint8Array, dst: Uint8Array) => Promise<number>;

let zstdState: Promise<ZstdNative | undefined> | undefined;
let zstdReady: ZstdNative | undefined;

/** libzstd's decoder once loaded and self-tested; starts loading on the first call. */
export function zstdNativeNow(): ZstdNative | undefined {
  void zstdNative();
  return zstdReady;
}

export function zstdNative(): Promise<ZstdNative | undefined> {
  zstdState ??= (async () => {
    if (process.env.TSMOUNT_NATIVE_ZSTD === '0') return undefined;
    try {
      const lib = await libzstd();
      const decompress = lib.func('size_t ZSTD_decompress(void *dst, size_t dstCapacity, const void *src, size_t srcSize)') as unknown as AsyncFn & ((...a: unknown[]) => number | bigint);
      const isError = lib.func('unsigned int ZSTD_isError(size_t code)') as unknown as (code: number | bigint) => number;
      const compressBound = lib.func('size_t ZSTD_compressBound(size_t srcSize)') as unknown as (n: number) => number | bigint;
      const compress = lib.func('size_t ZSTD_compress(void *dst, size_t dstCapacity, const void *src, size_t srcSize, int level)') as unknown as (...a: unknown[]) => number | bigint;
      // Any failure of the call itself is a refusal too: fzstd then decides.
      const fn: ZstdNative = (frame, dst) =>
        call(decompress, [dst, dst.length, frame, frame.length]).then(
          (rc) => (isError(rc) ? -1 : Number(rc)),
          () => -1,
        );
      // Self-test: a frame libzstd makes decodes the same through libzstd and fzstd,
      // also from and into shared memory (the qcow2 reader's buffers).
      const { decompress: fzstd } = await import('fzstd');
      const plain = Buffer.from(Array.from({ length: 65536 }, (_, i) => ((i * 2654435761) >>> 24) & (i & 0x100 ? 0x0f : 0xff)));
      const packed = Buffer.alloc(Number(compressBound(plain.length)));
      const n = Number(compress(packed, packed.length, plain, plain.length, 3));
      if (isError(n)) return undefined;
      const frame = new Uint8Array(new SharedArrayBuffer(n));
      frame.set(packed.subarray(0, n));
      const out = new Uint8Array(new SharedArrayBuffer(plain.length));
      const got = await fn(frame, out);
      const ref = fzstd(packed.subarray(0, n));
      const ok = got === plain.length && Buffer.from(out.buffer).equals(plain) && Buffer.from(ref).equals(plain) && (await fn(new Uint8Array(16).fill(0xff), out)) === -1;
      return ok ? fn : undefined;
    } catch {
      return undefined;
    }
  })().then((f) => (zstdReady = f));
  return zstdState;
}
