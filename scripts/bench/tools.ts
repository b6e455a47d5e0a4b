// The workloads (dd, fio), statistics, and what the report says about the machine.
import fs from 'node:fs';
import os from 'node:os';
import { run, runOk } from '../lib/qemu.js';

export { median } from '../lib/stats.js';

export const MiB = 1 << 20;
export const GiB = 1 << 30;

/** Run a command; throw with its stderr if it fails. Returns wall seconds and output. */
export async function timed(cmd: string, args: string[], timeoutMs = 600_000): Promise<{ seconds: number; stdout: string; stderr: string }> {
  const t0 = process.hrtime.bigint();
  const r = await run(cmd, args, { timeoutMs });
  const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
  if (r.code !== 0) {
    // dd ends with its statistics; the cause is in the lines before.
    const lines = (r.stderr || r.stdout).split('\n').filter((l) => l.trim() && !/records (in|out)|bytes .*copied/.test(l));
    throw new Error(`${cmd} failed: ${lines.slice(0, 2).join(' / ') || `exit ${r.code}`}`);
  }
  return { seconds, stdout: r.stdout, stderr: r.stderr };
}

/** Sequential read with dd bs=1M; bytes per second (dd's own clock). */
export async function ddRead(file: string, bytes: number): Promise<number> {
  const count = Math.ceil(bytes / MiB);
  const r = await timed('dd', [`if=${file}`, 'of=/dev/null', 'bs=1M', `count=${count}`]);
  return bytes / ddSeconds(r.stderr, r.seconds);
}

/** Sequential write with dd bs=1M conv=notrunc,fsync; bytes per second, fsync included. */
export async function ddWrite(src: string, file: string, bytes: number): Promise<number> {
  const count = Math.ceil(bytes / MiB);
  const r = await timed('dd', [`if=${src}`, `of=${file}`, 'bs=1M', `count=${count}`, 'conv=notrunc,fsync']);
  return bytes / r.seconds;
}

/**
 * `n` sequential readers at once, each dd bs=1M over its own 1/n of the file; bytes per
 * second of all of them together, by the wall clock from the first start to the last end.
 */
export async function ddReadParallel(file: string, bytes: number, n: number): Promise<number> {
  const each = Math.ceil(bytes / MiB / n);
  const t0 = process.hrtime.bigint();
  await Promise.all(Array.from({ length: n }, (_, i) => timed('dd', [`if=${file}`, 'of=/dev/null', 'bs=1M', `skip=${i * each}`, `count=${each}`])));
  return bytes / (Number(process.hrtime.bigint() - t0) / 1e9);
}

function ddSeconds(stderr: string, fallback: number): number {
  const m = /copied, ([\d.]+) s/.exec(stderr);
  return m ? Number(m[1]) : fallback;
}

export interface FioJob {
  file: string;
  rw: 'randread' | 'randwrite';
  jobs: number;
  /** Bytes of the file the offsets cover. */
  size: number;
  /** Time-based run of this many seconds (reads). */
  runtime?: number;
  /** Fixed amount per job (writes), with fsync at the end. */
  ioSize?: number;
}

/** fio with psync and 4 KiB blocks; returns operations per second (all jobs together). */
export async function fio(job: FioJob): Promise<number> {
  const args = [
    '--name=bench',
    `--filename=${job.file}`,
    `--rw=${job.rw}`,
    '--bs=4k',
    '--ioengine=psync',
    `--numjobs=${job.jobs}`,
    `--size=${job.size}`,
    '--group_reporting',
    '--fallocate=none',
    '--output-format=json',
  ];
  if (job.runtime !== undefined) args.push('--time_based', `--runtime=${job.runtime}`);
  if (job.ioSize !== undefined) args.push(`--io_size=${job.ioSize}`, '--end_fsync=1');
  const r = await timed('fio', args);
  const out = JSON.parse(r.stdout.slice(r.stdout.indexOf('{'))) as { jobs: { read: FioSide; write: FioSide }[] };
  const j = out.jobs[0];
  if (!j) throw new Error('fio printed no job');
  if (job.rw === 'randread') return j.read.iops;
  // Writes: count the closing fsync, which fio's own rate leaves out; fio's start-up
  // is in both sides of the ratio.
  return j.write.io_bytes / 4096 / r.seconds;
}

interface FioSide {
  iops: number;
  io_bytes: number;
}

/** Read files once so both servers start from the same (warm) host page cache. */
export async function warm(files: string[]): Promise<void> {
  for (const f of files) await runOk('dd', [`if=${f}`, 'of=/dev/null', 'bs=4M']);
}

/**
 * Give the next measurement free memory the hypervisor still backs. This VM's kernel
 * reports free memory to the host (`page_reporting.page_reporting_order=11` on its
 * command line): memory that stays free for a few seconds is handed back, and the next
 * first touch of each page faults on the host. Writing 2 GiB into a new host file's
 * page cache took 0.32-0.36 s on memory freed just before and 2.2-4.7 s after 5-10 s
 * idle (dd, the same file; BENCHMARKS.md, session 9), so whichever command of a pair
 * ran after a pause paid several times over: the bimodal copies of sessions 6-8.
 * Filling `bytes` of tmpfs and freeing it at once, just before a measurement, lets
 * both sides start on recently freed memory. Best effort: without /dev/shm, nothing.
 */
export function warmFreeMemory(bytes: number): void {
  if (bytes <= 0) return;
  const file = `/dev/shm/tsmount-bench-warm-${process.pid}`;
  const block = Buffer.alloc(4 * MiB, 1);
  let fd: number | undefined;
  try {
    fd = fs.openSync(file, 'w', 0o600);
    for (let done = 0; done < bytes; done += block.length) fs.writeSync(fd, block);
  } catch {
    // No tmpfs, or it is full: measure as before.
  } finally {
    if (fd !== undefined) fs.closeSync(fd);
    fs.rmSync(file, { force: true });
  }
}

/** The custom page_reporting module of this workplace's kernel: how long memory stays free before it is reported (0 here). */
const REPORT_AFTER = '/sys/module/page_reporting/parameters/min_free_ms';

/** The longest hold the parameter takes (larger values are refused). */
const HOLD_MS = 100_000;

/**
 * Keep freed memory backed for the run: raise the kernel's min_free_ms (how long memory
 * must stay free before it goes back to the host; 0 on these machines) to its maximum,
 * 100 s (each measurement's warm-up frees memory again well within that).
 * Converts back to back with it: 0.88-0.94 s each, nothing reported; with 0, every
 * other one took 2.2-2.3 s (sys 2.1 s against 0.7). Returns the function that puts the
 * old value back (the benchmark's end and its signal handler call it); where the
 * parameter is missing or read-only, nothing is changed.
 */
export function holdFreeMemory(): () => void {
  let old: string;
  try {
    old = fs.readFileSync(REPORT_AFTER, 'utf8').trim();
    fs.writeFileSync(REPORT_AFTER, String(HOLD_MS));
    if (fs.readFileSync(REPORT_AFTER, 'utf8').trim() !== String(HOLD_MS)) throw new Error('not taken');
  } catch {
    return () => undefined;
  }
  let done = false;
  return () => {
    if (done) return;
    done = true;
    try {
      fs.writeFileSync(REPORT_AFTER, old);
    } catch {
      /* gone meanwhile */
    }
  };
}

/** Drop these files from the host page cache (posix_fadvise DONTNEED), touching nothing else. */
export async function drop(files: string[]): Promise<void> {
  for (const f of files) await runOk('dd', [`if=${f}`, 'iflag=nocache', 'count=0']);
}

export function loadAverage(): string {
  return os.loadavg().map((x) => x.toFixed(2)).join(' ');
}

export interface Machine {
  date: string;
  nproc: number;
  cpu: string;
  kernel: string;
  node: string;
  qemu: string;
  fio: string;
  xmount: string;
  memory: string;
}

export async function machine(): Promise<Machine> {
  const cpuinfo = fs.readFileSync('/proc/cpuinfo', 'utf8');
  const first = async (cmd: string, args: string[]): Promise<string> => {
    const r = await run(cmd, args, { timeoutMs: 10_000 });
    return (r.stdout + r.stderr).split('\n').find((l) => l.trim() !== '')?.trim() ?? 'not installed';
  };
  const xm = await run('xmount', ['--version'], { timeoutMs: 10_000 });
  return {
    date: new Date().toISOString().replace(/\.\d+Z$/, 'Z'),
    nproc: os.cpus().length,
    cpu: /model name\s*:\s*(.*)/.exec(cpuinfo)?.[1] ?? 'unknown',
    kernel: os.release(),
    node: process.version,
    qemu: (await first('qemu-storage-daemon', ['--version'])).replace(/^qemu-storage-daemon version /, ''),
    fio: await first('fio', ['--version']),
    xmount: /xmount v[\d.]+/.exec(xm.stdout + xm.stderr)?.[0] ?? 'not installed',
    memory: `${Math.round(os.totalmem() / GiB)} GiB`,
  };
}

export async function have(cmd: string): Promise<boolean> {
  const r = await run('sh', ['-c', `command -v ${cmd}`], { timeoutMs: 10_000 });
  return r.code === 0;
}
