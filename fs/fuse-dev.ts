// Mounting a /dev/fuse session: the `-o` options, mount(2) as root, fusermount3
// otherwise (it mounts and passes the descriptor back). The session itself (the event
// loop, the buffers, the operations) is fuse-session.ts; the wire format fuse-codec.ts.
//
// Why not libfuse 2 (fuse-native): it caps requests at 128 KiB, and every request
// crossed threads four times (libfuse worker -> JS thread -> thread pool -> JS thread
// -> libfuse worker). Here /dev/fuse is read in Node's own event loop, and we
// negotiate FUSE_MAX_PAGES, so a 1 MiB read(2) or write(2) is one request.
import fs from 'node:fs';
import { spawn } from 'node:child_process';
import { constants as osc } from 'node:os';
import { ErrnoError, messageOf } from '../drivers/errors.js';
import { mount as sysMount, receiveFd, socketPair, MS_DIRSYNC, MS_NOATIME, MS_NODEV, MS_NOEXEC, MS_NOSUID, MS_RDONLY, MS_SYNCHRONOUS } from '../drivers/util/sys.js';
import { fusermountHelper, unmountFuse, type FsOps, type FuseMount, type MountOptions } from './fuse.js';
import { DEFAULT_MAX_WRITE, PAGE, Session, pipeWrap, type SessionConfig } from './fuse-session.js';

export { DEFAULT_MAX_WRITE };

const E = osc.errno;

/** What `-o` options and the server's own choices come to for this backend. */
interface DevConfig extends SessionConfig {
  flags: number;
  kernelOptions: string[];
  /** The kernel's max_read mount option: the largest READ it sends. */
  maxRead: number;
}

/** Options libfuse users know; each maps to a kernel option, a flag, or our own setting. */
function configure(opts: MountOptions): DevConfig {
  const cfg: DevConfig = {
    flags: MS_NOSUID | MS_NODEV | (opts.readOnly ? MS_RDONLY : 0),
    kernelOptions: ['default_permissions', ...(opts.allowOther || opts.allowRoot ? ['allow_other'] : [])],
    maxWrite: DEFAULT_MAX_WRITE,
    maxReadahead: DEFAULT_MAX_WRITE,
    maxRead: DEFAULT_MAX_READ,
    pageCache: 'auto',
    passthrough: 'auto',
    denyOthers: !opts.allowOther && !!opts.allowRoot,
  };
  const flagOpts: Record<string, number> = { ro: MS_RDONLY, noexec: MS_NOEXEC, sync: MS_SYNCHRONOUS, dirsync: MS_DIRSYNC, noatime: MS_NOATIME };
  const clearOpts: Record<string, number> = { rw: MS_RDONLY, exec: MS_NOEXEC, atime: MS_NOATIME };
  const size = (o: string, v: string | undefined, min: number, max: number): number => {
    const n = Number(v);
    if (v === undefined || !/^\d+$/.test(v) || n < min || n > max) throw new ErrnoError(`-o ${o}: needs a number from ${min} to ${max}`, E.EINVAL);
    return n;
  };
  for (const opt of opts.extra) {
    for (const o of opt.split(',').filter(Boolean)) {
      const [key, value] = o.split('=', 2) as [string, string | undefined];
      if (key in flagOpts) cfg.flags |= flagOpts[key]!;
      else if (key in clearOpts) cfg.flags &= ~clearOpts[key]!;
      else if (key === 'allow_other' || key === 'default_permissions') {
        if (!cfg.kernelOptions.includes(key)) cfg.kernelOptions.push(key);
      } else if (key === 'max_read') cfg.maxRead = size(key, value, PAGE, 1 << 30);
      else if (key === 'max_write') cfg.maxWrite = size(key, value, PAGE, DEFAULT_MAX_WRITE);
      else if (key === 'max_readahead') cfg.maxReadahead = size(key, value, 0, 1 << 30);
      else if (key === 'kernel_cache') cfg.pageCache = 'kernel';
      else if (key === 'direct_io') cfg.pageCache = 'direct';
      else if (key === 'passthrough') cfg.passthrough = 'on';
      else if (key === 'nopassthrough') cfg.passthrough = 'off';
      // libfuse 2 options that are how this backend always works, or mean nothing here.
      else if (['big_writes', 'async_read', 'nonempty', 'auto_cache', 'hard_remove', 'use_ino'].includes(key)) continue;
      else throw new ErrnoError(`-o ${o}: not a mount option tsmount knows`, E.EINVAL);
    }
  }
  cfg.kernelOptions.push(`max_read=${cfg.maxRead}`);
  return cfg;
}

/**
 * READs of at most 1020 KiB by default: header and data then fill one 1 MiB pipe (256
 * pages), the most /proc/sys/fs/pipe-max-size gives without CAP_SYS_RESOURCE, so a
 * worker splices every readahead request (fuse-worker.ts Splicer); a 1 MiB READ needs a
 * 2 MiB pipe and was read into a buffer instead. 1 GiB read through the page cache:
 * qcow2 +13 %, vmdk +18 % (3 rounds, scripts/BENCHMARKS.md "Session 7"); the kernel's
 * readahead window is cut to match (fs/server.ts). Writes keep 1 MiB requests.
 */
export const DEFAULT_MAX_READ = DEFAULT_MAX_WRITE - PAGE;

/** Whether this backend can serve here: root (mount(2)), /dev/fuse, Node's pipe binding. */
export function available(): boolean {
  try {
    if (typeof pipeWrap().Pipe !== 'function') return false;
    if (process.getuid?.() !== 0) return fusermountHelper() !== undefined;
    fs.accessSync('/dev/fuse', fs.constants.R_OK | fs.constants.W_OK);
    return true;
  } catch {
    return false;
  }
}

/**
 * Without root: fusermount3 opens /dev/fuse, mounts, and hands the descriptor back over
 * a Unix socket (its _FUSE_COMMFD protocol, as libfuse uses it). It adds fd, rootmode,
 * user_id and group_id itself, and always nosuid,nodev.
 */
async function mountWithFusermount(helper: string, mountpoint: string, fsname: string, cfg: DevConfig): Promise<number> {
  const names: [number, string][] = [[MS_RDONLY, 'ro'], [MS_NOEXEC, 'noexec'], [MS_SYNCHRONOUS, 'sync'], [MS_DIRSYNC, 'dirsync'], [MS_NOATIME, 'noatime']];
  // fusermount3 splits -o at commas and takes `\,` as a comma in a value.
  const options = [`fsname=${fsname.replace(/[\\,]/g, '\\$&')}`, 'subtype=tsmount', ...cfg.kernelOptions, ...names.filter(([f]) => cfg.flags & f).map(([, n]) => n)];
  const [mine, theirs] = socketPair();
  try {
    const child = spawn(helper, ['-o', options.join(','), '--', mountpoint], {
      stdio: ['ignore', 'ignore', 'pipe', theirs],
      env: { ...process.env, _FUSE_COMMFD: '3' },
    });
    let stderr = '';
    child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
    const code = await new Promise<number | null>((resolve, reject) => {
      child.on('error', reject);
      child.on('close', (c) => resolve(c));
    });
    const fd = receiveFd(mine);
    if (code !== 0 || fd === undefined) {
      if (fd !== undefined) fs.closeSync(fd);
      const why = stderr.trim().split('\n').pop()?.replace(/^fusermount3: /, '');
      throw new ErrnoError(`fusermount3 failed${why ? `: ${why}` : ''}`, E.EPERM);
    }
    return fd;
  } finally {
    fs.closeSync(mine);
    fs.closeSync(theirs);
  }
}

/** Mount `mountpoint` and serve it from this process's event loop. */
export async function mountDev(mountpoint: string, ops: FsOps, opts: MountOptions): Promise<FuseMount> {
  const cfg = configure(opts);
  const st = fs.statSync(mountpoint);
  let fd: number;
  let session: Session;
  // TSMOUNT_FUSE=fusermount takes the unprivileged path as root too (tests).
  const helper = process.getuid?.() === 0 && process.env.TSMOUNT_FUSE !== 'fusermount' ? undefined : fusermountHelper();
  if (helper) {
    try {
      fd = await mountWithFusermount(helper, mountpoint, opts.fsname, cfg);
    } catch (err) {
      throw new Error(`${mountpoint}: mount failed: ${messageOf(err)}`);
    }
  } else try {
    fd = fs.openSync('/dev/fuse', fs.constants.O_RDWR); // close-on-exec, as Node opens everything
    const data = [
      `fd=${fd}`,
      `rootmode=${(st.mode & 0o170000).toString(8)}`,
      `user_id=${process.getuid?.() ?? 0}`,
      `group_id=${process.getgid?.() ?? 0}`,
      ...cfg.kernelOptions,
    ].join(',');
    try {
      sysMount(opts.fsname, mountpoint, 'fuse.tsmount', cfg.flags, data);
    } catch (err) {
      fs.closeSync(fd);
      throw err;
    }
  } catch (err) {
    throw new Error(`${mountpoint}: mount failed: ${messageOf(err)}`);
  }
  const undo = (): void => {
    try {
      unmountFuse(mountpoint, true);
    } catch {
      /* gone already */
    }
  };
  try {
    session = new Session(mountpoint, fd, ops, cfg);
  } catch (err) {
    undo();
    fs.closeSync(fd);
    throw err;
  }
  let timer: NodeJS.Timeout | undefined;
  try {
    await Promise.race([
      session.initialized,
      new Promise((_, reject) => (timer = setTimeout(() => reject(new Error(`${mountpoint}: the kernel did not start the FUSE session`)), 10_000))),
    ]);
  } catch (err) {
    undo();
    session.close();
    throw err;
  } finally {
    clearTimeout(timer);
  }
  return session;
}

