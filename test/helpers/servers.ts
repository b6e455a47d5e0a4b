// Real servers on loopback for the remote protocol tests (shared/TESTING.md): started
// by the tests, stopped in after hooks and on process exit.
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';

/** A port nobody listens on right now. */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const port = (s.address() as net.AddressInfo).port;
      s.close(() => resolve(port));
    });
  });
}

function canConnect(opts: { port: number } | { path: string }): Promise<boolean> {
  return new Promise((resolve) => {
    const s = 'path' in opts ? net.connect({ path: opts.path }) : net.connect({ host: '127.0.0.1', port: opts.port });
    s.once('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.once('error', () => resolve(false));
  });
}

export interface RunningServer {
  child: ChildProcess;
  output: () => string;
  stop(): Promise<void>;
}

const running = new Set<ChildProcess>();
process.once('exit', () => {
  for (const c of running) c.kill('SIGKILL');
});

/** Start a server and wait until it accepts connections on the port or socket. */
export async function startServer(cmd: string, args: string[], ready: { port: number } | { path: string }, env?: NodeJS.ProcessEnv): Promise<RunningServer> {
  const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'], env: env ?? process.env });
  running.add(child);
  let out = '';
  child.stdout?.on('data', (d: Buffer) => (out += String(d)));
  child.stderr?.on('data', (d: Buffer) => (out += String(d)));
  const exited = new Promise<void>((r) => child.once('exit', () => r()));
  const stop = async (): Promise<void> => {
    if (child.exitCode === null && child.signalCode === null) {
      child.kill('SIGTERM');
      const t = setTimeout(() => child.kill('SIGKILL'), 3000);
      await exited;
      clearTimeout(t);
    }
    running.delete(child);
    if ('path' in ready) fs.rmSync(ready.path, { force: true });
  };
  const deadline = Date.now() + 15_000;
  for (;;) {
    if (child.exitCode !== null || child.signalCode !== null) throw new Error(`${cmd} exited: ${out.trim()}`);
    if (await canConnect(ready)) return { child, output: () => out, stop };
    if (Date.now() > deadline) {
      await stop();
      throw new Error(`${cmd} ${args.join(' ')} not ready: ${out.trim()}`);
    }
    await new Promise((r) => setTimeout(r, 30));
  }
}
