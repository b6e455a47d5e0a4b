// tsmount -u: unmount, then wait until the server has written everything and exited.
import fs from 'node:fs';
import { UsageError, IoError, TsmountError, messageOf } from '../drivers/errors.js';
import { findMount, realMountpoint, serverAlive } from '../fs/mounts.js';

const EBUSY = 16;

export interface UnmountOptions {
  /** Detach now (umount -l); the server exits once the last user has closed. */
  lazy?: boolean;
  timeoutMs?: number;
}

/** Returns what to tell the user, if anything (lazy: that the server goes on). */
export async function unmount(mountpoint: string, opts: UnmountOptions = {}): Promise<string | undefined> {
  const timeoutMs = opts.timeoutMs ?? 300_000;
  let mp: string;
  try {
    // The kernel names the mount by its real path: resolve symlinks as the mount did.
    mp = realMountpoint(mountpoint);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    throw new UsageError(`${mountpoint}: ${code === 'ENOENT' ? 'no such file or directory' : messageOf(err)}`);
  }
  const m = findMount(mp);
  if (!m) throw new UsageError(`${mountpoint}: not a tsmount mount`);
  // koffi loads here, not when tsmount starts a mount (it would cost every mount ~12 ms).
  const { unmountFuse } = await import('../fs/fuse.js');
  try {
    unmountFuse(mp, !!opts.lazy);
  } catch (err) {
    if (err instanceof TsmountError && err.errno === EBUSY) {
      const who = holders(mp);
      throw new IoError(`${mountpoint}: busy${who.length ? `: ${who.join('; ')}` : ' (a file on it is still open)'}; close them, or detach it now with tsmount -u --lazy`, EBUSY);
    }
    throw new IoError(`${mountpoint}: unmount failed: ${messageOf(err)}`);
  }
  if (m.pid <= 0) return undefined;
  if (opts.lazy) {
    // Users may go on reading for hours: the server stays until they close.
    return `${mountpoint}: detached; the server (pid ${m.pid}) exits once the last file on it is closed`;
  }
  // The server notices the unmount by itself; the signal only saves it the wait.
  try {
    process.kill(m.pid, 'SIGTERM');
  } catch {
    /* already gone */
  }
  const deadline = Date.now() + timeoutMs;
  while (serverAlive(m.pid)) {
    if (Date.now() > deadline) throw new IoError(`${mountpoint}: unmounted, but the server (pid ${m.pid}) is still writing after ${timeoutMs / 1000} s`);
    await new Promise((r) => setTimeout(r, 20));
  }
  return undefined;
}

function under(p: string, mp: string): boolean {
  return p === mp || p.startsWith(mp.endsWith('/') ? mp : `${mp}/`);
}

function readOr(file: string): string | undefined {
  try {
    return fs.readFileSync(file, 'utf8');
  } catch {
    return undefined;
  }
}

/**
 * What keeps the mount busy: loop devices backed by a file on it
 * (/sys/block/loop*\/loop/backing_file) and processes with a file on it open, or
 * their working directory in it (/proc/PID/fd, /proc/PID/cwd). Best effort: another
 * user's processes are visible to root only.
 */
export function holders(mp: string): string[] {
  const out: string[] = [];
  let blocks: string[] = [];
  try {
    blocks = fs.readdirSync('/sys/block').filter((b) => /^loop\d+$/.test(b));
  } catch {
    /* no sysfs */
  }
  for (const b of blocks) {
    const backing = readOr(`/sys/block/${b}/loop/backing_file`)?.trim();
    if (backing && under(backing.replace(/ \(deleted\)$/, ''), mp)) out.push(`/dev/${b} uses ${backing}`);
  }
  let pids: string[] = [];
  try {
    pids = fs.readdirSync('/proc').filter((p) => /^\d+$/.test(p) && Number(p) !== process.pid);
  } catch {
    /* no procfs */
  }
  for (const pid of pids) {
    const files = new Set<string>();
    let fds: string[] = [];
    try {
      fds = fs.readdirSync(`/proc/${pid}/fd`);
    } catch {
      continue;
    }
    for (const fd of fds) {
      try {
        const target = fs.readlinkSync(`/proc/${pid}/fd/${fd}`);
        if (under(target, mp)) files.add(target);
      } catch {
        /* closed meanwhile */
      }
    }
    let cwd: string | undefined;
    try {
      cwd = fs.readlinkSync(`/proc/${pid}/cwd`);
    } catch {
      /* gone, or not ours to see */
    }
    const inside = cwd !== undefined && under(cwd, mp);
    if (files.size === 0 && !inside) continue;
    const comm = readOr(`/proc/${pid}/comm`)?.trim() ?? '?';
    const what = [...(files.size ? [`has ${[...files].join(', ')} open`] : []), ...(inside ? [`works in ${cwd}`] : [])];
    out.push(`process ${pid} (${comm}) ${what.join(' and ')}`);
  }
  return out;
}
