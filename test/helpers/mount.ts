// Running tsmount as a user would, and never leaving a mount behind.
import { spawn, type ChildProcess } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { run, type RunResult } from './qemu.js';
import { forceUnmount, isAlive, mountedPid, TSMOUNT } from '../../scripts/lib/mounts.js';
import type { ListedMount } from '../../mount-helpers/list.js';

export { forceUnmount, isAlive, mountedPid, TSMOUNT } from '../../scripts/lib/mounts.js';

export function tsmount(args: string[], opts: { cwd?: string; timeoutMs?: number } = {}): Promise<RunResult> {
  return run(process.execPath, [TSMOUNT, ...args], { cwd: opts.cwd, timeoutMs: opts.timeoutMs ?? 120_000 });
}

export async function waitFor(cond: () => boolean, timeoutMs: number, what: string): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** Every tracker a test file made: one exit hook for all (one each passed Node's listener limit at 11 files). */
const trackers = new Set<MountTracker>();
process.once('exit', () => {
  for (const t of trackers) t.atExit();
});

/**
 * Tracks the mounts a test file makes; `cleanup()` (in an afterEach) unmounts what a
 * failed test left, gracefully first. A process exit hook catches the rest.
 */
export class MountTracker {
  private readonly mountpoints = new Set<string>();
  private readonly children = new Set<ChildProcess>();

  constructor() {
    trackers.add(this);
  }

  /** At process exit: what no cleanup() reached. */
  atExit(): void {
    for (const mp of this.mountpoints) forceUnmount(mp);
    for (const c of this.children) c.kill('SIGKILL');
  }

  /** tsmount ARGS...; the last argument is the mountpoint. Throws if it fails. */
  async mount(args: string[], opts: { cwd?: string } = {}): Promise<string> {
    const mp = path.resolve(opts.cwd ?? '.', args[args.length - 1]!);
    this.mountpoints.add(mp);
    const r = await tsmount(args, opts);
    if (r.code !== 0) throw new Error(`tsmount ${args.join(' ')} failed (${r.code}): ${r.stderr.trim()}`);
    return mp;
  }

  /** Register a mountpoint made some other way (foreground, qemu-storage-daemon...). */
  track(mountpoint: string): void {
    this.mountpoints.add(path.resolve(mountpoint));
  }

  trackChild(child: ChildProcess): void {
    this.children.add(child);
    child.on('exit', () => this.children.delete(child));
  }

  /** tsmount -u; throws if it fails. */
  async unmount(mountpoint: string): Promise<void> {
    const r = await tsmount(['-u', mountpoint]);
    if (r.code !== 0) throw new Error(`tsmount -u ${mountpoint} failed: ${r.stderr.trim()}`);
    this.mountpoints.delete(path.resolve(mountpoint));
  }

  /** Start tsmount --foreground ARGS and wait for the mount to appear. */
  async foreground(args: string[]): Promise<ChildProcess> {
    const mp = path.resolve(args[args.length - 1]!);
    this.mountpoints.add(mp);
    const child = spawn(process.execPath, [TSMOUNT, '--foreground', ...args], { stdio: ['ignore', 'ignore', 'pipe'] });
    this.trackChild(child);
    let stderr = '';
    child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
    await waitFor(() => mountedPid(mp) !== undefined || child.exitCode !== null, 30_000, `mount at ${mp}`);
    if (mountedPid(mp) === undefined) throw new Error(`tsmount --foreground exited: ${stderr.trim()}`);
    return child;
  }

  async cleanup(): Promise<void> {
    for (const mp of [...this.mountpoints]) {
      if (mountedPid(mp) !== undefined) {
        const r = await tsmount(['-u', mp], { timeoutMs: 30_000 });
        if (r.code !== 0) forceUnmount(mp);
      }
      this.mountpoints.delete(mp);
    }
    for (const c of [...this.children]) c.kill('SIGKILL');
  }
}

/** A mountpoint folder `name` in `dir`, made if missing. */
export function mountpointIn(dir: string, name: string): string {
  const p = path.join(dir, name);
  fs.mkdirSync(p, { recursive: true });
  return p;
}

/** Where the test fixtures live; kept between runs so that they are made once. */
export const FIXTURE_DIR = process.env.TSMOUNT_FIXTURES ?? '/tmp/tsmount-fixtures';

/** FUSE mount points under `prefix`, from /proc/mounts (to show none is left behind). */
export function fuseMountsUnder(prefix: string): string[] {
  return fs
    .readFileSync('/proc/mounts', 'utf8')
    .split('\n')
    .map((l) => l.split(' '))
    .filter((f) => f.length > 2 && /^fuse(\.|$)/.test(f[2] ?? '') && (f[1] ?? '').startsWith(prefix))
    .map((f) => (f[1] ?? '').replace(/\\040/g, ' '));
}

/** The detached server's entry (mount-helpers/tsmount-server.cts). */
const TSMOUNT_SERVER = path.join(path.dirname(TSMOUNT), 'tsmount-server.cjs');

/** Live tsmount processes (commands and servers) whose command line mentions `tag` (a test's temp dir). */
export function tsmountProcesses(tag: string): number[] {
  const out: number[] = [];
  for (const entry of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(entry) || Number(entry) === process.pid) continue;
    let cmdline: string;
    try {
      cmdline = fs.readFileSync(`/proc/${entry}/cmdline`, 'utf8');
    } catch {
      continue;
    }
    if ((cmdline.includes(TSMOUNT) || cmdline.includes(TSMOUNT_SERVER)) && cmdline.includes(tag) && isAlive(Number(entry))) out.push(Number(entry));
  }
  return out;
}

/** md5 of [skip*bs, (skip+count)*bs) of a plain file (not one on a mount this process serves), clipped at its end. */
export async function pieceMd5(file: string, bs: number, skip: number, count: number): Promise<string> {
  const h = crypto.createHash('md5');
  const end = Math.min(fs.statSync(file).size, (skip + count) * bs) - 1;
  const stream = fs.createReadStream(file, { start: skip * bs, end, highWaterMark: 1 << 20 });
  for await (const chunk of stream) h.update(chunk as Buffer);
  return h.digest('hex');
}

/** The counters `tsmount --list --output json` shows for the mount at `mp` (published once a second: poll). */
export async function mountCounters(mp: string): Promise<NonNullable<ListedMount['counters']>> {
  const r = await tsmount(['--list', '--output', 'json']);
  if (r.code !== 0) throw new Error(`tsmount --list: ${r.stderr.trim()}`);
  const m = (JSON.parse(r.stdout) as ListedMount[]).find((x) => x.mountpoint === mp);
  if (!m?.counters) throw new Error(`tsmount --list shows no counters for ${mp}`);
  return m.counters;
}
