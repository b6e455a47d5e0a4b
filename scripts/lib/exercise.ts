// Exercising a damaged image in-process, as the corruption test and the fuzzer do: it
// must be refused with one clean line, or open and read to the end (a clean error on
// some reads is fine: EIO), each open and each read within a deadline, no Buffer
// larger than the metadata cache plus a fixed bound, and the file never written.
import fs from 'node:fs';
import { openImage } from '../../drivers/open.js';
import { TsmountError } from '../../drivers/errors.js';
import type { BlockNode } from '../../drivers/types.js';

const MiB = 1024 * 1024;
/** Per open, per read: longer is a hang. */
export const DEADLINE_MS = 5000;
/** Read at most this much of a mutated disk (a flipped size field may claim petabytes). */
const READ_LIMIT = 16 * MiB;
/** The metadata cache the exercise opens with. */
export const CACHE_BYTES = MiB;
/**
 * The fixed bound on one allocation beyond the cache: a decoded unit (a dmg chunk
 * may be 64 MiB, as QEMU allows) or one request's buffer.
 */
export const FIXED_BOUND = 64 * MiB;
export const ALLOC_LIMIT = CACHE_BYTES + FIXED_BOUND;

/** A TsmountError with a one-line message: what the user may see. */
export function isClean(err: unknown): boolean {
  return err instanceof TsmountError && !/\n/.test(err.message);
}

export function withDeadline<T>(p: Promise<T>, what: string, ms = DEADLINE_MS): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const t = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: no answer within ${ms} ms (a hang)`)), ms);
  });
  return Promise.race([p, t]).finally(() => clearTimeout(timer));
}

/**
 * The largest Buffer allocated while `fn` runs (Buffer.alloc, allocUnsafe,
 * allocUnsafeSlow and concat: what the drivers allocate with). Not reentrant.
 */
export async function trackAllocations<T>(fn: () => Promise<T>): Promise<{ value: T; maxAlloc: number }> {
  const B = Buffer as unknown as Record<string, (...a: unknown[]) => Buffer>;
  const names = ['alloc', 'allocUnsafe', 'allocUnsafeSlow', 'concat'] as const;
  const saved = names.map((n) => B[n]!);
  let maxAlloc = 0;
  names.forEach((n, i) => {
    const orig = saved[i]!;
    B[n] = function (this: unknown, ...a: unknown[]) {
      if (n !== 'concat' && typeof a[0] === 'number' && a[0] > maxAlloc) maxAlloc = a[0];
      const out = orig.apply(Buffer, a);
      if (n === 'concat' && out.length > maxAlloc) maxAlloc = out.length;
      return out;
    };
  });
  try {
    const value = await fn();
    return { value, maxAlloc };
  } finally {
    names.forEach((n, i) => (B[n] = saved[i]!));
  }
}

async function readAll(node: BlockNode, what: string, ms: number): Promise<void> {
  const buf = Buffer.alloc(MiB);
  const spans: [number, number][] = [[0, Math.min(node.size, READ_LIMIT)]];
  if (node.size > READ_LIMIT) spans.push([Math.max(READ_LIMIT, node.size - MiB), node.size]);
  for (const [a, b] of spans) {
    for (let off = a; off < b; off += buf.length) {
      const n = Math.min(buf.length, b - off);
      try {
        await withDeadline(node.read(off, buf.subarray(0, n)), `${what}: read at ${off}`, ms);
      } catch (err) {
        if (!isClean(err)) throw err;
      }
    }
    try {
      await withDeadline(node.blockStatus(a, b - a), `${what}: block status`, ms);
    } catch (err) {
      if (!isClean(err)) throw err;
    }
  }
}

export type Outcome = 'refused' | 'read';

/** Open and read; resolves with what happened, rejects only on an unclean error or a hang. */
export async function exercise(file: string, format: string, secret = 'x', ms = DEADLINE_MS): Promise<Outcome> {
  let node: BlockNode;
  const what = `${file} (${format})`;
  try {
    node = await withDeadline(
      openImage(file, { readOnly: true, format, cache: 'writeback', metadataCacheBytes: CACHE_BYTES, locking: 'off', forceShare: false, shareRw: false, secret }),
      `${what}: open`,
      ms,
    );
  } catch (err) {
    if (isClean(err)) return 'refused';
    throw err;
  }
  try {
    await readAll(node, what, ms);
    // What tsimg info shows, and the views a mount shows of internal snapshots (a few).
    node.describe?.();
    for (const snap of (node.snapshots?.() ?? []).slice(0, 4)) await readAll(snap.node, `${what}: snapshot ${snap.name}`, ms);
  } finally {
    await node.close().catch(() => undefined);
  }
  return 'read';
}

/**
 * Set the file's times to a fixed past moment and return its stamp (size and mtime):
 * any write to it, even within the same clock tick, moves mtime to now.
 */
export function stampFile(file: string): string {
  fs.utimesSync(file, 1_000_000, 1_000_000);
  return fileStamp(file);
}

export function fileStamp(file: string): string {
  const st = fs.statSync(file, { bigint: true });
  return `${st.size}:${st.mtimeNs}`;
}

/**
 * exercise() with every bound checked: rejects with why when an open or read fails
 * uncleanly or hangs, a Buffer over ALLOC_LIMIT is allocated, or the file changed.
 */
export async function exerciseBounded(file: string, format: string, secret = 'x', ms = DEADLINE_MS): Promise<{ outcome: Outcome; maxAlloc: number }> {
  const before = stampFile(file);
  const { value, maxAlloc } = await trackAllocations(() => exercise(file, format, secret, ms)).catch(async (err: unknown) => {
    // A loaded machine can be slow: a hang is one that a six times longer deadline does not end either.
    if (!/no answer within/.test(String(err)) || ms > DEADLINE_MS) throw err;
    return trackAllocations(() => exercise(file, format, secret, 6 * ms));
  });
  if (maxAlloc > ALLOC_LIMIT) throw new Error(`${file} (${format}): allocated ${maxAlloc} bytes at once, over the cache plus the fixed bound (${ALLOC_LIMIT})`);
  if (fileStamp(file) !== before) throw new Error(`${file} (${format}): a read-only open changed the file`);
  return { outcome: value, maxAlloc };
}
