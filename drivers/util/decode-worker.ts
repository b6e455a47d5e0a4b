// Worker of decode-pool.ts: runs one JavaScript decoder (or one compression) per
// message and sends the output back transferred, or the decoder's error message.
import { parentPort } from 'node:worker_threads';
import { decodeSync, encodeSync, type EncodeCodec, type JsCodec } from './js-codecs.js';
import { isEnd } from './worker-pools.js';

/** Decode `input` into at most `size` bytes, or (encode) compress it into at most `size` bytes. */
export type DecodeJob = { id: number; codec: JsCodec; input: Uint8Array; size: number; encode?: false } | { id: number; codec: EncodeCodec; input: Uint8Array; size: number; encode: true };

export type DecodeReply = { id: number; out: Uint8Array } | { id: number; error: string };

parentPort?.on('message', (job: DecodeJob) => {
  // Asked to end between jobs (worker-pools.ts).
  if (isEnd(job)) return parentPort!.close();
  let reply: DecodeReply;
  try {
    // A compression that does not fit comes back empty (no stream is empty).
    const out = job.encode ? (encodeSync(job.codec, job.input, job.size) ?? new Uint8Array(0)) : decodeSync(job.codec, job.input, job.size);
    // A copy of exactly the output, so that its whole buffer can be transferred.
    const copy = new Uint8Array(out.length);
    copy.set(out);
    reply = { id: job.id, out: copy };
    parentPort!.postMessage(reply, [copy.buffer]);
    return;
  } catch (err) {
    reply = { id: job.id, error: err instanceof Error ? err.message : String(err) };
  }
  parentPort!.postMessage(reply);
});
