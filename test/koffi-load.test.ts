// koffi is loaded in worker threads one at a time (drivers/util/koffi-load.ts): loading
// the addon in two threads at once crashed a process in CI. Each case runs in child
// processes: a crash there is a failed exit, not the end of the test run.
import { expect } from 'chai';
import { spawn } from 'node:child_process';

const child = new URL('./helpers/koffi-load.js', import.meta.url).pathname;

function run(args: string[]): Promise<{ code: number | null; signal: string | null; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    const p = spawn(process.execPath, [child, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    p.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    p.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    p.on('close', (code, signal) => resolve({ code, signal, stdout, stderr }));
  });
}

describe('koffi loaded by several threads at once (koffi-load.ts)', function () {
  this.timeout(120_000);
  const runs = process.env.TSMOUNT_SOAK === '1' ? 200 : 10;

  it(`four threads and the main thread load it at once, under the lock (${runs} processes)`, async function () {
    for (let i = 0; i < runs; i++) {
      const r = await run(['4']);
      expect({ code: r.code, signal: r.signal, stderr: r.stderr }, `run ${i}`).to.deep.equal({ code: 0, signal: null, stderr: '' });
      const out = JSON.parse(r.stdout) as { pids: number[]; self: number; lock: number; libdeflate: boolean };
      expect(out.pids, 'each thread called into libc').to.deep.equal([out.self, out.self, out.self, out.self]);
      expect(out.lock, 'the lock is free after the loads').to.equal(0);
    }
  });

  it('a lock left held (a thread that died in its load) is taken over after the wait, and free again after', async function () {
    const r = await run(['2', 'stuck']);
    expect({ code: r.code, signal: r.signal, stderr: r.stderr }).to.deep.equal({ code: 0, signal: null, stderr: '' });
    const out = JSON.parse(r.stdout) as { pids: number[]; self: number; lock: number };
    expect(out.pids).to.deep.equal([out.self, out.self]);
    expect(out.lock).to.equal(0);
  });
});
