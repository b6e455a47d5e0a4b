// Finding and ending tsmount mounts from outside: the tests and the benchmarks both need it.
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { findMount, realMountpoint, serverAlive } from '../../fs/mounts.js';

export const TSMOUNT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../mount-helpers/tsmount.js');

/**
 * The serving pid of a tsmount mount (0 when its state file is missing), or undefined
 * when nothing is mounted there: the product's own lookup (fs/mounts.ts).
 */
export function mountedPid(mountpoint: string): number | undefined {
  let mp: string;
  try {
    mp = realMountpoint(mountpoint);
  } catch {
    return undefined;
  }
  return findMount(mp)?.pid;
}

/** The product's own liveness check: a zombie server counts as gone. */
export const isAlive = serverAlive;

/** Forcefully end a mount: lazy unmount and kill its server. For cleanup only. */
export function forceUnmount(mountpoint: string): void {
  const pid = mountedPid(mountpoint);
  if (pid === undefined) return;
  try {
    execFileSync('umount', ['-l', path.resolve(mountpoint)], { stdio: 'ignore' });
  } catch {
    /* gone */
  }
  if (pid > 0 && isAlive(pid)) {
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      /* gone */
    }
  }
}
