// Finding tsmount's mounts: the kernel's table (/proc/self/mountinfo, type
// fuse.tsmount) says what is mounted where; a small registry says which server serves
// it. Each server writes a state file (pid, mountpoint, images, rw) in a runtime dir of
// its user, named after the mount's device number ("0:NN"), and removes it at exit.
// The mount's source names the image (tsmount#/path/disk.qcow2), as FUSE file systems
// do, so the pid is no longer in it. A state file counts only while its mount has that
// device number at that mountpoint and its server lives: a stale one never matches.
import fs from 'node:fs';
import path from 'node:path';

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

export interface MountState {
  pid: number;
  mountpoint: string;
  images: string[];
  rw: boolean;
  /** Files, chains and counters for tsmount --list (fs/status.ts). */
  details?: import('./status.js').MountDetails;
}

export interface TsmountMount {
  mountpoint: string;
  /** The mount's device number as mountinfo gives it ("0:NN"). */
  dev: string;
  /** The mount's source (tsmount#IMAGE). */
  source: string;
  /** The serving process, 0 when no live state file names one. */
  pid: number;
  state?: MountState;
}

/**
 * `p` with symlinks resolved, as the kernel names a mount. A dead mount (its server
 * gone: ENOTCONN) cannot be resolved itself; its parent can. Throws ENOENT as fs does.
 */
export function realMountpoint(p: string): string {
  const abs = path.resolve(p);
  try {
    return fs.realpathSync(abs);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ENOENT' || code === 'ENOTDIR' || abs === '/') throw err;
    return path.join(fs.realpathSync(path.dirname(abs)), path.basename(abs));
  }
}

/** mountinfo escapes space, tab, newline and backslash as octal. */
function unescape(field: string): string {
  return field.replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8)));
}

/**
 * Where this user's state files live: /run/tsmount for root; otherwise
 * $XDG_RUNTIME_DIR/tsmount, or /tmp/tsmount-UID. Made 0700; a directory this user
 * does not own (someone else made it first in /tmp) is refused.
 */
export function runtimeDir(create: boolean): string | undefined {
  const uid = process.getuid?.() ?? 0;
  const xdg = process.env.XDG_RUNTIME_DIR;
  // Not $TMPDIR: the server and a later `tsmount -u` may see different ones.
  const dir = uid === 0 ? '/run/tsmount' : xdg && path.isAbsolute(xdg) ? path.join(xdg, 'tsmount') : `/tmp/tsmount-${uid}`;
  try {
    if (create) fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
    const st = fs.lstatSync(dir);
    if (!st.isDirectory() || st.uid !== uid || (st.mode & 0o022) !== 0) return undefined;
    return dir;
  } catch {
    return undefined;
  }
}

/**
 * The folders where the server of a mount made by `owner` (its user_id) may have left
 * its state file, as this process can trust them: our own runtime dir first; then the
 * owner's usual ones (/run/user/UID/tsmount, /tmp/tsmount-UID), which a mount made with
 * another XDG_RUNTIME_DIR, or by another user when we are root, uses. A folder counts
 * only if the owner owns it and nobody else may write it.
 */
export function stateDirsFor(owner: number): string[] {
  const me = process.getuid?.() ?? 0;
  const out: string[] = [];
  const own = runtimeDir(false);
  if (own && owner === me) out.push(own);
  if (owner !== me && me !== 0) return out;
  const usual = owner === 0 ? ['/run/tsmount'] : [`/run/user/${owner}/tsmount`, `/tmp/tsmount-${owner}`];
  for (const dir of usual) {
    if (out.includes(dir)) continue;
    try {
      const st = fs.lstatSync(dir);
      if (st.isDirectory() && st.uid === owner && (st.mode & 0o022) === 0) out.push(dir);
    } catch {
      /* none */
    }
  }
  return out;
}

/** The real uid of a process, from /proc (undefined when it is gone). */
function processUid(pid: number): number | undefined {
  try {
    const m = /^Uid:\s+(\d+)/m.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'));
    return m ? Number(m[1]) : undefined;
  } catch {
    return undefined;
  }
}

function stateFile(dir: string, dev: string): string {
  return path.join(dir, `${dev.replace(':', '_')}.json`);
}

/** Record this server's mount; returns the file to remove at exit, or undefined. */
export function writeState(dev: string, state: MountState): string | undefined {
  const dir = runtimeDir(true);
  if (!dir) return undefined;
  sweep(dir);
  return updateState(stateFile(dir, dev), state);
}

/** Replace the state file `file` in one step (write beside it, rename); returns it, or undefined. */
function updateState(file: string, state: MountState): string | undefined {
  const tmp = `${file}.${process.pid}.tmp`;
  try {
    fs.writeFileSync(tmp, JSON.stringify(state), { mode: 0o600 });
    fs.renameSync(tmp, file);
    return file;
  } catch {
    fs.rmSync(tmp, { force: true });
    return undefined;
  }
}

/**
 * updateState off the JS thread (the counters, every second): the directory may be on
 * a journalled disk (/run is ext4 on these machines, not tmpfs), where a rename that
 * replaces a file waits for the journal: 161 ms once while dd wrote through the mount
 * with fsync, the JS thread serving nothing meanwhile. `stopped` is asked before the
 * rename: a server on its way out does not put its file back after removing it.
 */
export async function updateStateAsync(file: string, state: MountState, stopped: () => boolean): Promise<void> {
  const tmp = `${file}.${process.pid}.tmp`;
  try {
    await fs.promises.writeFile(tmp, JSON.stringify(state), { mode: 0o600 });
    if (stopped()) throw new Error('stopped');
    await fs.promises.rename(tmp, file);
  } catch {
    await fs.promises.rm(tmp, { force: true }).catch(() => undefined);
  }
}

/** Remove state files whose server died without removing its own (SIGKILL, a crash). */
function sweep(dir: string): void {
  let names: string[] = [];
  try {
    names = fs.readdirSync(dir).filter((n) => /^\d+_\d+\.json$/.test(n));
  } catch {
    return;
  }
  for (const n of names) {
    try {
      const s = JSON.parse(fs.readFileSync(path.join(dir, n), 'utf8')) as Partial<MountState>;
      if (typeof s.pid === 'number' && serverAlive(s.pid)) continue;
    } catch {
      /* unreadable: stale too */
    }
    fs.rmSync(path.join(dir, n), { force: true });
  }
}

/** The state of the mount of `dev` at `mountpoint`, made by `owner`, from wherever its server left it. */
export function stateOf(owner: number, dev: string, mountpoint: string): MountState | undefined {
  for (const dir of stateDirsFor(owner)) {
    const state = readStateIn(dir, owner, dev, mountpoint);
    if (state) return state;
  }
  return undefined;
}

function readStateIn(dir: string, owner: number, dev: string, mountpoint: string): MountState | undefined {
  try {
    const s = JSON.parse(fs.readFileSync(stateFile(dir, dev), 'utf8')) as Partial<MountState>;
    if (typeof s.pid !== 'number' || !Number.isSafeInteger(s.pid) || s.pid <= 0 || s.mountpoint !== mountpoint || !serverAlive(s.pid)) return undefined;
    // -u signals this pid: a file another user wrote may only name that user's own
    // process (what they could signal themselves), never one of root's.
    if (owner !== (process.getuid?.() ?? 0) && processUid(s.pid) !== owner) return undefined;
    // details is our own server's, in a folder only this user can write: shown as it is
    // (another user's counters are not shown to root).
    const details = typeof s.details === 'object' && s.details !== null && owner === (process.getuid?.() ?? 0) ? s.details : undefined;
    return { pid: s.pid, mountpoint: s.mountpoint, images: Array.isArray(s.images) ? s.images.map(String) : [], rw: !!s.rw, ...(details ? { details } : {}) };
  } catch {
    return undefined;
  }
}

interface MountInfoEntry {
  dev: string;
  mountpoint: string;
  fstype: string;
  source: string;
  /** user_id= of a FUSE mount: who mounted it. */
  owner: number;
}

function mountInfo(): MountInfoEntry[] {
  let text: string;
  try {
    text = fs.readFileSync('/proc/self/mountinfo', 'utf8');
  } catch {
    return [];
  }
  const out: MountInfoEntry[] = [];
  for (const line of text.split('\n')) {
    // ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPEROPTS
    const sep = line.indexOf(' - ');
    if (sep < 0) continue;
    const pre = line.slice(0, sep).split(' ');
    const [fstype, source, superOpts] = line.slice(sep + 3).split(' ');
    if (!pre[2] || !pre[4] || !fstype) continue;
    const owner = /(?:^|,)user_id=(\d+)(?:,|$)/.exec(superOpts ?? '');
    out.push({ dev: pre[2], mountpoint: unescape(pre[4]), fstype, source: unescape(source ?? ''), owner: owner ? Number(owner[1]) : 0 });
  }
  return out;
}

/** Every tsmount mount this process can see, the topmost last for stacked mountpoints. */
export function listMounts(): TsmountMount[] {
  return mountInfo()
    .filter((e) => e.fstype === 'fuse.tsmount')
    .map((e) => {
      const state = stateOf(e.owner, e.dev, e.mountpoint);
      return { mountpoint: e.mountpoint, dev: e.dev, source: e.source, pid: state?.pid ?? 0, state };
    });
}

/**
 * The tsmount mount at `mountpoint` (an absolute path, symlinks resolved), served by
 * `pid` if given; the topmost one when several are stacked.
 */
export function findMount(mountpoint: string, pid?: number): TsmountMount | undefined {
  return listMounts()
    .filter((m) => m.mountpoint === mountpoint && (pid === undefined || m.pid === pid))
    .pop();
}

/** The device number of the tsmount mount at `mountpoint`, whoever serves it. */
export function mountDevice(mountpoint: string): string | undefined {
  return mountInfo()
    .filter((e) => e.fstype === 'fuse.tsmount' && e.mountpoint === mountpoint)
    .pop()?.dev;
}

/** Whether the mount with device number `dev` is still at `mountpoint`. */
export function stillMounted(mountpoint: string, dev: string): boolean {
  return mountInfo().some((e) => e.dev === dev && e.mountpoint === mountpoint);
}

/** An image as messages and the registry show it: a local one absolute, a URI without its password. */
export function shownImage(spec: string): string {
  const local = spec.startsWith('file:') || !/^[a-z][a-z0-9+.-]*:/i.test(spec);
  if (local) return path.resolve(spec.replace(/^file:/, ''));
  return spec.replace(/^([a-z][a-z0-9+.-]*:\/\/[^/@:]*):[^/@]*@/i, '$1@').replace(/([?&;]password=)[^&;]*/gi, '$1');
}

/** The mount's source: `tsmount#` and the first image (the rest are in the registry). */
export function mountSource(images: string[]): string {
  // A newline would break /proc/self/mounts' lines for every reader.
  return `tsmount#${shownImage(images[0] ?? '').replace(/[\n\0]/g, '?')}`;
}
