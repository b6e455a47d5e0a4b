// tsimg bench: qemu-img bench's load on one image, through the format driver: `count`
// requests of `size` bytes, `depth` of them in flight, from `offset` on in steps of
// `step` (wrapping at the end of the disk); reads, or with -w writes of the --pattern
// byte, with a flush every --flush-interval completions (the queue drained first unless
// --no-drain). It prints what qemu-img prints, and the same requests leave the same image.
import { UsageError } from '../../drivers/errors.js';
import { openImage } from '../../drivers/open.js';
import { CACHE_MODES, type BlockNode, type CacheMode } from '../../drivers/types.js';
import { cvtnum, readOnlyOptions, type OpenCli } from './common.js';

export interface BenchCli extends OpenCli {
  count?: string;
  depth?: string;
  offset?: string;
  size?: string;
  stepSize?: string;
  cache?: string;
  write?: boolean;
  pattern?: string;
  flushInterval?: string;
  drain?: boolean;
  aio?: string;
  native?: boolean;
  quiet?: boolean;
}

/** qemu_strtoul with qemu-img's bound: a whole number 0..max (decimal, 0x hex or 0 octal), or `message`. */
function whole(text: string | undefined, fallback: number, max: number, message: string): number {
  if (text === undefined) return fallback;
  const t = text.trim();
  const n = /^0x[0-9a-f]+$/i.test(t) ? parseInt(t, 16) : /^0[0-7]+$/.test(t) ? parseInt(t, 8) : /^\d+$/.test(t) ? Number(t) : NaN;
  if (!Number.isSafeInteger(n) || n > max) throw new UsageError(message);
  return n;
}

export async function bench(file: string, o: BenchCli): Promise<void> {
  const INT_MAX = 2 ** 31 - 1;
  const count = whole(o.count, 75000, INT_MAX, 'Invalid request count specified');
  const depth = whole(o.depth, 64, INT_MAX, 'Invalid queue depth specified');
  if (o.aio !== undefined && !['threads', 'native', 'io_uring'].includes(o.aio)) throw new UsageError(`Invalid aio option: ${o.aio}`);
  const offset = o.offset === undefined ? 0 : cvtnum('offset', o.offset, 0, Number.MAX_SAFE_INTEGER);
  const size = o.size === undefined ? 4096 : cvtnum('buffer size', o.size, 0, INT_MAX);
  const step = (o.stepSize === undefined ? 0 : cvtnum('step_size', o.stepSize, 0, INT_MAX)) || size;
  if (o.cache !== undefined && !(CACHE_MODES as readonly string[]).includes(o.cache)) throw new UsageError('Invalid cache mode');
  const pattern = whole(o.pattern, 0, 0xff, 'Invalid pattern byte specified');
  const flushInterval = whole(o.flushInterval, 0, INT_MAX, 'Invalid flush interval specified');
  const drain = o.drain !== false;
  const write = o.write === true;
  if (!write && flushInterval) throw new UsageError('--flush-interval is only available in write tests');
  if (flushInterval && flushInterval < depth) throw new UsageError("Flush interval can't be smaller than depth");

  // QEMU's file-posix: native AIO only with O_DIRECT.
  if ((o.native || o.aio === 'native') && o.cache !== 'none' && o.cache !== 'directsync') {
    throw new UsageError(`Could not open '${file}': aio=native was specified, but it requires cache.direct=on, which was not specified.`);
  }
  const node = await openImage(file, readOnlyOptions(o, { readOnly: !write, cache: (o.cache ?? 'writeback') as CacheMode }));
  try {
    process.stdout.write(`Sending ${count} ${write ? 'write' : 'read'} requests, ${size} bytes each, ${depth} in parallel (starting at offset ${offset}, step size ${step})\n`);
    if (flushInterval) process.stdout.write(`Sending flush every ${flushInterval} requests\n`);
    const started = process.hrtime.bigint();
    await run(node, { count, depth, offset, size, step, write, pattern, flushInterval, drain });
    const seconds = Number(process.hrtime.bigint() - started) / 1e9;
    process.stdout.write(`Run completed in ${seconds.toFixed(3)} seconds.\n`);
  } finally {
    await node.close();
  }
}

interface Load {
  count: number;
  depth: number;
  offset: number;
  size: number;
  step: number;
  write: boolean;
  pattern: number;
  flushInterval: number;
  drain: boolean;
}

/**
 * qemu-img's bench_cb loop: submit while fewer than `depth` are in flight; every
 * `flushInterval` completions a flush, after the queue drained (nothing new is sent
 * until it is done) or, with --no-drain, beside the requests.
 */
async function run(node: BlockNode, l: Load): Promise<void> {
  const disk = node.size;
  // A buffer per slot, as qemu-img's one buffer of depth * size split into its requests.
  const free = Array.from({ length: Math.max(1, Math.min(l.depth, l.count)) }, () => Buffer.alloc(l.size, l.pattern));
  let next = l.offset;
  let left = l.count;
  let inFlight = 0;
  let flushDue = false;
  let failure: Error | undefined;
  let wake: (() => void) | undefined;
  const settle = (): void => {
    const w = wake;
    wake = undefined;
    w?.();
  };
  const fail = (e: unknown): void => {
    failure ??= e instanceof UsageError ? e : new UsageError(`Failed request: ${(e as Error).message}`);
  };
  const background = new Set<Promise<void>>();
  const submit = (): void => {
    const at = next;
    next = disk > 0 ? (next + l.step) % disk : 0;
    const buf = free.pop()!;
    inFlight++;
    const io = at + buf.length > disk ? Promise.reject(new UsageError('Failed request: Input/output error')) : l.write ? node.write(at, buf) : node.read(at, buf);
    io.then(() => {
      const remaining = left - inFlight;
      left--;
      inFlight--;
      free.push(buf);
      if (!l.flushInterval || remaining % l.flushInterval !== 0) return;
      if (l.drain) flushDue = true;
      else {
        const f: Promise<void> = node.flush().catch(fail).finally(() => background.delete(f));
        background.add(f);
      }
    }, (e: unknown) => {
      inFlight--;
      fail(e);
    }).finally(settle);
  };
  while (!failure) {
    if (flushDue && l.drain && inFlight === 0) {
      flushDue = false;
      await node.flush().catch(fail);
      continue;
    }
    if (left === 0 && inFlight === 0) break;
    while (left > inFlight && inFlight < l.depth && !(flushDue && l.drain)) submit();
    await new Promise<void>((r) => (wake = r));
  }
  while (inFlight > 0) await new Promise<void>((r) => (wake = r));
  await Promise.allSettled([...background]);
  if (failure) throw failure;
}
