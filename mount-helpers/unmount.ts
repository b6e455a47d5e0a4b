// tsmount -u: unmount, then wait until the server has written everything and exited.
import path from 'node:path';
import { UsageError, IoError, TsmountError, messageOf } from '../drivers/errors.js';
import { findMount, serverAlive } from '../fs/mounts.js';

const EBUSY = 16;

export async function unmount(mountpoint: string, timeoutMs = 300_000): Promise<void> {
  const mp = path.resolve(mountpoint);
  const m = findMount(mp);
  if (!m) throw new UsageError(`${mountpoint}: not a tsmount mount`);
  // koffi loads here, not when tsmount starts a mount (it would cost every mount ~12 ms).
  const { unmountFuse } = await import('../fs/fuse.js');
  try {
    unmountFuse(mp, false);
  } catch (err) {
    if (err instanceof TsmountError && err.errno === EBUSY) throw new IoError(`${mountpoint}: busy (a file on it is still open)`, EBUSY);
    throw new IoError(`${mountpoint}: unmount failed: ${messageOf(err)}`);
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
