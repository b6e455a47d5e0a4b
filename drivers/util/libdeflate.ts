// libdeflate (Debian's libdeflate0) through koffi: whole-buffer deflate decoding,
// 1.15-1.3x zlib's on 64 KiB clusters (scripts/BENCHMARKS.md, sessions 13, 24, 27).
// A fast path only: what it does not decode to the expected size (a qcow2 stream that
// ends without a final block, as QEMU reads them; a damaged one) goes to zlib, which
// decides. Used by the FUSE workers and the io_uring queues (fs/read-map-runs.ts) and by
// qcow2's inflate pool (inflate-worker.ts); koffi loads under the process's lock
// (koffi-load.ts: two threads loading it at once crashed once).
import zlib from 'node:zlib';
import { loadKoffi } from './koffi-load.js';

/**
 * Decodes `input` into `dst`; the bytes produced, or -1 when libdeflate did not decode
 * it whole into `dst`. `close` frees the decoder (a thread that ends before the process).
 */
export type WholeInflater = ((input: Uint8Array, dst: Uint8Array) => number) & { close?: () => void };

/**
 * A decoder of raw deflate ('raw') or zlib streams ('zlib') on this thread's own
 * libdeflate decompressor (kept until its close, or for the thread's life), or undefined: no libdeflate
 * here, TSMOUNT_LIBDEFLATE=0, or it failed its self-test against zlib.
 */
export function libdeflate(kind: 'raw' | 'zlib'): WholeInflater | undefined {
  if (process.env.TSMOUNT_LIBDEFLATE === '0') return undefined;
  try {
    const koffi = loadKoffi();
    const lib = koffi.load('libdeflate.so.0');
    const alloc = lib.func('void *libdeflate_alloc_decompressor()');
    const decode = lib.func(`int libdeflate_${kind === 'raw' ? 'deflate' : 'zlib'}_decompress(void *d, const void *src, size_t n, void *dst, size_t avail, _Out_ size_t *actual)`);
    const free = lib.func('void libdeflate_free_decompressor(void *d)');
    const d: unknown = alloc();
    if (!d) return undefined;
    const actual = [0];
    const run: WholeInflater = (input, dst) => (decode(d, input, input.length, dst, dst.length, actual) === 0 ? Number(actual[0]) : -1);
    run.close = () => free(d);
    const plain = Buffer.from(Array.from({ length: 65536 }, (_, i) => (i * 2654435761) >>> 27));
    const packed = kind === 'raw' ? zlib.deflateRawSync(plain) : zlib.deflateSync(plain);
    const out = Buffer.alloc(plain.length + 1024);
    const ok =
      run(packed, out) === plain.length &&
      out.subarray(0, plain.length).equals(plain) &&
      run(new Uint8Array(64).fill(0xff), out) === -1 &&
      run(packed, out.subarray(0, plain.length - 1)) === -1;
    if (ok) return run;
    free(d);
    return undefined;
  } catch {
    return undefined;
  }
}
