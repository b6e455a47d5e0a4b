// Child process of koffi-load.test.ts. As the main thread (no argument): starts
// `workers` threads of this file at once, each loading koffi through loadKoffi() with the
// process's lock and calling libc's getpid, while this thread loads libdeflate too;
// prints one JSON line: the pids the threads saw and the lock word after them.
//   node koffi-load.js N             N threads at once
//   node koffi-load.js N stuck       the lock held by nobody (a thread that died in its load): the threads take it over
import { isMainThread, parentPort, Worker, workerData } from 'node:worker_threads';
import { koffiWorkerData, loadKoffi } from '../../drivers/util/koffi-load.js';
import { libdeflate } from '../../drivers/util/libdeflate.js';

function getpid(waitMs?: number): number {
  const koffi = loadKoffi(waitMs);
  return Number(koffi.load('libc.so.6').func('int getpid()')());
}

if (isMainThread) {
  const n = Number(process.argv[2] ?? 4);
  const stuck = process.argv[3] === 'stuck';
  const data = koffiWorkerData();
  if (stuck) Atomics.store(data.koffiLock!, 0, 1);
  const threads = Array.from({ length: n }, () => new Worker(new URL(import.meta.url), { workerData: { ...data, waitMs: stuck ? 300 : undefined } }));
  const fast = stuck ? undefined : libdeflate('raw');
  const exits = threads.map((t) => new Promise((r) => t.once('exit', r)));
  const pids = await Promise.all(
    threads.map(
      (t) =>
        new Promise<number>((resolve, reject) => {
          t.once('message', (m: number) => resolve(m));
          t.once('error', reject);
        }),
    ),
  );
  await Promise.all(exits);
  process.stdout.write(`${JSON.stringify({ pids, self: process.pid, lock: Atomics.load(data.koffiLock!, 0), libdeflate: stuck || fast !== undefined })}\n`);
} else {
  parentPort!.postMessage(getpid((workerData as { waitMs?: number }).waitMs));
}
