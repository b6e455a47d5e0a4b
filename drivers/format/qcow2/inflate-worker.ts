// Worker of the inflate pool (inflate-pool.ts): decompresses batches of compressed
// clusters synchronously, with exactly decompressCluster's acceptance rules (raw
// deflate with Z_SYNC_FLUSH to exactly one cluster, at most clusterSize bytes; one
// zstd frame; zlib clusters through libdeflate first, as the FUSE workers do). A cluster
// that fails is only flagged: the main thread decompresses it again in-thread, so that
// its error is the one decompressCluster gives.
import { parentPort } from 'node:worker_threads';
import { decompress as zstdDecompress } from 'fzstd';
import { COMPRESSION, INFLATE_SLACK, zstdFrameLength } from './compress.js';
import { isEnd } from '../../util/worker-pools.js';
import { rawInflater, type Inflater } from '../../util/raw-inflater.js';
import { libdeflate, type WholeInflater } from '../../util/libdeflate.js';

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

/** ok[i] is 1 where cluster i is in the job's `out` (2: decoded by libdeflate). */
export interface InflateResult {
  id: number;
  ok: Uint8Array;
}

/**
 * Picked at the first job, not when the worker loads: a worker ended during its start-up
 * (a short convert releases the pool at once) then holds no zlib stream. Node aborts the
 * process when it tears down a stream whose init had not run (seen once in CI).
 */
let inflate: Inflater | undefined;
/** libdeflate, the first try for zlib clusters (picked at the first job too; null: not here). */
let fast: WholeInflater | null | undefined;

/** Cluster i of the job into out at i * clusterSize; out has INFLATE_SLACK bytes past the last cluster. */
function decompressInto(job: InflateJob, i: number, out: Uint8Array): 0 | 1 | 2 {
  const cs = job.clusterSize;
  const input = new Uint8Array(job.buf, job.ranges[2 * i]!, job.ranges[2 * i + 1]! - job.ranges[2 * i]!);
  if (job.type === COMPRESSION.zlib) {
    // The room past the cluster (the next cluster's place, written after this one)
    // shows a stream that inflates to more than a cluster.
    // libdeflate first (1.2-1.8x zlib here); what it does not decode to exactly the
    // cluster, zlib decides (a stream without a final block, as QEMU reads them).
    const dst = out.subarray(i * cs, (i + 1) * cs + INFLATE_SLACK);
    fast ??= libdeflate('raw') ?? null;
    if (fast && fast(input, dst) === cs) return 2;
    inflate ??= rawInflater();
    return inflate(input, dst) === cs ? 1 : 0;
  }
  if (job.type === COMPRESSION.zstd) {
    const dst = out.subarray(i * cs, (i + 1) * cs);
    // As decompressCluster's Buffer.alloc: a frame fzstd accepts short leaves zeros.
    dst.fill(0);
    const frame = input.subarray(0, zstdFrameLength(input, ''));
    const res = zstdDecompress(frame, dst);
    if (res === dst) return 1;
    if (res.length < cs) return 0;
    dst.set(res.subarray(0, cs));
    return 1;
  }
  return 0;
}

const port = parentPort;
if (port) {
  port.on('message', (job: InflateJob) => {
    if (isEnd(job)) {
      // Asked to end (worker-pools.ts): between jobs, with the zlib stream and libdeflate's decoder closed first.
      inflate?.close?.();
      inflate = undefined;
      fast?.close?.();
      fast = undefined;
      port.close();
      return;
    }
    const n = job.ranges.length / 2;
    const view = new Uint8Array(job.out, 0, n * job.clusterSize + INFLATE_SLACK);
    const ok = new Uint8Array(n);
    for (let i = 0; i < n; i++) {
      try {
        ok[i] = decompressInto(job, i, view);
      } catch {
        ok[i] = 0;
      }
    }
    const res: InflateResult = { id: job.id, ok };
    port.postMessage(res);
  });
}
