// A glusterd on loopback for the gluster tests (shared/TESTING.md): bricks on
// 127.0.0.2 (glusterd refuses 127.0.0.1), volumes made with `force` in temp folders.
// Everything made here is undone by stop(), also after a failed test: the volumes
// stopped and deleted (which ends their brick processes), and glusterd itself when
// this helper started it.
import fs from 'node:fs';
import path from 'node:path';
import { run, runOk } from './qemu.js';
import { startServer, type RunningServer } from './servers.js';

export const GLUSTER_HOST = '127.0.0.2';
const SOCKET = '/var/run/glusterd.socket';

export function glusterAvailable(): string | undefined {
  if (!fs.existsSync('/usr/sbin/glusterd')) return 'glusterd is not installed (glusterfs-server)';
  if (!['/usr/lib/x86_64-linux-gnu/libgfapi.so.0', '/usr/lib/aarch64-linux-gnu/libgfapi.so.0'].some((p) => fs.existsSync(p))) return 'libgfapi0 is not installed';
  return undefined;
}

const gluster = (args: string[], timeoutMs = 60_000) => run('gluster', ['--mode=script', ...args], { timeoutMs });

export class Glusterd {
  private server: RunningServer | undefined;
  private readonly volumes: string[] = [];

  /** Use a glusterd that is already up, or start one (in the foreground, as our child). */
  async start(): Promise<void> {
    if ((await gluster(['volume', 'list'], 10_000)).code === 0) return;
    fs.rmSync(SOCKET, { force: true });
    this.server = await startServer('glusterd', ['-N'], { path: SOCKET });
    for (let i = 0; i < 50 && (await gluster(['volume', 'list'], 10_000)).code !== 0; i++) await new Promise((r) => setTimeout(r, 200));
  }

  /** A started volume of `replica` bricks in `dir` (single brick when 1). */
  async createVolume(name: string, dir: string, replica = 1): Promise<string[]> {
    const bricks = Array.from({ length: replica }, (_, i) => path.join(dir, `${name}-brick${i}`));
    const args = ['volume', 'create', name];
    if (replica > 1) args.push('replica', String(replica));
    args.push(...bricks.map((b) => `${GLUSTER_HOST}:${b}`), 'force');
    this.volumes.push(name);
    const c = await gluster(args);
    if (c.code !== 0) throw new Error(`gluster volume create ${name}: ${c.stderr.trim() || c.stdout.trim()}`);
    await runOk('gluster', ['--mode=script', 'volume', 'start', name], { timeoutMs: 60_000 });
    return bricks;
  }

  /** The pid of the brick process serving `brick` (from `volume status --xml`). */
  async brickPid(volume: string, brick: string): Promise<number> {
    const xml = await runOk('gluster', ['--mode=script', 'volume', 'status', volume, '--xml']);
    for (const node of xml.split('<node>').slice(1)) {
      if (node.includes(`<path>${brick}</path>`)) {
        const pid = Number(/<pid>(\d+)<\/pid>/.exec(node)?.[1]);
        if (pid > 0) return pid;
      }
    }
    throw new Error(`no brick process for ${brick} in: ${xml}`);
  }

  async stop(): Promise<void> {
    for (const v of this.volumes.splice(0)) {
      await gluster(['volume', 'stop', v, 'force']);
      await gluster(['volume', 'delete', v]);
    }
    if (this.server) {
      // The self-heal daemon of replicated volumes outlives glusterd: end it by its pidfile.
      const shd = '/var/run/gluster/shd/glustershd.pid';
      await this.server.stop();
      this.server = undefined;
      for (const f of [shd, ...listPidfiles('/var/run/gluster/shd')]) {
        const pid = readPid(f);
        // Only a gluster process of ours: a stale pidfile may name someone else by now.
        if (pid && commOf(pid) === 'glusterfs') {
          try {
            process.kill(pid, 'SIGKILL');
          } catch {
            // gone already
          }
        }
      }
    }
  }
}

function listPidfiles(dir: string): string[] {
  try {
    return fs.readdirSync(dir, { recursive: true }).map(String).filter((f) => f.endsWith('.pid')).map((f) => path.join(dir, f));
  } catch {
    return [];
  }
}

function readPid(file: string): number | undefined {
  try {
    const pid = Number(fs.readFileSync(file, 'utf8').trim());
    return pid > 1 ? pid : undefined;
  } catch {
    return undefined;
  }
}

function commOf(pid: number): string | undefined {
  try {
    return fs.readFileSync(`/proc/${pid}/comm`, 'utf8').trim();
  } catch {
    return undefined;
  }
}
