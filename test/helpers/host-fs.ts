// Small host file systems and memory cgroups that tests make and always take down
// (issue 20, "Faults" and "Loop devices over the flat file").
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { run, runOk } from './qemu.js';

/** A file system on a loop device over a sparse file, mounted at `mountpoint`. */
export interface LoopFs {
  device: string;
  mountpoint: string;
  /** Unmount and detach; safe to call more than once, never throws. */
  remove(): void;
}

/** Whether this machine lets the tests attach loop devices and mount what is on them. */
export function canLoopMount(): boolean {
  return process.getuid?.() === 0 && fs.existsSync('/dev/loop-control');
}

function quiet(cmd: string, args: string[]): void {
  try {
    execFileSync(cmd, args, { stdio: 'ignore' });
  } catch {
    /* already gone */
  }
}

/** Attach `file` to a free loop device (losetup --find --show). */
export async function attachLoop(file: string): Promise<string> {
  return (await runOk('losetup', ['--find', '--show', file])).trim();
}

export function detachLoop(device: string): void {
  quiet('losetup', ['-d', device]);
}

/** mkfs.TYPE on a loop device over `backingFile` (made `bytes` long), mounted at `mountpoint`. */
export async function makeLoopFs(backingFile: string, bytes: number, mountpoint: string, type: 'ext4' | 'xfs' = 'ext4'): Promise<LoopFs> {
  fs.writeFileSync(backingFile, '');
  fs.truncateSync(backingFile, bytes);
  fs.mkdirSync(mountpoint, { recursive: true });
  const device = await attachLoop(backingFile);
  const remove = (): void => {
    quiet('umount', [mountpoint]);
    if (fs.readFileSync('/proc/mounts', 'utf8').includes(` ${mountpoint} `)) quiet('umount', ['-l', mountpoint]);
    detachLoop(device);
  };
  try {
    await runOk(type === 'ext4' ? 'mkfs.ext4' : 'mkfs.xfs', type === 'ext4' ? ['-q', '-F', device] : ['-q', '-f', device]);
    await runOk('mount', [device, mountpoint]);
  } catch (err) {
    remove();
    throw err;
  }
  return { device, mountpoint, remove };
}

/** Fill the file system holding `dir` with one file (`name`) until writes fail with ENOSPC. */
export async function fillUp(dir: string, name = 'filler'): Promise<string> {
  const file = path.join(dir, name);
  await run('dd', ['if=/dev/zero', `of=${file}`, 'bs=1M', 'status=none']);
  // The last blocks: whatever dd's megabyte writes left.
  await run('dd', ['if=/dev/zero', `of=${file}`, 'bs=4k', 'oflag=append', 'conv=notrunc', 'status=none']);
  await run('sync', []);
  return file;
}

/** A memory cgroup with a hard limit, v2 or v1 (whichever the machine mounts). */
export interface MemoryCgroup {
  /** sh -c SCRIPT, run inside the cgroup. */
  argv(script: string): string[];
  /** Write a pid here to move that process in. */
  procsFile: string;
  /** Times the limit was hit (reclaim forced): v1 memory.failcnt, v2 memory.events max. */
  limitHits(): number;
  /** Processes the kernel killed for want of memory in it. */
  oomKills(): number;
  remove(): void;
}

/** A memory cgroup of `limit` bytes, or undefined where the machine has no memory controller for us. */
export function memoryCgroup(name: string, limit: number): MemoryCgroup | undefined {
  const v2root = '/sys/fs/cgroup';
  const v1root = '/sys/fs/cgroup/memory';
  let dir: string;
  let limitFile: string;
  let events: string;
  try {
    if (fs.existsSync(path.join(v2root, 'cgroup.controllers')) && fs.readFileSync(path.join(v2root, 'cgroup.controllers'), 'utf8').includes('memory')) {
      dir = path.join(v2root, name);
      fs.mkdirSync(dir);
      limitFile = 'memory.max';
      events = 'memory.events';
    } else if (fs.existsSync(path.join(v1root, 'memory.limit_in_bytes'))) {
      dir = path.join(v1root, name);
      fs.mkdirSync(dir);
      limitFile = 'memory.limit_in_bytes';
      events = 'memory.oom_control';
    } else {
      return undefined;
    }
    fs.writeFileSync(path.join(dir, limitFile), String(limit));
  } catch {
    return undefined;
  }
  const procs = path.join(dir, 'cgroup.procs');
  return {
    argv: (script: string) => ['sh', '-c', `echo $$ > ${procs} && ${script}`],
    procsFile: procs,
    limitHits: () =>
      limitFile === 'memory.max'
        ? Number(/^max (\d+)/m.exec(fs.readFileSync(path.join(dir, events), 'utf8'))?.[1] ?? 0)
        : Number(fs.readFileSync(path.join(dir, 'memory.failcnt'), 'utf8')),
    oomKills: () => Number(/oom_kill (\d+)/.exec(fs.readFileSync(path.join(dir, events), 'utf8'))?.[1] ?? 0),
    remove: () => {
      // Anything left in it goes back to the root group first; rmdir then succeeds.
      try {
        const parent = path.join(path.dirname(dir), 'cgroup.procs');
        for (const pid of fs.readFileSync(procs, 'utf8').split('\n').filter(Boolean)) {
          try {
            fs.writeFileSync(parent, pid);
          } catch {
            /* gone */
          }
        }
        fs.rmdirSync(dir);
      } catch {
        /* already gone */
      }
    },
  };
}
