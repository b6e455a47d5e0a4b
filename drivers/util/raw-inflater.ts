// Deflate streams into a caller's buffer, synchronously, one after another: the qcow2
// inflate pool's workers (drivers/format/qcow2/inflate-worker.ts) and the FUSE
// threads that answer a READ of compressed clusters and grains from the read map
// (fs/read-map-runs.ts). Imports only node:zlib, so such a thread loads nothing else.
import zlib from 'node:zlib';

/** Output room past the expected size: zlib ends the stream inside it, and more output than expected shows there. */
export const INFLATE_SLACK = 1024;

/**
 * Inflates `input` into `dst`; returns the bytes produced, at most dst.length, or -1 on
 * a zlib error. 'raw': raw deflate with Z_SYNC_FLUSH (a stream may end without a final
 * block, as QEMU writes and reads qcow2 clusters); 'zlib': a zlib stream that must end
 * (Z_FINISH, as QEMU's uncompress() reads a VMDK grain): one cut short is an error
 * while `dst` has room left. A caller that wants exactly n bytes gives a `dst` with
 * room past them (INFLATE_SLACK) and checks for n: more shows in the room.
 */
export type InflateKind = 'raw' | 'zlib';

export type Inflater = ((input: Uint8Array, dst: Uint8Array) => number) & { close?: () => void };

/**
 * zlib.inflateRawSync makes a zlib stream object per call, which costs about as much
 * as inflating a 64 KiB cluster. This drives one native zlib handle through the
 * internals inflateRawSync itself uses (handle.reset, handle.writeSync and the
 * stream's write state), one call per stream. Used only when those internals are
 * there and agree with inflateRawSync on a test stream (see rawInflater).
 */
function handleInflater(kind: InflateKind): Inflater | undefined {
  interface Handle {
    reset(): void;
    writeSync(flush: number, input: Uint8Array, inOff: number, inLen: number, out: Uint8Array, outOff: number, outLen: number): void;
    onerror: (message: string, errno: number) => void;
  }
  let engine: zlib.InflateRaw | zlib.Inflate | undefined;
  let handle: Handle | undefined;
  let state: Uint32Array | undefined;
  let failed = false;
  const open = (): boolean => {
    engine = kind === 'raw' ? zlib.createInflateRaw() : zlib.createInflate();
    const e = engine as unknown as { _handle?: Handle; _writeState?: Uint32Array };
    handle = e._handle;
    state = e._writeState;
    if (!handle || typeof handle.reset !== 'function' || typeof handle.writeSync !== 'function' || !(state instanceof Uint32Array) || state.length < 2) return false;
    handle.onerror = () => {
      failed = true;
    };
    return true;
  };
  if (!open()) return undefined;
  const run: Inflater = (input, dst) => {
    if (!handle) open();
    failed = false;
    handle!.reset();
    state![0] = dst.length;
    handle!.writeSync(kind === 'raw' ? zlib.constants.Z_SYNC_FLUSH : zlib.constants.Z_FINISH, input, 0, input.length, dst, 0, dst.length);
    if (failed) {
      // A fresh handle for the next stream.
      engine!.close();
      engine = handle = state = undefined;
      return -1;
    }
    return dst.length - state![0]!;
  };
  run.close = () => {
    engine?.close();
    engine = handle = state = undefined;
  };
  return run;
}

/** zlib.inflateRawSync or inflateSync, at most dst.length bytes: the reference, and the fallback. */
function syncInflater(kind: InflateKind): Inflater {
  return (input, dst) => {
    let r: Buffer;
    try {
      const opts = { maxOutputLength: dst.length, chunkSize: Math.max(64, dst.length) };
      r = kind === 'raw' ? zlib.inflateRawSync(input, { ...opts, finishFlush: zlib.constants.Z_SYNC_FLUSH }) : zlib.inflateSync(input, opts);
    } catch {
      return -1;
    }
    dst.set(r);
    return r.length;
  };
}

/**
 * The handle inflater if it works here (it inflates a test stream as the reference
 * does, fails a broken one, and inflates again after the failure), else the reference.
 * Make one when the first stream comes, not when a thread loads: Node aborts the
 * process when it tears down a zlib stream whose init had not run (seen once in CI,
 * a pool worker ended during its start-up).
 */
export function rawInflater(kind: InflateKind = 'raw'): Inflater {
  const reference = syncInflater(kind);
  try {
    const h = handleInflater(kind);
    if (!h) return reference;
    const plain = Buffer.from(Array.from({ length: 8192 }, (_, i) => (i * 2654435761) >>> 27));
    const packed = kind === 'raw' ? zlib.deflateRawSync(plain) : zlib.deflateSync(plain);
    const a = new Uint8Array(plain.length + INFLATE_SLACK);
    const ok = h(packed, a) === plain.length && Buffer.from(a.buffer, 0, plain.length).equals(plain);
    const bad = h(new Uint8Array(64).fill(0xff), a) === -1;
    // 'zlib': a stream cut short is an error, as the reference says.
    const cut = kind === 'raw' || (h(packed.subarray(0, packed.length - 8), a) === -1 && reference(packed.subarray(0, packed.length - 8), a) === -1);
    const again = h(packed, a) === plain.length && Buffer.from(a.buffer, 0, plain.length).equals(plain);
    if (ok && bad && cut && again) return h;
    h.close?.();
    return reference;
  } catch {
    return reference;
  }
}

/** The fallbacks alone (tests: both must agree). */
export const referenceInflater = (kind: InflateKind = 'raw'): Inflater => syncInflater(kind);
