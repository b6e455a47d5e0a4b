// Node-level micro-benchmark: the block graph without FUSE. Each workload opens its
// image the way fs/server.ts does (openGraph, default
// --cache-size split) and drives the node directly; the same I/O is then run by
// `qemu-img bench` (C, QEMU's block layer, same image kind, same request sizes and
// queue depth, writeback cache, the final flush included) as an anchor in the same run.
// What to compare is the ratio node/qemu, not the absolute numbers.
//
//   node dist/scripts/node-bench.js [--workloads a,b (default; --list shows all)] [--repeat 3] [--depth 1] [--dir DIR]
//                                  [--node-only] [--floor] [--list]
//
// --floor adds a third run: the same requests as bare fs.write calls on a raw file (the
// libuv round trip drivers/protocol/file.ts makes per request, nothing above it).
// --dir on tmpfs (/dev/shm/...) takes disk writeback out of the numbers.
//
// A workload is an entry in WORKLOADS: how to make its image (once, cached in --dir,
// or afresh per run), what requests to send, and the matching qemu-img bench arguments.
// Adding one (e.g. sequential reads of a compressed qcow2) is adding an entry.
import fs from 'node:fs';
import path from 'node:path';
import os from 'node:os';
import { openGraph } from '../drivers/open.js';
import type { BlockNode } from '../drivers/types.js';
import { run, runOk } from './lib/qemu.js';
import { median } from './lib/stats.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const GiB = 1024 * MiB;

/** fs/server.ts's split of the default --cache-size (64M) for one image. */
const CACHE_SIZE = 64 * MiB;

interface Workload {
  name: string;
  what: string;
  /** The image to run on, called before each side's run: made afresh (workloads that allocate) or once per --dir (reused). */
  image(dir: string): Promise<string>;
  format: string;
  write: boolean;
  requestSize: number;
  count: number;
  /** Offset of request i (qemu-img bench's sequence: offset += step, modulo the size). */
  step: number;
  size: number;
  /** Flush once after the last request (timed). */
  flush: boolean;
  /** For --floor: the raw file the bare-syscall run uses (a new empty one, or a preallocated one kept in --dir). */
  floor: 'empty' | 'full';
}

const STRIDE_4K = 4 * KiB * 40503; // odd multiple of 4 KiB: visits every 4 KiB block of 1 GiB once per 262144 requests

const WORKLOADS: Workload[] = [
  {
    name: 'a',
    what: 'sequential allocating writes, 1 MiB requests, empty 1 GiB qcow2 (64 KiB clusters), then flush',
    image: (dir) => emptyQcow2(dir),
    format: 'qcow2',
    write: true,
    requestSize: MiB,
    count: 1024,
    step: MiB,
    size: GiB,
    flush: true,
    floor: 'empty',
  },
  {
    name: 'a128',
    what: 'as a, in 128 KiB requests (what libfuse 2 delivers today)',
    image: (dir) => emptyQcow2(dir),
    format: 'qcow2',
    write: true,
    requestSize: 128 * KiB,
    count: 8192,
    step: 128 * KiB,
    size: GiB,
    flush: true,
    floor: 'empty',
  },
  {
    name: 'b',
    what: 'scattered 4 KiB writes (stride 4 KiB*40503, every block distinct), fully allocated 1 GiB qcow2, 32768 requests, then flush',
    image: (dir) =>
      once(dir, 'full.qcow2', (f) => runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=65536,preallocation=full', f, String(GiB)], { timeoutMs: 300_000 }).then(() => undefined)),
    format: 'qcow2',
    write: true,
    requestSize: 4 * KiB,
    count: 32768,
    step: STRIDE_4K,
    size: GiB,
    flush: true,
    floor: 'full',
  },
];

/** The raw file for the --floor run. */
async function floorFile(w: Workload, dir: string): Promise<string> {
  if (w.floor === 'full') return once(dir, 'floor-full.raw', (f) => runOk('qemu-img', ['create', '-q', '-f', 'raw', '-o', 'preallocation=full', f, String(w.size)]).then(() => undefined));
  const f = path.join(dir, 'floor-empty.raw');
  fs.rmSync(f, { force: true });
  fs.writeFileSync(f, '');
  return f;
}

/**
 * The same requests as bare fs.write calls (libuv's thread pool, as drivers/protocol/file.ts
 * does) on a raw file, then fdatasync: what the protocol round trip alone costs, with
 * no format, cache or FUSE layer above it.
 */
async function runFloor(w: Workload, file: string, depth: number): Promise<Timing> {
  const fd = fs.openSync(file, w.write ? 'r+' : 'r');
  try {
    const io = (buf: Buffer, at: number): Promise<void> =>
      new Promise((resolve, reject) => {
        const cb = (err: Error | null): void => (err ? reject(err) : resolve());
        if (w.write) fs.write(fd, buf, 0, buf.length, at, cb);
        else fs.read(fd, buf, 0, buf.length, at, cb);
      });
    const flush = (): Promise<void> => new Promise<void>((resolve, reject) => fs.fdatasync(fd, (err) => (err ? reject(err) : resolve())));
    return await timed(w, depth, io, flush);
  } finally {
    fs.closeSync(fd);
  }
}

/** The workload's requests, `depth` in flight, each through `io`; then `flush` if it flushes. */
async function timed(w: Workload, depth: number, io: (buf: Buffer, at: number) => Promise<void>, flush: () => Promise<void>): Promise<Timing> {
  const buffers = Array.from({ length: depth }, (_, i) => Buffer.alloc(w.requestSize, 0xa5 + i));
  let next = 0;
  let offset = 0;
  const c0 = process.cpuUsage();
  const m0 = threadCpu();
  const t0 = process.hrtime.bigint();
  await Promise.all(
    buffers.map(async (buf) => {
      while (next < w.count) {
        next++;
        const at = offset;
        offset = (offset + w.step) % w.size;
        await io(buf, at);
      }
    }),
  );
  if (w.flush) await flush();
  const wall = Number(process.hrtime.bigint() - t0) / 1e9;
  const c = process.cpuUsage(c0);
  return { wall, cpu: (c.user + c.system) / 1e6, main: threadCpu() - m0 };
}

/** A new empty 1 GiB qcow2 with 64 KiB clusters (replacing the previous run's). */
async function emptyQcow2(dir: string): Promise<string> {
  const f = path.join(dir, 'empty.qcow2');
  fs.rmSync(f, { force: true });
  await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=65536', f, String(GiB)]);
  return f;
}

async function once(dir: string, name: string, make: (file: string) => Promise<void>): Promise<string> {
  const f = path.join(dir, name);
  if (fs.existsSync(`${f}.done`)) return f;
  fs.rmSync(f, { force: true });
  process.stderr.write(`  making ${name}\n`);
  await make(f);
  fs.writeFileSync(`${f}.done`, '');
  return f;
}

async function openLikeServer(file: string, format: string, rw: boolean): Promise<BlockNode> {
  const [top] = await openGraph([file], { readOnly: !rw, format, cache: 'writeback', cacheSize: CACHE_SIZE, locking: 'auto', forceShare: false, shareRw: false });
  if (!top) throw new Error('no node');
  return top;
}

interface Timing {
  /** Wall-clock seconds. */
  wall: number;
  /** CPU seconds of the whole process (user + system, every thread). */
  cpu: number;
  /** tsmount only: CPU seconds of the main (JavaScript) thread. */
  main?: number;
}

/** CPU seconds the calling thread has used (/proc/thread-self/stat utime + stime; 10 ms resolution). */
function threadCpu(): number {
  const f = fs.readFileSync('/proc/thread-self/stat', 'utf8');
  const fields = f.slice(f.lastIndexOf(')') + 2).split(' ');
  return (Number(fields[11]) + Number(fields[12])) / 100;
}

/** The workload through tsmount's node, `depth` requests in flight. */
async function runNode(w: Workload, file: string, depth: number): Promise<Timing> {
  const node = await openLikeServer(file, w.format, w.write);
  try {
    return await timed(w, depth, (buf, at) => (w.write ? node.write(at, buf) : node.read(at, buf)), () => node.flush());
  } finally {
    await node.close();
  }
}

/**
 * qemu-img bench on the same requests: wall time is its own timer (the final flush
 * included, via --flush-interval); CPU time is the process's (/usr/bin/time) minus
 * that of a run of `depth` requests (start-up, open, close).
 */
async function runQemu(w: Workload, file: string, depth: number, count = w.count): Promise<Timing> {
  const args = ['bench', '-f', w.format, '-t', 'writeback', '-d', String(depth), '-s', String(w.requestSize), '-S', String(w.step), '-c', String(count)];
  if (w.write) args.push('-w');
  if (w.flush) args.push(`--flush-interval=${count}`);
  const r = await run('/usr/bin/time', ['-f', 'CPU %U %S', 'qemu-img', ...args, file], { timeoutMs: 600_000 });
  const out = r.stdout + r.stderr;
  if (r.code !== 0) throw new Error(`qemu-img bench failed: ${out}`);
  const m = /Run completed in ([0-9.]+) seconds/.exec(out);
  const c = /CPU ([0-9.]+) ([0-9.]+)/.exec(out);
  if (!m || !c) throw new Error(`qemu-img bench: unexpected output: ${out}`);
  return { wall: Number(m[1]), cpu: Number(c[1]) + Number(c[2]) };
}

function rate(w: Workload, secs: number): string {
  return w.requestSize >= 64 * KiB ? `${((w.count * w.requestSize) / MiB / secs).toFixed(0)} MiB/s` : `${(w.count / secs).toFixed(0)} IOPS`;
}

function arg(name: string): string | undefined {
  const i = process.argv.indexOf(name);
  return i >= 0 ? process.argv[i + 1] : undefined;
}

async function main(): Promise<void> {
  if (process.argv.includes('--list')) {
    for (const w of WORKLOADS) console.log(`${w.name}\t${w.what}`);
    return;
  }
  const names = (arg('--workloads') ?? 'a,b').split(',');
  const repeat = Number(arg('--repeat') ?? 3);
  const depth = Number(arg('--depth') ?? 1);
  const noQemu = process.argv.includes('--no-qemu');
  const nodeOnly = process.argv.includes('--node-only');
  const floor = process.argv.includes('--floor');
  const dir = arg('--dir') ?? path.join(os.tmpdir(), 'tsmount-node-bench');
  fs.mkdirSync(dir, { recursive: true });
  for (const name of names) {
    const w = WORKLOADS.find((x) => x.name === name);
    if (!w) throw new Error(`no workload '${name}' (--list shows them)`);
    const ts: Timing[] = [];
    const qs: Timing[] = [];
    const fl: Timing[] = [];
    let qemuBase = 0;
    if (!noQemu && !nodeOnly) qemuBase = (await runQemu(w, await w.image(dir), depth, depth)).cpu;
    for (let r = 0; r < repeat; r++) {
      // Alternate who goes first; a fresh image for each side when the workload allocates.
      const order = r % 2 === 0 ? ['node', 'qemu'] : ['qemu', 'node'];
      for (const who of order) {
        if (who === 'qemu' && (noQemu || nodeOnly)) continue;
        const file = await w.image(dir);
        if (who === 'node') ts.push(await runNode(w, file, depth));
        else {
          const q = await runQemu(w, file, depth);
          qs.push({ wall: q.wall, cpu: Math.max(0.001, q.cpu - qemuBase) });
        }
      }
      if (floor) fl.push(await runFloor(w, await floorFile(w, dir), depth));
    }
    const secs = (xs: Timing[], k: keyof Timing): string => xs.map((x) => (x[k] ?? 0).toFixed(3)).join(', ');
    const line = [
      `${w.name}: ${w.what}, depth ${depth}`,
      `  tsmount node:   ${rate(w, median(ts.map((x) => x.wall)))}; wall ${secs(ts, 'wall')} s; cpu ${secs(ts, 'cpu')} s, of it main thread ${secs(ts, 'main')} s`,
    ];
    if (qs.length > 0) {
      line.push(`  qemu-img bench: ${rate(w, median(qs.map((x) => x.wall)))}; wall ${secs(qs, 'wall')} s; cpu ${secs(qs, 'cpu')} s (start-up cpu ${qemuBase.toFixed(3)} s subtracted)`);
      const wall = ts.map((t, i) => qs[i]!.wall / t.wall);
      const cpu = ts.map((t, i) => qs[i]!.cpu / t.cpu);
      const fmt = (r: number[]): string => `${median(r).toFixed(2)} (${Math.min(...r).toFixed(2)}..${Math.max(...r).toFixed(2)})`;
      line.push(`  ratio tsmount/qemu: speed (wall) ${fmt(wall)}; cpu efficiency (qemu cpu / tsmount cpu) ${fmt(cpu)}`);
    }
    if (fl.length > 0) {
      line.push(`  bare fs.write on a raw file: ${rate(w, median(fl.map((x) => x.wall)))}; wall ${secs(fl, 'wall')} s; cpu ${secs(fl, 'cpu')} s, of it main thread ${secs(fl, 'main')} s`);
      const r = ts.map((t, i) => fl[i]!.wall / t.wall);
      line.push(`  ratio tsmount/bare fs.write (speed): ${median(r).toFixed(2)} (${Math.min(...r).toFixed(2)}..${Math.max(...r).toFixed(2)})`);
    }
    console.log(line.join('\n'));
  }
}

main().catch((err: unknown) => {
  console.error(err);
  process.exit(1);
});
