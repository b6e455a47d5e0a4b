// The oracle: QEMU's own tools, run at test time and by the scripts (shared/DESIGN.md, "Where the truth comes from").
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { MapEntry } from '../../mount-helpers/tsimg/map.js';

export interface RunResult {
  stdout: string;
  stderr: string;
  code: number;
}

type ExecError = (Error & { code?: unknown; signal?: NodeJS.Signals | null; killed?: boolean }) | null;

/** A child's status as a shell gives it: its exit code, 128 + the signal that ended it, 1 otherwise. */
function exitCodeOf(err: ExecError): number {
  if (!err) return 0;
  if (typeof err.code === 'number') return err.code;
  if (err.signal) return 128 + (os.constants.signals[err.signal] ?? 0);
  return 1;
}

/**
 * What the child's own stderr cannot say: that it was killed (by a signal or our
 * timeout) or out-ran the output buffer. Appended to stderr, so a failing assertion that
 * prints stderr tells an exit from a crash (once, a convert "exited 1" with nothing on
 * stderr: the runner had turned a signal into 1).
 */
function howEnded(err: ExecError, timeoutMs: number): string {
  if (!err || typeof err.code === 'number') return '';
  if (err.killed && err.signal === 'SIGTERM') return `\n[run: killed after the ${timeoutMs} ms timeout]`;
  if (err.signal) return `\n[run: ended by ${err.signal}]`;
  return `\n[run: ${err.message.split('\n')[0]}]`;
}

/** Run a program; never throws for a non-zero exit (the caller asserts on code). */
export function run(cmd: string, args: string[], opts: { cwd?: string; timeoutMs?: number; env?: NodeJS.ProcessEnv } = {}): Promise<RunResult> {
  return new Promise((resolve) => {
    execFile(
      cmd,
      args,
      { cwd: opts.cwd, timeout: opts.timeoutMs ?? 120_000, maxBuffer: 64 << 20, env: opts.env ?? process.env },
      (err, stdout, stderr) => {
        resolve({ stdout: String(stdout), stderr: String(stderr) + howEnded(err, opts.timeoutMs ?? 120_000), code: exitCodeOf(err) });
      },
    );
  });
}

/**
 * Run a qemu tool that times PBKDF iterations (LUKS creation with iter-time). Debian's
 * QEMU 7.2 carries a fix whose sanity check misfires on fast machines: the first round
 * of its benchmark can finish within one tick of thread CPU time, and it then gives up
 * with "Unable to get accurate CPU usage" (a known QEMU bug, fixed upstream in 2025);
 * seen several times in a row. Retry that one failure, a little apart; return the rest.
 */
export async function runTimingPbkdf(cmd: string, args: string[], attempts = 40, opts: { cwd?: string } = {}): Promise<RunResult> {
  let r: RunResult = { code: 1, stdout: '', stderr: '' };
  for (let i = 0; i < attempts; i++) {
    r = await run(cmd, args, opts);
    if (r.code === 0 || !/accurate CPU usage/.test(r.stderr)) return r;
    await new Promise((res) => setTimeout(res, 50 * Math.min(i + 1, 10)));
  }
  return r;
}

/** Run a program and throw with its stderr if it fails. */
export async function runOk(cmd: string, args: string[], opts: { cwd?: string; timeoutMs?: number } = {}): Promise<string> {
  const r = await run(cmd, args, opts);
  if (r.code !== 0) throw new Error(`${cmd} ${args.join(' ')} failed (${r.code}): ${r.stderr.trim() || r.stdout.trim()}`);
  return r.stdout;
}

/**
 * qemu-img convert -q -f raw [ARGS...] RAW IMAGE. QEMU 7.2's convert to a compressed
 * qcow (`-O qcow -c`) writes every cluster and then exits 1 without a message; that one
 * is accepted when qemu-img compare finds the image identical to RAW.
 */
export async function convertFromRaw(raw: string, image: string, args: string[]): Promise<void> {
  const r = await run('qemu-img', ['convert', '-q', '-f', 'raw', ...args, raw, image]);
  if (r.code === 0) return;
  const qcowCompressed = args.includes('-c') && args[args.indexOf('-O') + 1] === 'qcow' && r.stderr.trim() === '';
  if (qcowCompressed && (await run('qemu-img', ['compare', '-q', '-f', 'raw', '-F', 'qcow', raw, image])).code === 0) return;
  throw new Error(`qemu-img convert ${args.join(' ')} ${raw} ${image} failed (${r.code}): ${r.stderr.trim() || r.stdout.trim()}`);
}

export function qemuImg(...args: string[]): Promise<string> {
  return runOk('qemu-img', args);
}

/** qemu-img create -f FMT [-o k=v,...] [-b BACKING -F BFMT] FILE [SIZE] */
export async function createImage(
  file: string,
  format: string,
  size: number | string | undefined,
  options: Record<string, string | number> = {},
  backing?: { file: string; format: string },
): Promise<void> {
  const args = ['create', '-q', '-f', format];
  const o = Object.entries(options).map(([k, v]) => `${k}=${v}`);
  if (o.length) args.push('-o', o.join(','));
  if (backing) args.push('-b', backing.file, '-F', backing.format);
  args.push(file);
  if (size !== undefined) args.push(String(size));
  await runOk('qemu-img', args, { cwd: path.dirname(file) });
}

/** qemu-io -f FMT -c CMD ... FILE, e.g. ['write -P 0xab 0 64k', 'write -z 1M 64k']. */
export async function qemuIo(file: string, format: string, commands: string[]): Promise<void> {
  const args = ['-f', format];
  for (const c of commands) args.push('-c', c);
  args.push(file);
  const out = await runOk('qemu-io', args, { cwd: path.dirname(file) });
  // qemu-io reports failed commands on stdout and still exits 0.
  const bad = out.split('\n').find((l) => /failed|error/i.test(l) && !/^wrote|^read/.test(l));
  if (bad) throw new Error(`qemu-io ${commands.join('; ')}: ${bad}`);
}

/** What qemu-img convert -O raw makes of the image, written to `out`. Runs in the image's folder. */
export async function convertToRaw(file: string, out: string, format?: string): Promise<void> {
  const args = ['convert', '-U', '-O', 'raw'];
  if (format) args.push('-f', format);
  args.push(file, out);
  await runOk('qemu-img', args, { cwd: path.dirname(file), timeoutMs: 600_000 });
}

export async function md5File(file: string, length?: number): Promise<string> {
  const h = crypto.createHash('md5');
  const stream = fs.createReadStream(file, { highWaterMark: 1 << 20, ...(length !== undefined ? { start: 0, end: length - 1 } : {}) });
  for await (const chunk of stream) h.update(chunk as Buffer);
  return h.digest('hex');
}

/** md5 of the guest-visible disk as qemu-img sees it. */
export async function rawMd5(file: string, format?: string): Promise<string> {
  const tmp = path.join(os.tmpdir(), `tsmount-raw-${process.pid}-${crypto.randomBytes(4).toString('hex')}.raw`);
  try {
    await convertToRaw(file, tmp, format);
    return await md5File(tmp);
  } finally {
    fs.rmSync(tmp, { force: true });
  }
}

export interface CheckResult {
  code: number;
  corruptions: number;
  leaks: number;
  checkErrors: number;
  output: string;
}

/** qemu-img check; exit 0 clean, 3 leaks only, 2 corruptions, 1 failed to check. */
export async function checkImage(file: string, format: string): Promise<CheckResult> {
  const r = await run('qemu-img', ['check', '-U', '--output=json', '-f', format, file], { cwd: path.dirname(file) });
  let j: { corruptions?: number; leaks?: number; 'check-errors'?: number } = {};
  try {
    j = JSON.parse(r.stdout) as typeof j;
  } catch {
    /* leave zeros; code tells */
  }
  return { code: r.code, corruptions: j.corruptions ?? 0, leaks: j.leaks ?? 0, checkErrors: j['check-errors'] ?? 0, output: r.stdout + r.stderr };
}

export interface ImageInfo {
  'virtual-size': number;
  format: string;
  'backing-filename'?: string;
  'cluster-size'?: number;
  [k: string]: unknown;
}

export async function imageInfo(file: string, format?: string): Promise<ImageInfo> {
  const args = ['info', '-U', '--output=json'];
  if (format) args.push('-f', format);
  args.push(file);
  return JSON.parse(await runOk('qemu-img', args, { cwd: path.dirname(file) })) as ImageInfo;
}

/** A fresh folder under the system temp dir, removed by the returned function. */
export function tempDir(prefix: string): { dir: string; cleanup: () => void } {
  // The pid in the name lets the root hook judge only this run's mounts.
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), `tsmount-${process.pid}-${prefix}-`));
  return { dir, cleanup: () => fs.rmSync(dir, { recursive: true, force: true }) };
}

/** One entry of `qemu-img map --output json`: the same shape tsimg map prints. */
export type MapExtent = MapEntry;

/** qemu-img map --output=json: which runs hold data, zeros or nothing, and at which backing depth. */
export async function mapImage(file: string, format?: string): Promise<MapExtent[]> {
  const args = ['map', '-U', '--output=json'];
  if (format) args.push('-f', format);
  args.push(file);
  return JSON.parse(await runOk('qemu-img', args, { cwd: path.dirname(file), timeoutMs: 600_000 })) as MapExtent[];
}

// Runs in a worker so that two large files hash on two cores; eval'd because a worker needs a file
// of its own otherwise. Holes are fed to the hash as zeros instead of being read: reading GiBs of
// holes costs more kernel time than hashing them.
const SPARSE_MD5_WORKER = `
const { parentPort, workerData } = require('node:worker_threads');
const fs = require('node:fs');
const crypto = require('node:crypto');
const { file, runs } = workerData;
const CHUNK = 1 << 20;
const zeros = Buffer.alloc(CHUNK);
const buf = Buffer.alloc(CHUNK);
const h = crypto.createHash('md5');
const fd = fs.openSync(file, 'r');
try {
  for (const [start, length, data] of runs) {
    for (let done = 0; done < length; ) {
      const n = Math.min(CHUNK, length - done);
      if (data) {
        const got = fs.readSync(fd, buf, 0, n, start + done);
        if (got !== n) throw new Error(file + ': short read at ' + (start + done));
        h.update(buf.subarray(0, n));
      } else {
        h.update(zeros.subarray(0, n));
      }
      done += n;
    }
  }
} finally {
  fs.closeSync(fd);
}
parentPort.postMessage(h.digest('hex'));
`;

/** md5 of a plain file, equal to md5File's, reading only the runs qemu-img map reports as data. */
export async function md5Sparse(file: string): Promise<string> {
  const size = fs.statSync(file).size;
  const runs: [number, number, boolean][] = [];
  let pos = 0;
  for (const e of await mapImage(file, 'raw')) {
    // raw sizes are rounded up to 512 by QEMU; the file itself may end earlier.
    const end = Math.min(e.start + e.length, size);
    if (e.start !== pos || end <= pos) break;
    runs.push([pos, end - pos, e.data || !e.zero]);
    pos = end;
  }
  if (pos < size) runs.push([pos, size - pos, true]);
  const { Worker } = await import('node:worker_threads');
  return new Promise((resolve, reject) => {
    const w = new Worker(SPARSE_MD5_WORKER, { eval: true, workerData: { file, runs } });
    w.once('message', (m: string) => resolve(m));
    w.once('error', reject);
    w.once('exit', (code) => reject(new Error(`md5 worker for ${file} exited with ${code}`)));
  });
}

/** rawMd5 for images of any size: the same digest, but holes in the converted file are not read. */
export async function rawMd5Sparse(file: string, format?: string): Promise<string> {
  const tmp = path.join(os.tmpdir(), `tsmount-raw-${process.pid}-${crypto.randomBytes(4).toString('hex')}.raw`);
  try {
    await convertToRaw(file, tmp, format);
    return await md5Sparse(tmp);
  } finally {
    fs.rmSync(tmp, { force: true });
  }
}

export interface LockEntry {
  byte: number;
  /** 'OFDLCK' or 'POSIX' (flock locks cover no byte range and are left out). */
  kind: string;
  mode: 'READ' | 'WRITE';
}

/** The byte-range locks anyone holds on `file`, from /proc/locks, byte by byte in byte order. */
export function lockEntries(file: string): LockEntry[] {
  const st = fs.statSync(file, { bigint: true });
  // glibc's dev_t encoding (gnu_dev_major/minor); /proc/locks prints "%02x:%02x:%lu".
  const major = ((st.dev >> 8n) & 0xfffn) | ((st.dev >> 32n) & ~0xfffn);
  const minor = (st.dev & 0xffn) | ((st.dev >> 12n) & ~0xffn);
  const id = `${major.toString(16).padStart(2, '0')}:${minor.toString(16).padStart(2, '0')}:${st.ino}`;
  const out: LockEntry[] = [];
  for (const line of fs.readFileSync('/proc/locks', 'utf8').split('\n')) {
    // "1: OFDLCK ADVISORY  READ -1 fe:00:2146546 100 101" (blocked waiters start with "->")
    const f = line.trim().split(/\s+/);
    const at = f.indexOf(id);
    if (at < 0 || f[1] === '->' || f[1] === 'FLOCK') continue;
    const start = Number(f[at + 1]);
    const end = f[at + 2] === 'EOF' ? start : Number(f[at + 2]);
    for (let b = start; b <= end; b++) out.push({ byte: b, kind: f[1] ?? '', mode: f[3] === 'WRITE' ? 'WRITE' : 'READ' });
  }
  return out.sort((a, b) => a.byte - b.byte);
}

/** Sorted, distinct bytes locked on `file` by anyone. */
export function lockBytes(file: string): number[] {
  return [...new Set(lockEntries(file).map((e) => e.byte))].sort((a, b) => a - b);
}

/** A QEMU process that holds an image open until stop(). */
export interface QemuHolder {
  readonly process: ChildProcess;
  /** Ends the process (and its mount); safe to call more than once. */
  stop(): Promise<void>;
}

function exited(child: ChildProcess, timeoutMs: number): Promise<boolean> {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve(true);
  return new Promise((resolve) => {
    const t = setTimeout(() => resolve(false), timeoutMs);
    child.once('exit', () => {
      clearTimeout(t);
      resolve(true);
    });
  });
}

async function stopChild(child: ChildProcess): Promise<void> {
  if (await exited(child, 0)) return;
  child.kill('SIGTERM');
  if (await exited(child, 5000)) return;
  child.kill('SIGKILL');
  await exited(child, 5000);
}

/** Wait for `ready()` while the child lives; reject with its stderr if it dies first. */
async function waitReady(child: ChildProcess, what: string, stderr: () => string, ready: () => boolean, timeoutMs = 15_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  // 'exit' can come before the child's last output is read: its message is only whole
  // once the pipes have closed ('close'), so a refusal is never judged on half of it.
  let closed = false;
  const pipesClosed = new Promise<void>((resolve) => child.once('close', () => resolve(void (closed = true))));
  for (;;) {
    if (ready()) return;
    if (child.exitCode !== null || child.signalCode !== null) {
      // (The timer is unref'd: it never holds the process open.)
      if (!closed) await Promise.race([pipesClosed, new Promise((r) => setTimeout(r, 5000).unref())]);
      const how = child.signalCode !== null ? `killed by ${child.signalCode}` : `exit code ${child.exitCode}`;
      throw new Error(`${what} exited (${how}): ${stderr().trim()}`);
    }
    if (Date.now() > deadline) {
      await stopChild(child);
      throw new Error(`${what} not ready after ${timeoutMs} ms: ${stderr().trim()}`);
    }
    await new Promise((r) => setTimeout(r, 25));
  }
}

/**
 * qemu-io ARGS... FILE, kept open: returns once it has read the first sector (so its
 * locks are in place). Rejects with qemu-io's error if it cannot open the image.
 */
export async function holdWithQemuIo(file: string, args: string[] = []): Promise<QemuHolder> {
  const child = spawn('qemu-io', [...args, file], { cwd: path.dirname(file), stdio: ['pipe', 'pipe', 'pipe'] });
  let out = '';
  let err = '';
  child.stdout?.on('data', (d: Buffer) => (out += String(d)));
  child.stderr?.on('data', (d: Buffer) => (err += String(d)));
  child.stdin?.write('read 0 512\n');
  let stopping: Promise<void> | undefined;
  const stop = (): Promise<void> =>
    (stopping ??= (async () => {
      child.stdin?.end('quit\n');
      if (!(await exited(child, 5000))) await stopChild(child);
    })());
  child.stdin?.on('error', () => undefined); // it may be gone before we say quit
  try {
    await waitReady(child, `qemu-io ${args.join(' ')} ${file}`, () => err + out, () => /read 512\/512 bytes/.test(out));
  } catch (e) {
    await stop();
    throw e;
  }
  return { process: child, stop };
}

function isMounted(mountpoint: string): boolean {
  return fs
    .readFileSync('/proc/mounts', 'utf8')
    .split('\n')
    .some((l) => (l.split(' ')[1] ?? '').replace(/\\040/g, ' ') === mountpoint);
}

/**
 * qemu-storage-daemon exporting `node` over FUSE on `mountpoint` (an existing regular
 * file), e.g. blockdevs ['driver=file,node-name=f,filename=IMG',
 * 'driver=qcow2,node-name=q,file=f']. Returns once the export is mounted; stop()
 * kills it and makes sure the mount is gone.
 */
export async function startStorageDaemon(blockdevs: string[], node: string, mountpoint: string, opts: { writable?: boolean; growable?: boolean } = {}): Promise<QemuHolder> {
  const args: string[] = [];
  for (const b of blockdevs) args.push('--blockdev', b);
  args.push('--export', `type=fuse,id=exp0,node-name=${node},mountpoint=${mountpoint},writable=${opts.writable ? 'on' : 'off'}${opts.growable ? ',growable=on' : ''}`);
  const child = spawn('qemu-storage-daemon', args, { stdio: ['ignore', 'pipe', 'pipe'] });
  let err = '';
  child.stdout?.on('data', (d: Buffer) => (err += String(d)));
  child.stderr?.on('data', (d: Buffer) => (err += String(d)));
  let stopping: Promise<void> | undefined;
  const stop = (): Promise<void> =>
    (stopping ??= (async () => {
      await stopChild(child);
      if (isMounted(mountpoint)) {
        const r = await run('fusermount', ['-u', mountpoint]);
        if (r.code !== 0) await run('umount', ['-l', mountpoint]);
      }
    })());
  try {
    await waitReady(child, 'qemu-storage-daemon', () => err, () => isMounted(mountpoint));
  } catch (e) {
    await stop();
    throw e;
  }
  return { process: child, stop };
}
