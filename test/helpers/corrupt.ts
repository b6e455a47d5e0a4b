// Exercising a damaged image in-process: it must be refused with one clean line, or
// open and read to the end (a clean error on some reads is fine: EIO), in bounded time.
import { openImage } from '../../drivers/open.js';
import { TsmountError } from '../../drivers/errors.js';
import type { BlockNode } from '../../drivers/types.js';

const MiB = 1024 * 1024;
export const DEADLINE_MS = 5000;
/** Read at most this much of a mutated disk (a flipped size field may claim petabytes). */
const READ_LIMIT = 64 * MiB;

/** A small deterministic PRNG, so a failure can be replayed from its seed. */
export function rng(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return (x >>> 0) / 2 ** 32;
  };
}

/** A TsmountError with a one-line message: what the user may see. */
export function isClean(err: unknown): boolean {
  return err instanceof TsmountError && !/\n/.test(err.message);
}

async function readAll(node: BlockNode): Promise<void> {
  const buf = Buffer.alloc(MiB);
  const spans: [number, number][] = [[0, Math.min(node.size, READ_LIMIT)]];
  if (node.size > READ_LIMIT) spans.push([Math.max(READ_LIMIT, node.size - MiB), node.size]);
  for (const [a, b] of spans) {
    for (let off = a; off < b; off += buf.length) {
      const n = Math.min(buf.length, b - off);
      try {
        await node.read(off, buf.subarray(0, n));
      } catch (err) {
        if (!isClean(err)) throw err;
      }
    }
  }
}

/** Open and read; resolves with what happened, rejects only on an unclean error. */
export async function exercise(file: string, format: string, secret = 'x'): Promise<'refused' | 'read'> {
  let node: BlockNode;
  try {
    node = await openImage(file, { readOnly: true, format, cache: 'writeback', metadataCacheBytes: 1 << 20, locking: 'off', forceShare: false, shareRw: false, secret });
  } catch (err) {
    if (isClean(err)) return 'refused';
    throw err;
  }
  try {
    await readAll(node);
  } finally {
    await node.close().catch(() => undefined);
  }
  return 'read';
}

export function withDeadline<T>(p: Promise<T>, what: string, ms = DEADLINE_MS): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const t = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: no answer within ${ms} ms (a hang)`)), ms);
  });
  return Promise.race([p, t]).finally(() => clearTimeout(timer));
}
