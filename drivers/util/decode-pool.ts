// The decoders written in JavaScript (js-codecs.ts: bzip2, ADC, LZFSE) take tens to
// hundreds of milliseconds a chunk: on the event loop that would stall every FUSE
// request meanwhile. Compression for tsimg convert -c (deflate) runs here too. They run in a few worker threads, started on first use and
// unref'd while idle (so they never keep the process alive). If a worker cannot
// start or dies, its jobs and every later one are decoded in-thread instead.
// TSMOUNT_DECODE_WORKERS=0 decodes in-thread from the start. Workers are ended by a
// message between jobs, never terminated in the middle of one (worker-pools.ts).
import os from 'node:os';
import { Worker } from 'node:worker_threads';
import createDebug from './debug.js';
import { decodeSync, encodeSync, type EncodeCodec, type JsCodec } from './js-codecs.js';
import type { DecodeJob, DecodeReply } from './decode-worker.js';
import { Busy, endWorker, noteExit, registerPool } from './worker-pools.js';

const debug = createDebug('tsmount:decode');

const MAX_WORKERS = 2;

interface Pending {
  resolve: (b: Buffer) => void;
  reject: (err: Error) => void;
  /** Decode in-thread (the worker died). */
  redo: () => void;
}

interface Slot {
  worker: Worker;
  jobs: Map<number, Pending>;
  /** Jobs inside the worker, including those redone in-thread after broken(). */
  busy: Busy;
}

let slots: Slot[] | undefined;
let disabled = false;
let nextId = 1;

function workerCount(): number {
  const env = process.env.TSMOUNT_DECODE_WORKERS;
  if (env !== undefined && env !== '' && Number.isInteger(Number(env))) return Math.max(0, Math.min(MAX_WORKERS, Number(env)));
  const cores = typeof os.availableParallelism === 'function' ? os.availableParallelism() : os.cpus().length;
  return Math.max(1, Math.min(MAX_WORKERS, cores - 1));
}

function broken(err: Error): void {
  if (disabled) return;
  debug('decode workers unusable, decoding in-thread: %s', err.message);
  disabled = true;
  const all = slots ?? [];
  slots = undefined;
  for (const s of all) {
    endWorker(s.worker, s.busy);
    for (const p of s.jobs.values()) p.redo();
    s.jobs.clear();
  }
}

registerPool(() => Promise.all((slots ?? []).map((s) => s.busy.idle())).then(() => undefined));

function getSlots(): Slot[] | undefined {
  if (slots || disabled) return slots;
  const n = workerCount();
  if (n === 0) {
    disabled = true;
    return undefined;
  }
  try {
    const url = new URL('./decode-worker.js', import.meta.url);
    slots = [];
    for (let i = 0; i < n; i++) {
      const slot: Slot = { worker: new Worker(url), jobs: new Map(), busy: new Busy() };
      slot.worker.unref();
      // Node 20 refs a worker's port again when it comes online (inflate-pool.ts).
      slot.worker.once('online', () => {
        if (slot.jobs.size === 0) slot.worker.unref();
      });
      slot.worker.on('message', (r: DecodeReply) => {
        slot.busy.done();
        const p = slot.jobs.get(r.id);
        if (!p) return;
        slot.jobs.delete(r.id);
        if (slot.jobs.size === 0) slot.worker.unref();
        if ('error' in r) p.reject(new Error(r.error));
        else p.resolve(Buffer.from(r.out.buffer, r.out.byteOffset, r.out.byteLength));
      });
      slot.worker.on('error', (err) => broken(err));
      slot.worker.on('exit', (code) => {
        noteExit(code);
        slot.busy.gone();
        broken(new Error(`decode worker exited with code ${code}`));
      });
      slots.push(slot);
    }
  } catch (err) {
    broken(err as Error);
  }
  return slots;
}

/** Decode in a worker thread (in-thread where none can run); rejects with the decoder's message. */
export function decodeOffThread(codec: JsCodec, input: Uint8Array, size: number): Promise<Buffer> {
  return run({ codec, size }, input, () => decodeSync(codec, input, size));
}

/**
 * Compress in a worker thread (in-thread where none can run): the stream, or undefined
 * where it would be longer than `limit` bytes (qcow2 and qcow clusters, tsimg convert -c).
 */
export async function encodeOffThread(codec: EncodeCodec, input: Uint8Array, limit: number): Promise<Buffer | undefined> {
  const out = await run({ codec, size: limit, encode: true }, input, () => encodeSync(codec, input, limit) ?? Buffer.alloc(0));
  return out.length === 0 ? undefined : out;
}

function run(what: Omit<DecodeJob, 'id' | 'input'>, input: Uint8Array, sync: () => Buffer): Promise<Buffer> {
  const inThread = (): Promise<Buffer> => {
    try {
      return Promise.resolve(sync());
    } catch (err) {
      return Promise.reject(err instanceof Error ? err : new Error(String(err)));
    }
  };
  const all = getSlots();
  if (!all || all.length === 0) return inThread();
  let slot = all[0]!;
  for (const s of all) if (s.jobs.size < slot.jobs.size) slot = s;
  const id = nextId++;
  return new Promise<Buffer>((resolve, reject) => {
    if (slot.jobs.size === 0) slot.worker.ref();
    slot.jobs.set(id, { resolve, reject, redo: () => inThread().then(resolve, reject) });
    slot.busy.start();
    // A copy goes to the worker: the caller's buffer stays usable.
    const copy = new ArrayBuffer(input.length);
    new Uint8Array(copy).set(input);
    const job = { ...what, id, input: new Uint8Array(copy) } as DecodeJob;
    slot.worker.postMessage(job, [copy]);
  });
}
