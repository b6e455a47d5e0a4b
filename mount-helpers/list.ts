// tsmount --list: the tsmount mounts this user can see, from the kernel's mount table
// and each server's state file (fs/mounts.ts).
import { listMounts } from '../fs/mounts.js';

export async function listCommand(json: boolean): Promise<string> {
  const mounts = listMounts().map((m) => ({
    mountpoint: m.mountpoint,
    source: m.source,
    pid: m.pid,
    images: m.state?.images ?? [],
    readOnly: m.state ? !m.state.rw : undefined,
  }));
  if (json) return `${JSON.stringify(mounts, null, 2)}\n`;
  return mounts.map((m) => `${m.mountpoint}: ${m.images.join(' ') || m.source}, ${m.readOnly === false ? 'read-write' : 'read-only'}, pid ${m.pid || '?'}\n`).join('');
}
