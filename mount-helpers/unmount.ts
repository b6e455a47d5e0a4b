// tsmount -u: unmount, then wait until the server has written everything and exited.
import { spawnSync } from 'node:child_process';
import path from 'node:path';
import { UsageError, IoError } from '../drivers/errors.js';
import { findMount, serverAlive } from '../fs/mounts.js';

const EBUSY = 16;
const EPERM = 1;

function fusermount(mp: string): boolean {
  for (const helper of ['fusermount', 'fusermount3']) {
    const r = spawnSync(helper, ['-u', mp], { stdio: ['ignore', 'ignore', 'pipe'] });
    if (r.status === 0) return true;
    if (r.error === undefined && /busy/i.test(String(r.stderr))) throw new IoError(`${mp}: busy (a file on it is still open)`, EBUSY);
  }
  return false;
}


export async function unmount(mountpoint: string, timeoutMs = 300_000): Promise<void> {
  const mp = path.resolve(mountpoint);
  const m = findMount(mp);
  if (!m) throw new UsageError(`${mountpoint}: not a tsmount mount`);
  // koffi loads here, not when tsmount starts a mount (it would cost every mount ~12 ms).
  const { umount2, SysError } = await import('../drivers/protocol/sys.js');
  try {
    umount2(mp, 0);
  } catch (err) {
    if (err instanceof SysError && err.errno === EBUSY) throw new IoError(`${mountpoint}: busy (a file on it is still open)`, EBUSY);
    // Not root: the setuid helper may unmount what this user mounted. Only this
    // process spawns it, never the server (it would inherit /dev/fuse).
    if (!(err instanceof SysError && err.errno === EPERM) || !fusermount(mp)) {
      throw new IoError(`${mountpoint}: unmount failed: ${(err as Error).message}`);
    }
  }
  if (m.pid <= 0) return;
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
}
