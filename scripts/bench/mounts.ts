// Mounting one image three ways for the benchmark (tsmount, qemu-storage-daemon, xmount),
// timing the mount, and never leaving a mount behind: every live mount is in one
// registry that an exit or signal handler tears down synchronously.
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { TSMOUNT, forceUnmount, isAlive, mountedPid } from '../lib/mounts.js';
import { run } from '../lib/qemu.js';

/**
 * ceiling: scripts/bench/ceiling.c, a libfuse3 server of memory (the machine's FUSE limit).
 * dd: no server at all, the workload straight into a host file on the same disk (the
 * anchor of the write rows); nothing is mounted for it.
 */
export type System = 'tsmount' | 'qsd' | 'xmount' | 'ceiling' | 'dd';

export interface Mounted {
  system: System;
  /** The path whose bytes are the guest disk. */
  file: string;
  /** Where the FUSE file system is mounted (the file itself, or xmount's directory). */
  mountpoint: string;
  /** The serving process. */
  pid: number;
  /** Seconds from starting the mount command to the disk being readable. */
  mountSeconds: number;
  child?: ChildProcess;
}

export interface MountRequest {
  image: string;
  /** QEMU driver name: qcow2, raw, vmdk, vhdx. */
  format: string;
  rw: boolean;
  /** tsmount --cache-size. */
  cacheSize?: string;
  /** An existing regular file (tsmount, qsd) or an empty directory (xmount). */
  target: string;
  /** Extra environment for the tsmount server (profiling). */
  env?: NodeJS.ProcessEnv;
  /** Extra node options for the tsmount server, e.g. ['--cpu-prof']. */
  nodeArgs?: string[];
  /** The disk's virtual size: the ceiling server serves this many bytes. */
  size?: number;
  /** The passphrase of an encrypted image (luks): tsmount --secret, a secret object for qsd. */
  secret?: string;
  /** QEMU's preallocate filter over the image file: tsmount --preallocate, a preallocate blockdev for qsd. */
  preallocate?: boolean;
}

const live = new Map<string, Mounted>();

function fuseMounted(mountpoint: string): boolean {
  const mp = path.resolve(mountpoint);
  return fs
    .readFileSync('/proc/mounts', 'utf8')
    .split('\n')
    .some((l) => {
      const f = l.split(' ');
      return f[1] === mp && (f[2] ?? '').startsWith('fuse');
    });
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

async function waitUntil(cond: () => boolean, timeoutMs: number, pollMs = 2): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > deadline) return false;
    await sleep(pollMs);
  }
  return true;
}

function seconds(t0: bigint): number {
  return Number(process.hrtime.bigint() - t0) / 1e9;
}

/** `tsmount [--rw] IMG FILE`: timed from start to its return (it returns once the mount is ready). */
async function mountTsmount(req: MountRequest): Promise<Mounted> {
  const args = [...(req.nodeArgs ?? []), TSMOUNT, '-f', req.format];
  if (req.rw) args.push('--rw');
  if (req.cacheSize) args.push('--cache-size', req.cacheSize);
  if (req.secret !== undefined) args.push('--secret', req.secret);
  if (req.preallocate) args.push('--preallocate');
  args.push(req.image, req.target);
  const mp = path.resolve(req.target);
  // Registered before it exists, so an interrupt during the mount still cleans up.
  live.set(mp, { system: 'tsmount', file: mp, mountpoint: mp, pid: 0, mountSeconds: 0 });
  const t0 = process.hrtime.bigint();
  const r = await run(process.execPath, args, { timeoutMs: 120_000, env: { ...process.env, ...req.env } });
  const mountSeconds = seconds(t0);
  if (r.code !== 0) {
    forceUnmount(mp);
    live.delete(mp);
    throw new Error(r.stderr.trim() || `tsmount: exit ${r.code}`);
  }
  const pid = mountedPid(mp) ?? 0;
  const m: Mounted = { system: 'tsmount', file: mp, mountpoint: mp, pid, mountSeconds };
  live.set(mp, m);
  return m;
}

/** qemu-storage-daemon's FUSE export over a regular file; timed until the mount appears. */
async function mountQsd(req: MountRequest): Promise<Mounted> {
  const mp = path.resolve(req.target);
  const file = req.preallocate ? 'p' : 'f';
  const blockdevs = [
    `driver=file,node-name=f,filename=${req.image}`,
    ...(req.preallocate ? ['driver=preallocate,node-name=p,file=f'] : []),
    req.format === 'raw' ? `driver=raw,node-name=q,file=${file}` : `driver=${req.format},node-name=q,file=${file}${req.secret !== undefined ? ',key-secret=s0' : ''}`,
  ];
  const args = req.secret !== undefined ? ['--object', `secret,id=s0,data=${req.secret}`] : [];
  args.push(...blockdevs.flatMap((b) => ['--blockdev', b]));
  args.push('--export', `type=fuse,id=e,node-name=q,mountpoint=${mp},writable=${req.rw ? 'on' : 'off'}`);
  // Not --daemonize: a daemonized qsd 7.2 leaves its mount behind when it gets SIGTERM.
  return spawnServer('qsd', 'qemu-storage-daemon', args, mp, path.dirname(req.image));
}

/** A server that stays in the foreground and mounts `mp` itself; timed until its mount appears. */
async function spawnServer(system: 'qsd' | 'ceiling', cmd: string, args: string[], mp: string, cwd?: string): Promise<Mounted> {
  const t0 = process.hrtime.bigint();
  const child = spawn(cmd, args, { stdio: ['ignore', 'ignore', 'pipe'], cwd });
  const m: Mounted = { system, file: mp, mountpoint: mp, pid: child.pid ?? 0, mountSeconds: 0, child };
  live.set(mp, m);
  let stderr = '';
  child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
  const ok = await waitUntil(() => fuseMounted(mp) || child.exitCode !== null || child.signalCode !== null, 60_000);
  m.mountSeconds = seconds(t0);
  if (!ok || !fuseMounted(mp)) {
    await unmount(m);
    throw new Error(`${system === 'qsd' ? 'qemu-storage-daemon' : 'ceiling'}: ${stderr.trim() || 'mount did not appear'}`);
  }
  return m;
}

const CEILING_SOURCE = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../../scripts/bench/ceiling.c');
let ceilingBinary: string | undefined;

/**
 * The ceiling server, built from scripts/bench/ceiling.c with gcc against libfuse3
 * (libfuse3-dev, pkg-config) the first time it is needed; the binary is named after
 * the source's hash, so an edit rebuilds it.
 */
export function ceiling(): string {
  if (ceilingBinary) return ceilingBinary;
  const src = fs.readFileSync(CEILING_SOURCE);
  const bin = path.join(os.tmpdir(), `tsmount-ceiling-${crypto.createHash('sha256').update(src).digest('hex').slice(0, 12)}`);
  if (!fs.existsSync(bin)) {
    let flags: string[];
    try {
      flags = execFileSync('pkg-config', ['--cflags', '--libs', 'fuse3'], { encoding: 'utf8' }).trim().split(/\s+/);
    } catch {
      throw new Error('the ceiling server needs pkg-config and libfuse3-dev (scripts/setup.sh installs them)');
    }
    const tmp = `${bin}.${process.pid}`;
    execFileSync('gcc', ['-O2', '-Wall', '-o', tmp, CEILING_SOURCE, ...flags], { stdio: ['ignore', 'ignore', 'pipe'] });
    fs.renameSync(tmp, bin);
  }
  return (ceilingBinary = bin);
}

/** The ceiling server over the target file, serving req.size bytes; timed until its mount appears. */
async function mountCeiling(req: MountRequest): Promise<Mounted> {
  if (req.size === undefined) throw new Error('ceiling: needs the virtual size');
  // Writable: direct I/O, as tsmount and qsd serve writable files, so every write reaches the server.
  const args = [String(req.size), path.resolve(req.target), ...(req.rw ? ['--direct'] : [])];
  const m = await spawnServer('ceiling', ceiling(), args, path.resolve(req.target));
  // 1 MiB requests, as tsmount gets them: the kernel gives a FUSE mount a 128 KiB
  // readahead window, and only root widens it through sysfs (fs/fuse.ts setReadahead).
  widenReadahead(m.mountpoint, 1024);
  return m;
}

/** read_ahead_kb of the mount at `mountpoint` (its MAJ:MIN from mountinfo); best effort. */
function widenReadahead(mountpoint: string, kib: number): void {
  try {
    for (const line of fs.readFileSync('/proc/self/mountinfo', 'utf8').split('\n')) {
      const f = line.split(' ');
      if (f[4] === mountpoint && f[2] && /^\d+:\d+$/.test(f[2])) fs.writeFileSync(`/sys/class/bdi/${f[2]}/read_ahead_kb`, String(kib));
    }
  } catch {
    /* not root: the kernel's window stays */
  }
}

/** xmount --in raw IMG DIR: read-only, the disk appears as DIR/<stem>.dd. */
async function mountXmount(req: MountRequest): Promise<Mounted> {
  if (req.format !== 'raw') throw new Error(`xmount: this build reads raw, ewf and aff only, not ${req.format}`);
  const mp = path.resolve(req.target);
  live.set(mp, { system: 'xmount', file: mp, mountpoint: mp, pid: 0, mountSeconds: 0 });
  const t0 = process.hrtime.bigint();
  // xmount daemonizes once mounted (fuse_main without -f).
  const r = await run('xmount', ['--in', 'raw', req.image, mp], { timeoutMs: 60_000 });
  const mountSeconds = seconds(t0);
  if (r.code !== 0 || !fuseMounted(mp)) {
    await unmount({ system: 'xmount', file: mp, mountpoint: mp, pid: xmountPid(mp), mountSeconds });
    throw new Error(`xmount: ${(r.stderr + r.stdout).trim() || 'mount did not appear'}`);
  }
  const stem = path.basename(req.image).replace(/\.[^.]*$/, '');
  const file = path.join(mp, `${stem}.dd`);
  const m: Mounted = { system: 'xmount', file, mountpoint: mp, pid: xmountPid(mp), mountSeconds };
  live.set(mp, m);
  return m;
}

/** The xmount process serving `mountpoint`: the one whose last argument it is. */
function xmountPid(mountpoint: string): number {
  for (const d of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(d)) continue;
    try {
      const argv = fs.readFileSync(`/proc/${d}/cmdline`, 'utf8').split('\0').filter(Boolean);
      if (path.basename(argv[0] ?? '') === 'xmount' && argv[argv.length - 1] === mountpoint) return Number(d);
    } catch {
      /* exited */
    }
  }
  return 0;
}

export function mountWith(system: System, req: MountRequest): Promise<Mounted> {
  switch (system) {
    case 'tsmount':
      return mountTsmount(req);
    case 'qsd':
      return mountQsd(req);
    case 'xmount':
      return mountXmount(req);
    case 'ceiling':
      return mountCeiling(req);
    case 'dd':
      throw new Error('dd writes a host file itself: nothing is mounted');
  }
}

/** Peak resident set of a process, in bytes (VmHWM). */
export function peakRss(pid: number): number | undefined {
  try {
    const m = /VmHWM:\s+(\d+) kB/.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'));
    return m ? Number(m[1]) * 1024 : undefined;
  } catch {
    return undefined;
  }
}

/** Gracefully unmount and wait until the server has exited; force it if that fails. */
export async function unmount(m: Mounted): Promise<void> {
  try {
    if (m.system === 'tsmount') {
      if (mountedPid(m.mountpoint) !== undefined) {
        const r = await run(process.execPath, [TSMOUNT, '-u', m.mountpoint], { timeoutMs: 60_000 });
        if (r.code !== 0) forceUnmount(m.mountpoint);
      }
      if (m.pid > 0) await waitUntil(() => !isAlive(m.pid), 10_000, 10);
    } else if (m.system === 'qsd' || m.system === 'ceiling') {
      if (m.pid > 0 && isAlive(m.pid)) process.kill(m.pid, 'SIGTERM');
      await waitUntil(() => m.pid <= 0 || !isAlive(m.pid), 10_000, 10);
      if (fuseMounted(m.mountpoint)) execFileSync('umount', ['-l', m.mountpoint], { stdio: 'ignore' });
    } else {
      if (fuseMounted(m.mountpoint)) await run('fusermount', ['-u', m.mountpoint], { timeoutMs: 30_000 });
      await waitUntil(() => m.pid <= 0 || !isAlive(m.pid), 10_000, 10);
    }
  } finally {
    forceCleanup(m);
    live.delete(path.resolve(m.mountpoint));
  }
}

/** Synchronous last resort: lazy unmount and SIGKILL. */
function forceCleanup(m: Mounted): void {
  if (fuseMounted(m.mountpoint)) {
    try {
      execFileSync('umount', ['-l', m.mountpoint], { stdio: 'ignore' });
    } catch {
      /* gone */
    }
  }
  const pid = m.pid > 0 ? m.pid : m.system === 'xmount' ? xmountPid(m.mountpoint) : (mountedPid(m.mountpoint) ?? 0);
  if (pid > 0 && isAlive(pid)) {
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      /* gone */
    }
  }
}

/** Tear down every live mount; safe to call from 'exit' and signal handlers. */
export function cleanupAll(): void {
  for (const m of [...live.values()]) {
    forceCleanup(m);
    live.delete(path.resolve(m.mountpoint));
  }
}

export function liveMounts(): number {
  return live.size;
}

/** Mount, run fn, always unmount. */
export async function withMount<T>(system: System, req: MountRequest, fn: (m: Mounted) => Promise<T>): Promise<T> {
  const m = await mountWith(system, req);
  try {
    return await fn(m);
  } finally {
    await unmount(m);
  }
}
