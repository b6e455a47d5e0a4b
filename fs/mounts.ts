// Finding tsmount's mounts in /proc/mounts. The serving process's pid is in the
// mount's source ("tsmount:PID"), so `tsmount -u` needs no state files.
import fs from 'node:fs';

/**
 * Whether a server process still runs. A zombie has finished: the server is detached,
 * and whoever reaps it may be slow.
 */
export function serverAlive(pid: number): boolean {
  try {
    if (/\) Z /.test(fs.readFileSync(`/proc/${pid}/stat`, 'utf8'))) return false;
  } catch {
    return false;
  }
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

export interface TsmountMount {
  mountpoint: string;
  pid: number;
}

/** /proc/mounts escapes space, tab, newline and backslash as octal. */
function unescape(field: string): string {
  return field.replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8)));
}

export function listMounts(): TsmountMount[] {
  let text: string;
  try {
    text = fs.readFileSync('/proc/self/mounts', 'utf8');
  } catch {
    return [];
  }
  const out: TsmountMount[] = [];
  for (const line of text.split('\n')) {
    const [source, target, type] = line.split(' ');
    if (type !== 'fuse.tsmount' || !source || !target) continue;
    const m = /^tsmount:(\d+)$/.exec(source);
    out.push({ mountpoint: unescape(target), pid: m ? Number(m[1]) : 0 });
  }
  return out;
}

/** The tsmount mount at `mountpoint` (an absolute path), served by `pid` if given. */
export function findMount(mountpoint: string, pid?: number): TsmountMount | undefined {
  return listMounts().find((m) => m.mountpoint === mountpoint && (pid === undefined || m.pid === pid));
}
