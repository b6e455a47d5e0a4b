// Node-level sequential read benchmark: the block graph as fs/server.ts builds it
// (openGraph, as the server builds it, with the default cache budget), read in
// 1 MiB requests with a few in flight, as the kernel's readahead would issue them.
// No FUSE: this measures the format/cache path alone. `qemu-img bench` on the same
// image in the same run is the C anchor; compare the ratios, not the MB/s.
//
//   node dist/scripts/node-read-bench.js [--images DIR] [--reps N] [--depth D]
//        [--req BYTES] [--no-anchor] [--verify] [--only NAME,...] [IMAGE[:FMT]...]
//
// Without IMAGE arguments it makes (or reuses) the benchmark's images in --images
// (default /tmp/tsm-perf/img) with scripts/bench/images.ts: compressed qcow2,
// monolithicSparse vmdk, fully allocated qcow2, vhdx. --verify compares every
// request with the raw data the images were converted from.
import fs from 'node:fs';
import { openGraph } from '../drivers/open.js';
import { run } from './lib/qemu.js';
import { median } from './lib/stats.js';
import { Images } from './bench/images.js';
import { GiB, MiB } from './bench/tools.js';

/** tsmount's --cache-size default (openGraph splits it as the server does). */
const CACHE_SIZE = 64 * MiB;

interface Args {
  images: string;
  reps: number;
  depth: number;
  req: number;
  anchor: boolean;
  verify: boolean;
  only: string[] | undefined;
  targets: { name: string; file: string; format: string }[];
}

const USAGE = `node dist/scripts/node-read-bench.js [--images DIR] [--reps N] [--depth D]
     [--req BYTES] [--no-anchor] [--verify] [--only NAME,...] [IMAGE[:FMT]...]
`;

function parse(argv: string[]): Args {
  const a: Args = { images: '/tmp/tsm-perf/img', reps: 3, depth: 4, req: MiB, anchor: true, verify: false, only: undefined, targets: [] };
  for (let i = 0; i < argv.length; i++) {
    const v = argv[i]!;
    const next = (): string => {
      const x = argv[++i];
      if (x === undefined) throw new Error(`${v} needs a value`);
      return x;
    };
    if (v === '--images') a.images = next();
    else if (v === '--reps') a.reps = Number(next());
    else if (v === '--depth') a.depth = Number(next());
    else if (v === '--req') a.req = Number(next());
    else if (v === '--no-anchor') a.anchor = false;
    else if (v === '--verify') a.verify = true;
    else if (v === '--only') a.only = next().split(',');
    else if (v === '--help' || v === '-h') {
      process.stdout.write(USAGE);
      process.exit(0);
    } else if (v.startsWith('--')) throw new Error(`unknown option ${v}`);
    else {
      const [file, format] = v.split(':');
      a.targets.push({ name: file!.split('/').pop()!, file: file!, format: format ?? '' });
    }
  }
  return a;
}

interface Measure {
  /** Bytes per wall second. */
  speed: number;
  /** CPU seconds (user + system, every thread) per GiB read. */
  cpu: number;
  /** Of it, the main thread's (NaN for qemu-img). */
  main: number;
}

/** CPU seconds the calling thread has used (/proc/thread-self/stat utime + stime; 10 ms resolution). */
function threadCpu(): number {
  const f = fs.readFileSync('/proc/thread-self/stat', 'utf8');
  const fields = f.slice(f.lastIndexOf(')') + 2).split(' ');
  return (Number(fields[11]) + Number(fields[12])) / 100;
}

async function readAll(file: string, format: string, depth: number, req: number, reference: number | undefined): Promise<Measure> {
  const [top] = await openGraph([file], {
    readOnly: true,
    format: format || undefined,
    cache: 'writeback',
    cacheSize: CACHE_SIZE,
    locking: 'off',
    forceShare: true,
    shareRw: false,
  });
  if (!top) throw new Error('no node');
  try {
    const size = top.size;
    let next = 0;
    const c0 = process.cpuUsage();
    const m0 = threadCpu();
    const t0 = process.hrtime.bigint();
    const worker = async (): Promise<void> => {
      const buf = Buffer.allocUnsafe(req);
      const want = reference === undefined ? undefined : Buffer.allocUnsafe(req);
      for (;;) {
        const off = next;
        if (off >= size) return;
        next += req;
        const dst = buf.subarray(0, Math.min(req, size - off));
        await top.read(off, dst);
        if (want) {
          const n = fs.readSync(reference!, want, 0, dst.length, off);
          if (n !== dst.length || !want.subarray(0, n).equals(dst)) throw new Error(`${file}: bytes differ from the reference at 0x${off.toString(16)}`);
        }
      }
    };
    await Promise.all(Array.from({ length: depth }, worker));
    const s = Number(process.hrtime.bigint() - t0) / 1e9;
    const c = process.cpuUsage(c0);
    return { speed: size / s, cpu: (c.user + c.system) / 1e6 / (size / GiB), main: (threadCpu() - m0) / (size / GiB) };
  } finally {
    await top.close();
  }
}

/** qemu-img bench: sequential reads of `req` bytes, `depth` in flight, whole image. */
async function anchor(file: string, format: string, depth: number, req: number, size: number): Promise<Measure> {
  const count = Math.floor(size / req);
  const args = ['bench', '-U', '-f', format, '-c', String(count), '-d', String(depth), '-s', String(req), '-t', 'writeback', file];
  // bash's `times` reports the CPU time of its children: qemu-img's, every thread.
  const quoted = args.map((a) => `'${a.replace(/'/g, "'\\''")}'`).join(' ');
  const t0 = process.hrtime.bigint();
  const r = await run('bash', ['-c', `qemu-img ${quoted} && times`], { timeoutMs: 600_000 });
  const wall = Number(process.hrtime.bigint() - t0) / 1e9;
  if (r.code !== 0) throw new Error(`qemu-img bench failed: ${r.stderr.trim()}`);
  const m = /Run completed in ([\d.]+) seconds/.exec(r.stdout);
  const t = /(\d+)m([\d.]+)s (\d+)m([\d.]+)s\s*$/.exec(r.stdout.trim());
  const cpu = t ? Number(t[1]) * 60 + Number(t[2]) + Number(t[3]) * 60 + Number(t[4]) : NaN;
  return { speed: (count * req) / (m ? Number(m[1]) : wall), cpu: cpu / ((count * req) / GiB), main: NaN };
}

function warm(file: string): void {
  const fd = fs.openSync(file, 'r');
  const buf = Buffer.allocUnsafe(8 * MiB);
  try {
    while (fs.readSync(fd, buf, 0, buf.length, null) > 0);
  } finally {
    fs.closeSync(fd);
  }
}

async function main(): Promise<void> {
  const args = parse(process.argv.slice(2));
  let refPath: string | undefined;
  if (args.targets.length === 0) {
    const im = new Images(args.images, { main: GiB, big: 4 * GiB, small: 64 * MiB });
    args.targets = [
      { name: 'compressed-qcow2', file: await im.compressedQcow2(), format: 'qcow2' },
      { name: 'vmdk', file: await im.vmdk(), format: 'vmdk' },
      { name: 'full-qcow2', file: await im.fullQcow2(), format: 'qcow2' },
      { name: 'vhdx', file: await im.vhdx(), format: 'vhdx' },
    ];
    refPath = await im.dataRaw();
  }
  if (args.only) args.targets = args.targets.filter((t) => args.only!.includes(t.name));
  const mb = (x: number): string => `${(x / 1e6).toFixed(0)} MB/s`;
  process.stdout.write(`node ${process.version}, ${args.req / 1024} KiB requests, depth ${args.depth}, ${args.reps} reps, load ${fs.readFileSync('/proc/loadavg', 'utf8').split(' ').slice(0, 3).join(' ')}\n`);
  for (const t of args.targets) {
    warm(t.file);
    const ref = args.verify && refPath ? fs.openSync(refPath, 'r') : undefined;
    const ours: Measure[] = [];
    const theirs: Measure[] = [];
    const ratios: number[] = [];
    const vsize = args.anchor ? await virtualSize(t.file) : 0;
    for (let r = 0; r < args.reps; r++) {
      // Alternate which goes first.
      let o: Measure = { speed: 0, cpu: 0, main: 0 };
      let c: Measure = { speed: 0, cpu: 0, main: NaN };
      const doOurs = async (): Promise<void> => {
        o = await readAll(t.file, t.format, args.depth, args.req, ref);
      };
      const doC = async (): Promise<void> => {
        if (args.anchor) c = await anchor(t.file, t.format || 'qcow2', args.depth, args.req, vsize);
      };
      if (r % 2 === 0) {
        await doOurs();
        await doC();
      } else {
        await doC();
        await doOurs();
      }
      ours.push(o);
      if (args.anchor) {
        theirs.push(c);
        ratios.push(o.speed / c.speed);
      }
    }
    if (ref !== undefined) fs.closeSync(ref);
    const speed = (ms: Measure[]): string => mb(median(ms.map((m) => m.speed)));
    const cpu = (ms: Measure[]): string => `${median(ms.map((m) => m.cpu)).toFixed(2)} cpu-s/GiB${Number.isNaN(ms[0]!.main) ? '' : ` (main thread ${median(ms.map((m) => m.main)).toFixed(2)})`}`;
    const line = args.anchor
      ? `${t.name}: tsmount ${speed(ours)} ${cpu(ours)}; qemu-img bench ${speed(theirs)} ${cpu(theirs)}; speed ratio ${median(ratios).toFixed(2)} (${Math.min(...ratios).toFixed(2)}..${Math.max(...ratios).toFixed(2)}), cpu ratio (qemu/tsmount) ${(median(theirs.map((m) => m.cpu)) / median(ours.map((m) => m.cpu))).toFixed(2)}`
      : `${t.name}: tsmount ${speed(ours)} (${ours.map((x) => (x.speed / 1e6).toFixed(0)).join(', ')}) ${cpu(ours)}`;
    process.stdout.write(`${line}${ref !== undefined ? ' [verified]' : ''}\n`);
  }
}

async function virtualSize(file: string): Promise<number> {
  const r = await run('qemu-img', ['info', '-U', '--output', 'json', file]);
  return (JSON.parse(r.stdout) as { 'virtual-size': number })['virtual-size'];
}

main().catch((err: unknown) => {
  process.stderr.write(`node-read-bench: ${err instanceof Error ? err.stack : String(err)}\n`);
  process.exit(1);
});
