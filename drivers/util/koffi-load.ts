// koffi loaded in a thread of this process, one thread at a time. Loading the addon in
// two threads at once crashed the process (in CI: a tsimg run whose inflate worker
// loaded it while the main thread did); so every thread that loads it in a worker
// (the FUSE workers, the io_uring queues, the inflate pool) goes through loadKoffi(),
// which holds a lock shared by the whole process while it loads. The lock is made on
// the main thread and given to each worker in its workerData (koffiWorkerData()).
import { createRequire } from 'node:module';
import { isMainThread, workerData } from 'node:worker_threads';

type Koffi = typeof import('koffi');

/** The main thread's lock word, or the one its creator gave this worker (none: loads unlocked, as before). */
const LOCK: Int32Array | undefined = isMainThread
  ? new Int32Array(new SharedArrayBuffer(4))
  : ((workerData as { koffiLock?: Int32Array } | null | undefined)?.koffiLock ?? undefined);

/** How long a thread waits for another's load before it takes the lock anyway (a thread that died holding it). */
const WAIT_MS = 10_000;

let koffi: Koffi | undefined;

/** What a worker that may load koffi gets in its workerData (spread into it). */
export function koffiWorkerData(): { koffiLock: Int32Array | undefined } {
  return { koffiLock: LOCK };
}

/** koffi in this thread, loaded under the process's lock the first time (`waitMs`: for tests). */
export function loadKoffi(waitMs = WAIT_MS): Koffi {
  if (koffi) return koffi;
  const lock = LOCK instanceof Int32Array && LOCK.length >= 1 ? LOCK : undefined;
  if (lock) {
    // A thread that ended while it held the lock (terminated in its load) never gives it
    // back: after waitMs this thread takes it over, so that it is free after this load.
    const deadline = Date.now() + waitMs;
    while (Atomics.compareExchange(lock, 0, 0, 1) !== 0 && Date.now() < deadline) Atomics.wait(lock, 0, 1, 50);
  }
  try {
    koffi = createRequire(import.meta.url)('koffi') as Koffi;
    return koffi;
  } finally {
    if (lock) {
      Atomics.store(lock, 0, 0);
      Atomics.notify(lock, 0);
    }
  }
}
