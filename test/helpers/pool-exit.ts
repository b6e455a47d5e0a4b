// Child process of inflate-pool.test.ts "worker pools end without aborting the process":
// uses a worker pool the way a short command does, then exits. Node aborts a process
// whose worker was stopped while building a zlib stream (worker-pools.ts); the parent
// runs this many times and wants exit status 0 and nothing on stderr.
//   node pool-exit.js first      one cluster, the pool released, a natural exit
//   node pool-exit.js inflight   the pool released with batches still in the workers, then process.exit
//   node pool-exit.js encode     deflate jobs in the decode pool, then process.exit
import zlib from 'node:zlib';
import { COMPRESSION } from '../../drivers/format/qcow2/compress.js';
import { acquireInflatePool, decompressClusters } from '../../drivers/format/qcow2/inflate-pool.js';
import { encodeOffThread } from '../../drivers/util/decode-pool.js';
import { settleWorkers } from '../../drivers/util/worker-pools.js';

const CS = 64 * 1024;
const plain = Buffer.alloc(CS);
for (let i = 0; i < CS; i++) plain[i] = (i * 2654435761) >>> 27;
const packed = zlib.deflateRawSync(plain);

function batch(n: number): Promise<Buffer>[] {
  const src = Buffer.alloc(packed.length * n);
  const parts = [];
  for (let i = 0; i < n; i++) {
    packed.copy(src, i * packed.length);
    parts.push({ from: i * packed.length, to: (i + 1) * packed.length, what: `cluster ${i}` });
  }
  return decompressClusters(COMPRESSION.zlib, src, parts, CS);
}

async function main(mode: string): Promise<void> {
  if (mode === 'first') {
    const release = acquireInflatePool();
    const [p] = batch(1);
    if (!(await p!).equals(plain)) throw new Error('wrong bytes');
    release();
    return;
  }
  if (mode === 'inflight') {
    const release = acquireInflatePool();
    const all = batch(64);
    for (const p of all) p.catch(() => undefined);
    release();
    await settleWorkers();
    process.exit(0);
  }
  if (mode === 'encode') {
    for (let i = 0; i < 8; i++) void encodeOffThread('deflate-raw', plain, CS).catch(() => undefined);
    await settleWorkers();
    process.exit(0);
  }
  throw new Error(`unknown mode ${mode}`);
}

main(process.argv[2] ?? '').catch((err: unknown) => {
  process.stderr.write(`pool-exit: ${(err as Error).message}\n`);
  process.exit(1);
});
