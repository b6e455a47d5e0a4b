// The oracle: QEMU's own tools, run at test time (shared/DESIGN.md, "Where the truth comes from").
import { execFile } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

export interface RunResult {
  stdout: string;
  stderr: string;
  code: number;
}

/** Run a program; never throws for a non-zero exit (the caller asserts on code). */
export function run(cmd: string, args: string[], opts: { cwd?: string; timeoutMs?: number; env?: NodeJS.ProcessEnv } = {}): Promise<RunResult> {
  return new Promise((resolve) => {
    execFile(
      cmd,
      args,
      { cwd: opts.cwd, timeout: opts.timeoutMs ?? 120_000, maxBuffer: 64 << 20, env: opts.env ?? process.env },
      (err, stdout, stderr) => {
        const code = err ? (typeof (err as { code?: unknown }).code === 'number' ? (err as { code: number }).code : 1) : 0;
        resolve({ stdout: String(stdout), stderr: String(stderr), code });
      },
    );
  });
}

/** Run a program and throw with its stderr if it fails. */
export async function runOk(cmd: string, args: string[], opts: { cwd?: string; timeoutMs?: number } = {}): Promise<string> {
  const r = await run(cmd, args, opts);
  if (r.code !== 0) throw new Error(`${cmd} ${args.join(' ')} failed (${r.code}): ${r.stderr.trim() || r.stdout.trim()}`);
  return r.stdout;
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
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), `tsmount-${prefix}-`));
  return { dir, cleanup: () => fs.rmSync(dir, { recursive: true, force: true }) };
}
