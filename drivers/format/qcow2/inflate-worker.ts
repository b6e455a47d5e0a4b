// Worker of the inflate pool (inflate-pool.ts): decompresses batches of compressed
// clusters synchronously, with exactly decompressCluster's acceptance rules (raw
// deflate with Z_SYNC_FLUSH to exactly one cluster, at most clusterSize bytes; one
// zstd frame). A cluster that fails is only flagged: the main thread decompresses it
// again in-thread, so that its error is the one decompressCluster gives.
import { parentPort } from 'node:worker_threads';
import zlib from 'node:zlib';
import { decompress as zstdDecompress } from 'fzstd';
import { COMPRESSION, INFLATE_SLACK, zstdFrameLength } from './compress.js';
import { isEnd } from '../../util/worker-pools.js';

/** One batch: clusters whose compressed bytes are buf[ranges[2i], ranges[2i+1]). */
export interface InflateJob {
  id: number;
  type: number;
  clusterSize: number;
  buf: ArrayBuffer | SharedArrayBuffer;
  ranges: number[];
  /** Where cluster i goes: out[i * clusterSize, (i + 1) * clusterSize); INFLATE_SLACK bytes more past the last. */
  out: SharedArrayBuffer;
}

/** ok[i] is 1 where cluster i is in the job's `out`. */
export interface InflateResult {
  id: number;
  ok: Uint8Array;
}

/** Inflates `input` into `dst`; returns the bytes produced, or -1 on a zlib error. `close` frees its zlib stream. */
type Inflater = ((input: Uint8Array, dst: Uint8Array) => number) & { close?: () => void };

/**
 * zlib.inflateRawSync makes a zlib stream object per call, which costs about as much
 * as inflating a 64 KiB cluster. This drives one native zlib handle through the
 * internals inflateRawSync itself uses (handle.reset, handle.writeSync and the
 * stream's write state), one call per cluster. Used only when those internals are
 * there and agree with inflateRawSync on a test stream (see pickInflater).
 */
function handleInflater(): Inflater | undefined {
  interface Handle {
    reset(): void;
    writeSync(flush: number, input: Uint8Array, inOff: number, inLen: number, out: Uint8Array, outOff: number, outLen: number): void;
    onerror: (message: string, errno: number) => void;
  }
  let engine: zlib.InflateRaw | undefined;
  let handle: Handle | undefined;
  let state: Uint32Array | undefined;
  let failed = false;
  const open = (): boolean => {
    engine = zlib.createInflateRaw();
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
    handle!.writeSync(zlib.constants.Z_SYNC_FLUSH, input, 0, input.length, dst, 0, dst.length);
    if (failed) {
      // A fresh handle for the next cluster.
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

/** zlib.inflateRawSync with decompressCluster's options: the reference, and the fallback. */
function syncInflater(clusterSize: () => number): Inflater {
  return (input, dst) => {
    const cs = clusterSize();
    let r: Buffer;
    try {
      r = zlib.inflateRawSync(input, { finishFlush: zlib.constants.Z_SYNC_FLUSH, maxOutputLength: cs, chunkSize: cs + INFLATE_SLACK });
    } catch {
      return -1;
    }
    dst.set(r.subarray(0, dst.length));
    return r.length;
  };
}

let currentClusterSize = 0;
const reference = syncInflater(() => currentClusterSize);

/** The handle inflater if it works here, else inflateRawSync. */
function pickInflater(): Inflater {
  try {
    const h = handleInflater();
    if (!h) return reference;
    const plain = Buffer.from(Array.from({ length: 8192 }, (_, i) => (i * 2654435761) >>> 27));
    const packed = zlib.deflateRawSync(plain);
    const a = new Uint8Array(plain.length + INFLATE_SLACK);
    const ok = h(packed, a) === plain.length && Buffer.from(a.buffer, 0, plain.length).equals(plain);
    const bad = h(new Uint8Array(64).fill(0xff), a) === -1;
    const again = h(packed, a) === plain.length && Buffer.from(a.buffer, 0, plain.length).equals(plain);
    if (ok && bad && again) return h;
    h.close?.();
    return reference;
  } catch {
    return reference;
  }
}

/**
 * Picked at the first job, not when the worker loads: a worker ended during its start-up
 * (a short convert releases the pool at once) then holds no zlib stream. Node aborts the
 * process when it tears down a stream whose init had not run (seen once in CI).
 */
let inflate: Inflater | undefined;

/** Cluster i of the job into out at i * clusterSize; out has INFLATE_SLACK bytes past the last cluster. */
function decompressInto(job: InflateJob, i: number, out: Uint8Array): boolean {
  const cs = job.clusterSize;
  const input = new Uint8Array(job.buf, job.ranges[2 * i]!, job.ranges[2 * i + 1]! - job.ranges[2 * i]!);
  if (job.type === COMPRESSION.zlib) {
    // The room past the cluster (the next cluster's place, written after this one)
    // shows a stream that inflates to more than a cluster.
    currentClusterSize = cs;
    inflate ??= pickInflater();
    return inflate(input, out.subarray(i * cs, (i + 1) * cs + INFLATE_SLACK)) === cs;
  }
  if (job.type === COMPRESSION.zstd) {
    const dst = out.subarray(i * cs, (i + 1) * cs);
    // As decompressCluster's Buffer.alloc: a frame fzstd accepts short leaves zeros.
    dst.fill(0);
    const frame = input.subarray(0, zstdFrameLength(input, ''));
    const res = zstdDecompress(frame, dst);
    if (res === dst) return true;
    if (res.length < cs) return false;
    dst.set(res.subarray(0, cs));
    return true;
  }
  return false;
}

const port = parentPort;
if (port) {
  port.on('message', (job: InflateJob) => {
    if (isEnd(job)) {
      // Asked to end (worker-pools.ts): between jobs, with the zlib stream closed first.
      inflate?.close?.();
      inflate = undefined;
      port.close();
      return;
    }
    const n = job.ranges.length / 2;
    const view = new Uint8Array(job.out, 0, n * job.clusterSize + INFLATE_SLACK);
    const ok = new Uint8Array(n);
    for (let i = 0; i < n; i++) {
      try {
        ok[i] = decompressInto(job, i, view) ? 1 : 0;
      } catch {
        ok[i] = 0;
      }
    }
    const res: InflateResult = { id: job.id, ok };
    port.postMessage(res);
  });
}
