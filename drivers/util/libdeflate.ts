// libdeflate (Debian's libdeflate0) through koffi: whole-buffer deflate decoding,
// 1.15-1.3x zlib's on 64 KiB clusters (scripts/BENCHMARKS.md, sessions 13, 24, 27).
// A fast path only: what it does not decode to the expected size (a qcow2 stream that
// ends without a final block, as QEMU reads them; a damaged one) goes to zlib, which
// decides. Loaded only by threads that hold koffi already (the FUSE workers and the
// io_uring queues: fs/read-map-runs.ts), never by the inflate pool's workers (two
// threads loading koffi at once crashed once).
import { createRequire } from 'node:module';
import zlib from 'node:zlib';

/** Decodes `input` into `dst`; the bytes produced, or -1 when libdeflate did not decode it whole into `dst`. */
export type WholeInflater = (input: Uint8Array, dst: Uint8Array) => number;

/**
 * A decoder of raw deflate ('raw') or zlib streams ('zlib') on this thread's own
 * libdeflate decompressor (kept for the thread's life), or undefined: no libdeflate
 * here, TSMOUNT_LIBDEFLATE=0, or it failed its self-test against zlib.
 */
export function libdeflate(kind: 'raw' | 'zlib'): WholeInflater | undefined {
  if (process.env.TSMOUNT_LIBDEFLATE === '0') return undefined;
  try {
    const koffi = createRequire(import.meta.url)('koffi') as typeof import('koffi');
    const lib = koffi.load('libdeflate.so.0');
    const alloc = lib.func('void *libdeflate_alloc_decompressor()');
    const decode = lib.func(`int libdeflate_${kind === 'raw' ? 'deflate' : 'zlib'}_decompress(void *d, const void *src, size_t n, void *dst, size_t avail, _Out_ size_t *actual)`);
    const d: unknown = alloc();
    if (!d) return undefined;
    const actual = [0];
    const run: WholeInflater = (input, dst) => (decode(d, input, input.length, dst, dst.length, actual) === 0 ? Number(actual[0]) : -1);
    const plain = Buffer.from(Array.from({ length: 65536 }, (_, i) => (i * 2654435761) >>> 27));
    const packed = kind === 'raw' ? zlib.deflateRawSync(plain) : zlib.deflateSync(plain);
    const out = Buffer.alloc(plain.length + 1024);
    if (run(packed, out) !== plain.length || !out.subarray(0, plain.length).equals(plain)) return undefined;
    if (run(new Uint8Array(64).fill(0xff), out) !== -1) return undefined;
    if (run(packed, out.subarray(0, plain.length - 1)) !== -1) return undefined;
    return run;
  } catch {
    return undefined;
  }
}
